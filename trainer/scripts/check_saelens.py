"""Load a `dmsae train` export with SAELens and check it encodes as dmsae means it to.

Not run by CI (SAELens pulls transformer-lens, datasets, plotly, ...). Usage:
    python check_saelens.py RUN_DIR ACTS.npy
ACTS.npy: float32 [n, d_in] activations in model units (what the store was imported from).
Checks: SAE.load_from_disk works and picks JumpReLU; SAELens' encode equals a plain numpy
JumpReLU (ReLU(pre) where pre > threshold, pre = (x - b_dec) W_enc + b_enc) on the export;
prints SAELens' FVU on the rows beside the trainer's held-out eval FVU from cfg.json.
"""

import json
import sys

import numpy as np
import torch
from safetensors.numpy import load_file
from sae_lens import SAE

run, acts = sys.argv[1], sys.argv[2]
x = np.load(acts).astype(np.float32)[:4096]
sae = SAE.load_from_disk(run, device="cpu")
print("loaded", type(sae).__name__, "d_in", sae.cfg.d_in, "d_sae", sae.cfg.d_sae)
with torch.no_grad():
    f_lens = sae.encode(torch.from_numpy(x)).numpy()
    x_hat = sae.decode(torch.from_numpy(f_lens)).numpy()
w = load_file(f"{run}/sae_weights.safetensors")
pre = (x.astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
f_np = np.where((pre > w["threshold"]) & (pre > 0), pre, 0.0)
diff = np.abs(f_lens - f_np).max()
same_support = ((f_lens > 0) == (f_np > 0)).mean()
fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
cfg = json.load(open(f"{run}/cfg.json"))
print(f"max |SAELens - numpy| code difference {diff:.3e}; same support on {same_support:.6f} of entries")
print(f"SAELens FVU on {len(x)} rows {fvu:.4f}; trainer eval FVU {cfg['dmsae']['eval']['fvu']:.4f}")
print(f"L0 {np.count_nonzero(f_lens, axis=1).mean():.3f} (trainer eval {cfg['dmsae']['eval']['l0_total']:.3f})")
assert diff < 1e-4 * max(1.0, np.abs(f_np).max()) and same_support > 0.9999, "SAELens encodes differently"
print("ok")
