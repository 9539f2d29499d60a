# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_OUT ?= slidemil-demo

.PHONY: install demo demo-quick test test-slow test-gpu test-slurm test-container lint bench

install:
	$(PIP) install -q -e ".[dev]"

demo: install
	$(PYTHON) -m slidemil demo --out $(DEMO_OUT)

demo-quick: install
	$(PYTHON) -m slidemil demo --quick --out $(DEMO_OUT)

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m slow

test-gpu: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m gpu

test-slurm: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m slurm

test-container:
	bash .ci/container.sh

lint: install
	$(PYTHON) -m ruff check slidemil tests bench
	$(PYTHON) -m mypy
	hadolint docker/Dockerfile
