"""`make bench-extract`: `dmsae extract` against transformers (eager attention) computing the same
thing, layer-L residuals and d(sum of next-token CE)/d(residual), on the same contexts, in one
run, printed side by side with their ratio.

The anchor is what a researcher writes with transformers: parameters frozen, a forward hook
that makes the layer-L output require grad, full logits, cross-entropy, autograd.grad. It
keeps its results in memory; dmsae also compresses, checksums and writes them to a store.

    python scripts/bench_extract.py --dmsae target/release/dmsae --model target/models/gemma-3-270m
    python scripts/bench_extract.py --dmsae dmsae --model DIR --device cuda --dtype bf16 --tokens 256K
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

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


def count(s):
    m = re.fullmatch(r"(\d+)([KMB]?)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a count like 2048 or 64K")
    return int(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "B": 1 << 30}[m[2]]


def contexts(tok, data, n_ctx, context):
    """Documents packed into contexts that start with BOS (as `dmsae extract` packs them)."""
    ids = []
    for line in open(data):
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= n_ctx * (context - 1):
            break
    if len(ids) < n_ctx * (context - 1):
        sys.exit(f"bench_extract: {data} holds fewer than {n_ctx * (context - 1)} tokens")
    rows = [[tok.bos_token_id] + ids[i * (context - 1) : (i + 1) * (context - 1)] for i in range(n_ctx)]
    return torch.tensor(rows)


def anchor_rate(model_dir, data, n_ctx, a):
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    model.to(a.device).eval().requires_grad_(False)
    ids = contexts(tok, data, n_ctx, a.context).to(a.device)
    got = {}

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        h.requires_grad_(True)
        got["h"] = h

    model.model.layers[a.layer].register_forward_hook(hook)

    def batch(b):
        x = ids[b * a.batch : (b + 1) * a.batch]
        logits = model(input_ids=x).logits.float()
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        (g,) = torch.autograd.grad(ce, got["h"])
        return got["h"].detach().cpu(), g.cpu()

    batch(0)  # warm-up, untimed
    sync(a.device)
    t = time.perf_counter()
    n = n_ctx // a.batch
    for b in range(1, n):
        batch(b)
    sync(a.device)
    return (n - 1) * a.batch * (a.context - 1) / (time.perf_counter() - t)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dmsae", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="target/demo/corpus/train.jsonl", help="jsonl with `text` (make corpus)")
    ap.add_argument("--tokens", type=count, default=count("3K"))
    ap.add_argument("--layer", type=int, default=9)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n_ctx = max(2, -(-a.tokens // (a.context - 1)) // a.batch) * a.batch
    work = tempfile.mkdtemp(prefix="dmsae-bench-extract-")
    try:
        cmd = [a.dmsae, "extract", "--model", a.model, "--data", a.data, "--layer", str(a.layer),
               "--tokens", str(n_ctx * (a.context - 1)), "--context", str(a.context),
               "--batch", str(a.batch), "--device", a.device, "--dtype", a.dtype,
               "--out", os.path.join(work, "store")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"bench_extract: {' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
        m = re.search(r"([\d.]+)([KMB]?) tokens/s over \S+ \(model ([\d.]+)s, waiting for the store writer ([\d.]+)s\)",
                      r.stdout)
        if not m:
            sys.exit(f"bench_extract: no rate in dmsae's output:\n{r.stdout}{r.stderr}")
        ours = float(m[1]) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m[2]]
        model_s, wait_s = float(m[3]), float(m[4])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    anchor = anchor_rate(a.model, a.data, n_ctx, a)
    dev = torch.cuda.get_device_name() if a.device != "cpu" else f"CPU, {a.threads} threads"
    print(f"extraction, {os.path.basename(os.path.normpath(a.model))} layer {a.layer}, {n_ctx} contexts of "
          f"{a.context}, batch {a.batch}, {a.dtype}; {dev}; torch {torch.__version__}")
    print("| implementation | tokens/s | dmsae / this |\n|---|---|---|")
    print(f"| dmsae extract (whole command: model, gradients, store) | {ours:,.0f} | 1.00 |")
    print(f"| transformers eager, forward + autograd.grad (first batch untimed) | {anchor:,.0f} | {ours / anchor:.2f} |")
    print(f"dmsae: {model_s:.1f} s in the model, {wait_s:.2f} s waiting for its store writer")


if __name__ == "__main__":
    main()
