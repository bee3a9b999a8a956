//! HF `config.json` for the supported architectures, in both dialects: the published one
//! (`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`, no
//! `layer_types`) and the transformers-5 one (`rope_parameters`, `layer_types`). Gemma-3
//! multimodal configs (`model_type: gemma3`) keep the text model under `text_config`.
//! Missing keys take transformers' defaults for that architecture; a key present as `null`
//! (a soft-cap) means "off", so those are `Option<Option<_>>`.

use crate::error::{Error, Result};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::path::Path;

/// Distinguishes a missing key (outer `None`) from an explicit `null` (`Some(None)`).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The keys of `Gemma2Config` / `Gemma3TextConfig` that change the forward pass.
#[derive(Debug, Clone, Deserialize)]
pub struct GemmaConfigJson {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: Option<usize>,
    pub hidden_activation: Option<String>,
    pub hidden_act: Option<String>,
    pub rms_norm_eps: Option<f64>,
    pub query_pre_attn_scalar: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    pub sliding_window: Option<Option<usize>>,
    pub layer_types: Option<Vec<String>>,
    pub sliding_window_pattern: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rope_local_base_freq: Option<f64>,
    pub rope_scaling: Option<RopeJson>,
    pub rope_parameters: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    pub tie_word_embeddings: Option<bool>,
    pub bos_token_id: Option<Value>,
    pub attention_bias: Option<bool>,
    pub use_bidirectional_attention: Option<bool>,
}

/// One RoPE parameter set (`rope_scaling` or an entry of `rope_parameters`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeJson {
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Gemma2,
    Gemma3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Full = 0,
    Sliding = 1,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    /// Linear position scaling (`rope_type: linear`); 1 for `default`.
    pub factor: f64,
}

/// The resolved configuration the models are built from.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`), else exact (`gelu`).
    pub gelu_tanh: bool,
    pub rms_norm_eps: f64,
    pub query_pre_attn_scalar: f64,
    pub sliding_window: Option<usize>,
    pub layer_types: Vec<LayerType>,
    /// Indexed by `LayerType as usize`.
    pub rope: [Rope; 2],
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
}

impl Config {
    /// Read `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Config> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Config::parse(&text).map_err(|msg| Error::Config { path, msg })
    }

    pub fn parse(text: &str) -> std::result::Result<Config, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let (arch, body) = match model_type {
            "gemma2" => (Arch::Gemma2, v.clone()),
            "gemma3_text" => (Arch::Gemma3, v.clone()),
            "gemma3" => {
                let t = v
                    .get("text_config")
                    .cloned()
                    .ok_or("model_type gemma3 without text_config")?;
                (Arch::Gemma3, t)
            }
            "" => return Err("no model_type".into()),
            other => {
                return Err(format!(
                    "unsupported model_type {other:?} (supported: gemma2, gemma3_text, gemma3)"
                ))
            }
        };
        let j: GemmaConfigJson = serde_json::from_value(body).map_err(|e| format!("{e}"))?;
        resolve(arch, j)
    }

    pub fn layer_type(&self, layer: usize) -> LayerType {
        self.layer_types[layer]
    }
}

fn rope_of(r: &RopeJson, default_theta: f64, what: &str) -> std::result::Result<Rope, String> {
    let ty = r
        .rope_type
        .as_deref()
        .or(r.type_.as_deref())
        .unwrap_or("default");
    let factor = match ty {
        "default" => 1.0,
        "linear" => r
            .factor
            .ok_or_else(|| format!("{what}: linear RoPE without factor"))?,
        other => {
            return Err(format!(
                "{what}: unsupported rope_type {other:?} (supported: default, linear)"
            ))
        }
    };
    Ok(Rope {
        theta: r.rope_theta.unwrap_or(default_theta),
        factor,
    })
}

fn resolve(arch: Arch, j: GemmaConfigJson) -> std::result::Result<Config, String> {
    let n = j.num_hidden_layers;
    if j.num_attention_heads == 0
        || j.num_key_value_heads == 0
        || !j.num_attention_heads.is_multiple_of(j.num_key_value_heads)
    {
        return Err(format!(
            "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
            j.num_attention_heads, j.num_key_value_heads
        ));
    }
    if j.use_bidirectional_attention == Some(true) {
        return Err(
            "use_bidirectional_attention is not supported (causal language models only)".into(),
        );
    }
    if j.attention_bias == Some(true) {
        return Err("attention_bias is not supported".into());
    }
    let act = j
        .hidden_activation
        .as_deref()
        .or(j.hidden_act.as_deref())
        .unwrap_or("gelu_pytorch_tanh");
    let gelu_tanh = match act {
        "gelu_pytorch_tanh" | "gelu_tanh" => true,
        "gelu" => false,
        other => return Err(format!("unsupported hidden_activation {other:?}")),
    };
    // transformers' defaults per architecture (Gemma2Config, Gemma3TextConfig).
    let (pattern, soft_attn, soft_final, thetas) = match arch {
        Arch::Gemma2 => (2, Some(50.0), Some(30.0), [10_000.0, 10_000.0]),
        Arch::Gemma3 => (
            j.sliding_window_pattern.unwrap_or(6),
            None,
            None,
            [1_000_000.0, 10_000.0],
        ),
    };
    let layer_types = match &j.layer_types {
        Some(t) => {
            if t.len() != n {
                return Err(format!(
                    "layer_types has {} entries for {n} layers",
                    t.len()
                ));
            }
            t.iter()
                .map(|s| match s.as_str() {
                    "full_attention" => Ok(LayerType::Full),
                    "sliding_attention" => Ok(LayerType::Sliding),
                    o => Err(format!("unsupported layer type {o:?}")),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?
        }
        None if pattern == 0 => return Err("sliding_window_pattern must be positive".into()),
        None => (0..n)
            .map(|i| {
                if (i + 1) % pattern != 0 {
                    LayerType::Sliding
                } else {
                    LayerType::Full
                }
            })
            .collect(),
    };
    let rope = match &j.rope_parameters {
        // transformers 5: one set for all layers, or one per layer type.
        Some(p) if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() => {
            let get = |k: &str, d: f64| -> std::result::Result<Rope, String> {
                let r: RopeJson = match p.get(k) {
                    Some(x) if !x.is_null() => serde_json::from_value(x.clone())
                        .map_err(|e| format!("rope_parameters.{k}: {e}"))?,
                    _ => RopeJson::default(),
                };
                rope_of(&r, d, &format!("rope_parameters.{k}"))
            };
            [
                get("full_attention", thetas[0])?,
                get("sliding_attention", thetas[1])?,
            ]
        }
        Some(p) => {
            let r: RopeJson =
                serde_json::from_value(p.clone()).map_err(|e| format!("rope_parameters: {e}"))?;
            let r = rope_of(&r, j.rope_theta.unwrap_or(thetas[0]), "rope_parameters")?;
            [r, r]
        }
        // Published dialect: rope_scaling applies to global layers only (Gemma-3 4B+).
        None => {
            let global_theta = j.rope_theta.unwrap_or(thetas[0]);
            let full = match &j.rope_scaling {
                Some(s) => rope_of(
                    &RopeJson {
                        rope_theta: Some(global_theta),
                        ..s.clone()
                    },
                    global_theta,
                    "rope_scaling",
                )?,
                None => Rope {
                    theta: global_theta,
                    factor: 1.0,
                },
            };
            let local = match arch {
                Arch::Gemma2 => full,
                Arch::Gemma3 => Rope {
                    theta: j.rope_local_base_freq.unwrap_or(thetas[1]),
                    factor: 1.0,
                },
            };
            [full, local]
        }
    };
    let sliding_window = j.sliding_window.unwrap_or(Some(4096));
    if sliding_window == Some(0) {
        return Err("sliding_window must be positive".into());
    }
    let bos_token_id = match &j.bos_token_id {
        Some(Value::Number(x)) => x.as_u64().map(|x| x as u32),
        _ => None,
    };
    Ok(Config {
        arch,
        vocab_size: j.vocab_size,
        hidden_size: j.hidden_size,
        intermediate_size: j.intermediate_size,
        num_hidden_layers: n,
        num_attention_heads: j.num_attention_heads,
        num_key_value_heads: j.num_key_value_heads,
        head_dim: j.head_dim.unwrap_or(j.hidden_size / j.num_attention_heads),
        gelu_tanh,
        rms_norm_eps: j.rms_norm_eps.unwrap_or(1e-6),
        query_pre_attn_scalar: j.query_pre_attn_scalar.unwrap_or(256.0),
        sliding_window,
        layer_types,
        rope,
        attn_logit_softcapping: j.attn_logit_softcapping.unwrap_or(soft_attn),
        final_logit_softcapping: j.final_logit_softcapping.unwrap_or(soft_final),
        tie_word_embeddings: j.tie_word_embeddings.unwrap_or(true),
        bos_token_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4"#;

    #[test]
    fn gemma2_published_dialect_defaults() {
        let c = Config::parse(&format!(
            r#"{{"model_type": "gemma2", {BASE}, "rope_theta": 5000.0}}"#
        ))
        .unwrap();
        assert_eq!(c.arch, Arch::Gemma2);
        assert_eq!(c.layer_types[0], LayerType::Sliding);
        assert_eq!(c.layer_types[1], LayerType::Full);
        assert_eq!(c.rope[0].theta, 5000.0);
        assert_eq!(c.rope[1].theta, 5000.0);
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.final_logit_softcapping, Some(30.0));
    }

    #[test]
    fn explicit_null_softcap_is_off() {
        let c = Config::parse(&format!(
            r#"{{"model_type": "gemma2", {BASE}, "final_logit_softcapping": null}}"#
        ))
        .unwrap();
        assert_eq!(c.final_logit_softcapping, None);
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
    }

    #[test]
    fn gemma3_published_and_nested() {
        let text = format!(
            r#"{{"model_type": "gemma3", "text_config": {{"model_type": "gemma3_text", {BASE},
            "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
            "rope_scaling": {{"rope_type": "linear", "factor": 8.0}}}}}}"#
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.arch, Arch::Gemma3);
        use LayerType::*;
        assert_eq!(
            c.layer_types,
            vec![Sliding, Sliding, Full, Sliding, Sliding, Full]
        );
        assert_eq!(
            c.rope[Full as usize],
            Rope {
                theta: 1e6,
                factor: 8.0
            }
        );
        assert_eq!(
            c.rope[Sliding as usize],
            Rope {
                theta: 1e4,
                factor: 1.0
            }
        );
        assert_eq!(c.final_logit_softcapping, None);
    }

    #[test]
    fn gemma3_transformers5_dialect() {
        let text = format!(
            r#"{{"model_type": "gemma3_text", {BASE},
            "layer_types": ["sliding_attention","full_attention","sliding_attention","full_attention","sliding_attention","full_attention"],
            "rope_parameters": {{"full_attention": {{"rope_type": "default", "rope_theta": 2e6}},
                                 "sliding_attention": {{"rope_type": "default", "rope_theta": 3e4}}}}}}"#
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.layer_types[1], LayerType::Full);
        assert_eq!(c.rope[0].theta, 2e6);
        assert_eq!(c.rope[1].theta, 3e4);
    }

    #[test]
    fn refusals() {
        let e = Config::parse(&format!(r#"{{"model_type": "llama", {BASE}}}"#)).unwrap_err();
        assert!(e.contains("unsupported model_type \"llama\""), "{e}");
        let e = Config::parse(&format!(
            r#"{{"model_type": "gemma2", {BASE}, "rope_parameters": {{"rope_type": "yarn", "rope_theta": 1.0}}}}"#
        ))
        .unwrap_err();
        assert!(e.contains("yarn"), "{e}");
        let e = Config::parse(&format!(
            r#"{{"model_type": "gemma2", {BASE}, "layer_types": ["full_attention"]}}"#
        ))
        .unwrap_err();
        assert!(e.contains("layer_types has 1 entries"), "{e}");
    }
}
