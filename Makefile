# NovaCron's set-up lives here. The README's two commands:
#   make demo   coordinator + two agents + a real guest live-migrated between them
#   make test   the whole test suite (lint, types, unit, property, integration, e2e)
# Both install what they need first; re-running is quick when nothing changed.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMPS := build/stamps
PYTEST_ARGS ?=

# The bundled classifier was fitted with OpenBLAS's SkylakeX kernels. On some AVX-512
# CPUs OpenBLAS picks others (Haswell's on AMD EPYC), lbfgs takes another path and a
# refit differs by ~1e-3 (tests/classifier/test_model.py): same kernels, same fit.
ifeq ($(origin OPENBLAS_CORETYPE),undefined)
OPENBLAS_CORETYPE := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo SkylakeX)
endif
ifneq ($(OPENBLAS_CORETYPE),)
export OPENBLAS_CORETYPE
endif

# Sources whose change means the package must be rebuilt.
BUILD_INPUTS := pyproject.toml setup.py $(wildcard native/*.pyx native/*.pxd native/*.h)

# What the suite and the demo need besides the venv: the test guest and the
# claude-flow npm package (both cached under ~/.cache/novacron, rules below).
TEST_ASSETS := guest claude-flow
DEMO_ASSETS := guest claude-flow

.PHONY: demo test lint typecheck system-deps venv clean lock

$(STAMPS)/system-deps: tools/system-packages.txt tools/install-system-deps
	tools/install-system-deps tools/system-packages.txt
	@mkdir -p $(STAMPS) && touch $@

system-deps: $(STAMPS)/system-deps

# Exact versions from the lock (make lock refreshes it); the package itself is
# built against the locked Cython/numpy without an isolated build env.
$(STAMPS)/venv: $(BUILD_INPUTS) requirements/dev.lock $(STAMPS)/system-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/dev.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	@mkdir -p $(STAMPS) && touch $@

venv: $(STAMPS)/venv

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	PYTHON=$(PY) tools/typecheck

test: venv lint typecheck $(TEST_ASSETS)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv $(DEMO_ASSETS)
	$(VENV)/bin/novacron demo

# Re-resolve pyproject.toml's ranges and rewrite requirements/*.lock (then commit them).
lock:
	tools/lock

clean:
	rm -rf build $(VENV) *.egg-info native/*.c native/*.so

# The test guest (kernel from linux-image-amd64, busybox initramfs, our workload),
# cached under ${XDG_CACHE_HOME:-~/.cache}/novacron/guest/; a no-op when cached.
.PHONY: guest
guest: venv
	$(PY) -m novacron.agent.guest build

# claude-flow MCP server for the MCP bridge (pinned by coordinator/mcp/node/package-lock.json;
# cached under ~/.cache/novacron/claude-flow/<hash>, so re-runs are instant).
.PHONY: claude-flow
claude-flow: $(STAMPS)/system-deps
	@coordinator/mcp/node/install >/dev/null
