"""A container engine for the image tests: Debian's podman, driven through a test-local
configuration (storage under the user's cache folder, cgroupfs, runc, ulimits within this
process's hard limits) passed by environment variables: nothing system-wide is changed.

Registries of images may be unreachable (as on the machines this project is tested on): a
base image that cannot be pulled is replaced by a local stand-in, a `debootstrap` of the same
Debian release with its python3 + venv, tagged with the base's name. The Dockerfiles stay as
they are. Everything the build needs only because of this machine (the CA bundle pip must
trust, a reachable wheel index) is passed at build time (volumes, build arguments) and never
enters an image layer.
"""

from __future__ import annotations

import configparser
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ppc-sweeps-tests"
PYPI = "https://pypi.org/simple"


def _hard_limit(which: int, cap: int) -> int:
    hard = resource.getrlimit(which)[1]
    return cap if hard == resource.RLIM_INFINITY else min(hard, cap)


def unavailable() -> str | None:
    """Why no engine can run here, or None."""
    if shutil.which("podman") is None:
        return ("no container engine: `make container-bin` installs Debian's podman (as root on "
                "Debian/Ubuntu)")
    if os.geteuid() != 0:
        return "the image tests drive podman as root (rootless podman needs subuid set-up)"
    return None


@dataclass
class Podman:
    """podman with a private configuration; `env` also serves podman-compose."""

    root: Path = CACHE / "containers"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        run = Path(tempfile.mkdtemp(prefix="ppc-podman-run-"))
        (self.root / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.root / "storage"}"\n'
            f'runroot = "{run}"\n')
        nofile = _hard_limit(resource.RLIMIT_NOFILE, 1 << 20)
        nproc = _hard_limit(resource.RLIMIT_NPROC, 32768)
        (self.root / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\nruntime = "runc"\nevents_logger = "file"\n'
            f'volume_path = "{self.root / "volumes"}"\n')
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
                    "CONTAINERS_CONF": str(self.root / "containers.conf")}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def has_image(self, name: str) -> bool:
        return self("image", "exists", name, check=False).returncode == 0

    def base_image(self, dockerfile: Path) -> str:
        """The Dockerfile's FROM image, pulled or, where it cannot be, a stand-in."""
        name = next(line.split()[1] for line in dockerfile.read_text().splitlines()
                    if line.startswith("FROM "))
        full = name if "/" in name else f"docker.io/library/{name}"
        if self.has_image(full):
            return full
        if self("pull", "-q", full, check=False, timeout=120).returncode == 0:
            return full
        self._stand_in(full)
        return full

    def _stand_in(self, full: str) -> None:
        """debootstrap the base's Debian release with python3 + venv, import it as `full`."""
        release = re.search(r"-(bookworm|bullseye|trixie)\b", full)
        if not release:
            raise AssertionError(f"no Debian release in the base image name {full}")
        tarball = CACHE / f"standin-{release.group(1)}.tar"
        if not tarball.exists():
            if shutil.which("debootstrap") is None:
                raise AssertionError("the base image cannot be pulled and debootstrap is missing "
                                     "(`make container-bin` installs it)")
            rootfs = Path(tempfile.mkdtemp(prefix="ppc-standin-"))
            try:
                # python-is-python3: the official python images have `python` on PATH
                subprocess.run(["debootstrap", "--variant=minbase",
                                "--include=python3,python3-venv,python-is-python3",
                                release.group(1), str(rootfs), "http://deb.debian.org/debian"],
                               check=True, capture_output=True, timeout=1200)
                subprocess.run(["tar", "-C", str(rootfs), "-cf", f"{tarball}.part", "."],
                               check=True, capture_output=True)
                os.replace(f"{tarball}.part", tarball)
            finally:
                shutil.rmtree(rootfs, ignore_errors=True)
        self("import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]',
             str(tarball), full)

    def build(self, dockerfile: Path, tag: str, *build_args: str) -> float:
        """Build `dockerfile` (context: the repository) as `tag`; returns the seconds taken."""
        self.base_image(dockerfile)
        extra: list[str] = []
        index = wheel_index(dockerfile)
        if index:
            extra += ["--build-arg", f"TORCH_INDEX_URL={index}"]
        ca = machine_ca_bundle()
        if ca:
            # pip in the build trusts what pip here trusts: a folder with this machine's bundle
            # and a pip.conf naming it is mounted as root's HOME for each RUN. /root exists in
            # every base, so the mount leaves no trace in a layer (a new mount point would leave
            # an empty file), and no ENV or ARG of the Dockerfile is involved.
            home = self.root / "build-home"
            (home / ".config" / "pip").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ca, home / ".config" / "pip" / "ca.crt")
            (home / ".config" / "pip" / "pip.conf").write_text(
                "[global]\ncert = /root/.config/pip/ca.crt\n")
            extra += ["-v", f"{home}:/root"]
        start = time.monotonic()
        self("build", "--layers", "--format", "docker", "-f", str(dockerfile), "-t", tag, *extra,
             *[a for arg in build_args for a in ("--build-arg", arg)], str(REPO), timeout=3000)
        return time.monotonic() - start


def machine_ca_bundle() -> str | None:
    """The CA bundle pip uses on this machine (a proxy's CA may be in it), if one is set."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return os.environ[var]
    parser = configparser.ConfigParser()
    parser.read(["/etc/pip.conf", "/etc/xdg/pip/pip.conf",
                 str(Path.home() / ".config/pip/pip.conf"), str(Path.home() / ".pip/pip.conf")])
    cert = parser.get("global", "cert", fallback="")
    return cert if cert and Path(cert).is_file() else None


def _reachable(url: str) -> bool:
    import ssl

    ca = machine_ca_bundle()
    context = ssl.create_default_context(cafile=ca) if ca else None
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return response.status < 400
    except OSError:
        return False


def wheel_index(dockerfile: Path) -> str | None:
    """A replacement for the Dockerfile's TORCH_INDEX_URL when that index is unreachable here:
    pip's own index (PyPI's torch is the CUDA build, several GB larger than the CPU one)."""
    match = re.search(r"^ARG TORCH_INDEX_URL=(\S+)", dockerfile.read_text(), re.MULTILINE)
    if match is None or _reachable(match.group(1).rstrip("/") + "/torch/"):
        return None
    return os.environ.get("PIP_INDEX_URL") or PYPI
