"""Checkpoint folders of a run: `<output_dir>/checkpoints/step_XXXXXXXX` (Accelerate `save_state`).

A save is written beside its final name and renamed into place, so a run killed mid-save never
leaves a half checkpoint as the latest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of the run in `output_dir`, or None."""
    ckpts = sorted(p for p in Path(output_dir, "checkpoints").glob("step_*")
                   if not p.name.endswith(".tmp"))  # a save cut short by a kill
    return ckpts[-1] if ckpts else None


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int = 2) -> Path:
    """Save the prepared objects' state at `step` (every rank takes part); keep the newest `keep`."""
    final = output_dir / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)  # every rank writes its RNG state here
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(final.parent.glob("step_*"))[:-keep]:
            if not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
