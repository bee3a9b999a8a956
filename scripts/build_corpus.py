"""The demo's real-text corpus, from text that ships with the machine: the Python reference
manual's topics (`pydoc_data/topics.py` in CPython's standard library, the text `help()` shows)
and the licence texts in /usr/share/common-licenses (Debian/Ubuntu base-files). No downloads.

    python3 scripts/build_corpus.py OUT_DIR [--eval-every N]

Writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl (one {"id", "source", "text"} object per
line; the extractor reads `text`) and OUT_DIR/manifest.json (sources, documents, characters,
sha256 of each file). Whole documents go to one split: the held-out split is every N-th
document in a fixed order (sorted by the sha256 of the id), so the two splits share no text. Standard library only.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile

LICENSES = "/usr/share/common-licenses"


def documents():
    """(id, source, text) of every document, duplicates (symlinked licences) left out."""
    docs = []
    try:
        from pydoc_data import topics
    except ImportError:
        topics = None
    if topics is not None:
        for name, text in topics.topics.items():
            docs.append((f"pydoc/{name}", "pydoc_data.topics", text))
    if os.path.isdir(LICENSES):
        for name in sorted(os.listdir(LICENSES)):
            path = os.path.join(LICENSES, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    docs.append((f"license/{name}", LICENSES, f.read()))
    # A fixed shuffle (by the hash of the id) so that any prefix of the corpus mixes both sources.
    seen, out = set(), []
    for doc in sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest()):
        h = hashlib.sha256(doc[2].encode()).digest()
        if doc[2].strip() and h not in seen:
            seen.add(h)
            out.append(doc)
    return out


def write_atomic(path, text):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--eval-every", type=int, default=8, help="every N-th document is held out (default 8)")
    a = ap.parse_args()
    docs = documents()
    if len(docs) < 2 * a.eval_every or sum(len(d[2]) for d in docs) < 100_000:
        sys.exit(f"build_corpus: only {len(docs)} documents found (pydoc_data.topics and {LICENSES}); "
                 "need at least 100,000 characters")
    os.makedirs(a.out, exist_ok=True)
    splits = {"train": [], "eval": []}
    for i, (doc_id, source, text) in enumerate(docs):
        split = "eval" if i % a.eval_every == a.eval_every - 1 else "train"
        splits[split].append(json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False))
    manifest = {"sources": ["pydoc_data.topics (CPython %d.%d.%d)" % sys.version_info[:3], LICENSES],
                "eval_every": a.eval_every, "files": {}}
    for split, lines in splits.items():
        body = "\n".join(lines) + "\n"
        write_atomic(os.path.join(a.out, f"{split}.jsonl"), body)
        manifest["files"][f"{split}.jsonl"] = {
            "documents": len(lines),
            "characters": sum(len(json.loads(l)["text"]) for l in lines),
            "sha256": hashlib.sha256(body.encode()).hexdigest(),
        }
    write_atomic(os.path.join(a.out, "manifest.json"), json.dumps(manifest, indent=1) + "\n")
    for name, f in manifest["files"].items():
        print(f"corpus: {a.out}/{name}: {f['documents']} documents, {f['characters']:,} characters")


if __name__ == "__main__":
    main()
