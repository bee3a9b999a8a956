"""`make bench-train`: dmsae's training step against an eager PyTorch Matryoshka BatchTopK step
(the issue's anchor), at the same sizes, in one run, printed side by side with their ratio.

The anchor is what a researcher writes in PyTorch (dictionary_learning's Matryoshka BatchTopK
trainer, reduced to the step): dense decoder product for every prefix, BatchTopK over the
batch, the unit-norm decoder constraint, gradient clipping, Adam, the dead-latent counters and
the threshold EMA. It reads its batches from memory; dmsae streams them from a store on disk
(decompressing and verifying every block), so the comparison is not flattered in our favour.
AuxK is idle on both sides by default: no latent can be dead within a benchmark's few steps.
`--auxk` counts every latent dead (dead_tokens = 0), so AuxK takes its full k_aux = d/2
(METHOD.md) every step on both sides: a step of a long run with at least d/2 dead latents.
`--dead-tokens N` counts a latent dead after N tokens without firing instead: a few steps' worth
leaves some latents dead each step, as a long run has (how many depends on the run).
`--core C` gives both sides a trained core of C latents (random unit encoder columns, zero bias,
plain ReLU: each fires on about half the tokens), exempt from BatchTopK: a later cycle's step,
or a sweep's (METHOD.md's distilled core: 197).

Run with a Python that has torch (`.venv-model/bin/python`, or the GPU machine's):
    python scripts/bench_train.py --dmsae target/release/dmsae --preset cpu
    python scripts/bench_train.py --dmsae dmsae --preset h100 --device cuda
"""

import argparse
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from make_random_gemma import tensor_bytes  # scripts/ is on sys.path when run as a script

# (d_model, width, k, batch, steps, store tokens). h100: the sizes.
PRESETS = {
    "cpu": (640, 4096, 32, 1024, 24, 65536),
    "h100": (2304, 65536, 64, 4096, 120, 262144),
}
GROUP_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4]  # METHOD.md; the rest is the last group


def groups(width):
    sizes = [int(width * f) for f in GROUP_FRACTIONS]
    return sizes + [width - sum(sizes)]


def core_columns(d, c):
    """The bench's core encoder columns [d, c]: random unit vectors."""
    w = torch.randn(d, c, generator=torch.Generator().manual_seed(1))
    return w / w.norm(dim=0, keepdim=True)


def write_core(path, d, c):
    """A core file (`dmsae train --core`): W_enc [d, c] and b_enc [c], float32 safetensors."""
    tensors = {"W_enc": core_columns(d, c), "b_enc": torch.zeros(c)}
    header, at = {}, 0
    for name, t in tensors.items():
        n = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for t in tensors.values():
            f.write(tensor_bytes(t))


def anchor_rate(x_all, width, k, batch, steps, warm, device, bf16, dead_tokens, core=0):
    """Tokens/s of the eager PyTorch step over `steps` timed steps after `warm` untimed ones.
    `core`: the first latents are a core (ReLU, anchored to x, exempt from BatchTopK)."""
    d = x_all.shape[1]
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(width, d, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    if core:
        w_dec[:core] = core_columns(d, core).t()
    params = {
        "W_dec": w_dec.clone().to(device).requires_grad_(),
        "W_enc": w_dec.t().contiguous().to(device).requires_grad_(),
        "b_enc": torch.zeros(width, device=device, requires_grad=True),
        "b_dec": torch.zeros(d, device=device, requires_grad=True),
    }
    opt = torch.optim.Adam(params.values(), lr=3e-4, betas=(0.9, 0.999))
    bounds = [0] + [core + b for b in itertools.accumulate(groups(width - core))]
    fired_since = torch.zeros(width, dtype=torch.long, device=device)
    threshold = -1.0
    x_all = x_all.to(device)
    n_batches = x_all.shape[0] // batch

    def step(i):
        nonlocal fired_since, threshold
        x = x_all[(i % n_batches) * batch : (i % n_batches + 1) * batch]
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
            if core:  # anchored to x: b_dec W_enc added back on the core's columns
                pre = torch.cat([pre[:, :core] + params["b_dec"] @ params["W_enc"][:, :core],
                                 pre[:, core:]], 1)
            post = torch.relu(pre).float()
            flat = post[:, core:].flatten()
            vals, idx = flat.topk(k * batch, sorted=False)
            f = torch.zeros_like(flat).scatter(0, idx, vals).view(batch, width - core)
            if core:
                f = torch.cat([post[:, :core], f], 1)
            x_hat = params["b_dec"].expand_as(x)
            loss = 0.0
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                x_hat = x_hat + f[:, lo:hi] @ params["W_dec"][lo:hi]
                loss = loss + (x - x_hat.float()).pow(2).sum(-1).mean()
            loss = loss / (len(bounds) - 1)
            dead = fired_since >= dead_tokens
            n_dead = int(dead.sum())
            if n_dead > 0:  # dictionary_learning's AuxK: a dense scatter times W_dec
                e = (x - x_hat.float()).detach()
                aux = torch.where(dead[None], post, -torch.inf)
                a_vals, a_idx = aux.topk(min(d // 2, n_dead), sorted=False)
                a = torch.zeros_like(post).scatter(-1, a_idx, a_vals)
                e_hat = a @ params["W_dec"]
                l2_aux = (e - e_hat.float()).pow(2).sum(-1).mean()
                var = (e - e.mean(0)).pow(2).sum(-1).mean()
                loss = loss + l2_aux / var / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            wd, gd = params["W_dec"], params["W_dec"].grad
            gd -= (gd * wd).sum(-1, keepdim=True) * wd
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            wd /= wd.norm(dim=1, keepdim=True)
            fired = (f > 0).any(0)
            fired[:core] = True  # the core is exempt from AuxK
            fired_since = torch.where(fired, 0, fired_since + batch)
            kept_min = vals[vals > 0].min().item()
            threshold = kept_min if threshold < 0 else 0.999 * threshold + 0.001 * kept_min
        return loss.item()

    for i in range(warm):
        step(i)
    sync(device)
    t = time.perf_counter()
    for i in range(warm, warm + steps):
        step(i)
    sync(device)
    return steps * batch / (time.perf_counter() - t)


def write_npy_u16(path, t, shape):
    """A .npy of uint16 (bf16 bit patterns) from a 16-bit tensor's bytes."""
    header = f"{{'descr': '<u2', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
        f.write(tensor_bytes(t))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dmsae_rate(dmsae, store, work, width, k, batch, steps, warm, device, threads, dead_tokens, extra="",
               env=None, core=None):
    """Tokens/s of `dmsae train` over its metrics windows after the first (its warm-up), the
    seconds it waited for data and the mean dead fraction at their ends; `extra`: more config
    lines; `env`: more environment variables; `core`: a core file, trained."""
    cfg = os.path.join(work, "bench.toml")
    with open(cfg, "w") as f:
        f.write(
            f"width = {width}\nk = {k}\nbatch_tokens = {batch}\nsteps = {warm + steps}\n"
            f"log_every = {warm}\nwarmup_steps = {warm}\neval_fraction = 0.01\n"
            f"eval_tokens = {batch}\ncheckpoint_every = 0\ncpu_threads = {threads}\n"
            f"dead_tokens = {dead_tokens}\n{extra}" + ("core_frozen = false\n" if core else "")
        )
    out = os.path.join(work, "run")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [dmsae, "train", "--shards", store, "--config", cfg, "--device", device, "--quiet", "--out", out]
    cmd += ["--core", core] if core else []
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        sys.exit(f"bench_train: {' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    train = [l for l in lines if l.get("kind") == "train"][1:]
    tokens = sum(l["tokens_per_s"] for l in train) / len(train)
    wait = sum(l["data_wait_s"] for l in train)
    dead = sum(l["dead_fraction"] for l in train) / len(train)
    return tokens, wait, dead


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dmsae", required=True)
    ap.add_argument("--preset", choices=PRESETS, default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both sides")
    ap.add_argument("--work", help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--auxk", action="store_true",
                    help="every latent counts as dead: full AuxK every step, both sides")
    ap.add_argument("--dead-tokens", type=int,
                    help="a latent is dead after this many tokens without firing, both sides "
                         "(default: 10M, none within a bench; --auxk: 0)")
    ap.add_argument("--encoder-f32", action="store_true",
                    help="also time dmsae with a float32 encoder product (encoder_bf16 = false)")
    ap.add_argument("--kernels-ab", action="store_true",
                    help="also time dmsae with each of its trainer kernels off in turn "
                         "(DMSAE_FUSED_ADAM, _DECODE, _ENCODER_GRAD, _LOSS, _SELECT = 0), all "
                         "five off, the kernels without 16-byte packs (DMSAE_PACKS=0), with "
                         "float32 Adam moments (adam_bf16_moments = false), with the "
                         "decoder's forward over float32 rows (decoder_bf16 = false), with a "
                         "float32 W_enc gradient (encoder_grad_bf16 = false), a float32 W_dec "
                         "gradient (decoder_grad_bf16 = false), float32 Matryoshka parts "
                         "(parts_bf16 = false), and with "
                         "its update reading each row back (DMSAE_DECODER_HELD=0), each "
                         "step's figures read at its end (DMSAE_DEFER_FIGURES=0), and "
                         "BatchTopK's cut and count read by the host (DMSAE_HOSTLESS_SELECT=0), "
                         "and its entries from three passes over the pre-activations "
                         "(DMSAE_SELECT_SLOTS=0); CUDA")
    ap.add_argument("--base", help="an earlier dmsae binary, timed beside this one, alternating "
                                    "(two runs each)")
    ap.add_argument("--core", type=int, default=0,
                    help="a trained core of this many latents on both sides (ReLU, exempt from "
                         "BatchTopK): a later cycle's or a sweep's step; dmsae is also timed "
                         "with the core's entries listed rather than as a block")
    for key in ("width", "k", "batch", "steps"):
        ap.add_argument(f"--{key}", type=int, help="override the preset's")
    a = ap.parse_args()
    if a.auxk and a.dead_tokens is not None:
        ap.error("--auxk is --dead-tokens 0; give one of them")
    if a.kernels_ab and not a.device.startswith("cuda"):
        ap.error("--kernels-ab needs --device cuda (the kernels run on CUDA only)")
    d, width, k, batch, steps, n_tokens = PRESETS[a.preset]
    width, k, batch, steps = (v if o is None else o for v, o in
                              zip((width, k, batch, steps), (a.width, a.k, a.batch, a.steps)))
    warm = max(steps // 4, 2)
    torch.set_num_threads(a.threads)
    work = a.work or tempfile.mkdtemp(prefix="dmsae-bench-train-")
    try:
        # bf16, as `dmsae extract` stores activations; torch only, so it runs wherever torch does.
        xt = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(0)).bfloat16()
        acts = os.path.join(work, "acts.npy")
        write_npy_u16(acts, xt.view(torch.int16), (n_tokens, d))
        store = os.path.join(work, "store")
        shutil.rmtree(store, ignore_errors=True)
        subprocess.run(
            [a.dmsae, "store", "import", "--acts", acts, "--dtype", "bf16", "--out", store],
            check=True, capture_output=True,
        )
        os.remove(acts)
        xt = xt.float()  # the same values as the store
        core_file = None
        if a.core:
            core_file = os.path.join(work, "core.safetensors")
            write_core(core_file, d, a.core)
        rate = functools.partial(dmsae_rate, core=core_file)
        # METHOD.md's 10M: never within a bench.
        dead_tokens = 0 if a.auxk else a.dead_tokens if a.dead_tokens is not None else 10_000_000
        ours, wait, dead = rate(a.dmsae, store, work, width, k, batch, steps, warm, a.device,
                                a.threads, dead_tokens)
        bf16 = ", bf16 encoder product" if a.device != "cpu" else ""
        rows = []

        def add(row):
            # Each row as it comes, so a run cut off by a time limit still tells what it timed.
            rows.append(row)
            print(f"-- {row[0]}: {row[1]:,.0f} tokens/s, dmsae / this {ours / row[1]:.2f}",
                  flush=True)

        add((f"dmsae train (sparse decoder{bf16}, streamed from the store)", ours))
        if a.base:  # the same bench of an earlier version, alternating with this one
            for r in (1, 2):
                add((f"base {a.base}, run {r}",
                     rate(a.base, store, work, width, k, batch, steps, warm, a.device,
                          a.threads, dead_tokens)[0]))
                if r == 1:
                    add(("dmsae train, run 2",
                         rate(a.dmsae, store, work, width, k, batch, steps, warm, a.device,
                              a.threads, dead_tokens)[0]))
        # The anchors before the variants: the ratio the issue asks for comes first.
        torch.backends.cuda.matmul.allow_tf32 = True  # the float32 anchor used tf32
        add(("eager PyTorch, float32" + (" (tf32)" if a.device != "cpu" else ""),
             anchor_rate(xt, width, k, batch, steps, warm, a.device, False, dead_tokens, a.core)))
        if a.device != "cpu":
            add(("eager PyTorch, bf16 autocast",
                 anchor_rate(xt, width, k, batch, steps, warm, a.device, True, dead_tokens,
                             a.core)))
        if a.encoder_f32:  # what the bf16 encoder product buys
            add(("dmsae train, float32 encoder product (encoder_bf16 = false)",
                 rate(a.dmsae, store, work, width, k, batch, steps, warm, a.device,
                      a.threads, dead_tokens, "encoder_bf16 = false\n")[0]))
        if a.core:  # what the core as a block buys
            add(("dmsae train, the core's entries listed with BatchTopK's (DMSAE_CORE_BLOCK=0)",
                 rate(a.dmsae, store, work, width, k, batch, steps, warm, a.device,
                      a.threads, dead_tokens, "", {"DMSAE_CORE_BLOCK": "0"})[0]))
        if a.kernels_ab:  # what dmsae's trainer kernels buy
            off = {k: "0" for k in ("DMSAE_FUSED_ADAM", "DMSAE_FUSED_DECODE",
                                    "DMSAE_FUSED_ENCODER_GRAD", "DMSAE_FUSED_LOSS",
                                    "DMSAE_FUSED_SELECT")}
            for name, extra, env in (
                ("dmsae train, ATen update (DMSAE_FUSED_ADAM=0)", "", {"DMSAE_FUSED_ADAM": "0"}),
                ("dmsae train, embedding_bag decoder (DMSAE_FUSED_DECODE=0)", "",
                 {"DMSAE_FUSED_DECODE": "0"}),
                ("dmsae train, dense W_enc gradient (DMSAE_FUSED_ENCODER_GRAD=0)", "",
                 {"DMSAE_FUSED_ENCODER_GRAD": "0"}),
                ("dmsae train, ATen Matryoshka loss (DMSAE_FUSED_LOSS=0)", "",
                 {"DMSAE_FUSED_LOSS": "0"}),
                ("dmsae train, ATen's mask and nonzero for BatchTopK (DMSAE_FUSED_SELECT=0)", "",
                 {"DMSAE_FUSED_SELECT": "0"}),
                ("dmsae train, all five off", "", off),
                ("dmsae train, no 16-byte packs (DMSAE_PACKS=0)", "", {"DMSAE_PACKS": "0"}),
                ("dmsae train, float32 Adam moments (adam_bf16_moments = false)",
                 "adam_bf16_moments = false\n", None),
                ("dmsae train, float32 decoder rows (decoder_bf16 = false)",
                 "decoder_bf16 = false\n", None),
                ("dmsae train, float32 W_enc gradient (encoder_grad_bf16 = false)",
                 "encoder_grad_bf16 = false\n", None),
                ("dmsae train, float32 W_dec gradient (decoder_grad_bf16 = false)",
                 "decoder_grad_bf16 = false\n", None),
                ("dmsae train, float32 Matryoshka parts and their gradient "
                 "(parts_bf16 = false)", "parts_bf16 = false\n", None),
                ("dmsae train, decoder's update reading its rows back (DMSAE_DECODER_HELD=0)",
                 "", {"DMSAE_DECODER_HELD": "0"}),
                ("dmsae train, each step's figures read at its end (DMSAE_DEFER_FIGURES=0)",
                 "", {"DMSAE_DEFER_FIGURES": "0"}),
                ("dmsae train, BatchTopK's cut and count read by the host "
                 "(DMSAE_HOSTLESS_SELECT=0)", "", {"DMSAE_HOSTLESS_SELECT": "0"}),
                ("dmsae train, BatchTopK's entries counted and written from three passes over "
                 "the pre-activations, not one (DMSAE_SELECT_SLOTS=0)", "",
                 {"DMSAE_SELECT_SLOTS": "0"}),
            ):
                add((name, rate(a.dmsae, store, work, width, k, batch, steps, warm,
                                a.device, a.threads, dead_tokens, extra, env)[0]))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    dev = torch.cuda.get_device_name() if a.device != "cpu" else f"CPU, {a.threads} threads"
    aux = (f"on every latent (k_aux {min(d // 2, width)})" if a.auxk
           else f"on latents dead after {dead_tokens:,} tokens" if a.dead_tokens is not None
           else "idle")
    core = f", a trained core of {a.core} (ReLU)" if a.core else ""
    print(f"training step, d {d}, width {width}{core}, k {k}, batch {batch}, METHOD.md groups, "
          f"{steps} timed steps after {warm}; "
          f"AuxK {aux}; {dev}; "
          f"torch {torch.__version__}")
    print("| implementation | tokens/s | dmsae / this |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r:,.0f} | {ours / r:.2f} |")
    print(f"dmsae waited {wait:.3f} s for data over its timed windows" +
          (f"; {dead:.1%} of its latents dead at their ends" if a.dead_tokens is not None else ""))


if __name__ == "__main__":
    main()
