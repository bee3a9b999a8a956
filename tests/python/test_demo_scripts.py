"""scripts/build_corpus.py and scripts/demo.py (the `make demo` driver): the held-out split shares
no document with the training split, and every demo config key can be overridden and reaches the
per-command TOML intact."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import demo  # noqa: E402


def test_corpus_splits_are_disjoint_documents(tmp_path):
    out = tmp_path / "corpus"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_corpus.py"), str(out), "--eval-every", "5"],
                   check=True, capture_output=True)
    docs = {s: [json.loads(l) for l in (out / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "eval")}
    ids = {s: {d["id"] for d in v} for s, v in docs.items()}
    texts = {s: {d["text"] for d in v} for s, v in docs.items()}
    assert ids["train"].isdisjoint(ids["eval"]) and texts["train"].isdisjoint(texts["eval"])
    n = len(docs["train"]) + len(docs["eval"])
    assert len(docs["eval"]) == n // 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["eval.jsonl"]["documents"] == len(docs["eval"])
    assert sum(f["characters"] for f in manifest["files"].values()) >= 100_000


def test_set_overrides_reach_the_command_configs():
    cfg = tomllib.loads((REPO / "configs" / "gemma-3-270m-demo.toml").read_text())
    for item in ["extract.tokens=8K", "train.width=512", "train.distill.tau=0.8", "sweep.ks=[8, 16]",
                 "train.group_fractions=[0.25, 0.25]"]:
        demo.apply_set(cfg, item)
    assert cfg["extract"]["tokens"] == "8K" and cfg["sweep"]["ks"] == [8, 16]
    train = tomllib.loads(demo.toml_dump(cfg["train"]))
    assert train == cfg["train"]
    assert train["width"] == 512 and train["distill"]["tau"] == 0.8
    assert train["group_fractions"] == [0.25, 0.25]
