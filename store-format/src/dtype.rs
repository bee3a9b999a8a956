//! Element types, codecs and array descriptions, as named in SPEC.md.

use serde::{Deserialize, Serialize};

/// Element type of a per-token array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Bf16,
    F16,
    F32,
    U8,
    U16,
    U32,
    I32,
    U64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::Bf16 | DType::F16 | DType::U16 => 2,
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::U64 => 8,
        }
    }

    /// (total, exponent, mantissa) bits for float types.
    pub fn float_layout(self) -> Option<(u32, u32, u32)> {
        match self {
            DType::Bf16 => Some((16, 8, 7)),
            DType::F16 => Some((16, 5, 10)),
            DType::F32 => Some((32, 8, 23)),
            _ => None,
        }
    }

    pub fn is_float(self) -> bool {
        self.float_layout().is_some()
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::I32 => "i32",
            DType::U64 => "u64",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase())).ok()
    }

    /// Element `i` of little-endian `bytes` as f64 (floats and integers alike).
    #[inline]
    pub fn get_f64(self, bytes: &[u8], i: usize) -> f64 {
        let s = self.size();
        let b = &bytes[i * s..i * s + s];
        match self {
            DType::Bf16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) as f64,
            DType::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])) as f64,
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            DType::U8 => b[0] as f64,
            DType::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
            DType::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            DType::U64 => u64::from_le_bytes(b.try_into().unwrap()) as f64,
        }
    }

    /// Elements `start..start + out.len()` as f64, a loop per type.
    pub fn row_f64(self, bytes: &[u8], start: usize, out: &mut [f64]) {
        let s = self.size();
        let b = &bytes[start * s..(start + out.len()) * s];
        match self {
            DType::Bf16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64;
                }
            }
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
                }
            }
            _ => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = self.get_f64(b, i);
                }
            }
        }
    }

    /// Convert little-endian elements to f32, appending to `out`.
    pub fn extend_f32(self, bytes: &[u8], out: &mut Vec<f32>) {
        let n = bytes.len() / self.size();
        out.reserve(n);
        match self {
            DType::Bf16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
            ),
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            _ => out.extend((0..n).map(|i| self.get_f64(bytes, i) as f32)),
        }
    }
}

/// IEEE half to single, exact (every f16 is an f32).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: renormalise into f32's wider exponent range.
            let shift = m.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((m << shift) & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// How a block's bytes are stored (SPEC.md, "Codecs").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    Raw,
    Bytesplit,
    Expsplit,
}

impl Codec {
    pub fn parse(s: &str) -> Option<Codec> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase())).ok()
    }
    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Bytesplit => "bytesplit",
            Codec::Expsplit => "expsplit",
        }
    }
}

/// One per-token array of a store: `width` elements of `dtype` per token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArraySpec {
    pub name: String,
    pub dtype: DType,
    pub width: usize,
    pub codec: Codec,
}

impl ArraySpec {
    pub fn new(name: &str, dtype: DType, width: usize, codec: Codec) -> Self {
        // expsplit is defined for floats only; integers fall back to byte planes.
        let codec = if codec == Codec::Expsplit && !dtype.is_float() {
            Codec::Bytesplit
        } else {
            codec
        };
        ArraySpec {
            name: name.to_string(),
            dtype,
            width,
            codec,
        }
    }
    pub fn row_bytes(&self) -> usize {
        self.width * self.dtype.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_known_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);
    }

    #[test]
    fn names_round_trip() {
        for d in [
            DType::Bf16,
            DType::F16,
            DType::F32,
            DType::U8,
            DType::U16,
            DType::U32,
            DType::I32,
            DType::U64,
        ] {
            assert_eq!(DType::parse(d.name()), Some(d));
        }
        assert_eq!(DType::parse("f64"), None);
        assert_eq!(Codec::parse("expsplit"), Some(Codec::Expsplit));
    }
}
