"""Fixtures of the image tests: the engine (skipped with a message where none can run) and the
CPU image built from docker/Dockerfile.cpu (layers cached between runs)."""

from __future__ import annotations

import pytest

from tests.docker.engine import REPO, Podman, unavailable

CPU_DOCKERFILE = REPO / "docker" / "Dockerfile.cpu"
CPU_IMAGE = "ppc-sweeps:cpu"


@pytest.fixture(scope="session")
def podman() -> Podman:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    engine = Podman()
    info = engine("info", check=False, timeout=120)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip().splitlines()[-1:]}")
    return engine


@pytest.fixture(scope="session")
def cpu_image(podman: Podman) -> str:
    seconds = podman.build(CPU_DOCKERFILE, CPU_IMAGE)
    print(f"\nbuild {CPU_DOCKERFILE.name}: {seconds:.0f} s")
    return f"localhost/{CPU_IMAGE}"
