"""`python -m experiments.pretrain`: the cnn4 backbone learns single-digit classification.

The reference starts PPC from ImageNet weights, whose CAMs localise from the first step; the
bundled digits task has no such weights, so this makes the stand-in: cnn4 + global average
pooling + a linear layer learn to name the one digit of a scene (a photo crop with one digit
pasted on it, as in the WSSS data). Training scenes draw their digits from the training pool
only; held-out accuracy is measured on scenes built from the val pool, whose digits the network
never sees. Only the backbone's state dict is saved (the classifier is thrown away), in the key
format `model.pretrained=<file>` loads.

    python -m experiments.pretrain                     # 1,500 steps, seed 0, runs/pretrain
    OMP_NUM_THREADS=1 python -m experiments.pretrain --out experiments/weights/cnn4_digits.pt  # the shipped file

Deterministic from --seed on a given machine and thread count: the scenes come from the seeded
generator, the batches and flips from seeded torch generators. The run is tracked like a
training run: config.json (with provenance), metrics.json, an offline W&B run (--trackers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from experiments.config import WEIGHTS_DIR
from experiments.tracking import provenance
from ppc_core.checkpoint import file_sha256
from ppc_core.data.digits import DEFAULT_CANVAS, NUM_CLASSES, single_digit_scenes
from ppc_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ppc_core.models.backbone import CNN4

SHIPPED_WEIGHTS = WEIGHTS_DIR / "cnn4_digits.pt"
# SHA-256 of SHIPPED_WEIGHTS; a test holds the file to it. Regenerate with REGENERATE.
SHIPPED_SHA256 = "74f3ad8a80ed0704e7bcd4ff7b31fd58f0973bca0bbba57aa1eb43d6f2240a23"
REGENERATE = "OMP_NUM_THREADS=1 python -m experiments.pretrain --out experiments/weights/cnn4_digits.pt"


@dataclass
class PretrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 0.002
    weight_decay: float = 1e-4
    seed: int = 0
    canvas: int = DEFAULT_CANVAS
    train_images: int = 8000  # distinct training scenes (digits from the training pool)
    eval_images: int = 1000  # held-out scenes (digits from the val pool)
    eval_every: int = 250
    output_stride: int = 8
    output_dir: str = "runs/pretrain"
    out: str = ""  # where the backbone weights go ("" = <output_dir>/cnn4_digits.pt)
    data_root: str = ""  # digits cache folder ("" = the default cache)
    trackers: list[str] = field(default_factory=lambda: ["wandb"])

    def check(self) -> None:
        for name in ("steps", "batch_size", "train_images", "eval_images", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.canvas < 16:
            raise ValueError(f"--canvas must be >= 16, got {self.canvas}")
        if self.output_stride not in (8, 16):
            raise ValueError(f"--output-stride must be 8 or 16, got {self.output_stride}")

    @property
    def weights_path(self) -> Path:
        return Path(self.out) if self.out else Path(self.output_dir) / "cnn4_digits.pt"


class DigitClassifier(nn.Module):
    """cnn4 -> global average pooling -> linear: (B, 3, H, W) -> (B, NUM_CLASSES) logits."""

    def __init__(self, output_stride: int = 8) -> None:
        super().__init__()
        self.backbone = CNN4(output_stride)
        self.fc = nn.Linear(self.backbone.out_channels, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        fea = self.backbone(x, low=False).fea
        return self.fc(fea.mean(dim=(2, 3)))


class _Scenes:
    """uint8 scenes and digit ids, served as ImageNet-normalised float batches."""

    def __init__(self, split: str, cfg: PretrainConfig, num_images: int) -> None:
        arrays = single_digit_scenes(split, num_images, cfg.canvas, cfg.seed,
                                     cfg.data_root or None)
        self.images = torch.from_numpy(np.ascontiguousarray(arrays.images)).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(arrays.labels.argmax(1).astype(np.int64))
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor, flip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = (self.images[index].float() / 255.0 - self.mean) / self.std
        if flip is not None:  # the WSSS training flips its scenes too
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[index]


@torch.no_grad()
def accuracy(model: nn.Module, scenes: _Scenes, batch_size: int = 250) -> float:
    """Fraction of scenes whose digit is the arg-max logit (model left in eval mode)."""
    model.eval()
    correct = 0
    for start in range(0, len(scenes), batch_size):
        x, y = scenes.batch(torch.arange(start, min(start + batch_size, len(scenes))))
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(scenes)


def pretrain(cfg: PretrainConfig, progress: bool = True) -> dict:
    """Train, save the backbone's state dict to cfg.weights_path; returns the metrics."""
    cfg.check()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**asdict(cfg), **provenance()}, indent=2))
    accelerator = None
    if cfg.trackers:
        from accelerate import Accelerator

        os.environ.setdefault("WANDB_MODE", "offline")
        accelerator = Accelerator(cpu=True, log_with=cfg.trackers, project_dir=str(out))
        accelerator.init_trackers("ppc", config={**asdict(cfg), **provenance()},
                                  init_kwargs={"wandb": {"dir": str(out), "name": "pretrain",
                                                         "tags": ["pretrain"]}})

    train_set = _Scenes("train", cfg, cfg.train_images)
    held_out = _Scenes("val", cfg, cfg.eval_images)
    torch.manual_seed(cfg.seed)
    model = DigitClassifier(cfg.output_stride)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Cosine decay to zero: the last steps settle the BatchNorm statistics the file keeps.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + np.cos(np.pi * min(s, cfg.steps) / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_set), generator=gen)
    cursor = 0
    history: list[dict] = []
    tic = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="pretrain", disable=not progress)
    loss_avg = None
    for step in bar:
        model.train()
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(train_set), generator=gen), 0
        index = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x, y = train_set.batch(index, torch.rand(len(index), generator=gen) < 0.5)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = loss.item()
        loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
        logs = {"train/loss": value, "train/lr": optimizer.param_groups[0]["lr"]}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = accuracy(model, held_out)
            history.append({"step": step, "held_out_accuracy": acc})
            logs["eval/held_out_accuracy"] = acc
            bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc:.3f}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss_avg:.3f}")
        if accelerator is not None:
            accelerator.log(logs, step=step)

    path = cfg.weights_path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.backbone.state_dict(), path)
    metrics = {"step": cfg.steps, "held_out_accuracy": history[-1]["held_out_accuracy"],
               "train_loss_ema": loss_avg, "weights": str(path), "sha256": file_sha256(path),
               "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - tic, 1),
               "history": history}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if accelerator is not None:
        accelerator.end_training()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    defaults = PretrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, list):
            p.add_argument(flag, nargs="*", default=value, help=f"default {value}")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"default {value!r}")
    args = vars(p.parse_args(argv))
    cfg = PretrainConfig(**args)
    try:
        cfg.check()
    except ValueError as err:
        print(f"pretrain: {err}", file=sys.stderr)
        return 2
    metrics = pretrain(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
