# maptr-pipeline: `make repro` runs the whole pipeline, `make test` the test suite (both create the venv).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

.PHONY: install repro test lint ui clean-venv gpu-check gpu-check-data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# DVC runs each stage's `python pipeline/<stage>.py` with the venv first on PATH.
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# The MLflow UI over the local store, reachable from this machine only (ssh -L 5000:127.0.0.1:5000 to view).
ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The GPU check's data (~7 MB, git-ignored): made here, where synth and pack have their dependencies.
# The metric's exact buffer test needs shapely, which the GPU machines lack: its wheel for their Python
# (3.12, manylinux x86_64) is unpacked into data/gpu_check/site, used there only when shapely is missing.
SHAPELY_WHEEL = shapely==2.0.7
gpu-check-data: $(STAMP)
	$(BIN)/python benchmarks/make_gpu_check_data.py --out data/gpu_check
	rm -rf data/gpu_check/site data/gpu_check/wheels
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 -d data/gpu_check/wheels '$(SHAPELY_WHEEL)'
	$(BIN)/python -m zipfile -e data/gpu_check/wheels/shapely-*.whl data/gpu_check/site
	rm -rf data/gpu_check/wheels

# The GPU check itself, on a CUDA machine with its own torch: no venv, the source tree on PYTHONPATH
# (benchmarks/gpu_check.py's docstring; README, "GPU"). Bring data/gpu_check along.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
