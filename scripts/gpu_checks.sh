#!/usr/bin/env bash
# The device checks the issues leave open, in one call on a lent GPU machine (device tool).
# Build here, then fill the git-ignored gpu/ (`make gpu-bundle` does the first three) and carry it:
#   gpu/dmsae          target/release/dmsae, stripped (the unstripped binary is over the carry limit)
#   gpu/trainer-tests  the trainer's unit tests, stripped (`cargo test --release -p dmsae-trainer
#                      --lib --no-run` prints the path)
#   gpu/extractor-tests the extractor's unit tests, stripped (the same with -p dmsae-extractor):
#                      dmsae's CUDA kernels against the ATen sequences they replace
#   gpu/demo-extract   a store of real Gemma-3-270M activations (make demo's target/demo/extract,
#                      else make demo-sample's target/demo-store), for the FVU checks
#   run: OUT=$OUT bash scripts/gpu_checks.sh            (figures in $OUT/gpu-checks.log)
#   ONLY="env adam kernels model extract base knobs ab train trainauxk traindead traincore fvu" runs only the steps named (default: all; the
#   names are those of the `want` tests below). TRAIN_EXTRA= leaves out the train step's float32
#   encoder run (default --encoder-f32), TRAIN_AB= its kernels-off runs.
#   gpu/dmsae-base     (optional; make gpu-bundle GPU_BASE=REV) an earlier version's binary: the
#                      `base` step times its extraction beside this one's, alternating, in one call,
#                      and the `train` step its training (bench_train.py --base)
#   gpu/writer_rate, gpu/stream_rate (store-format's examples, stripped): the `hostio` step, the
#   store writer's and the training stream's rates on this host's CPUs, and its disk's.
# Steps run in order of what the issues need most; each has its own time limit, a failed one is
# logged and the next goes on, and every step appends to the log as it goes, so a call cut off
# by its time limit still returns the steps it finished.
# It needs only torch and transformers there (no model download): the extraction runs on a
# randomly initialised Gemma-2-2B-shaped checkpoint (scripts/make_random_gemma.py), so its
# speeds are real and its activations meaningless. SMALL=1 DEVICE=cpu runs the same steps at toy
# sizes on a CPU, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
# This checkout's build where there is one (target/ does not travel), else the carried binary;
# a Python with torch: the GPU machine's, else the model venv (make model-venv).
first() { for f in "$@"; do if [ -x "$f" ]; then echo "$f"; return; fi; done; echo "${@: -1}"; }
BIN=${DMSAE_BIN:-$(first target/release/dmsae gpu/dmsae)}
PY=${PYTHON:-$(first /opt/torch/.venv/bin/python .venv-model/bin/python python3)}
REAL=${REAL_STORE:-$( [ -d gpu/demo-extract ] && echo gpu/demo-extract || echo target/demo/extract)}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/dmsae-gpu-checks}
# WORK=DIR keeps the scratch (checkpoint, stores) for a later invocation, so that one call can
# run the steps in another order (ONLY=... twice); by default it is a temporary folder, removed.
if [ -n "${WORK:-}" ]; then W=$WORK; mkdir -p "$W"; else
  W=$(mktemp -d "${TMPDIR:-/tmp}/dmsae-gpu-XXXXXX"); trap 'rm -rf "$W"' EXIT; fi
mkdir -p "$OUT"
LOG=$OUT/gpu-checks.log
export LD_LIBRARY_PATH="$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
if [ "${SMALL:-0}" = 1 ]; then
  MODEL=tiny LAYER=2 CTX=128 BATCH=4 EXTRACT=8K EXTRACT_AB=4K EXTRACT_F32=2K WORDS=20000 WIDTH=1024 K=16 STEPS=40
  TBATCH=512 ATTR=2K TRAIN_PRESET="--preset cpu --width 1024 --steps 8"
else
  MODEL=gemma-2-2b LAYER=12 CTX=1024 BATCH=8 EXTRACT=256K EXTRACT_AB=64K EXTRACT_F32=32K WORDS=600000 WIDTH=65536 K=64
  STEPS=200 TBATCH=4096 ATTR=64K TRAIN_PRESET="--preset h100"
fi
# A quarter of the store held out for the eval; attribution takes $ATTR training tokens.
printf 'eval_fraction = 0.25\nbatch_tokens = %s\nwarmup_steps = %s\ncheckpoint_every = 0\n' "$TBATCH" "$((STEPS / 10))" > "$W/train.toml"
step() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
# run SECONDS CMD...: the command under a time limit; a failure is logged, and the script goes on.
run() {
  local limit=$1; shift
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "FAILED (exit $rc${rc/#124/, over its ${limit}s}): $*" | tee -a "$LOG"
  return 0
}
# idle FILE: the DMSAE_KINETO table's account of where the device idled, into the log.
idle() { sed -n '/^# device idle/,$p' "$1" 2>/dev/null | head -48 | tee -a "$LOG"; }
last_fvu() { "$PY" -c 'import json, sys; print([json.loads(l) for l in open(sys.argv[1]) if "\"eval\"" in l][-1]["eval"]["fvu"])' "$1"; }

if want env; then
step "environment: is CUDA visible to the binary?"
run 60 "$BIN" env
command -v nvidia-smi >/dev/null && run 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

if want adam; then
TESTS=${DMSAE_TRAINER_TESTS:-gpu/trainer-tests}
if [ -x "$TESTS" ]; then
  step "torch's fused Adam on CUDA against the textbook update (the CPU kernel is tested in CI)"
  DMSAE_TEST_CUDA=1 run 60 "$TESTS" --exact sae::tests::fused_adam_is_adam --nocapture
  step "dmsae's trainer kernels (adam.cu, bag_decode.cu, encoder_grad.cu, matryoshka_l2.cu, select.cu) on CUDA against the ATen sequences"
  DMSAE_TEST_CUDA=1 run 60 "$TESTS" _on_cuda --nocapture --test-threads 1
fi
fi

if want kernels; then
XTESTS=${DMSAE_EXTRACTOR_TESTS:-gpu/extractor-tests}
if [ -x "$XTESTS" ]; then
  step "dmsae's CUDA kernels (NVRTC, driver launch) against the ATen sequences they replace"
  DMSAE_TEST_CUDA=1 run 120 "$XTESTS" _on_cuda --nocapture --test-threads 1
fi
fi

if want model; then
step "random $MODEL checkpoint and text"
run 150 "$PY" scripts/make_random_gemma.py --preset "$MODEL" --out "$W/model" --text "$W/text.txt" --words "$WORDS"
fi

if want extract; then
step "extract, bf16, against transformers (eager, sdpa) on the same contexts; FLOP utilisation; float32 check"
run 300 "$PY" scripts/bench_extract.py --dmsae "$BIN" --model "$W/model" --data "$W/text.txt" --tokens "$EXTRACT" \
  --layer "$LAYER" --context "$CTX" --batch "$BATCH" --device "$DEVICE" --dtype bf16 --check 2 \
  --keep-store "$W/store-bf16"
[ -d "$W/store-bf16" ] && run 30 "$BIN" store inspect "$W/store-bf16"
fi

if want base && [ -x "${BASE_BIN:-gpu/dmsae-base}" ]; then
BASE=${BASE_BIN:-gpu/dmsae-base}
step "extract, bf16: this build against $BASE, alternating, the same tokens (rates after the first batch)"
for i in 1 2; do
  for b in "$BIN" "$BASE"; do
    echo "-- $b, run $i" | tee -a "$LOG"
    rm -rf "$W/store-base"
    timeout 120 "$b" extract --model "$W/model" --data "$W/text.txt" --tokens "$EXTRACT_AB" --layer "$LAYER" \
      --context "$CTX" --batch "$BATCH" --device "$DEVICE" --dtype bf16 --out "$W/store-base" 2>&1 \
      | grep -E "tokens/s" | tail -2 | tee -a "$LOG"
  done
done
fi

if want knobs; then
# KNOBS="A=0 B=1 --flag=2 ..." (default below): each setting beside none, alternating, $ROUNDS rounds, on
# $EXTRACT_KNOB tokens; an A=B item is an environment setting, a --flag=value item a CLI flag.
step "extract, bf16: this build with each setting of KNOBS and with none, alternating, the same tokens (rates after the first batch)"
for i in $(seq "${ROUNDS:-2}"); do
  for k in "" ${KNOBS:-DMSAE_TRANSPOSED_BACKWARD=0 DMSAE_TRANSPOSED_HEAD=0 --ce-chunk=1024 --ce-chunk=8192}; do
    echo "-- ${k:-as built}, run $i" | tee -a "$LOG"
    env_k=; flag_k=; case "$k" in --*) flag_k=${k/=/ } ;; ?*) env_k=$k ;; esac
    rm -rf "$W/store-knob"
    timeout 120 env $env_k "$BIN" extract --model "$W/model" --data "$W/text.txt" --tokens "${EXTRACT_KNOB:-$EXTRACT_AB}" \
      --layer "$LAYER" --context "$CTX" --batch "$BATCH" --device "$DEVICE" --dtype bf16 $flag_k --out "$W/store-knob" 2>&1 \
      | grep -E "tokens/s" | tail -2 | tee -a "$LOG"
  done
done
fi

if want ab; then
step "extract, bf16, with dmsae's fused kernels turned off one at a time (rates only; same tokens)"
all_off="DMSAE_FUSED_CE=0 DMSAE_FUSED_ATTENTION=0 DMSAE_FUSED_NORM=0 DMSAE_FUSED_GEGLU=0 DMSAE_FUSED_ROPE=0"
# DMSAE_PACKS=0: the kernels read an element at a time rather than in 16-byte packs.
for off in "" DMSAE_PACKS=0 $all_off "$all_off"; do
  echo "-- fused kernels off: ${off:-none}" | tee -a "$LOG"
  run 120 env $off "$BIN" extract --model "$W/model" --data "$W/text.txt" --tokens "$EXTRACT_AB" \
    --layer "$LAYER" --context "$CTX" --batch "$BATCH" --device "$DEVICE" --dtype bf16 --out "$W/store-ab-${off// /-}"
done
# The stores with every kernel on and every kernel off, side by side: how far the kernels move
# the stored rows (relative L2 per array; 0 means bit-identical).
for s in "" "${all_off// /-}"; do
  "$BIN" store export "$W/store-ab-$s" --out-dir "$W/export-ab-$s" --arrays acts,grads,loss >/dev/null 2>&1
done
"$PY" - "$W/export-ab-" "$W/export-ab-${all_off// /-}" <<'PY' 2>&1 | tee -a "$LOG"
import sys, numpy as np
def f32(x):
    return (x.astype(np.uint32) << 16).view(np.float32) if x.dtype == np.uint16 else x.astype(np.float32)
for n in ("acts", "grads", "loss"):
    a, b = (f32(np.load(f"{d}/{n}.npy")).astype(np.float64) for d in sys.argv[1:3])
    ok = np.isfinite(a) & np.isfinite(b)
    rel = np.linalg.norm(a[ok] - b[ok]) / max(np.linalg.norm(b[ok]), 1e-300)
    print(f"fused against unfused, {n}: relative L2 {rel:.3e}, identical {np.array_equal(a, b, equal_nan=True)}")
PY
fi

if want profile; then
step "where an extraction batch's time goes (DMSAE_PROFILE), and its kernels and idle time (DMSAE_KINETO, $OUT/kineto-extract.tsv)"
DMSAE_PROFILE=1 run 120 "$BIN" extract --model "$W/model" --data "$W/text.txt" --tokens "$EXTRACT_F32" \
  --layer "$LAYER" --context "$CTX" --batch "$BATCH" --device "$DEVICE" --dtype bf16 --out "$W/store-profile"
# A run of its own: DMSAE_PROFILE's synchronisations would show as idle time.
DMSAE_KINETO="$OUT/kineto-extract.tsv" DMSAE_KINETO_FROM=1 DMSAE_KINETO_UNITS=2 \
  run 120 "$BIN" extract --model "$W/model" --data "$W/text.txt" --tokens "$EXTRACT_F32" \
  --layer "$LAYER" --context "$CTX" --batch "$BATCH" --device "$DEVICE" --dtype bf16 --out "$W/store-kineto"
idle "$OUT/kineto-extract.tsv"
fi

if want hostio; then
step "the host side: the store writer as extract drives it, the training stream over the extracted store, the disk"
[ -x gpu/writer_rate ] && run 60 gpu/writer_rate "$W/writer-rate" 2304 24
if [ -x gpu/stream_rate ]; then
  # The writer's store (d 2,304 bf16, 3 shuffle buffers) on 2, 4 and all threads: how the
  # stream scales, and its CPU time a token; then the extracted store (with flags: BOS dropped).
  for t in 2 4 0; do
    [ -d "$W/writer-rate" ] && RAYON_NUM_THREADS=$t run 60 gpu/stream_rate "$W/writer-rate" acts 4 4096
  done
  [ -d "$W/store-bf16" ] && run 60 gpu/stream_rate "$W/store-bf16" acts 4 4096
fi
rm -rf "$W/writer-rate"
run 60 dd if=/dev/zero of="$W/dd" bs=1M count=2048 conv=fsync && rm -f "$W/dd"
fi

if want repeat; then
step "does a CUDA extraction repeat bit for bit? (the same command again; shard BLAKE3s compared)"
run 120 "$BIN" extract --model "$W/model" --data "$W/text.txt" --tokens "$EXTRACT_F32" \
  --layer "$LAYER" --context "$CTX" --batch "$BATCH" --device "$DEVICE" --dtype bf16 --out "$W/store-repeat"
"$PY" - "$W/store-profile" "$W/store-repeat" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
a, b = ([s["blake3"] for s in json.load(open(d + "/manifest.json"))["shards"]] for d in sys.argv[1:3])
print("extraction repeat: identical shards" if a == b else f"extraction repeat: shards DIFFER: {a} {b}")
PY
fi

if want train; then
step "training step against eager PyTorch (the issue's anchor), AuxK idle; each trainer kernel off in turn"
AB=${TRAIN_AB-$([ "$DEVICE" = cpu ] || echo --kernels-ab)}
TBASE=$([ -x "${BASE_BIN:-gpu/dmsae-base}" ] && echo "--base ${BASE_BIN:-gpu/dmsae-base}")
run 420 "$PY" scripts/bench_train.py --dmsae "$BIN" --device "$DEVICE" $TRAIN_PRESET ${TRAIN_EXTRA---encoder-f32} $AB $TBASE
fi

if want trainauxk; then
step "training step against eager PyTorch with AuxK on every latent"
run 180 "$PY" scripts/bench_train.py --dmsae "$BIN" --device "$DEVICE" $TRAIN_PRESET --auxk --encoder-f32
fi

if want traindead; then
step "training step against eager PyTorch with some latents dead (a latent dead after two steps without firing)"
TBASE=$([ -x "${BASE_BIN:-gpu/dmsae-base}" ] && echo "--base ${BASE_BIN:-gpu/dmsae-base}")
run 240 "$PY" scripts/bench_train.py --dmsae "$BIN" --device "$DEVICE" $TRAIN_PRESET --dead-tokens "${DEAD_TOKENS:-8192}" $TBASE
fi

if want traincore; then
step "training step against eager PyTorch with a trained core (METHOD.md's distilled core, 197): a later cycle's or a sweep's step"
TBASE=$([ -x "${BASE_BIN:-gpu/dmsae-base}" ] && echo "--base ${BASE_BIN:-gpu/dmsae-base}")
run 300 "$PY" scripts/bench_train.py --dmsae "$BIN" --device "$DEVICE" $TRAIN_PRESET --core "${CORE:-197}" $TBASE
fi

if want fvu; then
# fvu NAME CONFIG-LINE: a short training on the real store ($REAL), seed $seed; logs its held-out FVU.
fvu() {
  printf 'width = 1024\nk = 32\nbatch_tokens = 256\ntokens = 32768\nwarmup_steps = 16\neval_fraction = 0.25\nlog_every = 32\ncheckpoint_every = 0\nseed = %s\n%s\n' \
    "$seed" "$2" > "$W/fvu.toml"
  run 60 "$BIN" train --shards "$REAL" --config "$W/fvu.toml" --device "$DEVICE" --quiet --out "$W/fvu-$seed-$1"
  [ -f "$W/fvu-$seed-$1/metrics.jsonl" ] && echo "seed $seed, $2: held-out FVU $(last_fvu "$W/fvu-$seed-$1/metrics.jsonl")" | tee -a "$LOG"
}
step "bf16 encoder product against float32, then bf16 Adam moments, then the decoder over bf16 rows, then W_enc's and W_dec's gradients in bf16, then the Matryoshka parts in bf16: held-out FVU on real Gemma-3-270M activations ($REAL), 2 seeds"
for seed in 1 2; do
  fvu bf16 $'encoder_bf16 = true\nadam_bf16_moments = false\ndecoder_bf16 = false\nencoder_grad_bf16 = false\ndecoder_grad_bf16 = false\nparts_bf16 = false'
  fvu f32 $'encoder_bf16 = false\nadam_bf16_moments = false\ndecoder_bf16 = false\nencoder_grad_bf16 = false\ndecoder_grad_bf16 = false\nparts_bf16 = false'
  fvu moments $'adam_bf16_moments = true\ndecoder_bf16 = false\nencoder_grad_bf16 = false\ndecoder_grad_bf16 = false\nparts_bf16 = false'
  fvu decoder $'adam_bf16_moments = true\ndecoder_bf16 = true\nencoder_grad_bf16 = false\ndecoder_grad_bf16 = false\nparts_bf16 = false'
  fvu grad $'adam_bf16_moments = true\ndecoder_bf16 = true\nencoder_grad_bf16 = true\ndecoder_grad_bf16 = true\nparts_bf16 = false'
  fvu parts $'adam_bf16_moments = true\ndecoder_bf16 = true\nencoder_grad_bf16 = true\ndecoder_grad_bf16 = true\nparts_bf16 = true'
done
fi

if want cycle; then
step "one distillation cycle on the extracted store: training, then attribution tokens/s"
run 120 "$BIN" train-cycle --shards "$W/store-bf16" --width "$WIDTH" --k "$K" --steps "$STEPS" \
  --config "$W/train.toml" --attribution-tokens "$ATTR" --device "$DEVICE" --quiet --out "$W/run/cycle-0"
fi

if want cycle; then
step "cycle 1 from cycle 0's core: the carried core (and its thresholds) on the device"
run 120 "$BIN" train-cycle --shards "$W/store-bf16" --core "$W/run/cycle-0" --width "$WIDTH" --k "$K" \
  --steps "$STEPS" --config "$W/train.toml" --attribution-tokens "$ATTR" --device "$DEVICE" --quiet \
  --out "$W/run/cycle-1"
fi

if want sweep; then
step "sweep in one pass against one model at a time"
run 180 "$BIN" sweep --shards "$W/store-bf16" --core "$W/run/cycle-0" --series distilled-core,baseline \
  --k "$K,$((2 * K))" --width "$WIDTH" --steps "$STEPS" --config "$W/train.toml" --device "$DEVICE" --quiet \
  --compare-separate --out "$W/sweep"
fi

if want eval; then
step "eval: the sweep's SAEs spliced into the model on the device"
run 120 "$BIN" eval --model "$W/model" --sae "$W/sweep" --data "$W/text.txt" --tokens "$((CTX * 8))" \
  --context "$CTX" --batch "$BATCH" --device "$DEVICE" --out "$W/eval"
fi

if want trainprofile; then
step "where a training step's time goes (DMSAE_PROFILE; kernels from DMSAE_KINETO in $OUT), AuxK idle and then on every latent"
for dead in 10000000 0; do
  printf 'dead_tokens = %s\n' "$dead" | cat "$W/train.toml" - > "$W/profile.toml"
  DMSAE_PROFILE=1 run 90 "$BIN" train --shards "$W/store-bf16" --width "$WIDTH" --k "$K" --steps 50 \
    --config "$W/profile.toml" --device "$DEVICE" --quiet --out "$W/profile-$dead"
  DMSAE_KINETO="$OUT/kineto-train-dead$dead.tsv" run 90 "$BIN" train --shards "$W/store-bf16" --width "$WIDTH" \
    --k "$K" --steps 30 --config "$W/profile.toml" --device "$DEVICE" --quiet --out "$W/kineto-$dead"
  idle "$OUT/kineto-train-dead$dead.tsv"
done
fi

if want trainrepeat; then
step "does a seeded CUDA training run repeat bit for bit?"
for r in 1 2; do
  printf 'seed = 3\n' | cat "$W/train.toml" - > "$W/seeded.toml"
  run 90 "$BIN" train --shards "$W/store-bf16" --width "$WIDTH" --k "$K" --steps 20 --config "$W/seeded.toml" \
    --device "$DEVICE" --quiet --out "$W/seeded-$r"
done
"$PY" -c 'import hashlib, sys; h = [hashlib.sha256(open(p + "/sae_weights.safetensors", "rb").read()).hexdigest() for p in sys.argv[1:]]; print("training repeat:", "identical weights" if h[0] == h[1] else "weights DIFFER")' \
  "$W/seeded-1" "$W/seeded-2" 2>&1 | tee -a "$LOG"
fi

if want batch16; then
step "extract, bf16, batch $((2 * BATCH)): a rate only"
run 120 "$BIN" extract --model "$W/model" --data "$W/text.txt" --tokens "$EXTRACT" --layer "$LAYER" \
  --context "$CTX" --batch "$((2 * BATCH))" --device "$DEVICE" --dtype bf16 --out "$W/store-bf16-b$((2 * BATCH))"
fi

if want f32; then
step "extract, float32: a rate only"
run 120 "$BIN" extract --model "$W/model" --data "$W/text.txt" --tokens "$EXTRACT_F32" --layer "$LAYER" \
  --context "$CTX" --batch "$((BATCH / 2))" --device "$DEVICE" --dtype f32 --out "$W/store-f32"
fi

step "done"
