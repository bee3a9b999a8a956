# dmsae: set-up, build, tests, benchmarks. `make help` lists the targets.
#
# libtorch: by default `make setup` makes .venv with the CPU-only torch 2.11.0 wheel set-up
# (no CUDA libraries; ~0.5 GB). Point LIBTORCH at your own libtorch / torch/ directory, or
# set LIBTORCH_USE_PYTORCH=1 with a full `pip install torch==2.11.0` (e.g. a CUDA node),
# and .venv only gets the Python test dependencies.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.dmsae-setup-1
TORCH_PIN := torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
PY_TEST_DEPS := numpy zstandard blake3 pytest
DATA ?= ../shared/data/gemma3-270m-l9-licenses
DEMO_STORE ?= target/demo-store
DEMO_RUN ?= target/demo-run
CARGO_FLAGS ?= --release

PYVER := $(shell $(PYTHON) -c 'import sys; print("python%d.%d" % sys.version_info[:2])')
ifeq ($(LIBTORCH)$(LIBTORCH_USE_PYTORCH),)
  export LIBTORCH := $(abspath $(VENV))/lib/$(PYVER)/site-packages/torch
  USE_VENV_TORCH := 1
endif

.PHONY: help setup build test test-rust test-python bench demo clean

help:
	@echo "make setup   - .venv (torch $(TORCH_PIN) CPU set-up unless LIBTORCH is set) and a release build"
	@echo "make test    - every test: Rust (cargo test) and Python (pytest)"
	@echo "make demo    - import the real activation sample into a store, verify it, train a small SAE on it"
	@echo "make bench   - store codec benchmark on the real sample (ratio, MB/s on 1 and 2 cores)"

$(STAMP):
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check $(PY_TEST_DEPS)
ifdef USE_VENV_TORCH
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps $(TORCH_PIN)
endif
	@touch $@

setup: $(STAMP) build

build: $(STAMP)
	cargo build $(CARGO_FLAGS)

test: setup test-rust test-python

test-rust: $(STAMP)
	cargo test $(CARGO_FLAGS) --workspace

test-python: build
	DMSAE_BIN=$(abspath target/release/dmsae) $(VPY) -m pytest -q tests/python

bench: build
	target/release/dmsae store bench --data $(DATA)

demo: build
	rm -rf $(DEMO_STORE)
	target/release/dmsae store import --acts $(DATA)/acts.npy --grads $(DATA)/grads.npy \
	  --tokens $(DATA)/tokens.npy --loss $(DATA)/loss.npy --dtype bf16 --out $(DEMO_STORE) \
	  --chunk-tokens 256 --shard-tokens 2048
	target/release/dmsae store verify $(DEMO_STORE)
	target/release/dmsae store inspect $(DEMO_STORE)
	target/release/dmsae store stats $(DEMO_STORE)
	rm -rf $(DEMO_RUN)
	target/release/dmsae train --shards $(DEMO_STORE) --config configs/demo-sample.toml --out $(DEMO_RUN)

clean:
	cargo clean
