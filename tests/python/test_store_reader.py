"""The Python store reader (store-format/python/dmsae_store.py) against SPEC.md and the Rust writer.

Stores written by `dmsae store import` must read back bit-exactly. The binary is $DMSAE_BIN or
<repo>/target/release/dmsae; the tests that need it skip when it is missing. A tiny reference
writer below builds shards by hand so the reader's checks are tested without the binary too.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "store-format" / "python"))
import dmsae_store as ds

BIN = Path(os.environ.get("DMSAE_BIN", REPO / "target" / "release" / "dmsae"))
SAMPLE = REPO.parent / "shared" / "data" / "gemma3-270m-l9-licenses"
HAVE_BLAKE3 = ds._blake3 is not None
NP = {"bf16": np.uint16, "f16": np.float16, "f32": np.float32}
BITS = {"bf16": np.uint16, "f16": np.uint16, "f32": np.uint32}

needs_bin = pytest.mark.skipif(not BIN.is_file(), reason=f"dmsae binary not built at {BIN}")


def bits(a: np.ndarray) -> np.ndarray:
    """Raw bit patterns, so NaN payloads and -0.0 compare exactly."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.array_equal(bits(got), bits(want))


def run_import(tmp: Path, out: str, arrays: dict[str, np.ndarray], dtype: str, **opts: object) -> Path:
    args = [str(BIN), "store", "import"]
    for name, arr in arrays.items():
        p = tmp / f"{out}-{name}.npy"
        np.save(p, arr)
        args += [f"--{name}", str(p)]
    args += ["--dtype", dtype, "--out", str(tmp / out)]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(args, capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"{' '.join(args)}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return tmp / out


def boundary_ranges(st: ds.Store) -> list[tuple[int, int]]:
    """Ranges that straddle every shard boundary and chunk boundaries, from the store's own layout
    (the CLI may round --shard-tokens to whole chunks)."""
    starts = np.cumsum([0] + [s["tokens"] for s in st.manifest["shards"]])
    n, c = st.total_tokens, st.chunk_tokens
    assert len(starts) > 2, "want several shards"
    out = [(int(b) - 3, int(b) + 2) for b in starts[1:-1]]  # shard boundaries
    out += [(c - 1, c + 1), (c // 2, int(starts[1]) + c + 1), (1, n - 1), (n - 1, n), (0, n), (5, 5)]
    return out


def special_values(dtype: str) -> np.ndarray:
    """±0, ±inf, NaNs with payloads (quiet, signalling, negative), subnormals, extremes."""
    if dtype == "f32":
        return np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001,
                         0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF, 0x00000001, 0x807FFFFF, 0x00400000,
                         0x7F7FFFFF, 0xFF7FFFFF, 0x00800000, 0x3F800000], np.uint32)
    if dtype == "f16":
        return np.array([0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01, 0x7DFF, 0xFFFF,
                         0x0001, 0x83FF, 0x0200, 0x7BFF, 0xFBFF, 0x0400, 0x3C00], np.uint16)
    return np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x7FBF, 0xFFFF,
                     0x0001, 0x807F, 0x0040, 0x7F7F, 0xFF7F, 0x0080, 0x3F80], np.uint16)


def synthetic(dtype: str, n: int, d: int, seed: int) -> np.ndarray:
    """Column and row scales spread over many binades (escapes), specials sprinkled in."""
    rng = np.random.default_rng(seed)
    lo, hi = {"f16": (-20, 14), "bf16": (-60, 60), "f32": (-60, 60)}[dtype]
    x = rng.standard_normal((n, d)) * 2.0 ** rng.integers(lo // 2, hi // 2, d)[None, :] \
        * 2.0 ** rng.integers(-3, 4, n)[:, None]
    x[rng.random((n, d)) < 0.02] *= 2.0 ** rng.integers(lo, hi)  # rare outliers
    with np.errstate(over="ignore", under="ignore"):
        if dtype == "bf16":
            b = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        else:
            b = bits(x.astype(NP[dtype]))
    sp = special_values(dtype)
    flat = b.reshape(-1)
    where = rng.choice(flat.size, 4 * sp.size, replace=False)
    flat[where] = np.tile(sp, 4)
    flat[: sp.size] = sp  # the first chunk certainly holds every special value
    return b if dtype == "bf16" else b.view(NP[dtype])


# ---------------------------------------------------------------------------------------------
# A minimal reference writer (SPEC.md "Shard file"), used to test the reader's checks.

def enc_expsplit(u: np.ndarray, dtype: str, rng: np.random.Generator) -> bytes:
    B, E, M = ds.DTYPES[dtype][1]
    u = u.astype(np.uint32)
    n, w = u.shape
    e, rest = (u >> M) & ((1 << E) - 1), ((u >> (B - 1)) << M) | (u & ((1 << M) - 1))
    col, row = rng.integers(0, 256, w, np.uint8), rng.integers(0, 256, n, np.uint8)  # any work
    nib = ((e.astype(np.int64) - col[None, :] - row[:, None] + 7) % 256).astype(np.uint8)
    esc = e[nib >= 15].astype(np.uint8)
    nib[nib >= 15] = 15
    flat = np.zeros(nib.size + nib.size % 2, np.uint8)
    flat[: nib.size] = nib.reshape(-1)
    packed = flat[0::2] | (flat[1::2] << 4)
    R = (M + 1 + 7) // 8
    planes = np.stack([(rest >> (8 * k)) & 255 for k in range(R)]).astype(np.uint8)
    return frames([col.tobytes() + row.tobytes(), packed.tobytes(), esc.tobytes(), planes.tobytes()])


def frames(parts: list[bytes]) -> bytes:
    z = [zstandard.ZstdCompressor(level=3).compress(p) for p in parts]
    return struct.pack(f"<{len(z)}I", *map(len, z)) + b"".join(z)


def encode(a: np.ndarray, dtype: str, codec: str, rng: np.random.Generator) -> bytes:
    if codec == "raw":
        return a.tobytes()
    if codec == "bytesplit":
        b = np.ascontiguousarray(a).view(np.uint8).reshape(a.size, a.dtype.itemsize)
        return frames([b[:, k].tobytes() for k in range(a.dtype.itemsize)])
    return enc_expsplit(bits(a), dtype, rng)


def write_shard(path: Path, cols: dict[str, tuple[str, str, np.ndarray]], chunk: int, seed: int = 0) -> None:
    from blake3 import blake3
    rng = np.random.default_rng(seed)
    hdr = json.dumps({"chunk_tokens": chunk, "level": 3, "writer": "py", "seq": 0, "arrays": [
        {"name": k, "dtype": dt, "width": a.shape[1], "codec": c} for k, (dt, c, a) in cols.items()]}).encode()
    head = b"DMSAESHD" + struct.pack("<II", 1, len(hdr)) + hdr
    out, index = [head + blake3(head).digest()], b""
    n = next(iter(cols.values()))[2].shape[0]
    for s in range(0, n, chunk):
        index += struct.pack("<II", min(chunk, n - s), 0)
        for dt, codec, a in cols.values():
            blk = encode(a[s:s + chunk], dt, codec, rng)
            out.append(blk)
            index += struct.pack("<Q", len(blk)) + blake3(blk).digest()
    stats = b"".join(struct.pack("<Qdd", 0, 0, 0) + bytes(16 * a.shape[1])
                     for dt, _, a in cols.values() if ds.DTYPES[dt][1])
    t = struct.pack("<4Q", -(-n // chunk), n, len(index), len(stats))
    out += [index, stats, t, blake3(index + stats + t).digest(), b"DMSAEEND"]
    path.write_bytes(b"".join(out))


def write_store(root: Path, cols: dict[str, tuple[str, str, np.ndarray]], chunk: int, shard: int) -> Path:
    from blake3 import blake3
    root.mkdir()
    n, shards = next(iter(cols.values()))[2].shape[0], []
    for i, s in enumerate(range(0, n, shard)):
        f = root / f"py-{i:06d}.dmss"
        write_shard(f, {k: (dt, c, a[s:s + shard]) for k, (dt, c, a) in cols.items()}, chunk, seed=i)
        shards.append({"file": f.name, "tokens": min(shard, n - s), "bytes": f.stat().st_size,
                       "blake3": blake3(f.read_bytes()).hexdigest()})
    arrays = [{"name": k, "dtype": dt, "width": a.shape[1], "codec": c} for k, (dt, c, a) in cols.items()]
    (root / "manifest.json").write_text(json.dumps({
        "format": "dmsae-store", "format_version": 1, "chunk_tokens": chunk, "arrays": arrays,
        "total_tokens": n, "shards": shards, "provenance": {}, "stats": {}}))
    return root


# ---------------------------------------------------------------------------------------------
# Pure-Python tests (no Rust binary needed).

def test_bf16_to_float32_is_exact() -> None:
    x = np.array([1.5, -0.0, np.inf, -3.0e38, 1e-40], np.float32)
    b = (x.view(np.uint32) >> 16).astype(np.uint16)
    assert_bits_equal(ds.bf16_to_float32(b), (b.astype(np.uint32) << 16).view(np.float32))
    assert ds.bf16_to_float32(np.array([0x3F80], np.uint16))[0] == 1.0


def test_expsplit_hand_built_block() -> None:
    # f16 [[1.0, -2.0], [65504, 0.0]]; col = [15, 16], row = [0, 15]
    # nibbles e - col - row + 7: [7, 7, 7, (0-16-15+7) mod 256 = 232 -> escape 0]
    blk = frames([bytes([15, 16, 0, 15]), bytes([0x77, 0xF7]), bytes([0]),
                  bytes([0x00, 0x00, 0xFF, 0x00, 0x00, 0x04, 0x03, 0x00])])
    got = ds.decode_expsplit(blk, "f16", 2, 2).view(np.float16)
    assert_bits_equal(got, np.array([[1.0, -2.0], [65504.0, 0.0]], np.float16))
    # an escaped exponent of 32 does not fit f16's 5 bits
    bad = frames([bytes([15, 16, 0, 15]), bytes([0x77, 0xF7]), bytes([32]), bytes(8)])
    with pytest.raises(ds.StoreFormatError, match="does not fit 5 bits"):
        ds.decode_expsplit(bad, "f16", 2, 2)
    # rest above 2^11 would spill into other fields
    bad = frames([bytes([15, 16, 0, 15]), bytes([0x77, 0xF7]), bytes([0]), bytes(7) + b"\x08"])
    with pytest.raises(ds.StoreFormatError, match="rest"):
        ds.decode_expsplit(bad, "f16", 2, 2)
    # a frame that decompresses to the wrong size
    bad = frames([bytes([15, 16, 0]), bytes([0x77, 0xF7]), bytes([0]), bytes(8)])
    with pytest.raises(ds.StoreFormatError, match="content size"):
        ds.decode_expsplit(bad, "f16", 2, 2)
    # One standard frame per stream, as the Rust reader requires (SPEC check 5): not an empty
    # stream, not a skippable frame, not two frames; and the odd count's padding nibble is 0.
    c = zstandard.ZstdCompressor(write_content_size=True)
    row = frames([bytes([15, 15, 15, 0]), bytes([0x77, 0x07]), b"", bytes(6)])  # 1 x 3 of 1.0
    assert_bits_equal(ds.decode_expsplit(row, "f16", 1, 3).view(np.float16), np.ones((1, 3), np.float16))
    row = frames([bytes([15, 15, 15, 0]), bytes([0x77, 0x17]), b"", bytes(6)])
    with pytest.raises(ds.StoreFormatError, match="padding nibble"):
        ds.decode_expsplit(row, "f16", 1, 3)
    parts = [bytes([15, 16, 0, 15]), bytes([0x77, 0xF7]), bytes([0]), bytes([0, 0, 0xFF, 0, 0, 4, 3, 0])]
    streams = [c.compress(p) for p in parts]
    skippable = b"\x50\x2a\x4d\x18" + bytes(4)
    for k, bad_stream, msg in [(2, b"", "standard zstd frame"), (2, skippable, "standard zstd frame"),
                               (1, streams[1] + c.compress(b""), "after the zstd frame")]:
        s = list(streams)
        s[k] = bad_stream
        blk = struct.pack("<4I", *map(len, s)) + b"".join(s)
        with pytest.raises(ds.StoreFormatError, match=msg):
            ds.decode_expsplit(blk, "f16", 2, 2)


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_reference_writer_roundtrip(tmp_path: Path, dtype: str) -> None:
    pytest.importorskip("blake3")
    rng = np.random.default_rng(1)
    a = synthetic(dtype, 157, 13, seed=2)
    cols = {c: (dtype, c, a) for c in ("raw", "bytesplit", "expsplit")}
    cols["ids"] = ("u32", "bytesplit", rng.integers(0, 2**32, (157, 1), np.uint32))
    cols["ctx"] = ("u64", "raw", rng.integers(0, 2**63, (157, 1), np.uint64))
    st = ds.Store(write_store(tmp_path / "s", cols, chunk=20, shard=50), require_blake3=True)
    for name, (_, _, want) in cols.items():
        assert_bits_equal(st.read(name), want)
        assert_bits_equal(np.concatenate(list(st.iter_chunks(name))), want)
        for lo, hi in [(0, 1), (19, 21), (45, 105), (99, 157), (150, 150), (7, 153)]:
            assert_bits_equal(st.read(name, lo, hi), want[lo:hi])
    st.verify_files()
    st.close()


def test_reader_rejects_corruption(tmp_path: Path) -> None:
    pytest.importorskip("blake3")
    a = synthetic("f32", 40, 8, seed=3)
    root = write_store(tmp_path / "s", {"acts": ("f32", "expsplit", a)}, chunk=16, shard=40)
    f = root / "py-000000.dmss"
    good = f.read_bytes()
    H = struct.unpack_from("<I", good, 12)[0]

    def corrupt(off: int, flip: int = 0x01) -> None:
        b = bytearray(good)
        b[off] ^= flip
        f.write_bytes(bytes(b))

    for off, where in [(0, "magic"), (9, "version"), (20, "header checksum"), (16 + H + 5, "header checksum"),
                       (len(good) - 3, "trailer magic"), (len(good) - 80, "footer checksum"),
                       (len(good) - 20, "footer checksum"), (len(good) - 50, "index_len")]:
        corrupt(off)
        with pytest.raises(ds.StoreFormatError, match=where) as ei:
            ds.Shard(f)
        assert str(f) in str(ei.value) and "\n" not in str(ei.value)
    corrupt(48 + H + 30)  # inside chunk 0's block: opens fine, fails on read
    sh = ds.Shard(f)
    with pytest.raises(ds.StoreFormatError, match="chunk 0 array 'acts': block checksum") as ei:
        sh.read_chunk("acts", 0)
    assert str(f) in str(ei.value)
    sh.read_chunk("acts", 1)  # other blocks still read
    sh.close()
    f.write_bytes(good[:100])
    with pytest.raises(ds.StoreFormatError, match="too short"):
        ds.Shard(f)
    f.write_bytes(good)
    ds.Shard(f, verify=False).close()


# ---------------------------------------------------------------------------------------------
# Stores written by the Rust CLI.

@needs_bin
def test_real_sample_bf16_expsplit(tmp_path: Path) -> None:
    if not (SAMPLE / "acts.npy").is_file():
        pytest.skip(f"sample data not found at {SAMPLE}")
    src = {k: np.load(SAMPLE / f"{k}.npy") for k in ("acts", "grads", "tokens", "loss")}
    n = src["acts"].shape[0]
    root = run_import(tmp_path, "real", src, "bf16", codec="expsplit", level=3, chunk_tokens=300, shard_tokens=1000)
    st = ds.Store(root, require_blake3=HAVE_BLAKE3)
    m = st.manifest
    assert m["format"] == "dmsae-store" and m["format_version"] == 1 and m["dtype"] == "bf16"
    assert st.total_tokens == n and len(st.files) > 2
    assert st.arrays["acts"] == ("bf16", src["acts"].shape[1])
    assert any(int(st.shard(i).chunk_rows[-1]) < 300 for i in range(len(st.files)))  # short last chunks
    acts = st.read("acts")
    assert acts.dtype == np.uint16 and acts.shape == src["acts"].shape
    assert_bits_equal(acts, src["acts"])
    assert_bits_equal(st.read("grads"), src["grads"])
    assert np.array_equal(st.read("tokens")[:, 0], src["tokens"].astype(np.uint32))
    assert_bits_equal(st.read("loss")[:, 0], src["loss"].astype(np.float32))
    assert_bits_equal(np.concatenate(list(st.iter_chunks("acts"))), src["acts"])
    for lo, hi in boundary_ranges(st):
        assert_bits_equal(st.read("acts", lo, hi), src["acts"][lo:hi])
        assert_bits_equal(st.read("grads", lo, hi), src["grads"][lo:hi])
    # footer stats are derived data, but cheap to cross-check against numpy
    x = ds.bf16_to_float32(src["acts"]).astype(np.float64)
    stats = st.manifest["stats"]["acts"]
    assert stats["count"] == n
    np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats["mean_norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-9)
    if HAVE_BLAKE3:
        st.verify_files()
    st.close()


@needs_bin
@pytest.mark.parametrize("codec", ["raw", "bytesplit", "expsplit"])
@pytest.mark.parametrize("dtype", ["f16", "f32", "bf16"])
def test_synthetic_every_codec(tmp_path: Path, dtype: str, codec: str) -> None:
    n, d = 203, 37  # n * d odd: the last nibble byte is half used
    acts, grads = synthetic(dtype, n, d, seed=10), synthetic(dtype, n, d, seed=11)
    root = run_import(tmp_path, "syn", {"acts": acts, "grads": grads}, dtype,
                      codec=codec, level=3, chunk_tokens=32, shard_tokens=90)
    st = ds.Store(root, require_blake3=HAVE_BLAKE3)
    assert st.total_tokens == n and len(st.files) >= 2
    assert [a["codec"] for a in st.manifest["arrays"] if a["name"] == "acts"] == [codec]
    got = st.read("acts")
    assert got.dtype == np.dtype(NP[dtype])
    assert_bits_equal(got, acts)
    assert_bits_equal(st.read("grads"), grads)
    for lo, hi in boundary_ranges(st):
        assert_bits_equal(st.read("acts", lo, hi), acts[lo:hi])
    st.close()


@needs_bin
@pytest.mark.parametrize("dtype", ["f16", "f32", "bf16"])
def test_escape_free_chunks(tmp_path: Path, dtype: str) -> None:
    """Constant chunks have no escapes (an empty escape stream) and an odd element count."""
    acts = np.full((7, 3), 1.0, np.float32)
    acts = (acts.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bf16" else acts.astype(NP[dtype])
    root = run_import(tmp_path, "const", {"acts": acts}, dtype, codec="expsplit", chunk_tokens=3, shard_tokens=3)
    with ds.Store(root, require_blake3=HAVE_BLAKE3) as st:
        assert_bits_equal(st.read("acts"), acts)


@needs_bin
@pytest.mark.skipif(not HAVE_BLAKE3, reason="blake3 module not installed")
def test_flipped_block_byte_is_refused(tmp_path: Path) -> None:
    acts = synthetic("f32", 100, 16, seed=5)
    root = run_import(tmp_path, "flip", {"acts": acts}, "f32", codec="expsplit", chunk_tokens=25, shard_tokens=50)
    f = root / json.loads((root / "manifest.json").read_text())["shards"][1]["file"]
    b = bytearray(f.read_bytes())
    H = struct.unpack_from("<I", b, 12)[0]
    b[48 + H + 20] ^= 0x40  # inside chunk 0's block of shard 1
    f.write_bytes(bytes(b))
    st = ds.Store(root, require_blake3=True)
    assert_bits_equal(st.read("acts", 0, 50), acts[:50])  # shard 0 is untouched
    with pytest.raises(ds.StoreFormatError, match="block checksum") as ei:
        st.read("acts", 40, 60)
    assert f.name in str(ei.value) and "chunk 0" in str(ei.value)
    with pytest.raises(ds.StoreFormatError):
        st.verify_files()
    st.close()


@needs_bin
def test_summary_cli(tmp_path: Path) -> None:
    acts = synthetic("f16", 64, 8, seed=6)
    root = run_import(tmp_path, "cli", {"acts": acts}, "f16", codec="bytesplit", chunk_tokens=16, shard_tokens=32)
    r = subprocess.run([sys.executable, str(REPO / "store-format" / "python" / "dmsae_store.py"), str(root),
                        "--check"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "64 tokens in 2 shards" in r.stdout and "acts" in r.stdout
