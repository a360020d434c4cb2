"""W&B from a training run: the user's WANDB_MODE is never changed, the mode follows the
credentials when it is unset, and a finished run's folder syncs whole after a move."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.tracking import wandb_mode
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def wandb_records(path: Path, kind: str):
    """Records of one type ("run", "artifact", ...) in an offline .wandb file (a LevelDB-style
    log of protobuf records in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, part = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if part in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == kind:
                yield getattr(record, kind)


def _bare_env(home: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without any W&B setting, with its own HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home), "XDG_DATA_HOME": str(home / ".local/share"),
            "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config"),
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **extra}


def test_mode_is_the_users_and_follows_credentials(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert wandb_mode({"HOME": str(home)})[0] == "offline"
    assert wandb_mode({"HOME": str(home), "WANDB_MODE": "disabled"})[0] == "disabled"
    assert wandb_mode({"HOME": str(home), "WANDB_API_KEY": "k" * 40})[0] == "online"
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40)
    assert wandb_mode({"HOME": str(home)})[0] == "online"
    # a key for another host is not a W&B login; a self-hosted server's is
    assert wandb_mode({"HOME": str(home), "WANDB_BASE_URL": "https://wandb.example"})[0] == "offline"
    (home / ".netrc").write_text("machine wandb.example login user password " + "k" * 40)
    assert wandb_mode({"HOME": str(home), "WANDB_BASE_URL": "https://wandb.example"})[0] == "online"
    assert wandb_mode({"HOME": str(home), "WANDB_MODE": "offline"})[0] == "offline"


def test_training_leaves_wandb_mode_unset(tmp_path: Path) -> None:
    """A run with WANDB_MODE unset and no credentials logs offline, says so, and does not put
    WANDB_MODE into the environment (a `wandb agent` parent's online mode would be lost)."""
    probe = ("import os, sys; from experiments.train import main; "
             "sys.argv = ['ppc-train', *sys.argv[1:]]; rc = 0\n"
             "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code or 0\n"
             "print('WANDB_MODE after run:', os.environ.get('WANDB_MODE'))\nsys.exit(rc)")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", probe,
                           *tiny_overrides(out, "track.trackers=[wandb]", "train.steps=2",
                                           "eval.every=2")],
                          env=_bare_env(tmp_path / "home"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WANDB_MODE after run: None" in proc.stdout
    assert "W&B: offline (no W&B credentials" in proc.stderr
    assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


@pytest.mark.slow
def test_moved_run_syncs_whole(tmp_path: Path) -> None:
    """Every file the run's artifact records lies inside the run folder, by a path relative to
    it: after moving the folder and changing HOME, each resolves inside the moved folder and
    exists, and nothing was staged in the first HOME (lost with a throwaway container)."""
    out, home = tmp_path / "a" / "run", tmp_path / "home1"
    proc = subprocess.run([sys.executable, "-m", "experiments.train",
                           *tiny_overrides(out, "track.trackers=[wandb]")],
                          env=_bare_env(home, WANDB_MODE="offline"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(out, moved)
    shutil.rmtree(tmp_path / "a")
    staged_in_home = [p for p in home.rglob("*") if p.is_file() and "artifacts" in p.parts]
    assert staged_in_home == []
    shutil.rmtree(home)

    (run_file,) = moved.glob("wandb/offline-run-*/run-*.wandb")
    (artifact,) = list(wandb_records(run_file, "artifact"))
    entries = {e.path: e.local_path for e in artifact.manifest.contents}
    assert {"metrics.json", "overlays.png"} <= set(entries)
    assert any(name.startswith("checkpoint/") for name in entries), sorted(entries)
    for name, local in entries.items():
        assert local and not os.path.isabs(local), (name, local)
        resolved = (moved / local).resolve()
        assert resolved.is_relative_to(moved.resolve()) and resolved.is_file(), (name, local)
        assert resolved.stat().st_size > 0
