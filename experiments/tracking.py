"""Run tracking through Accelerate's tracker API: config, provenance, images and artifacts.

Only the main process writes to a tracker (Accelerate's `log` already ensures that for
scalars; the artifact calls below check it themselves).

W&B: `WANDB_MODE` is the user's and is never changed here. Unset, a run goes online where W&B
credentials are present and offline otherwise (`wandb_mode`). Everything a run writes for W&B
lives in its own folder: the offline run in `<output_dir>/wandb/`, and the artifact records its
files (metrics, overlays, checkpoint) by paths relative to `<output_dir>`, so a copied or moved
run folder syncs whole with `cd <output_dir> && wandb sync wandb/offline-run-*`.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlparse

from accelerate import Accelerator

from experiments.config import RunConfig, flatten, run_identity
from ppc_core.checkpoint import latest_checkpoint
from ppc_core.evaluate import EvalResult
from ppc_core.viz import overlay_grid, save_png

_LIBRARIES = ("torch", "torchvision", "accelerate", "optuna", "wandb", "hydra-core", "numpy")


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


def _netrc_has_wandb_key(env: Mapping[str, str]) -> bool:
    """Whether `wandb login` left a key for the W&B host in the netrc file."""
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    path = env.get("NETRC") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The W&B mode a run uses and why: the user's `WANDB_MODE` when set; otherwise online
    where credentials exist (`WANDB_API_KEY`, or a `wandb login` entry in the netrc file),
    offline elsewhere."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"], "WANDB_MODE is set"
    if env.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY is set"
    if _netrc_has_wandb_key(env):
        return "online", "found a `wandb login` key"
    return "offline", "no W&B credentials (WANDB_API_KEY or `wandb login`)"


def announce_wandb_mode(where: str | Path) -> str:
    """Print (stderr) which W&B mode a run uses and where it writes; returns the mode."""
    mode, why = wandb_mode()
    print(f"W&B: {mode} ({why}); run files in {where}", file=sys.stderr)
    return mode


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run the block with `folder` as the working directory, so that the paths W&B records
    for an artifact's files are relative to the run folder (they stay valid when it moves)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def start_tracking(accelerator: Accelerator, cfg: RunConfig) -> None:
    config = {**flatten(asdict(cfg)), "run.identity": run_identity(cfg), **provenance()}
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if not cfg.track.trackers:
        return
    t = cfg.track
    wandb_kwargs = {"dir": str(out), "group": t.group or None, "name": t.run_name or None,
                    "tags": list(t.tags) or None}
    if "wandb" in t.trackers:
        # Passed to this run only: os.environ (the user's WANDB_MODE) stays as it was.
        wandb_kwargs["mode"] = wandb_mode()[0]
        if accelerator.is_main_process:
            announce_wandb_mode(out / "wandb")
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
    # "immutable": the run's own files are the payload (no copy in W&B's staging folder, which
    # defaults to $HOME and is lost with a throwaway container); they are final at this point.
    ckpt = latest_checkpoint(out)
    with inside(out):
        art.add_file("metrics.json", policy="immutable")
        if grid is not None:
            art.add_file(grid.name, policy="immutable")
        if ckpt is not None:
            art.add_dir(os.path.relpath(ckpt, out), name="checkpoint", policy="immutable")
        run.log_artifact(art)
