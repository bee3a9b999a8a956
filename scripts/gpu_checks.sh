#!/usr/bin/env bash
# The device checks the issues leave open, in one call on a lent GPU machine (device tool):
# build here, copy target/release/dmsae to gpu/dmsae (git-ignored) and the trainer's unit-test
# binary to gpu/trainer-tests (`cargo test --release -p dmsae-trainer --lib --no-run` prints its
# path), carry gpu/, then
#   run: bash scripts/gpu_checks.sh            (figures in $OUT/gpu-checks.log)
# Every step appends to that log as it goes, so a call cut off by its time limit still returns
# the steps it finished.
# It needs only torch on that machine (no transformers, no model download): the extraction runs
# on a randomly initialised Gemma-2-2B-shaped checkpoint (scripts/make_random_gemma.py), so its
# speeds are real and its activations meaningless. SMALL=1 DEVICE=cpu runs the same steps at toy
# sizes on a CPU, to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
# The carried binary on the GPU machine, this checkout's build elsewhere; a Python with torch:
# the GPU machine's, else the model venv (make model-venv).
first() { for f in "$@"; do if [ -x "$f" ]; then echo "$f"; return; fi; done; echo "${@: -1}"; }
BIN=${DMSAE_BIN:-$(first gpu/dmsae target/release/dmsae)}
PY=${PYTHON:-$(first /opt/torch/.venv/bin/python .venv-model/bin/python python3)}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/dmsae-gpu-checks}
W=$(mktemp -d "${TMPDIR:-/tmp}/dmsae-gpu-XXXXXX")
trap 'rm -rf "$W"' EXIT
mkdir -p "$OUT"
LOG=$OUT/gpu-checks.log
export LD_LIBRARY_PATH="$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "${SMALL:-0}" = 1 ]; then
  MODEL=tiny LAYER=2 CTX=128 BATCH=4 EXTRACT=8K EXTRACT_F32=2K WORDS=20000 WIDTH=1024 K=16 STEPS=40
  TBATCH=512 ATTR=2K TRAIN_PRESET="--preset cpu --width 1024 --steps 8"
else
  MODEL=gemma-2-2b LAYER=12 CTX=1024 BATCH=8 EXTRACT=256K EXTRACT_F32=64K WORDS=600000 WIDTH=65536 K=64
  STEPS=200 TBATCH=4096 ATTR=64K TRAIN_PRESET="--preset h100"
fi
# A quarter of the store held out for the eval; attribution takes $ATTR training tokens.
printf 'eval_fraction = 0.25\nbatch_tokens = %s\nwarmup_steps = %s\ncheckpoint_every = 0\n' "$TBATCH" "$((STEPS / 10))" > "$W/train.toml"
step() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; }

step "environment: is CUDA visible to the binary?"
run "$BIN" env
command -v nvidia-smi >/dev/null && run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

TESTS=${DMSAE_TRAINER_TESTS:-gpu/trainer-tests}
if [ -x "$TESTS" ]; then
  step "torch's fused Adam on CUDA against the textbook update (the CPU kernel is tested in CI)"
  DMSAE_TEST_CUDA=1 run "$TESTS" --exact sae::tests::fused_adam_is_adam --nocapture \
    || echo "fused Adam check FAILED (the checks below go on)" | tee -a "$LOG"
fi

step "random $MODEL checkpoint and text"
run "$PY" scripts/make_random_gemma.py --preset "$MODEL" --out "$W/model" --text "$W/text.txt" --words "$WORDS"

for dtype in bf16 f32; do
  step "extract, $dtype: tokens/s, and the wait for the store writer (should be ~0)"
  tokens=$EXTRACT; [ "$dtype" = f32 ] && tokens=$EXTRACT_F32  # f32 is only a rate here
  run "$BIN" extract --model "$W/model" --data "$W/text.txt" --tokens "$tokens" --layer "$LAYER" \
    --context "$CTX" --batch "$BATCH" --device "$DEVICE" --dtype "$dtype" --out "$W/store-$dtype"
done
run "$BIN" store inspect "$W/store-bf16"

step "one distillation cycle on the extracted store: training, then attribution tokens/s"
run "$BIN" train-cycle --shards "$W/store-bf16" --width "$WIDTH" --k "$K" --steps "$STEPS" \
  --config "$W/train.toml" --attribution-tokens "$ATTR" --device "$DEVICE" --quiet --out "$W/run/cycle-0"

step "cycle 1 from cycle 0's core: the carried core (and its thresholds) on the device"
run "$BIN" train-cycle --shards "$W/store-bf16" --core "$W/run/cycle-0" --width "$WIDTH" --k "$K" \
  --steps "$STEPS" --config "$W/train.toml" --attribution-tokens "$ATTR" --device "$DEVICE" --quiet \
  --out "$W/run/cycle-1"

step "sweep in one pass against one model at a time"
run "$BIN" sweep --shards "$W/store-bf16" --core "$W/run/cycle-0" --series distilled-core,baseline \
  --k "$K,$((2 * K))" --width "$WIDTH" --steps "$STEPS" --config "$W/train.toml" --device "$DEVICE" --quiet \
  --compare-separate --out "$W/sweep"

step "eval: the sweep's SAEs spliced into the model on the device"
run "$BIN" eval --model "$W/model" --sae "$W/sweep" --data "$W/text.txt" --tokens "$((CTX * 8))" \
  --context "$CTX" --batch "$BATCH" --device "$DEVICE" --out "$W/eval"

step "where a training step's time goes (DMSAE_PROFILE), AuxK idle and then on every latent"
for dead in 10000000 0; do
  printf 'dead_tokens = %s\n' "$dead" | cat "$W/train.toml" - > "$W/profile.toml"
  DMSAE_PROFILE=1 run "$BIN" train --shards "$W/store-bf16" --width "$WIDTH" --k "$K" --steps 50 \
    --config "$W/profile.toml" --device "$DEVICE" --quiet --out "$W/profile-$dead"
done

step "training step against eager PyTorch (the issue's anchor), AuxK idle and on every latent"
run "$PY" scripts/bench_train.py --dmsae "$BIN" --device "$DEVICE" $TRAIN_PRESET
run "$PY" scripts/bench_train.py --dmsae "$BIN" --device "$DEVICE" $TRAIN_PRESET --auxk

step "done"
