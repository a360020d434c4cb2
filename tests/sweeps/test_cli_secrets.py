"""`ppc-sweep` never prints a storage password (compose logs and CI logs are widely read)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sweeps.cli import shown
from tests.sweeps.conftest import write_space

REPO = Path(__file__).resolve().parents[2]


def test_shown_hides_only_the_password() -> None:
    assert shown("postgresql+psycopg://ppc:s3cr%40t@postgres:5432/optuna") == \
        "postgresql+psycopg://ppc:***@postgres:5432/optuna"
    assert shown("postgresql://ppc@db/optuna") == "postgresql://ppc@db/optuna"
    assert shown("sqlite:////runs/s/study.db") == "sqlite:////runs/s/study.db"


def test_create_and_errors_do_not_print_the_password(tmp_path: Path, postgres) -> None:
    secret = "hunter2-do-not-print"
    url = postgres.url.replace("postgres@", f"postgres:{secret}@")  # trust auth: any password
    space = write_space(tmp_path / "s.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv in (["create", "--study", "s", "--space", str(space)],
                 ["status", "--study", "missing"]):
        proc = subprocess.run([sys.executable, "-m", "sweeps.cli", *argv, "--storage", url],
                              capture_output=True, text=True, env=env, timeout=300)
        assert secret not in proc.stdout + proc.stderr
        assert ":***@127.0.0.1" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
