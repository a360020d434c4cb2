"""A run's claim on its folder, and its stop signals.

`claim_output_dir`: a run never continues another's work. The folder's checkpoints carry the
identity of the run that wrote them (`experiments.config.identity_fields`); a different one stops
the run before it writes anything, naming the fields that differ. `train.resume=false` moves a
previous run aside instead of mixing the two. One process at a time trains in a folder.

`StopSignals`: SIGTERM / SIGINT ask the loop to stop after the step in progress (with a
checkpoint); a second one aborts at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from experiments.config import ConfigError
from ppc_core.checkpoint import checkpoint_dirs, identity_hash, read_marker

LOCK = ".lock"
PREVIOUS = "previous"


class RunFolderConflict(ConfigError):
    """`train.output_dir` holds another run's work, or another process is training there."""


def _show(v: Any) -> str:
    return "unset" if v is _MISSING else repr(v)


_MISSING = object()


def folder_conflict(out: Path, fields: dict[str, Any]) -> str | None:
    """Why `out` cannot be resumed by the run with identity `fields` (None: it can, or it holds
    no checkpoint). Reads only."""
    ckpts = checkpoint_dirs(out)
    markers = [m for m in map(read_marker, ckpts) if m is not None]
    if ckpts and not markers:
        return (f"train.output_dir={out} holds checkpoints without a run identity (written by an "
                f"older version)")
    ours = identity_hash(fields)
    theirs = next((m for m in markers if m.get("identity") != ours), None)
    if theirs is None:
        return None
    old = theirs.get("fields", {})
    diff = [k for k in sorted({*fields, *old}) if fields.get(k, _MISSING) != old.get(k, _MISSING)]
    shown = ", ".join(f"{k} ({_show(fields.get(k, _MISSING))} here, "
                      f"{_show(old.get(k, _MISSING))} there)" for k in diff[:6])
    more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
    return (f"train.output_dir={out} holds checkpoints of another run (step {theirs.get('step')}) "
            f"that differs in {shown}{more}")


def move_aside(out: Path) -> Path:
    """Move everything a previous run left in `out` into `out/previous/<UTC time>/`."""
    dest = out / PREVIOUS / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.mkdir(parents=True)
    for entry in out.iterdir():
        if entry.name not in (PREVIOUS, LOCK):
            shutil.move(str(entry), dest / entry.name)
    return dest


def _lock(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel if we die
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunFolderConflict(f"train.output_dir={out} is in use by another training process "
                                f"(pid {holder}); wait for it or choose another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


@contextmanager
def claim_output_dir(accelerator: Accelerator, out: Path, fields: dict[str, Any],
                     resume: bool) -> Iterator[None]:
    """Check `out` against this run's identity, move a previous run aside when not resuming,
    and hold the folder's lock for the run. The main process decides; every rank raises the same
    `RunFolderConflict`."""
    fd, error = None, [None]
    if accelerator.is_main_process:
        try:
            if resume:
                if (why := folder_conflict(out, fields)) is not None:
                    raise RunFolderConflict(
                        f"{why}; choose another train.output_dir, or train.resume=false to move "
                        f"that run aside into {out / PREVIOUS}/")
                fd = _lock(out)
            else:
                fd = _lock(out)
                if any(e.name not in (PREVIOUS, LOCK) for e in out.iterdir()):
                    print(f"train.resume=false: previous run moved to {move_aside(out)}",
                          file=sys.stderr, flush=True)
        except RunFolderConflict as err:
            error = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        raise RunFolderConflict(error[0])
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


class StopSignals:
    """While active (main thread only; elsewhere it does nothing), SIGTERM and SIGINT are
    requests the training loop honours after its step; a second one aborts. Calling the object
    returns the first request's name, or None. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> str | None:
        return self.received

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # asked twice: stop now, checkpoint or not
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = name
        print(f"{name}: finishing the current step, then saving a checkpoint "
              f"(send it again to abort now)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
