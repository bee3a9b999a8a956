//! Block codecs (SPEC.md, "Codecs"). A block is one array's rows of one chunk.
//!
//! Decoders get hostile input: every length is checked against the block before use, and
//! every zstd frame must decompress to exactly the size the header implies, so a block can
//! never make us allocate more than `chunk_tokens × row bytes`.

use crate::dtype::{ArraySpec, Codec};

/// Encode `n` rows of `spec` (row-major little-endian bytes) at zstd `level`.
pub fn encode(spec: &ArraySpec, level: i32, data: &[u8], n: usize) -> Vec<u8> {
    debug_assert_eq!(data.len(), n * spec.row_bytes());
    match spec.codec {
        Codec::Raw => data.to_vec(),
        Codec::Bytesplit => {
            let s = spec.dtype.size();
            let planes: Vec<Vec<u8>> = (0..s)
                .map(|k| data.iter().skip(k).step_by(s).copied().collect())
                .collect();
            frames(
                level,
                &planes.iter().map(|p| p.as_slice()).collect::<Vec<_>>(),
            )
        }
        Codec::Expsplit => encode_expsplit(spec, level, data, n),
    }
}

/// Decode a block into `n` rows of `spec`; the error says what is wrong with the block.
pub fn decode(spec: &ArraySpec, stored: &[u8], n: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    decode_into(spec, stored, n, &mut out)?;
    Ok(out)
}

/// `decode` into `out`, which is resized to the rows' bytes: a buffer used again keeps its
/// memory, so a stream that recycles its buffers neither allocates nor faults in pages.
pub fn decode_into(
    spec: &ArraySpec,
    stored: &[u8],
    n: usize,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let len = n * spec.row_bytes();
    out.resize(len, 0);
    match spec.codec {
        Codec::Raw => {
            if stored.len() != len {
                return Err(format!(
                    "raw block is {} bytes, expected {len}",
                    stored.len()
                ));
            }
            out.copy_from_slice(stored);
        }
        Codec::Bytesplit => {
            let s = spec.dtype.size();
            let parts = split_frames(stored, s)?;
            SCRATCH.with(|sc| -> Result<(), String> {
                let plane = &mut sc.borrow_mut()[0];
                plane.resize(len / s, 0);
                for (k, part) in parts.iter().enumerate() {
                    unzstd(part, plane, "byte plane")?;
                    for (o, &b) in out.iter_mut().skip(k).step_by(s).zip(plane.iter()) {
                        *o = b;
                    }
                }
                Ok(())
            })?;
        }
        Codec::Expsplit => decode_expsplit(spec, stored, n, out)?,
    }
    Ok(())
}

/// `u32` lengths, then the zstd frames of each part.
fn frames(level: i32, parts: &[&[u8]]) -> Vec<u8> {
    let compressed: Vec<Vec<u8>> = parts
        .iter()
        .map(|p| zstd::bulk::compress(p, level).expect("zstd compression of an in-memory buffer"))
        .collect();
    let mut out =
        Vec::with_capacity(4 * parts.len() + compressed.iter().map(Vec::len).sum::<usize>());
    for c in &compressed {
        out.extend_from_slice(&(c.len() as u32).to_le_bytes());
    }
    for c in &compressed {
        out.extend_from_slice(c);
    }
    out
}

fn split_frames(stored: &[u8], count: usize) -> Result<Vec<&[u8]>, String> {
    let head = 4 * count;
    if stored.len() < head {
        return Err(format!(
            "block of {} bytes is shorter than its {count} frame lengths",
            stored.len()
        ));
    }
    let mut at = head;
    let mut parts = Vec::with_capacity(count);
    for k in 0..count {
        let l = u32::from_le_bytes(stored[4 * k..4 * k + 4].try_into().unwrap()) as usize;
        let end = at
            .checked_add(l)
            .filter(|&e| e <= stored.len())
            .ok_or_else(|| {
                format!(
                    "frame {k} length {l} runs past the block end ({} bytes)",
                    stored.len()
                )
            })?;
        parts.push(&stored[at..end]);
        at = end;
    }
    if at != stored.len() {
        return Err(format!(
            "{} trailing bytes after the last frame",
            stored.len() - at
        ));
    }
    Ok(parts)
}

thread_local! {
    // A decoder's frames, kept from block to block: fresh buffers of a chunk's size cost a
    // zeroing pass each (and page faults under glibc) beside a decode of one pass.
    static SCRATCH: std::cell::RefCell<[Vec<u8>; 4]> = const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
    // One decompression context per thread: creating one per frame costs more than a small frame.
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// A stream's content size, from its header: SPEC.md allows one standard frame with its
/// content size; zstd itself would also take concatenated or skippable frames, which other
/// readers of the format refuse.
fn frame_size(frame: &[u8], what: &str) -> Result<u64, String> {
    use zstd::zstd_safe::{find_frame_compressed_size, get_frame_content_size};
    // libzstd reports a skippable frame's content size as 0; only a standard frame will do.
    if !frame.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(format!("{what}: not a standard zstd frame"));
    }
    let Ok(Some(n)) = get_frame_content_size(frame) else {
        return Err(format!("{what}: not one zstd frame with its content size"));
    };
    if find_frame_compressed_size(frame).ok() != Some(frame.len()) {
        return Err(format!(
            "{what}: bytes after the zstd frame (one frame per stream)"
        ));
    }
    Ok(n)
}

fn unzstd(frame: &[u8], out: &mut [u8], what: &str) -> Result<(), String> {
    let n = frame_size(frame, what)?;
    if n != out.len() as u64 {
        return Err(format!(
            "{what}: zstd frame content size {n}, expected {}",
            out.len()
        ));
    }
    let got = DCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Decompressor::new()?);
        }
        c.as_mut().unwrap().decompress_to_buffer(frame, out)
    });
    let got = got.map_err(|e| format!("{what}: zstd: {e}"))?;
    if got != out.len() {
        return Err(format!(
            "{what}: decompressed to {got} bytes, expected {}",
            out.len()
        ));
    }
    Ok(())
}

/// Exponent field and sign+mantissa of one element, as a codec over u32 bit patterns.
struct FloatBits {
    size: usize,
    bits: u32,
    exp: u32,
    man: u32,
    rest_bytes: usize,
}

impl FloatBits {
    fn of(spec: &ArraySpec) -> FloatBits {
        let (bits, exp, man) = spec
            .dtype
            .float_layout()
            .expect("expsplit is for float dtypes");
        FloatBits {
            size: spec.dtype.size(),
            bits,
            exp,
            man,
            rest_bytes: (man as usize + 1).div_ceil(8),
        }
    }
    #[inline(always)]
    fn load(&self, data: &[u8], i: usize) -> u32 {
        if self.size == 2 {
            u16::from_le_bytes([data[2 * i], data[2 * i + 1]]) as u32
        } else {
            u32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap())
        }
    }
}

fn mode(hist: &[u32]) -> u8 {
    // Ties go to the smallest value, as SPEC.md says, so encoding is deterministic.
    let mut best = 0;
    for (v, &c) in hist.iter().enumerate() {
        if c > hist[best] {
            best = v;
        }
    }
    best as u8
}

/// Encoded in passes that each vectorise (the writer's time went here: element at a time, with
/// the layout read at run time, it held Gemma-2-2B's extraction store to 86 MB/s of raw rows on
/// two cores); 16-bit floats take a loop of their own.
fn encode_expsplit(spec: &ArraySpec, level: i32, data: &[u8], n: usize) -> Vec<u8> {
    let fb = FloatBits::of(spec);
    let w = spec.width;
    let count = n * w;
    let emask = (1u32 << fb.exp) - 1;
    let mmask = (1u32 << fb.man) - 1;
    let mut exps = vec![0u8; count];
    let mut rest = vec![0u8; count * fb.rest_bytes];
    if fb.size == 2 && fb.rest_bytes == 1 {
        // Sign and mantissa fit one byte (bf16).
        for ((e, r), v) in exps
            .iter_mut()
            .zip(rest.iter_mut())
            .zip(data.chunks_exact(2))
        {
            let v = u16::from_le_bytes([v[0], v[1]]) as u32;
            *e = ((v >> fb.man) & emask) as u8;
            *r = (((v >> (fb.bits - 1)) << fb.man) | (v & mmask)) as u8;
        }
    } else {
        for i in 0..count {
            let v = fb.load(data, i);
            exps[i] = ((v >> fb.man) & emask) as u8;
            let r = ((v >> (fb.bits - 1)) << fb.man) | (v & mmask);
            for k in 0..fb.rest_bytes {
                rest[k * count + i] = (r >> (8 * k)) as u8;
            }
        }
    }
    // Counts laid out [exponent][column]: a row's increments then fall on the few lines of
    // its common exponents, where [column][exponent] put each on a line of its own.
    let mut col_hist = vec![0u32; 256 * w];
    for row in exps.chunks_exact(w) {
        for (d, &e) in row.iter().enumerate() {
            col_hist[e as usize * w + d] += 1;
        }
    }
    // Each column's mode, ties to the smallest exponent (as `mode`).
    let mut col = vec![0u8; w];
    let mut best = col_hist[..w].to_vec();
    for (e, counts) in col_hist.chunks_exact(w).enumerate().skip(1) {
        for ((b, c), &h) in best.iter_mut().zip(col.iter_mut()).zip(counts) {
            if h > *b {
                *b = h;
                *c = e as u8;
            }
        }
    }
    let mut row_off = vec![0u8; n];
    let mut hist = [0u32; 256];
    for (t, row) in exps.chunks_exact(w).enumerate() {
        hist.fill(0);
        for (&e, &c) in row.iter().zip(&col) {
            hist[e.wrapping_sub(c) as usize] += 1;
        }
        row_off[t] = mode(&hist);
    }
    // Each exponent's code q (15: an escape, the exponent itself follows in `escapes`), then
    // the codes packed two a byte.
    let mut q = vec![0u8; count];
    for ((qrow, row), &off) in q
        .chunks_exact_mut(w)
        .zip(exps.chunks_exact(w))
        .zip(&row_off)
    {
        for ((q, &e), &c) in qrow.iter_mut().zip(row).zip(&col) {
            *q = e.wrapping_sub(c).wrapping_sub(off).wrapping_add(7).min(15);
        }
    }
    let mut at = Vec::new();
    escapes_at(&q, &mut at);
    let escapes: Vec<u8> = at.into_iter().map(|i| exps[i]).collect();
    let mut nibbles: Vec<u8> = q.chunks_exact(2).map(|p| p[0] | (p[1] << 4)).collect();
    if count % 2 == 1 {
        nibbles.push(q[count - 1]);
    }
    let mut side = col;
    side.extend_from_slice(&row_off);
    frames(level, &[&side, &nibbles, &escapes, &rest])
}

/// Appends to `at` where the exponent codes hold an escape (15), in order: a bit mask a
/// 16-code run (one compare and move-mask on x86-64), then its set bits. Escapes come a few
/// to a row of Gemma's width, a third of 64-code runs held one, and reading those runs a code
/// at a time took as long as the rest of the decode.
fn escapes_at(codes: &[u8], at: &mut Vec<usize>) {
    let runs = codes.chunks_exact(16);
    let tail = runs.remainder();
    let mut push = |base: usize, mut mask: u32| {
        while mask != 0 {
            at.push(base + mask.trailing_zeros() as usize);
            mask &= mask - 1;
        }
    };
    for (i, run) in runs.enumerate() {
        push(16 * i, escape_mask(run.try_into().unwrap()));
    }
    let mut last = [0u8; 16];
    last[..tail.len()].copy_from_slice(tail);
    push(codes.len() - tail.len(), escape_mask(&last));
}

#[inline(always)]
fn escape_mask(run: &[u8; 16]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of x86-64; the load reads the 16 bytes of `run`.
    unsafe {
        use std::arch::x86_64::*;
        let v = _mm_loadu_si128(run.as_ptr().cast());
        _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(15))) as u32
    }
    #[cfg(not(target_arch = "x86_64"))]
    escape_mask_portable(run)
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))] // tested against the x86-64 form
fn escape_mask_portable(run: &[u8; 16]) -> u32 {
    run.iter()
        .enumerate()
        .fold(0, |m, (j, &q)| m | (((q == 15) as u32) << j))
}

/// Decoded a row at a time, so that a row's passes (unpack its nibbles, add the row and column
/// base, patch escapes, check the exponents, assemble sign, exponent and mantissa) run in L1.
/// The same passes over the whole block, each through memory, decoded 2.1 GB/s of bf16 a core.
fn decode_expsplit(
    spec: &ArraySpec,
    stored: &[u8],
    n: usize,
    out: &mut [u8],
) -> Result<(), String> {
    let fb = FloatBits::of(spec);
    let w = spec.width;
    let count = n * w;
    let parts = split_frames(stored, 4)?;
    SCRATCH.with(|sc| {
        let mut sc = sc.borrow_mut();
        let [side, packed, escapes, rest] = &mut *sc;
        side.resize(w + n, 0);
        unzstd(parts[0], side, "side frame")?;
        packed.resize(count.div_ceil(2), 0);
        unzstd(parts[1], packed, "nibble frame")?;
        if count % 2 == 1 && packed[count / 2] >> 4 != 0 {
            return Err("padding nibble is not 0".into());
        }
        // The escapes' count is the frame's content size, checked against the nibbles below.
        let n_esc = frame_size(parts[2], "escape frame")?;
        if n_esc > count as u64 {
            return Err(format!(
                "escape frame: {n_esc} exponents for {count} elements"
            ));
        }
        escapes.resize(n_esc as usize, 0);
        unzstd(parts[2], escapes, "escape frame")?;
        rest.resize(count * fb.rest_bytes, 0);
        unzstd(parts[3], rest, "rest frame")?;
        let (col, row_off) = side.split_at(w);
        let mut escaped = escapes.iter();
        // A row's codes, unpacked from whole bytes: a row of odd width starts mid-byte.
        let mut codes = vec![0u8; w + 2];
        let mut at = Vec::new();
        let mmask = (1u32 << fb.man) - 1;
        for (t, &r) in row_off.iter().enumerate() {
            let i0 = t * w;
            let (b0, odd) = (i0 / 2, i0 % 2);
            let bytes = &packed[b0..b0 + (odd + w).div_ceil(2)];
            for (pair, &b) in codes.chunks_exact_mut(2).zip(bytes) {
                pair[0] = b & 15;
                pair[1] = b >> 4;
            }
            let e = &mut codes[odd..odd + w];
            // Patched after the row's add, which then vectorises.
            at.clear();
            escapes_at(e, &mut at);
            let base = r.wrapping_sub(7);
            for (x, &c) in e.iter_mut().zip(col) {
                *x = x.wrapping_add(c).wrapping_add(base);
            }
            for &d in &at {
                e[d] = *escaped
                    .next()
                    .ok_or("escape frame: fewer exponents than escape codes")?;
            }
            if fb.exp < 8 && e.iter().fold(0, |all, &x| all | x) >> fb.exp != 0 {
                let d = e.iter().position(|&x| x >> fb.exp != 0).unwrap();
                return Err(format!(
                    "element {}: exponent {} does not fit {} bits",
                    i0 + d,
                    e[d],
                    fb.exp
                ));
            }
            let row = &mut out[i0 * fb.size..(i0 + w) * fb.size];
            if fb.size == 2 && fb.rest_bytes == 1 {
                // bf16: byte 0 = low exponent bit + 7 mantissa bits, byte 1 = sign + high
                // exponent bits.
                for ((o, &x), &r) in row.chunks_exact_mut(2).zip(&*e).zip(&rest[i0..i0 + w]) {
                    o[0] = (x << 7) | (r & 0x7f);
                    o[1] = (r & 0x80) | (x >> 1);
                }
                continue;
            }
            for (j, (o, &x)) in row.chunks_exact_mut(fb.size).zip(&*e).enumerate() {
                let i = i0 + j;
                let mut r = 0u32;
                for k in 0..fb.rest_bytes {
                    r |= (rest[k * count + i] as u32) << (8 * k);
                }
                if r >> (fb.man + 1) != 0 {
                    return Err(format!(
                        "element {i}: spare bits set above the sign in the rest plane"
                    ));
                }
                let v = ((r >> fb.man) << (fb.bits - 1)) | ((x as u32) << fb.man) | (r & mmask);
                o.copy_from_slice(&v.to_le_bytes()[..fb.size]);
            }
        }
        if escaped.next().is_some() {
            return Err("escape frame: more exponents than escape codes".into());
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use rand::{Rng, SeedableRng};

    fn specials(dtype: DType) -> Vec<u32> {
        match dtype {
            DType::Bf16 => vec![
                0, 0x8000, 0x7f80, 0xff80, 0x7fc1, 0xffff, 0x0001, 0x807f, 0x7f7f, 0x3f80,
            ],
            DType::F16 => vec![
                0, 0x8000, 0x7c00, 0xfc00, 0x7e01, 0xffff, 0x0001, 0x83ff, 0x7bff, 0x3c00,
            ],
            _ => vec![
                0,
                0x8000_0000,
                0x7f80_0000,
                0xff80_0000,
                0x7fc0_0001,
                0xffff_ffff,
                1,
                0x807f_ffff,
                0x7f7f_ffff,
            ],
        }
    }

    /// Rows whose columns have different scales, plus every special value: all must survive.
    fn sample(dtype: DType, n: usize, w: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        let sp = specials(dtype);
        for t in 0..n {
            for d in 0..w {
                let x: f32 =
                    rng.gen_range(-1.0f32..1.0) * (1 << (d % 12)) as f32 * (1.0 + t as f32);
                let bits = match dtype {
                    DType::Bf16 => x.to_bits() >> 16,
                    DType::F16 => {
                        let h = x.to_bits();
                        ((h >> 16) & 0x8000) | (((rng.gen_range(1..31u32)) << 10) | (h & 0x3ff))
                    }
                    _ => x.to_bits(),
                };
                let bits = if rng.gen_range(0..50) == 0 {
                    sp[rng.gen_range(0..sp.len())]
                } else {
                    bits
                };
                out.extend_from_slice(&bits.to_le_bytes()[..dtype.size()]);
            }
        }
        out
    }

    #[test]
    fn every_codec_round_trips_bit_exactly() {
        for dtype in [DType::Bf16, DType::F16, DType::F32] {
            for codec in [Codec::Raw, Codec::Bytesplit, Codec::Expsplit] {
                for (n, w) in [(1, 1), (7, 13), (64, 40)] {
                    let spec = ArraySpec::new("a", dtype, w, codec);
                    let data = sample(dtype, n, w, (n * w) as u64);
                    let enc = encode(&spec, 3, &data, n);
                    assert_eq!(
                        decode(&spec, &enc, n).unwrap(),
                        data,
                        "{dtype:?} {codec:?} {n}x{w}"
                    );
                }
            }
        }
        let spec = ArraySpec::new("t", DType::U64, 3, Codec::Expsplit);
        assert_eq!(spec.codec, Codec::Bytesplit);
        let data: Vec<u8> = (0..5 * 3 * 8).map(|i| (i * 37 % 251) as u8).collect();
        assert_eq!(decode(&spec, &encode(&spec, 1, &data, 5), 5).unwrap(), data);
    }

    #[test]
    fn expsplit_golden_block() {
        // bf16 1.0, -2.0, 0.5, 3.0 as a 2x2 block; pins the layout in SPEC.md.
        let spec = ArraySpec::new("a", DType::Bf16, 2, Codec::Expsplit);
        let data: Vec<u8> = [0x3f80u16, 0xc000, 0x3f00, 0x4040]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let enc = encode(&spec, 3, &data, 2);
        let parts = split_frames(&enc, 4).unwrap();
        let side = zstd::bulk::decompress(parts[0], 64).unwrap();
        // exponents 127,128 / 126,128: col modes 126,128; row offsets 0 then (127-126)=1 vs 0 tie -> 0.
        assert_eq!(side, vec![126, 128, 0, 0]);
        let nib = zstd::bulk::decompress(parts[1], 64).unwrap();
        assert_eq!(nib, vec![0x78, 0x77]);
        let rest = zstd::bulk::decompress(parts[3], 64).unwrap();
        assert_eq!(rest, vec![0x00, 0x80, 0x00, 0x40]);
        assert_eq!(decode(&spec, &enc, 2).unwrap(), data);
    }

    #[test]
    fn hostile_blocks_are_refused_without_panic() {
        let spec = ArraySpec::new("a", DType::Bf16, 4, Codec::Expsplit);
        let data = sample(DType::Bf16, 8, 4, 1);
        let enc = encode(&spec, 3, &data, 8);
        assert!(decode(&spec, &enc[..enc.len() - 1], 8).is_err());
        assert!(decode(&spec, &enc, 9).is_err());
        let mut big = enc.clone();
        big[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&spec, &big, 8).is_err());
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x55;
            let _ = decode(&spec, &bad, 8); // may decode to other bits, must not panic
        }
        let raw = ArraySpec::new("a", DType::Bf16, 4, Codec::Raw);
        assert!(decode(&raw, &data[1..], 8).is_err());
    }

    #[test]
    fn escape_masks_agree() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for _ in 0..2000 {
            let run: [u8; 16] = std::array::from_fn(|_| rng.gen_range(12..=16u8));
            assert_eq!(escape_mask(&run), escape_mask_portable(&run), "{run:?}");
        }
        let mut at = Vec::new();
        let codes: Vec<u8> = (0..37).map(|i| if i % 5 == 0 { 15 } else { 3 }).collect();
        escapes_at(&codes, &mut at);
        assert_eq!(at, (0..37).step_by(5).collect::<Vec<_>>());
    }

    /// SPEC.md's "Decoding element i" read literally, one element at a time.
    fn expsplit_by_the_spec(spec: &ArraySpec, stored: &[u8], n: usize) -> Result<Vec<u8>, String> {
        let fb = FloatBits::of(spec);
        let (w, count) = (spec.width, n * spec.width);
        let parts = split_frames(stored, 4)?;
        let mut side = vec![0u8; w + n];
        unzstd(parts[0], &mut side, "side")?;
        let mut packed = vec![0u8; count.div_ceil(2)];
        unzstd(parts[1], &mut packed, "nibbles")?;
        if count % 2 == 1 && packed[count / 2] >> 4 != 0 {
            return Err("padding".into());
        }
        let nibble = |i: usize| (packed[i / 2] >> (4 * (i % 2))) & 15;
        let mut escapes = vec![0u8; (0..count).filter(|&i| nibble(i) == 15).count()];
        unzstd(parts[2], &mut escapes, "escapes")?;
        let mut rest = vec![0u8; count * fb.rest_bytes];
        unzstd(parts[3], &mut rest, "rest")?;
        let (mut out, mut next_escape) = (Vec::new(), escapes.iter());
        for i in 0..count {
            let (t, d) = (i / w, i % w);
            let e = match nibble(i) {
                15 => *next_escape.next().unwrap() as u32,
                q => (side[d] as u32 + side[w + t] as u32 + q as u32 + 256 - 7) % 256,
            };
            let r =
                (0..fb.rest_bytes).fold(0u32, |r, k| r | (rest[k * count + i] as u32) << (8 * k));
            if e >> fb.exp != 0 || r >> (fb.man + 1) != 0 {
                return Err("element".into());
            }
            let v = ((r >> fb.man) << (fb.bits - 1)) | (e << fb.man) | (r & ((1 << fb.man) - 1));
            out.extend_from_slice(&v.to_le_bytes()[..fb.size]);
        }
        Ok(out)
    }

    /// The row-at-a-time decoder against the spec read element by element, on valid blocks
    /// (odd widths, escapes, every special value) and on each with one byte changed: the same
    /// rows, or both refuse it.
    #[test]
    fn expsplit_decodes_as_the_spec_reads() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for dtype in [DType::Bf16, DType::F16, DType::F32] {
            for (n, w) in [(1, 1), (3, 5), (7, 13), (16, 40), (5, 77)] {
                let spec = ArraySpec::new("a", dtype, w, Codec::Expsplit);
                let data = sample(dtype, n, w, (n * w) as u64 + 11);
                let enc = encode(&spec, 3, &data, n);
                assert_eq!(expsplit_by_the_spec(&spec, &enc, n).unwrap(), data);
                for _ in 0..300 {
                    let mut bad = enc.clone();
                    let at = rng.gen_range(0..bad.len());
                    bad[at] ^= rng.gen_range(1..=255u8);
                    assert_eq!(
                        decode(&spec, &bad, n).ok(),
                        expsplit_by_the_spec(&spec, &bad, n).ok(),
                        "{dtype:?} {n}x{w}, byte {at} changed"
                    );
                }
            }
        }
    }

    /// SPEC.md allows one frame per stream; zstd alone would take a plane split into two
    /// concatenated frames, or one followed by a skippable frame, as the same bytes.
    #[test]
    fn a_stream_of_two_frames_is_refused() {
        let spec = ArraySpec::new("a", DType::Bf16, 4, Codec::Bytesplit);
        let (n, data) = (8, sample(DType::Bf16, 8, 4, 2));
        let planes: Vec<Vec<u8>> = (0..2)
            .map(|k| data.iter().skip(k).step_by(2).copied().collect())
            .collect();
        let block = |streams: &[Vec<u8>]| {
            let mut b: Vec<u8> = streams
                .iter()
                .flat_map(|s| (s.len() as u32).to_le_bytes())
                .collect();
            streams.iter().for_each(|s| b.extend_from_slice(s));
            b
        };
        let one = |p: &[u8]| zstd::bulk::compress(p, 3).unwrap();
        let good = block(&[one(&planes[0]), one(&planes[1])]);
        assert_eq!(decode(&spec, &good, n).unwrap(), data);
        let half = planes[0].len() / 2;
        let split = [one(&planes[0][..half]), one(&planes[0][half..])].concat();
        let skippable = [one(&planes[0]), vec![0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0]].concat();
        for bad in [split, skippable] {
            let e = decode(&spec, &block(&[bad, one(&planes[1])]), n).unwrap_err();
            assert!(
                e.contains("zstd frame") || e.contains("one zstd frame"),
                "{e}"
            );
        }
    }
}
