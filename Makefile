# hami-ray: every target creates .venv and installs what it needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TRACES := ../shared/traces/openb-v2023

.PHONY: demo test test-fast lint tools simulate bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hami-ray demo

test: $(STAMP) lint tools
	$(BIN)/python -m pytest -q -p no:cacheprovider

# promtool and a Prometheus server for the metrics tests: Debian's prometheus package
tools:
	@command -v promtool >/dev/null || { SUDO=$$(command -v sudo || true); export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null; } || \
		echo "could not install Debian's prometheus package (promtool): the metrics tests will fail"; }

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/mypy hami_ray/core

simulate: $(STAMP)
	$(BIN)/hami-ray simulate --seeds 10 --policies random,dotprod,clustering,packing,bestfit,fgd,default \
		--json out/simulate-default.json --plot out/simulate-default.png

bench: $(STAMP)
	$(BIN)/python bench/placement_latency.py --json out/placement_latency.json

clean:
	rm -rf $(VENV) out build *.egg-info
