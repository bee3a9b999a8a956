"""`make bench-extract`: `dmsae extract` against transformers computing the same thing, layer-L
residuals and d(sum of next-token CE)/d(residual), on the same contexts, in one run, printed
side by side with their ratio and FLOP utilisation, and checked against a float32 reference.

The anchor is what a researcher writes with transformers: parameters frozen, a forward hook
that makes the layer-L output require grad, full logits, cross-entropy, autograd.grad. It
keeps its results in memory; dmsae also compresses, checksums and writes them to a store.
Its contexts are read back from dmsae's store, so both sides see the same tokens. On CUDA the
anchor runs twice, eager attention (exact) and sdpa (which drops Gemma-2's attention soft-cap).

Correctness on the timed data: dmsae extracts the first --check contexts again into a small
store; transformers recomputes them in float32 (tf32 off), and both sides' errors against it
are printed. With --dtype f32 dmsae must match within 1e-4 relative (the issue's tolerance);
with bf16 its error must be within twice transformers' own bf16 error. Exit status 1 otherwise.

    python scripts/bench_extract.py --dmsae target/release/dmsae --model target/models/gemma-3-270m
    python scripts/bench_extract.py --dmsae dmsae --model DIR --data text.txt --device cuda --dtype bf16 --tokens 256K
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

# Dense peak TFLOP/s by device name, from NVIDIA's data sheets: (bf16, float32 without tf32).
PEAKS = {"H100 PCIe": (756.0, 51.0), "H100": (989.4, 66.9), "H200": (989.4, 66.9), "A100": (312.0, 19.5)}


def count(s):
    m = re.fullmatch(r"(\d+)([KMB]?)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a count like 2048 or 64K")
    return int(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "B": 1 << 30}[m[2]]


def flops_per_token(cfg, context, layer):
    """Model FLOPs per stored token: the forward through every layer and the head, the backward
    of the head and of the layers above `layer` to their inputs (no weight gradients; an input
    gradient costs what the forward product does, attention's backward twice its forward).
    Attention counts the causal half of the scores (within the sliding window), as MFU does."""
    d, n_layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim", 256)
    inter = cfg["intermediate_size"]
    linear = 2 * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter)
    types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                       for i in range(n_layers)]
    window = cfg.get("sliding_window") or context

    def attention(i):
        w = window if types[i] == "sliding_attention" else context
        span = sum(min(p + 1, w) for p in range(context)) / context
        return 2 * 2 * heads * hd * span  # scores and the weighted sum of values

    head = 2 * d * vocab
    fwd = sum(linear + attention(i) for i in range(n_layers)) + head
    bwd = sum(linear + 2 * attention(i) for i in range(layer + 1, n_layers)) + head
    # Computed over every position of a context; one of them (BOS) is not stored.
    return (fwd + bwd) * context / (context - 1)


def peak_flops(device, dtype):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in PEAKS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return peaks[0 if dtype == "bf16" else 1] * 1e12
    return None


def dmsae_extract(a, tokens, out):
    cmd = [a.dmsae, "extract", "--model", a.model, "--data", a.data, "--layer", str(a.layer),
           "--tokens", str(tokens), "--context", str(a.context), "--batch", str(a.batch),
           "--device", a.device, "--dtype", a.dtype, "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_extract: {' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


def exported(a, store, arrays, work):
    out = os.path.join(work, "export")
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([a.dmsae, "store", "export", store, "--out-dir", out, "--arrays", ",".join(arrays)],
                   check=True, capture_output=True)
    return {n: np.load(os.path.join(out, f"{n}.npy")) for n in arrays}


def as_float(x):
    """Store rows as float32: bf16 arrives as uint16 bit patterns."""
    if x.dtype == np.uint16:
        return torch.from_numpy(x.astype(np.int32) << 16).view(torch.float32)
    return torch.from_numpy(x.astype(np.float32))


class Anchor:
    def __init__(self, model_dir, a):
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
        self.model.to(a.device).eval().requires_grad_(False)
        self.got = {}

        def hook(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            h.requires_grad_(True)
            self.got["h"] = h

        self.model.model.layers[a.layer].register_forward_hook(hook)

    def __call__(self, x):
        """Stored rows (positions 1..) of the layer output, its gradient, and the per-token CE
        (NaN at the last position, as the store has it)."""
        logits = self.model(input_ids=x).logits.float()
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        (g,) = torch.autograd.grad(ce.sum(), self.got["h"])
        loss = torch.cat([ce.view(x.shape[0], -1), torch.full_like(ce[:1], float("nan")).expand(x.shape[0], 1)], 1)
        rows = lambda t: t[:, 1:].flatten(0, 1).detach().float().cpu()  # noqa: E731
        return rows(self.got["h"]), rows(g), loss[:, 1:].flatten().detach().cpu()

    def rate(self, ids, batch, device):
        n = ids.shape[0] // batch
        self(ids[:batch])  # warm-up, untimed
        sync(device)
        t = time.perf_counter()
        for b in range(1, n):
            self(ids[b * batch : (b + 1) * batch])
        sync(device)
        return (n - 1) * batch * (ids.shape[1] - 1) / (time.perf_counter() - t)


def rel(x, ref):
    keep = ~torch.isnan(ref)
    return float((x[keep] - ref[keep]).norm() / ref[keep].norm().clamp_min(1e-30))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dmsae", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="target/demo/corpus/train.jsonl", help="what `dmsae extract --data` takes")
    ap.add_argument("--tokens", type=count, default=count("3K"))
    ap.add_argument("--layer", type=int, default=9)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--check", type=int, default=2, help="contexts checked against a float32 reference")
    ap.add_argument("--keep-store", help="move dmsae's timed store here instead of deleting it")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is float32; bf16 is unaffected
    torch.backends.cudnn.allow_tf32 = False
    n_ctx = max(2, -(-a.tokens // (a.context - 1)) // a.batch) * a.batch
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    work = tempfile.mkdtemp(prefix="dmsae-bench-extract-")
    try:
        store = os.path.join(work, "store")
        out = dmsae_extract(a, n_ctx * (a.context - 1), store)
        m = re.search(r"([\d.]+)([KMB]?) tokens/s over \S+ \(model ([\d.]+)s, waiting for the store writer ([\d.]+)s\)", out)
        if not m:
            sys.exit(f"bench_extract: no rate in dmsae's output:\n{out}")
        unit = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}
        whole = float(m[1]) * unit[m[2]]
        model_s, wait_s = float(m[3]), float(m[4])
        # The anchor leaves its first batch untimed (start-up): the same for dmsae.
        m = re.search(r"([\d.]+)([KMB]?) tokens/s after the first batch", out)
        if not m:
            sys.exit(f"bench_extract: no rate after the first batch in dmsae's output (batches >= 2?):\n{out}")
        ours = float(m[1]) * unit[m[2]]
        tokens = exported(a, store, ["tokens"], work)["tokens"].astype(np.int64)
        if tokens.size != n_ctx * (a.context - 1):
            sys.exit(f"bench_extract: {store} holds {tokens.size} rows, expected {n_ctx} contexts of {a.context - 1}")
        bos = torch.full((n_ctx, 1), cfg.get("bos_token_id", 2), dtype=torch.long)
        ids = torch.cat([bos, torch.from_numpy(tokens).view(n_ctx, -1)], 1).to(a.device)
        if a.keep_store:
            shutil.rmtree(a.keep_store, ignore_errors=True)
            shutil.move(store, a.keep_store)
        else:
            shutil.rmtree(store)
        check = os.path.join(work, "check")
        dmsae_extract(a, a.check * (a.context - 1), check)
        ours_check = exported(a, check, ["acts", "grads", "loss", "tokens"], work)
        if not np.array_equal(ours_check["tokens"].astype(np.int64), tokens[: a.check * (a.context - 1)]):
            sys.exit("bench_extract: the check store's contexts differ from the timed store's")
        ours_check = [as_float(ours_check[n]) for n in ("acts", "grads", "loss")]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    anchor = Anchor(a.model, a)
    rates = [("transformers eager, forward + autograd.grad (first batch untimed)", anchor.rate(ids, a.batch, a.device))]
    theirs_check = [anchor(ids[i : i + 1]) for i in range(a.check)]
    if a.device.startswith("cuda"):
        anchor.model.set_attn_implementation("sdpa")
        rates.append(("transformers sdpa (no attention soft-cap: not exact)", anchor.rate(ids, a.batch, a.device)))
        anchor.model.set_attn_implementation("eager")
    anchor.model.float()
    ref = [anchor(ids[i : i + 1]) for i in range(a.check)]
    cat = lambda rs, j: torch.cat([r[j] for r in rs])  # noqa: E731

    dev = torch.cuda.get_device_name() if a.device != "cpu" else f"CPU, {a.threads} threads"
    fpt = flops_per_token(cfg, a.context, a.layer)
    peak = peak_flops(a.device, a.dtype)
    print(f"extraction, {os.path.basename(os.path.normpath(a.model))} layer {a.layer}, {n_ctx} contexts of "
          f"{a.context}, batch {a.batch}, {a.dtype}; {dev}; torch {torch.__version__}; "
          f"{fpt / 1e9:.2f} GFLOP per stored token" + (f", peak {peak / 1e12:.0f} TFLOP/s dense" if peak else ""))
    print("| implementation | tokens/s | dmsae / this | FLOP utilisation |\n|---|---|---|---|")
    mfu = lambda r: f"{r * fpt / peak:.1%}" if peak else "-"  # noqa: E731
    print(f"| dmsae extract (model, gradients, store; first batch untimed) | {ours:,.0f} | 1.00 | {mfu(ours)} |")
    print(f"| dmsae extract, every batch timed | {whole:,.0f} | {ours / whole:.2f} | {mfu(whole)} |")
    for name, r in rates:
        print(f"| {name} | {r:,.0f} | {ours / r:.2f} | {mfu(r)} |")
    print(f"dmsae: {model_s:.1f} s in the model, {wait_s:.2f} s waiting for its store writer")

    names = ("layer output", "gradient", "per-token CE")
    ok = True
    print(f"\nagainst transformers float32 (eager, tf32 off) on the first {a.check} contexts, relative L2 error:")
    print(f"| array | dmsae {a.dtype} | transformers {a.dtype} | dmsae vs transformers {a.dtype} |\n|---|---|---|---|")
    for j, name in enumerate(names):
        r_ours, r_theirs = rel(ours_check[j], cat(ref, j)), rel(cat(theirs_check, j), cat(ref, j))
        print(f"| {name} | {r_ours:.2e} | {r_theirs:.2e} | {rel(ours_check[j], cat(theirs_check, j)):.2e} |")
        ok &= r_ours <= (1e-4 if a.dtype == "f32" else 2 * r_theirs + 1e-6)
    bound = "1e-4" if a.dtype == "f32" else "twice transformers' bf16 error"
    print(f"check: dmsae's error within {bound}: {'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
