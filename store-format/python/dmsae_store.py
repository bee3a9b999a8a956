"""Pure-Python reader for dmsae stores (format version 1, byte-level spec in ../SPEC.md).

    from dmsae_store import Store, bf16_to_float32
    st = Store("/data/store")                      # checks the manifest; shards open lazily
    acts = st.read("acts", 0, 4096)                # np.ndarray [4096, d_model]
    x = torch.from_numpy(bf16_to_float32(acts))    # or: torch.from_numpy(acts.view(np.int16)).view(torch.bfloat16)

Every array comes back 2-D, [n, width], even when width is 1 (`st.read("tokens")[:, 0]` for a
vector), so callers never special-case scalar columns. bf16 comes back as np.uint16 bit patterns
(numpy has no bfloat16), f16/f32 as float16/float32, integers as their numpy dtype; results are
writable, native little-endian arrays. Block and header checksums are verified when the `blake3`
module is importable; pass require_blake3=True to insist on it, verify=False to skip it.
Needs numpy and zstandard. `python dmsae_store.py STORE_DIR [--check]` prints a summary.
"""
from __future__ import annotations

import functools
import itertools
import json
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt
import zstandard

try:
    import blake3 as _blake3
except ImportError:  # verification is optional, decoding is not
    _blake3 = None  # type: ignore[assignment]

__all__ = ["Shard", "Store", "StoreFormatError", "bf16_to_float32", "decode_expsplit"]

# dtype -> (numpy dtype, (total bits B, exponent bits E, mantissa bits M) for floats)
DTYPES: dict[str, tuple[np.dtype, tuple[int, int, int] | None]] = {
    "bf16": (np.dtype("<u2"), (16, 8, 7)), "f16": (np.dtype("<f2"), (16, 5, 10)),
    "f32": (np.dtype("<f4"), (32, 8, 23)), "u8": (np.dtype("u1"), None), "u16": (np.dtype("<u2"), None),
    "u32": (np.dtype("<u4"), None), "u64": (np.dtype("<u8"), None), "i32": (np.dtype("<i4"), None)}
CODECS = ("raw", "bytesplit", "expsplit")
SHARD_NAME = re.compile(r"[A-Za-z0-9_]{1,32}-[0-9]{6,}\.dmss")  # also rules out "../" in the manifest
TRAILER = struct.Struct("<4Q32s8s")
Fail = Callable[[str], Exception]


class StoreFormatError(ValueError):
    """The bytes on disk break SPEC.md; the one-line message names the file (and chunk, array)."""


def bf16_to_float32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """bf16 is the top half of an f32, so widening is exact (NaN payloads included)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON `true` is not a count


def _need_blake3(require: bool) -> None:
    if require and _blake3 is None:
        raise ImportError("require_blake3=True but the blake3 module is not installed")


def _unzstd(frame: Any, expected: int, fail: Fail) -> bytes:
    """One zstd frame that must decode to exactly `expected` bytes, with nothing after it."""
    # A standard frame (not skippable, not empty), as the Rust reader requires: SPEC check 5.
    if bytes(frame[:4]) != b"\x28\xb5\x2f\xfd":
        raise fail("not a standard zstd frame")
    try:
        size = zstandard.frame_content_size(frame)
        if size != expected:  # checked before decoding, so a hostile size cannot balloon memory
            raise fail(f"zstd frame content size {size}, expected {expected}")
        dobj = zstandard.ZstdDecompressor().decompressobj(write_size=max(expected, 1))
        out = dobj.decompress(frame)
    except zstandard.ZstdError as e:
        raise fail(f"zstd: {e}") from None
    if not dobj.eof:
        raise fail("zstd frame truncated")
    if dobj.unused_data:
        raise fail(f"{len(dobj.unused_data)} bytes after the zstd frame (one frame per stream)")
    if len(out) != expected:
        raise fail(f"zstd frame decoded to {len(out)} bytes, expected {expected}")
    return out


def _split_frames(block: Any, count: int, fail: Fail) -> list[Any]:
    """`count` u32 lengths, then the frames; together they must fill the block exactly."""
    if len(block) < 4 * count:
        raise fail(f"block of {len(block)} bytes is shorter than its {count} frame lengths")
    lens = struct.unpack_from(f"<{count}I", block)
    if 4 * count + sum(lens) != len(block):
        raise fail(f"frame lengths {list(lens)} do not fill the {len(block)}-byte block")
    offs = list(itertools.accumulate(lens, initial=4 * count))
    return [block[a:b] for a, b in itertools.pairwise(offs)]


def decode_expsplit(block: Any, dtype: str, n: int, width: int, fail: Fail = StoreFormatError) -> np.ndarray:
    """An expsplit block -> [n, width] bit patterns (uint16 or uint32), vectorised throughout."""
    bits, E, M = DTYPES[dtype][1]  # type: ignore[misc]
    R, count = (M + 8) // 8, n * width  # R = ceil((M + 1) / 8)
    side_f, nib_f, esc_f, rest_f = _split_frames(block, 4, fail)
    side = np.frombuffer(_unzstd(side_f, width + n, fail), np.uint8)
    packed = np.frombuffer(_unzstd(nib_f, (count + 1) // 2, fail), np.uint8)
    if count % 2 and packed[-1] >> 4:
        raise fail("padding nibble is not 0")
    nibs = np.empty(2 * len(packed), np.uint8)
    nibs[0::2], nibs[1::2] = packed & 15, packed >> 4  # the even element takes the low nibble
    nib = nibs[:count].reshape(n, width)
    is_esc = nib == 15
    esc = np.frombuffer(_unzstd(esc_f, int(is_esc.sum()), fail), np.uint8)
    # uint8 arithmetic wraps, which is exactly the spec's "mod 256"
    e = (side[None, :width] + side[width:, None] + nib - np.uint8(7)).astype(np.uint32)
    e[is_esc] = esc  # boolean indexing walks row-major, the order the escapes are stored in
    if E < 8 and (e >> E).any():
        t, d = map(int, np.argwhere(e >> E)[0])
        raise fail(f"exponent {int(e[t, d])} of element ({t}, {d}) does not fit {E} bits")
    planes = np.frombuffer(_unzstd(rest_f, R * count, fail), np.uint8).reshape(R, n, width)
    rest = np.zeros((n, width), np.uint32)
    for k in range(R):  # R <= 3 byte planes, not a loop over elements
        rest |= planes[k].astype(np.uint32) << (8 * k)
    if (rest >> (M + 1)).any():  # f16 stores 5 spare bits; set ones would spill into the exponent
        raise fail(f"expsplit rest value does not fit {M + 1} bits")
    out = ((rest >> M) << (bits - 1)) | (e << M) | (rest & ((1 << M) - 1))
    return out.astype(np.uint16) if bits == 16 else out


class _Closing:
    def close(self) -> None: ...

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Shard(_Closing):
    """One .dmss file. Checks 1-4 of SPEC.md "Reading" run on open, check 5 per block on read."""

    def __init__(self, path: str | os.PathLike[str], verify: bool = True, require_blake3: bool = False):
        _need_blake3(require_blake3)
        self.path, self.verify = Path(path), verify and _blake3 is not None
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 16 + 2 + 32 + 72:  # also keeps mmap away from empty files
                raise self._err(f"file of {size} bytes is too short for a shard")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(size)
        except BaseException:
            self._mm.close()
            raise

    def _err(self, what: str, chunk: int | None = None, array: str | None = None) -> StoreFormatError:
        where = (f": chunk {chunk}" if chunk is not None else "") + (f" array {array!r}" if array else "")
        return StoreFormatError(f"{self.path}{where}: {what}")

    def _hash_ok(self, data: Any, digest: bytes) -> bool:
        return not self.verify or _blake3.blake3(data).digest() == digest  # type: ignore[union-attr]

    def _parse(self, size: int) -> None:
        mm, err = self._mm, self._err
        if mm[0:8] != b"DMSAESHD":  # 1. fixed prefix
            raise err("bad magic (not a dmsae shard)")
        version, H = struct.unpack_from("<II", mm, 8)
        if version != 1:
            raise err(f"unsupported shard version {version}")
        if not 2 <= H <= 65536 or 48 + H + 72 > size:
            raise err(f"header length {H} out of range for a {size}-byte file")
        if not self._hash_ok(mm[0:16 + H], mm[16 + H:48 + H]):  # 2. header
            raise err("header checksum mismatch")
        try:
            self.header: dict[str, Any] = json.loads(mm[16:16 + H].decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            raise err(f"header is not UTF-8 JSON: {e}") from None
        self._check_header(self.header)
        self.chunk_tokens: int = self.header["chunk_tokens"]
        self.arrays: list[dict[str, Any]] = self.header["arrays"]
        self._col = {a["name"]: i for i, a in enumerate(self.arrays)}
        # 3. trailer; Python ints do not overflow, which gives the spec's "checked arithmetic"
        n_chunks, n_tokens, index_len, stats_len, footer_hash, magic = TRAILER.unpack_from(mm, size - 72)
        if magic != b"DMSAEEND":
            raise err("bad trailer magic (truncated or unfinished shard?)")
        A, rec = len(self.arrays), 8 + 40 * len(self.arrays)
        if index_len != n_chunks * rec:
            raise err(f"index_len {index_len} != n_chunks {n_chunks} x {rec}")
        floats = [a for a in self.arrays if DTYPES[a["dtype"]][1]]
        if stats_len != sum(24 + 16 * a["width"] for a in floats):
            raise err(f"stats_len {stats_len} does not match the float arrays")
        if 48 + H + index_len + stats_len + 72 > size:
            raise err("index and stats do not fit in the file")
        I, S = size - 72 - stats_len - index_len, size - 72 - stats_len
        if not self._hash_ok(mm[I:size - 40], footer_hash):
            raise err("footer checksum (index, stats, trailer) mismatch")
        if n_chunks < 1:  # 4. index
            raise err("shard has no chunks")
        rec_dt = np.dtype({"names": ["n", "res"] + [f"l{i}" for i in range(A)] + [f"h{i}" for i in range(A)],
                           "formats": ["<u4", "<u4"] + ["<u8"] * A + ["V32"] * A,
                           "offsets": [0, 4] + [8 + 40 * i for i in range(A)] + [16 + 40 * i for i in range(A)],
                           "itemsize": rec})
        idx = np.frombuffer(mm[I:S], rec_dt)  # mm[a:b] is a copy, so no view pins the map
        counts = idx["n"].astype(np.int64)
        if (idx["res"] != 0).any():
            raise err("index reserved field is not 0", int(np.argmax(idx["res"] != 0)))
        if (short := counts[:-1] != self.chunk_tokens).any():
            c = int(np.argmax(short))
            raise err(f"{counts[c]} rows in a non-last chunk, chunk_tokens is {self.chunk_tokens}", c)
        if not 1 <= counts[-1] <= self.chunk_tokens:
            raise err(f"last chunk has {counts[-1]} rows", n_chunks - 1)
        if int(counts.sum()) != n_tokens:
            raise err(f"chunk rows sum to {int(counts.sum())}, the trailer says {n_tokens}")
        lens = np.stack([idx[f"l{i}"] for i in range(A)], axis=1)  # [chunk, array], the file's order
        if int(lens.sum(dtype=object)) != I - (48 + H):  # object sum: no u64 wrap-around
            raise err(f"block lengths do not add up to the {I - 48 - H}-byte block region")
        self._ends = (48 + H + np.cumsum(lens.reshape(-1).astype(np.int64))).reshape(n_chunks, A)
        self._starts = self._ends - lens.astype(np.int64)
        self._hashes = np.stack([idx[f"h{i}"] for i in range(A)], axis=1)
        self.chunk_rows, self.n_chunks, self.n_tokens = counts, n_chunks, n_tokens
        self.stats: dict[str, dict[str, Any]] = {}  # per float array: count, sum_norm, sum_sq_norm, mean, m2
        for a in floats:
            w = a["width"]
            count, sum_norm, sum_sq = struct.unpack_from("<Qdd", mm, S)
            v = np.frombuffer(mm[S + 24:S + 24 + 16 * w], "<f8")
            self.stats[a["name"]] = {"count": count, "sum_norm": sum_norm, "sum_sq_norm": sum_sq,
                                     "mean": v[:w], "m2": v[w:]}
            S += 24 + 16 * w

    def _check_header(self, h: Any) -> None:
        if not isinstance(h, dict):
            raise self._err("header is not a JSON object")
        c = h.get("chunk_tokens")
        if not (_is_int(c) and 1 <= c <= 1 << 20):
            raise self._err(f"header chunk_tokens {c!r} out of range")
        if not (_is_int(h.get("level")) and _is_int(h.get("seq")) and isinstance(h.get("writer"), str)):
            raise self._err("header level, seq or writer missing or of the wrong type")
        arrays = h.get("arrays")
        if not isinstance(arrays, list) or not 1 <= len(arrays) <= 32:
            raise self._err("header arrays must be a list of 1 to 32 entries")
        for a in arrays:
            if not isinstance(a, dict) or not isinstance(a.get("name"), str) or a.get("dtype") not in DTYPES:
                raise self._err(f"bad array entry {a!r}")
            w, codec, (dt, fbits) = a.get("width"), a.get("codec"), DTYPES[a["dtype"]]
            if not (_is_int(w) and 1 <= w <= 1 << 20 and c * w * dt.itemsize <= 1 << 30):
                raise self._err(f"array {a['name']!r} width {w!r} out of range (or chunk over 1 GiB)")
            if codec not in CODECS or (codec == "expsplit" and fbits is None):
                raise self._err(f"array {a['name']!r} codec {codec!r} invalid for dtype {a['dtype']}")
        if len({a["name"] for a in arrays}) != len(arrays):
            raise self._err("array names are not unique")

    def read_chunk(self, name: str, chunk: int) -> np.ndarray:
        """Check and decode one block: array `name` of `chunk`, shape [rows, width]."""
        if name not in self._col:
            raise KeyError(f"{self.path}: no array {name!r} (has {list(self._col)})")
        if not 0 <= chunk < self.n_chunks:
            raise IndexError(f"{self.path}: chunk {chunk} out of range [0, {self.n_chunks})")
        col = self._col[name]
        a, fail = self.arrays[col], functools.partial(self._err, chunk=chunk, array=name)
        dt, n, w = DTYPES[a["dtype"]][0], int(self.chunk_rows[chunk]), a["width"]
        start, end = int(self._starts[chunk, col]), int(self._ends[chunk, col])
        # one writable copy out of the map: raw blocks are returned as they are, and nothing pins the map
        block = np.frombuffer(self._mm, np.uint8, end - start, start).copy()
        if not self._hash_ok(block, bytes(self._hashes[chunk, col])):
            raise fail("block checksum mismatch")
        if a["codec"] == "raw":
            if len(block) != n * w * dt.itemsize:
                raise fail(f"raw block is {len(block)} bytes, expected {n * w * dt.itemsize}")
            out = block
        elif a["codec"] == "bytesplit":
            planes = [_unzstd(f, n * w, fail) for f in _split_frames(block.data, dt.itemsize, fail)]
            out = np.stack([np.frombuffer(p, np.uint8) for p in planes], axis=1)  # [element, byte k]
        else:
            out = decode_expsplit(block.data, a["dtype"], n, w, fail)
        return out.view(dt).reshape(n, w)

    def close(self) -> None:
        self._mm.close()


class Store(_Closing):
    """A store directory. Shards open on first use and are cross-checked against the manifest."""

    def __init__(self, path: str | os.PathLike[str], verify: bool = True, require_blake3: bool = False):
        _need_blake3(require_blake3)
        self.path, self.verify, self._require = Path(path), verify, require_blake3
        mpath = self.path / "manifest.json"

        def bad(what: str) -> StoreFormatError:
            return StoreFormatError(f"{mpath}: {what}")

        try:
            m = json.loads(mpath.read_bytes().decode("utf-8"))
        except ValueError as e:
            raise bad(f"not UTF-8 JSON: {e}") from None
        if not isinstance(m, dict) or m.get("format") != "dmsae-store" or m.get("format_version") != 1:
            raise bad("not a dmsae-store manifest of format_version 1")
        try:
            self.arrays: dict[str, tuple[str, int]] = {a["name"]: (a["dtype"], a["width"]) for a in m["arrays"]}
            files, tokens = [s["file"] for s in m["shards"]], [s["tokens"] for s in m["shards"]]
            self.chunk_tokens: int = m["chunk_tokens"]
        except (KeyError, TypeError) as e:
            raise bad(f"malformed arrays, shards or chunk_tokens ({e!r})") from None
        if not all(isinstance(f, str) and SHARD_NAME.fullmatch(f) for f in files):
            raise bad("a shard file name is not <writer>-<seq>.dmss")
        if not all(_is_int(t) and t >= 1 for t in tokens) or m.get("total_tokens") != sum(tokens):
            raise bad(f"shard tokens do not add up to total_tokens {m.get('total_tokens')!r}")
        keys = [f.encode() for f in files]
        if keys != sorted(set(keys)):  # file order *is* the token order
            raise bad("shards are not sorted by file name (or repeat one)")
        self.manifest: dict[str, Any] = m
        self.files: list[str] = files
        self.total_tokens: int = sum(tokens)
        self._offsets = np.cumsum([0] + tokens, dtype=np.int64)  # global index of each shard's row 0
        self._open: dict[int, Shard] = {}

    def __len__(self) -> int:
        return self.total_tokens

    def shard(self, i: int) -> Shard:
        """Shard i in token order; opened, and checked against its manifest entry, once."""
        if i not in self._open:
            entry, key = self.manifest["shards"][i], ("name", "dtype", "width", "codec")
            sh = Shard(self.path / entry["file"], self.verify, self._require)
            why = ("its arrays differ from the manifest's"
                   if [[a.get(k) for k in key] for a in self.manifest["arrays"]] != [[a[k] for k in key] for a in sh.arrays]
                   else f"{sh.n_tokens} tokens, the manifest says {entry['tokens']}" if sh.n_tokens != entry["tokens"]
                   else f"chunk_tokens {sh.chunk_tokens}, the manifest says {self.chunk_tokens}"
                   if sh.chunk_tokens != self.chunk_tokens else None)
            if why:
                sh.close()
                raise StoreFormatError(f"{sh.path}: {why}")
            self._open[i] = sh
        return self._open[i]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) in global token order, shape [stop - start, width] (2-D even when
        width is 1). Decodes only the chunks that overlap the range."""
        if name not in self.arrays:
            raise KeyError(f"{self.path}: no array {name!r} (has {list(self.arrays)})")
        dtype, width = self.arrays[name]
        stop = self.total_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.total_tokens:
            raise IndexError(f"range [{start}, {stop}) is outside [0, {self.total_tokens})")
        out, pos = np.empty((stop - start, width), DTYPES[dtype][0]), start
        while pos < stop:
            s = int(np.searchsorted(self._offsets, pos, side="right")) - 1
            c, skip = divmod(pos - int(self._offsets[s]), self.chunk_tokens)  # chunks before a shard's last are full
            rows = self.shard(s).read_chunk(name, c)[skip:skip + stop - pos]
            out[pos - start:pos - start + len(rows)] = rows
            pos += len(rows)
        return out

    def iter_chunks(self, name: str) -> Iterator[np.ndarray]:
        """Every chunk of `name` in token order, [rows, width] each; one chunk in memory at a time."""
        for s in range(len(self.files)):
            sh = self.shard(s)
            for c in range(sh.n_chunks):
                yield sh.read_chunk(name, c)

    def verify_files(self) -> None:
        """Whole-file size and BLAKE3 of every shard against the manifest (reads every byte)."""
        _need_blake3(True)
        for entry in self.manifest["shards"]:
            p, h = self.path / entry["file"], _blake3.blake3()  # type: ignore[union-attr]
            h.update_mmap(str(p))
            if p.stat().st_size != entry.get("bytes") or h.hexdigest() != entry.get("blake3"):
                raise StoreFormatError(f"{p}: size or blake3 differs from the manifest")

    def close(self) -> None:
        for sh in self._open.values():
            sh.close()
        self._open.clear()


def _main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="Print a dmsae store's summary; --check also decodes it all.")
    ap.add_argument("store")
    ap.add_argument("--check", action="store_true", help="decode every block and hash every file")
    args = ap.parse_args(argv)
    with Store(args.store) as st:
        m, size = st.manifest, sum(s.get("bytes", 0) for s in st.manifest["shards"])
        raw = sum(st.total_tokens * a["width"] * DTYPES[a["dtype"]][0].itemsize for a in m["arrays"])
        print(f"{st.path}: {st.total_tokens} tokens in {len(st.files)} shards, {size / 2**20:.1f} MiB "
              f"({raw / max(size, 1):.2f}x smaller than raw), chunk_tokens {st.chunk_tokens}, "
              f"blake3 {'on' if _blake3 and st.verify else 'off'}")
        for a in m["arrays"]:
            norm = m.get("stats", {}).get(a["name"], {}).get("mean_norm")
            print(f"  {a['name']:<10} {a['dtype']:<4} x {a['width']:<6} {a['codec']:<9}"
                  + (f" mean_norm {norm:.4g}" if norm is not None else ""))
        print(f"  provenance: {', '.join(sorted(m.get('provenance', {}))) or '-'}")
        if args.check:
            for name in st.arrays:
                assert sum(len(c) for c in st.iter_chunks(name)) == st.total_tokens, name
            if _blake3 is not None:
                st.verify_files()
            print(f"  check: every block decodes{', every file hash matches' if _blake3 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
