"""The CPU image, built and run by a real engine (podman): a short `ppc-train` and a tiny sweep
(`create`, `run`, `status`, `report`) as the unprivileged user on a named volume, then the
files on the volume (metrics, checkpoints, W&B offline runs and their artifact files) are
checked, with their owner. The commands are docker/README.md's (`test_readme_shows_...`).

Slow (a cold build downloads the dependencies; layers are kept under ~/.cache/ppc-sweeps-tests
so later runs rebuild in seconds). Skipped with a message where no engine can run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import uuid
from pathlib import Path

import pytest

from tests.docker.conftest import CPU_DOCKERFILE as DOCKERFILE
from tests.docker.engine import REPO, Podman
from tests.experiments.test_tracking import wandb_records

README = REPO / "docker" / "README.md"
IMAGE = "ppc-sweeps:cpu"
UID, GID = 1234, 100  # GID 100 ("users") already exists in the base image

# The runs, written as docker/README.md shows them (`docker run` there, `podman run` here).
TINY = ("data.num_images=32 data.eval_images=16 train.steps=4 eval.every=2 "
        "train.batch_size=4 eval.batch_size=16 train.checkpoint_every=2 model.backbone=cnn4")
STORAGE = "sqlite:////runs/smoke/study.db"
RUNS = [
    f"--entrypoint ppc-train {IMAGE} train.output_dir=/runs/train {TINY}",
    f"{IMAGE} create --study smoke --storage {STORAGE} --space demo -- {TINY}",
    f"{IMAGE} run --study smoke --storage {STORAGE} --root /runs --n-trials 2",
    f"{IMAGE} status --study smoke --storage {STORAGE}",
    f"{IMAGE} report --study smoke --storage {STORAGE} --root /runs",
]


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\\\n", " "))


def test_readme_shows_the_commands_the_image_test_runs():
    readme = _flat(README.read_text()).replace("$TINY", TINY)
    assert f'TINY="{TINY}"' in readme
    for run in RUNS:
        assert f"-v ppc-runs:/runs {run}" in readme, run


def _layers(podman: Podman, tag: str) -> list[str]:
    return json.loads(podman("image", "inspect", "--format", "{{json .RootFS.Layers}}", tag).stdout)


@pytest.mark.slow
def test_other_ids_reuse_the_dependency_layer(podman: Podman, cpu_image: str):
    """PPC_UID/PPC_GID of the host user, here an existing GID: builds, and shares every layer
    but the last ones (source and user) with the default image, so it takes seconds."""
    image = cpu_image
    tag = f"{IMAGE}-{UID}-{GID}"
    seconds = podman.build(DOCKERFILE, tag, f"PPC_UID={UID}", f"PPC_GID={GID}")
    print(f"\nrebuild with PPC_UID={UID} PPC_GID={GID}: {seconds:.0f} s")
    default, other = _layers(podman, image), _layers(podman, tag)
    assert len(default) == len(other) and default[:-1] == other[:-1]
    user = podman("run", "--rm", "--entrypoint", "id", tag).stdout.split()
    podman("rmi", tag, check=False)
    assert user[:2] == [f"uid={UID}(ppc)", f"gid={GID}(users)"], user


@pytest.mark.slow
def test_nothing_of_this_machine_enters_the_image(podman: Podman, cpu_image: str):
    """The build-time CA mount (root's HOME) leaves no pip configuration or CA in the image."""
    image = cpu_image
    script = ("test ! -e /root/.config/pip && test ! -e /etc/pip.conf && "
              "test ! -e /etc/xdg/pip && ! find / -xdev -name ca.crt | grep -q .")
    podman("run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c", script)
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "ca.crt" not in history and "pip.conf" not in history


@pytest.mark.slow
def test_image_trains_and_sweeps_on_a_volume(podman: Podman, cpu_image: str):
    image = cpu_image
    volume = f"ppc-runs-test-{uuid.uuid4().hex[:8]}"
    podman("volume", "create", volume)
    try:
        for run in RUNS:
            argv = shlex.split(run)
            # each a fresh --rm container: its HOME (W&B's default staging place) is thrown away
            proc = podman("run", "--rm", "-e", "WANDB_MODE=offline", "-v", f"{volume}:/runs",
                          *argv, timeout=900)
            if argv[-1].startswith("--n-trials") or "status" in argv:
                assert "best: trial" in proc.stdout, proc.stdout
        mount = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume)
                     .stdout.strip())
        _check_volume(mount, uid=_image_uid(podman, image))
    finally:
        podman("volume", "rm", "-f", volume, check=False)


def _image_uid(podman: Podman, image: str) -> int:
    return int(podman("run", "--rm", "--entrypoint", "id", image, "-u").stdout)


def _check_artifact(run_dir: Path) -> None:
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    (artifact,) = list(wandb_records(run_file, "artifact"))
    entries = {e.path: e.local_path for e in artifact.manifest.contents}
    assert "metrics.json" in entries and any(p.startswith("checkpoint/") for p in entries)
    for name, local in entries.items():
        assert not os.path.isabs(local) and (run_dir / local).is_file(), (name, local)


def _check_volume(mount: Path, uid: int) -> None:
    train = mount / "train"
    assert json.loads((train / "metrics.json").read_text())["step"] == 4
    assert list(train.glob("checkpoints/step_*/model*.safetensors")), sorted(train.rglob("*"))
    _check_artifact(train)
    trials = sorted(mount.glob("smoke/trial_*/seed_0"))
    assert len(trials) >= 2, sorted(mount.rglob("*"))
    for seed_dir in trials:
        if (seed_dir / "metrics.json").is_file():
            _check_artifact(seed_dir)
    assert list(mount.glob("smoke/report/wandb/offline-run-*/run-*.wandb"))
    assert (mount / "smoke" / "report" / "report.md").is_file()
    wrong = [p for p in mount.rglob("*") if p.lstat().st_uid != uid]
    assert wrong == [], f"not owned by the image's user {uid}: {wrong[:5]}"
