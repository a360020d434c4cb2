# Two set-up commands (see README): `make demo` runs the main job, `make test` the tests.
# Both create or reuse the virtual environment in .venv, with the exact tested versions of
# constraints.txt (pyproject.toml only states ranges).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench gpu-check constraints postgres-bin container-bin chromium-bin

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/ppc-sweep demo

# The PostgreSQL tests need server binaries; install Debian's when missing and we may.
postgres-bin:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends postgresql >/dev/null) || \
	    echo "no PostgreSQL server binaries: PostgreSQL tests will be skipped"; }

# The image tests (tests/docker/test_image.py) need a container engine and, where the base
# image cannot be pulled, debootstrap for a stand-in: Debian's podman, when we may install it.
container-bin:
	@{ command -v podman && command -v debootstrap && [ -e /usr/lib/cni/dnsname ] && \
	   [ -e /usr/libexec/podman/catatonit ]; } >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    podman runc catatonit containernetworking-plugins \
	    golang-github-containernetworking-plugin-dnsname iptables debootstrap >/dev/null) || \
	    echo "no podman/debootstrap: the image tests will be skipped"; }

# The report's browser test needs a headless chromium; install Debian's when missing and we may.
chromium-bin:
	@command -v chromium >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null) || \
	    echo "no chromium: the report's browser test will be skipped"; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) postgres-bin container-bin chromium-bin lint
	WANDB_MODE=offline $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks

# On one CUDA device: step times, PPC's share, loss parity, memory, syncs (README, Benchmarks).
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

# Regenerate constraints.txt from a venv whose tests passed.
constraints: $(STAMP)
	$(PY) scripts/freeze_constraints.py
