"""Checkpoint folders of a run: `<output_dir>/checkpoints/step_XXXXXXXX` (Accelerate `save_state`).

A save is written beside its final name, completed by a marker (`complete.json`: the run's
identity, the step, every file's size and SHA-256) written last, and renamed into place, so a
run killed mid-save never leaves a half checkpoint as the latest. Loading checks the marker
against the files and falls back to the previous checkpoint when the newest is damaged
(truncated, a file missing), with a warning naming the bad folder.

A run's identity is a hash of the fields that decide its result (`identity_hash`); the caller
chooses them. Retention only ever deletes checkpoints of the identity being saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator

MARKER = "complete.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used: the message names the folder and the fault."""


def identity_hash(fields: dict[str, Any]) -> str:
    """A short stable hash of a run's identity fields (dotted name -> value)."""
    text = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Every renamed-into-place checkpoint folder of `output_dir`, oldest first."""
    return sorted(p for p in Path(output_dir, "checkpoints").glob("step_*")
                  if p.is_dir() and not p.name.endswith(".tmp"))  # .tmp: a save cut short


def read_marker(ckpt: Path) -> dict | None:
    """The completion marker of `ckpt`, or None when it is missing or unreadable."""
    try:
        marker = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "files" in marker else None


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoints can be GBs)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(ckpt: Path, deep: bool = True) -> str | None:
    """What is wrong with `ckpt` (None when intact): marker, files present at their recorded
    sizes and, when `deep`, their recorded SHA-256."""
    marker = read_marker(ckpt)
    if marker is None:
        return f"no readable {MARKER} (save not completed)"
    for name, meta in marker["files"].items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {meta['bytes']} were written"
        if deep and file_sha256(path) != meta["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of the run in `output_dir` (marker present, files
    at their sizes), or None."""
    for ckpt in reversed(checkpoint_dirs(output_dir)):
        if verify_checkpoint(ckpt, deep=False) is None:
            return ckpt
    return None


def _write_marker(folder: Path, step: int, identity: dict[str, Any] | None) -> None:
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
    marker = {"step": step, "identity": identity_hash(identity or {}),
              "fields": identity or {}, "files": files}
    tmp = folder / (MARKER + ".part")
    with tmp.open("w") as f:
        json.dump(marker, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(folder / MARKER)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int,
                    identity: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Save the prepared objects' state at `step` (every rank takes part), completed by its
    marker; keep the newest `keep` checkpoints of this identity (others are not ours to delete).
    """
    final = Path(output_dir) / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)  # every rank writes its RNG state here
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_marker(tmp, step, identity)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        ours = identity_hash(identity or {})
        mine = [p for p in checkpoint_dirs(output_dir)
                if (m := read_marker(p)) is not None and m.get("identity") == ours]
        for old in mine[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, output_dir: str | Path) -> Path | None:
    """Load the newest intact checkpoint of `output_dir` into the prepared objects; a damaged
    one is skipped with a warning naming it. Returns the folder loaded, or None (none usable)."""
    for ckpt in reversed(checkpoint_dirs(output_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            try:
                accelerator.load_state(str(ckpt))
                return ckpt
            except Exception as err:  # noqa: BLE001 - any library error: try the previous one
                problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(f"warning: checkpoint {ckpt} is unusable ({problem}); trying the previous one",
              file=sys.stderr, flush=True)
    return None
