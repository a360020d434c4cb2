"""docker/compose.yaml brought up by a real engine (podman + podman-compose): PostgreSQL,
create-study and one worker on a tiny study, which ends complete; then the dashboard, which is
healthy (CMD-SHELL check) and stops at once (init). The storage password never shows in logs.

Stand-ins where registries cannot be reached: the CPU image (conftest) for the ppc services,
and PostgreSQL 15 from Debian on the stand-in base for `postgres:16.10-bookworm`. A test-local
override file only removes the GPU reservation (no GPU here) and mounts the tiny space file.
podman 4.3 (Debian 12) runs health checks only when asked and podman-compose then ignores
`service_healthy`: the test brings the services up in dependency order and waits for health
itself (`podman healthcheck run`); `service_completed_successfully` is checked by exit codes.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.docker.engine import REPO, Podman
from tests.docker.test_docker import compose_cli
from tests.sweeps.conftest import TINY_FIXED

COMPOSE = REPO / "docker" / "compose.yaml"
STANDIN = Path(__file__).parent / "postgres-standin"


def _postgres_image(podman: Podman, base: str) -> None:
    name = yaml.safe_load(COMPOSE.read_text())["services"]["postgres"]["image"]
    full = name if "/" in name else f"docker.io/library/{name}"
    if podman.has_image(full) or podman("pull", "-q", full, check=False, timeout=120).returncode == 0:
        return
    podman("build", "--layers", "--format", "docker", "--build-arg", f"BASE={base}", "-t", full,
           "-f", str(STANDIN / "Containerfile"), str(STANDIN), timeout=1200)


class Stack:
    def __init__(self, podman: Podman, project: str, env: dict[str, str], files: list[Path]):
        argv = compose_cli(env)
        if argv is None or not argv[-1].endswith("podman-compose"):
            pytest.skip("podman-compose not installed (dev extra)")
        self.podman, self.project, self.env = podman, project, env
        self.argv = [*argv, "-p", project, *[a for f in files for a in ("-f", str(f))]]

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.argv, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=COMPOSE.parent)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def container(self, service: str) -> str:
        names = self.podman("ps", "-a", "--format", "{{.Names}}", "--filter",
                            f"label=io.podman.compose.project={self.project}", "--filter",
                            f"label=com.docker.compose.service={service}").stdout.split()
        assert len(names) == 1, (service, names)
        return names[0]

    def wait_healthy(self, service: str, timeout: float = 180) -> None:
        name, deadline = self.container(service), time.monotonic() + timeout
        while self.podman("healthcheck", "run", name, check=False).returncode != 0:
            assert time.monotonic() < deadline, f"{service} not healthy in {timeout} s"
            time.sleep(2)

    def exit_code(self, service: str, timeout: float = 900) -> int:
        return int(self.podman("wait", self.container(service), timeout=timeout).stdout.split()[0])


@pytest.mark.slow
def test_compose_up_runs_a_study_to_completion(podman: Podman, cpu_image: str, tmp_path: Path):
    _postgres_image(podman, podman.base_image(REPO / "docker" / "Dockerfile.cpu"))
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({"fixed": TINY_FIXED, "params": {
        "ppc.tau": {"type": "float", "low": 0.05, "high": 0.5, "log": True}}}))
    space.chmod(0o644)
    override = tmp_path / "compose.test.yaml"
    mount = [f"{space}:/app/tiny.yaml:ro"]
    override.write_text(yaml.safe_dump({"services": {
        "create-study": {"volumes": mount},
        "worker": {"volumes": mount, "deploy": "RESET"},
    }}).replace("RESET", "!reset {}"))
    password = secrets.token_hex(16)
    project = f"ppc-test-{secrets.token_hex(4)}"
    env = {**podman.env, "POSTGRES_PASSWORD": password, "PPC_IMAGE": cpu_image,
           "PPC_DOCKERFILE": "docker/Dockerfile.cpu", "PPC_STUDY": "compose-smoke",
           "PPC_SPACE": "/app/tiny.yaml", "PPC_TRIALS_PER_WORKER": "1", "WANDB_MODE": "offline",
           "PATH": os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])}
    stack = Stack(podman, project, env, [COMPOSE, override])
    try:
        stack("up", "-d", "--no-build", "postgres")
        stack.wait_healthy("postgres")
        stack("up", "-d", "--no-build", "create-study")
        assert stack.exit_code("create-study") == 0
        stack("up", "-d", "--no-build", "--no-deps", "worker")
        assert stack.exit_code("worker") == 0, podman("logs", stack.container("worker")).stderr
        url = f"postgresql+psycopg://ppc:{password}@postgres:5432/optuna"
        status = stack("run", "--rm", "--no-deps", "worker", "status", "--study",
                       "compose-smoke", "--storage", url).stdout
        assert "complete 2" in status, status  # the study's baseline arm and one trial

        logs = "".join(podman("logs", stack.container(s)).stdout + podman(
            "logs", stack.container(s)).stderr for s in ("create-study", "worker"))
        assert password not in logs and "ppc:***@postgres" in logs, logs[-2000:]

        stack("up", "-d", "--no-build", "--no-deps", "dashboard")
        stack.wait_healthy("dashboard", timeout=120)
        start = time.monotonic()
        podman("stop", "-t", "10", stack.container("dashboard"))
        assert time.monotonic() - start < 5, "the dashboard ignored SIGTERM"
        assert stack.exit_code("dashboard") != 137
    finally:
        subprocess.run([*stack.argv, "down", "-v"], env=env, capture_output=True, timeout=300,
                       cwd=COMPOSE.parent)
