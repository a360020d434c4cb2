# Two set-up commands (see README): `make demo` runs the main job, `make test` the tests.
# Both create or reuse the virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench postgres-bin chromium-bin

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/ppc-sweep demo

# The PostgreSQL tests need server binaries; install Debian's when missing and we may.
postgres-bin:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends postgresql >/dev/null) || \
	    echo "no PostgreSQL server binaries: PostgreSQL tests will be skipped"; }

# The report's browser test needs a headless chromium; install Debian's when missing and we may.
chromium-bin:
	@command -v chromium >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null) || \
	    echo "no chromium: the report's browser test will be skipped"; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) postgres-bin chromium-bin lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks
