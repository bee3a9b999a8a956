"""`make demo`'s driver: one TOML file (configs/gemma-3-270m-demo.toml) drives every dmsae step.

    python3 scripts/demo.py --config configs/gemma-3-270m-demo.toml --model DIR \\
        --out target/demo [--dmsae target/release/dmsae] [--set extract.tokens=8K ...]

Sections: [corpus] holds scripts/build_corpus.py's eval_every (the corpus is rebuilt into
OUT/corpus each run), [extract] holds `dmsae extract --config` keys, [train] (with
[train.distill]) holds `dmsae distill --config` keys (trainer/src/config.rs), [distill] holds `cycles`, [sweep] and
[eval] the keys of those commands. `--set SECTION.KEY=VALUE` overrides any key (VALUE is read as
TOML, else as a string). Each step's resolved settings are written to OUT/<step>.toml; a step
whose settings changed since the last run starts afresh (its output and every later step's are
removed), an unchanged one is rerun as is, which the commands resume or finish at once.
Standard library only (Python >= 3.11 for tomllib).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

try:
    import tomllib
except ImportError:
    sys.exit("demo: needs Python >= 3.11 (tomllib)")

STEPS = ("extract", "distill", "sweep", "eval")


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_dump(table, prefix=""):
    """A table of scalars and arrays with nested tables, as TOML text."""
    lines = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for k, v in table.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", toml_dump(v, f"{prefix}{k}.")]
    return "\n".join(lines)


def apply_set(cfg, item):
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        sys.exit(f"demo: --set {item}: expected SECTION.KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *path, last = key.split(".")
    t = cfg
    for p in path:
        t = t.setdefault(p, {})
        if not isinstance(t, dict):
            sys.exit(f"demo: --set {item}: {p} is not a table")
    t[last] = value


class Demo:
    def __init__(self, a, cfg):
        self.a, self.cfg, self.out = a, cfg, a.out
        self.times = []
        self.fresh = False  # set once a step started afresh: every later step does too

    def settings(self, step, text):
        """Write OUT/<step>.toml; remove the step's output when its settings changed."""
        path = os.path.join(self.out, f"{step}.toml")
        old = open(path).read() if os.path.exists(path) else None
        target = os.path.join(self.out, step)
        if self.fresh or old != text:
            self.fresh = True
            if os.path.exists(target):
                shutil.rmtree(target)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        return path, target

    def run(self, phase, args):
        print(f"\n$ {' '.join(args)}", flush=True)
        t0 = time.time()
        r = subprocess.run(args)
        dt = time.time() - t0
        self.times.append((phase, dt))
        if r.returncode != 0:
            sys.exit(f"demo: {phase} failed (exit {r.returncode}) after {dt:.0f} s")
        return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dmsae", default="target/release/dmsae")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    a = ap.parse_args()
    with open(a.config, "rb") as f:
        try:
            cfg = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            sys.exit(f"demo: {a.config}: {e}")
    for item in a.set:
        apply_set(cfg, item)
    unknown = set(cfg) - set(STEPS) - {"train", "corpus"}
    if unknown:
        sys.exit(f"demo: {a.config}: unknown section(s) {sorted(unknown)}; expected {list(STEPS) + ['corpus', 'train']}")
    os.makedirs(a.out, exist_ok=True)
    d = Demo(a, cfg)
    a.corpus = os.path.join(a.out, "corpus")
    here = os.path.dirname(os.path.abspath(__file__))
    d.run("corpus", [sys.executable, os.path.join(here, "build_corpus.py"), a.corpus,
                     "--eval-every", str(cfg.get("corpus", {}).get("eval_every", 8))])
    with open(os.path.join(a.corpus, "manifest.json")) as f:
        text_sha = {k: v["sha256"] for k, v in json.load(f)["files"].items()}
    x = dict(cfg.get("extract", {}))
    ext_path, store = d.settings("extract", f"# model {os.path.abspath(a.model)} text {text_sha['train.jsonl']}\n"
                                 + toml_dump(x) + "\n")
    t = d.run("extract", [a.dmsae, "extract", "--config", ext_path, "--model", a.model,
                          "--data", os.path.join(a.corpus, "train.jsonl"), "--out", store])
    d.run("store verify", [a.dmsae, "store", "verify", store])
    # The distill step also depends on the store: its settings include the extract settings.
    tr = dict(cfg.get("train", {}))
    cycles = cfg.get("distill", {}).get("cycles", 3)
    train_text = toml_dump(tr) + "\n"
    train_path, run_dir = d.settings("distill", f"# cycles = {cycles}\n" + train_text)
    d.run("distill", [a.dmsae, "distill", "--shards", store, "--config", train_path,
                      "--cycles", str(cycles), "--out", run_dir])
    d.run("report", [a.dmsae, "report", run_dir])
    sw = dict(cfg.get("sweep", {}))
    sweep_dir = None
    if sw:
        ks = sw.pop("ks", None)
        if not ks:
            sys.exit(f"demo: {a.config}: [sweep] needs ks = [..]")
        _, sweep_dir = d.settings("sweep", f"# {json.dumps(sw, sort_keys=True)} ks {ks}\n" + train_text)
        args = [a.dmsae, "sweep", "--shards", store, "--distill-run", run_dir, "--config", train_path,
                "--k", ",".join(str(k) for k in ks), "--out", sweep_dir]
        for key, v in sw.items():
            args += [f"--{key.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
        d.run("sweep", args)
        d.run("report", [a.dmsae, "report", sweep_dir])
    ev = dict(cfg.get("eval", {}))
    if ev:
        # The sweep's exports when there is a sweep, else the last distillation cycle's SAE.
        sae = sweep_dir or os.path.join(run_dir, f"cycle-{cycles - 1}")
        _, eval_dir = d.settings("eval", f"# sae {sae} text {text_sha['eval.jsonl']}\n" + toml_dump(ev) + "\n")
        os.makedirs(eval_dir, exist_ok=True)
        done = os.path.join(eval_dir, "eval.md")
        # eval.json is written last: both present means the eval finished.
        if not d.fresh and os.path.exists(done) and os.path.exists(os.path.join(eval_dir, "eval.json")):
            # Unlike the other commands, eval does not resume: its finished table is reused.
            print(f"\ndemo: {eval_dir}: settings unchanged since the finished eval:\n")
            print(open(done).read())
            ev = {}
    if ev:
        args = [a.dmsae, "eval", "--model", a.model, "--sae", sae,
                "--data", os.path.join(a.corpus, "eval.jsonl"), "--out", eval_dir]
        for key, v in ev.items():
            args += [f"--{key.replace('_', '-')}", str(v)]
        d.run("eval", args)
    print("\ndemo: times per phase: " + ", ".join(f"{p} {s:.0f} s" for p, s in d.times))
    print(f"demo: outputs in {a.out}/: extract/ (store), distill/ (run, plots/), sweep/, eval/")


if __name__ == "__main__":
    main()
