"""Typed run configuration: Hydra structured configs, validated once at the entry point.

Every field below is a Hydra override (`ppc-train ppc.tau=0.05 train.steps=200`) and a
possible sweep dimension (`sweeps/spaces/*.yaml` name fields by their dotted path).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from ppc_core.checkpoint import identity_hash
from ppc_core.losses.ppc import PPCConfig


class ConfigError(ValueError):
    """A config value outside its allowed range; the message starts with the dotted field."""


@dataclass
class DataConfig:
    name: str = "digits"  # digits | voc
    root: str = ""  # VOC: the VOC2012 folder; digits: cache folder ("" = default cache)
    train_split: str = "train"
    eval_split: str = "val"
    crop_size: int = 64
    # The second view: the crop bilinearly rescaled to this size (reference: 128 for 448 crops).
    target_size: int = 32
    target_flip: bool = False
    num_images: int = 0  # digits: training canvases (0 = the data set's default)
    eval_images: int = 0  # digits: evaluation canvases (0 = default)
    num_workers: int = 0
    skip_corrupt: bool = False

    def check(self) -> None:
        _one_of("name", self.name, ("digits", "voc"))
        if self.name == "voc" and not self.root:
            raise ConfigError("root must name the local VOC2012 folder when name=voc")
        _at_least("crop_size", self.crop_size, 8)
        _at_least("target_size", self.target_size, 8)
        _at_least("num_images", self.num_images, 0)
        _at_least("eval_images", self.eval_images, 0)
        _at_least("num_workers", self.num_workers, 0)


@dataclass
class ModelConfig:
    backbone: str = "cnn4"  # cnn4 | resnet18 | resnet34 | resnet50 | resnet101
    output_stride: int = 8
    proj_dim: int = 128
    pcm: bool = False  # SEAM's pixel correlation module
    pretrained: str = ""  # "" random init | local state-dict path | "torchvision" (online)
    freeze_bn: bool = False  # keep pretrained BatchNorm statistics, as the reference does

    def check(self) -> None:
        _one_of("backbone", self.backbone, ("cnn4", "resnet18", "resnet34", "resnet50", "resnet101"))
        _one_of("output_stride", self.output_stride, (8, 16))
        _at_least("proj_dim", self.proj_dim, 1)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (the reference) | adamw
    lr: float = 0.01
    momentum: float = 0.9  # SGD; the reference passes weight decay here by mistake (0.0005)
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    # LR multipliers of backbone weights, backbone biases, new-layer weights, new-layer biases.
    group_lr_mults: list[float] = field(default_factory=lambda: [1.0, 2.0, 10.0, 20.0])

    def check(self) -> None:
        _one_of("name", self.name, ("sgd", "adamw"))
        if len(self.group_lr_mults) != 4 or any(m <= 0 for m in self.group_lr_mults):
            raise ConfigError(f"group_lr_mults must be 4 numbers > 0, got {self.group_lr_mults}")
        _positive("lr", self.lr)
        _in_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _at_least("weight_decay", self.weight_decay, 0.0)
        _positive("poly_power", self.poly_power)


@dataclass
class LossConfig:
    use_ppc: bool = True
    # PPC from step 0 stalls a randomly initialised network: start it late and ramp it in.
    ppc_start_step: int = 0
    ppc_ramp_steps: int = 0
    seam: bool = False  # SEAM's ER / ECR / min-pooling terms (needs model.pcm for ECR)
    w_er: float = 1.0
    w_ecr: float = 1.0
    w_min_pool: float = 1.0

    def check(self) -> None:
        _at_least("ppc_start_step", self.ppc_start_step, 0)
        _at_least("ppc_ramp_steps", self.ppc_ramp_steps, 0)
        for name in ("w_er", "w_ecr", "w_min_pool"):
            _at_least(name, getattr(self, name), 0.0)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    # Train on CPU even where a GPU exists; required to run on CPU where GPUs were expected
    # (CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES set) but CUDA is not available.
    cpu: bool = False
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    # "" = runs/train/<run identity>: each configuration its own folder, the same one again.
    output_dir: str = ""
    # Continue from output_dir's last checkpoint (of the same identity: else an error); false
    # moves a previous run in output_dir aside into output_dir/previous/<time>/ and starts anew.
    resume: bool = True
    # How long a process waits in a collective for the others (gradient sync, evaluation's
    # reduce, checkpoint barriers) before the run fails; covers rank 0's extra work (logging,
    # the sweep's report, checkpoint writes).
    dist_timeout_s: int = 1800

    def check(self) -> None:
        _at_least("steps", self.steps, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("grad_accum", self.grad_accum, 1)
        _one_of("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _at_least("log_every", self.log_every, 1)
        _at_least("checkpoint_every", self.checkpoint_every, 1)
        _at_least("dist_timeout_s", self.dist_timeout_s, 1)


@dataclass
class EvalConfig:
    every: int = 100  # steps between evaluations; each one is reported to a sweep's pruner
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = True
    bg_threshold: float = 0.2  # pseudo masks
    max_batches: int = 0  # 0 = the whole split
    batch_size: int = 32
    num_samples: int = 8  # overlays in the run's image grid

    def check(self) -> None:
        _at_least("every", self.every, 1)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"scales must be a non-empty list of numbers > 0, got {self.scales}")
        _in_range("bg_threshold", self.bg_threshold, 0.0, 1.0)
        _at_least("max_batches", self.max_batches, 0)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("num_samples", self.num_samples, 0)


@dataclass
class TrackConfig:
    trackers: list[str] = field(default_factory=lambda: ["wandb"])  # any Accelerate tracker
    project: str = "ppc"
    group: str = ""
    run_name: str = ""
    tags: list[str] = field(default_factory=list)

    def check(self) -> None:
        allowed = ("wandb", "tensorboard", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
        for t in self.trackers:
            _one_of("trackers", t, allowed)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ppc: PPCConfig = field(default_factory=PPCConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _at_least(name: str, value: float, lo: float) -> None:
    if value < lo:
        raise ConfigError(f"{name} must be >= {lo}, got {value}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _in_range(name: str, value: float, lo: float, hi: float, hi_open: bool = False) -> None:
    if not (lo <= value < hi if hi_open else lo <= value <= hi):
        raise ConfigError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")


# Fields that cannot change a run's result (its checkpoints, metrics and reported history):
# where it writes, whether it resumes, how often it logs or checkpoints (resumption is exact),
# where it reports, how many overlay images it draws. Every other field, present or future, is
# part of the identity; `eval.every` too, since it decides the reported history and the steps at
# which a sweep's pruner may stop the run.
# data.num_workers: each batch is drawn from (seed, micro-step, rank) whichever process loads it.
NOT_IN_IDENTITY = ("train.output_dir", "train.resume", "train.log_every",
                   "train.checkpoint_every", "train.dist_timeout_s", "track.", "eval.num_samples",
                   "data.num_workers")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: dotted field names, as overrides and sweeps write them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def identity_fields(cfg: RunConfig) -> dict[str, Any]:
    """The fields of `cfg` that decide its result (dotted name -> value): a run's identity."""
    return {k: v for k, v in flatten(asdict(cfg)).items()
            if not any(k == n or (n.endswith(".") and k.startswith(n)) for n in NOT_IN_IDENTITY)}


def run_identity(cfg: RunConfig) -> str:
    """The short hash of `identity_fields(cfg)`, saved with every checkpoint and in config.json."""
    return identity_hash(identity_fields(cfg))


def to_run_config(cfg: DictConfig | RunConfig) -> RunConfig:
    """The one validation point: a composed Hydra config -> a checked `RunConfig`.

    Errors name the dotted field and the allowed range, e.g. `ppc.tau must be ...`.
    """
    run = cfg if isinstance(cfg, RunConfig) else None
    sections = {}
    for f in fields(RunConfig):
        try:
            section = getattr(run, f.name) if run else OmegaConf.to_object(cfg[f.name])
            if hasattr(section, "check"):
                section.check()
            elif hasattr(section, "__post_init__"):
                section.__post_init__()
        except ValueError as err:
            raise ConfigError(f"invalid config: {f.name}.{err}") from None
        sections[f.name] = section
    checked = RunConfig(**sections)
    if not checked.train.output_dir:
        checked.train = replace(checked.train,
                                output_dir=f"runs/train/{run_identity(checked)}")
    return checked


# Weights that ship with the package (experiments/weights/); presets name them as
# `${ppc_weights:cnn4_digits.pt}`, which resolves wherever the package is installed.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    OmegaConf.register_new_resolver("ppc_weights", lambda name: str(WEIGHTS_DIR / name),
                                    replace=True)


register_configs()  # importing the schema makes `run_schema` composable (Hydra, sweeps, tests)


def compose_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The `ppc-train` config with `preset` and `overrides`, composed by Hydra and validated:
    what the command line `ppc-train preset=... *overrides` would run (sweeps, benchmarks and
    tests compose through here)."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module("experiments.conf", version_base=None):
        cfg = compose("config", overrides=[f"preset={preset}", *overrides])
    return to_run_config(cfg)
