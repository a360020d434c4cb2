"""Run tracking through Accelerate's tracker API: config, provenance, images and artifacts.

Only the main process writes to a tracker (Accelerate's `log` already ensures that for
scalars; the artifact calls below check it themselves).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from accelerate import Accelerator

from experiments.config import RunConfig, run_identity
from ppc_core.checkpoint import latest_checkpoint
from ppc_core.evaluate import EvalResult
from ppc_core.viz import overlay_grid, save_png

_LIBRARIES = ("torch", "torchvision", "accelerate", "optuna", "wandb", "hydra-core", "numpy")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def provenance() -> dict:
    """Git commit and dirty flag of the code, and the library versions."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    info = {"git.commit": git("rev-parse", "HEAD") or "unknown",
            "git.dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    for lib in _LIBRARIES:
        try:
            info[f"version.{lib}"] = version(lib)
        except PackageNotFoundError:
            info[f"version.{lib}"] = "missing"
    return info


def start_tracking(accelerator: Accelerator, cfg: RunConfig) -> None:
    config = {**_flatten(asdict(cfg)), "run.identity": run_identity(cfg), **provenance()}
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if not cfg.track.trackers:
        return
    t = cfg.track
    wandb_kwargs = {"dir": str(out), "group": t.group or None, "name": t.run_name or None,
                    "tags": list(t.tags) or None}
    accelerator.init_trackers(t.project, config=config,
                              init_kwargs={"wandb": {k: v for k, v in wandb_kwargs.items() if v}})


def finish_tracking(accelerator: Accelerator, out: Path, metrics: dict, result: EvalResult,
                    num_classes: int) -> None:
    """Overlay grid, metrics JSON and final checkpoint: files in `out`, artifacts in W&B."""
    grid = None
    if result.samples:
        s = result.samples
        grid = save_png(overlay_grid(s["images"], s["targets"], s["cams"], s["masks"],
                                     num_classes), out / "overlays.png")
    try:
        run = accelerator.get_tracker("wandb", unwrap=True)
    except (ValueError, KeyError):
        return
    if not hasattr(run, "log_artifact"):
        return
    import wandb

    if grid is not None:
        run.log({"eval/overlays": wandb.Image(str(grid))}, step=metrics["step"])
    summary = {k: v for k, v in metrics.items() if k not in ("history", "last_logs")}
    run.summary.update({f"final/{k}": v for k, v in summary.items()})
    art = wandb.Artifact(f"run-{run.id}", type="model", metadata=summary)
    art.add_file(str(out / "metrics.json"))
    if grid is not None:
        art.add_file(str(grid))
    if (ckpt := latest_checkpoint(out)) is not None:
        art.add_dir(str(ckpt), name="checkpoint")
    run.log_artifact(art)
