"""A randomly initialised Gemma-2 checkpoint directory (config.json in the published dialect,
model.safetensors in bf16, a word-level tokenizer.json) and a text file of its words: enough
for `dmsae extract` to measure speed on a machine that cannot download Gemma-2-2B, such as the
lent GPU machine. The activations mean nothing; only the shapes are Gemma-2-2B's.

Needs only torch (the GPU machine has no transformers or safetensors package).

    python scripts/make_random_gemma.py --preset gemma-2-2b --out DIR --text FILE --words 2M
"""

import argparse
import ctypes
import json
import os

import torch

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, head_dim, vocab: the published Gemma-2-2B.
    "gemma-2-2b": (2304, 9216, 26, 8, 4, 256, 256000),
    "tiny": (64, 128, 4, 4, 2, 16, 512),
}
WORDS = 4000  # distinct words in the tokenizer at most (ids 4..); the rest of the vocabulary is unused


def tensor_bytes(t):
    """A CPU tensor's bytes, copied at memcpy speed (iterating its storage in Python took
    minutes for 84 MB; this needs no numpy)."""
    t = t.contiguous()
    return ctypes.string_at(t.data_ptr(), t.nbytes)


def config(p):
    hidden, inter, layers, heads, kv, head_dim, vocab = p
    return {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "torch_dtype": "float32",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": head_dim, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": head_dim, "sliding_window": 4096, "rope_theta": 10000.0,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "max_position_embeddings": 8192, "attention_bias": False,
    }


def tensors(p):
    hidden, inter, layers, heads, kv, head_dim, vocab = p
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        pre = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            yield pre + n + ".weight", (hidden,)
        yield pre + "self_attn.q_proj.weight", (heads * head_dim, hidden)
        yield pre + "self_attn.k_proj.weight", (kv * head_dim, hidden)
        yield pre + "self_attn.v_proj.weight", (kv * head_dim, hidden)
        yield pre + "self_attn.o_proj.weight", (hidden, heads * head_dim)
        yield pre + "mlp.gate_proj.weight", (inter, hidden)
        yield pre + "mlp.up_proj.weight", (inter, hidden)
        yield pre + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)


def write_safetensors(path, p, seed, device):
    """bf16 tensors, written one at a time (Gemma-2-2B is 5.2 GB), drawn on `device` (CUDA
    draws Gemma-2-2B's 2.6B numbers in a second; one CPU thread takes about a minute)."""
    specs = list(tensors(p))
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        n = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    g = torch.Generator(device).manual_seed(seed)
    with open(path + ".tmp", "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for name, shape in specs:
            # Norm weights are stored as w in (1 + w): zero is the identity.
            t = torch.zeros(shape) if len(shape) == 1 else torch.randn(shape, generator=g, device=device) * 0.02
            f.write(tensor_bytes(t.bfloat16().cpu()))
    os.replace(path + ".tmp", path)


def tokenizer(words):
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(words)})
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for t, i in list(vocab.items())[:4]]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="gemma-2-2b")
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--text", required=True, help="plain-text file of random words to write")
    ap.add_argument("--words", type=float, default=1e6, help="words in the text file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the weights are drawn (the numbers differ between devices)")
    a = ap.parse_args()
    p = PRESETS[a.preset]
    words = min(WORDS, p[-1] - 4)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config(p), f, indent=1)
    with open(os.path.join(a.out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer(words), f)
    write_safetensors(os.path.join(a.out, "model.safetensors"), p, a.seed, a.device)
    g = torch.Generator().manual_seed(a.seed + 1)
    ids = torch.randint(0, words, (int(a.words),), generator=g).tolist()
    with open(a.text, "w") as f:
        for i in range(0, len(ids), 200):  # paragraphs of 200 words
            f.write(" ".join(f"w{j}" for j in ids[i : i + 200]) + "\n\n")
    print(f"{a.out}: random {a.preset} ({sum(torch.Size(s).numel() for _, s in tensors(p)):,} parameters, bf16); "
          f"{a.text}: {int(a.words):,} words")


if __name__ == "__main__":
    main()
