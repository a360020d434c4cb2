"""Shared pieces of the sweep tests: a tiny training configuration, a tiny search space, and a
throwaway PostgreSQL cluster on loopback that a test can stop and start."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

# A digits run of a few seconds on one CPU thread (train.steps <= 6, few images).
TINY_FIXED = {
    "train.steps": 4, "eval.every": 2, "data.num_images": 32, "data.eval_images": 16,
    "train.batch_size": 4, "eval.batch_size": 16, "train.checkpoint_every": 2,
    "model.backbone": "cnn4",
}


def write_space(path: Path, fixed: dict | None = None, params: dict | None = None) -> Path:
    space = {
        "fixed": {**TINY_FIXED, **(fixed or {})},
        "params": params or {
            "ppc.tau": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
            "ppc.w_intra": {"type": "categorical", "choices": [0.0, 0.1]},
            "ppc.neg_drop": {"type": "int", "low": 0, "high": 4,
                             "when": {"ppc.w_intra": {"gt": 0}}},
        },
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture
def tiny_space(tmp_path: Path) -> Path:
    return write_space(tmp_path / "tiny.yaml")


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    """A PostgreSQL cluster of its own: `url`, and `stop()` / `start()` for outages."""

    url: str
    pg_ctl: list[str]
    data: Path
    opts: str
    log: Path

    def start(self, check: bool = True) -> None:
        """Start the server (`check=False`: it may be running already)."""
        subprocess.run([*self.pg_ctl, "-D", str(self.data), "-o", self.opts, "-l", str(self.log),
                        "-w", "start"], check=check, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"],
                       capture_output=True)


@pytest.fixture(scope="module")
def postgres():
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if not initdb:
        pytest.skip("no PostgreSQL server binaries (initdb): `make postgres-bin` installs them")
    bindir = Path(initdb).parent
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="ppc-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to own the cluster")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust",
                    "-U", "postgres", "--no-sync"], check=True, capture_output=True)
    pg = Postgres(f"postgresql://postgres@127.0.0.1:{port}/ppc", [*as_user, str(bindir / "pg_ctl")],
                  data, f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
                  root / "log")
    pg.start()
    try:
        subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "postgres", "ppc"], check=True, capture_output=True)
        yield pg
    finally:
        pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
