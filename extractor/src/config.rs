//! HF `config.json` for the supported architectures, in both dialects: the published one
//! (`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`, no
//! `layer_types`) and the transformers-5 one (`rope_parameters`, `layer_types`). Gemma-3
//! multimodal configs (`model_type: gemma3`) keep the text model under `text_config`.
//! Missing keys take transformers' defaults for that architecture (`hidden_act` is not read);
//! a key present as `null` (a soft-cap) means "off", so those are `Option<Option<_>>`, except
//! for the keys transformers refuses as `null`.

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

/// Keys whose type in transformers' strict config classes does not admit `null`.
const NOT_NULL: [&str; 12] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_activation",
    "rms_norm_eps",
    "query_pre_attn_scalar",
    "tie_word_embeddings",
    "attention_bias",
];

/// The keys of `Gemma2Config` / `Gemma3TextConfig` that change the forward pass.
#[derive(Debug, Clone, Deserialize)]
pub struct GemmaConfigJson {
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    /// transformers reads only this key; `hidden_act` is ignored.
    pub hidden_activation: Option<String>,
    pub rms_norm_eps: Option<f64>,
    pub query_pre_attn_scalar: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    pub sliding_window: Option<Option<usize>>,
    pub layer_types: Option<Vec<String>>,
    pub sliding_window_pattern: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rope_local_base_freq: Option<f64>,
    pub rope_scaling: Option<Value>,
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

impl LayerType {
    pub const ALL: [LayerType; 2] = [LayerType::Full, LayerType::Sliding];

    /// The name in `layer_types` and the key of its `rope_parameters` entry.
    pub fn name(self) -> &'static str {
        match self {
            LayerType::Full => "full_attention",
            LayerType::Sliding => "sliding_attention",
        }
    }
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
                // No text_config: Gemma3Config builds a default Gemma3TextConfig.
                let t = match v.get("text_config") {
                    None | Some(Value::Null) => Value::Object(Default::default()),
                    Some(t) => t.clone(),
                };
                (Arch::Gemma3, t)
            }
            "" => return Err("no model_type".into()),
            other => {
                return Err(format!(
                    "unsupported model_type {other:?} (supported: gemma2, gemma3_text, gemma3)"
                ))
            }
        };
        if let Some(k) = NOT_NULL
            .iter()
            .find(|k| body.get(**k).is_some_and(Value::is_null))
        {
            return Err(format!("{k} is null"));
        }
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

type Map = serde_json::Map<String, Value>;

fn object(v: &Value, what: &str) -> std::result::Result<Map, String> {
    match v {
        Value::Object(m) => Ok(m.clone()),
        _ => Err(format!("{what} is not an object")),
    }
}

fn rope_from(m: Map, default_theta: f64, what: &str) -> std::result::Result<Rope, String> {
    let r: RopeJson =
        serde_json::from_value(Value::Object(m)).map_err(|e| format!("{what}: {e}"))?;
    rope_of(&r, default_theta, what)
}

/// RoPE per layer type as transformers 5 resolves it (`convert_rope_params_to_dict`:
/// Gemma2Config inherits the base class's, Gemma3TextConfig overrides it).
fn resolve_rope(
    arch: Arch,
    j: &GemmaConfigJson,
    layer_types: &[LayerType],
) -> std::result::Result<[Rope; 2], String> {
    let scaling = j.rope_scaling.as_ref().filter(|v| !v.is_null());
    match arch {
        Arch::Gemma2 => {
            // `rope_scaling or rope_parameters`: a non-empty rope_scaling replaces the other.
            let (p, what) = match (scaling, &j.rope_parameters) {
                (Some(s), _) if s.as_object().is_none_or(|m| !m.is_empty()) => {
                    (object(s, "rope_scaling")?, "rope_scaling")
                }
                (_, Some(p)) if !p.is_null() => (object(p, "rope_parameters")?, "rope_parameters"),
                _ => (Map::new(), "rope_parameters"),
            };
            // transformers' Gemma2 model reads `rope_parameters["rope_type"]`: one set only.
            let nested = LayerType::ALL
                .into_iter()
                .filter(|t| layer_types.contains(t))
                .any(|t| p.contains_key(t.name()));
            if nested {
                return Err(format!(
                    "{what}: one RoPE set per layer type is not supported for gemma2 (transformers' Gemma2 model takes one set for all layers)"
                ));
            }
            let r = rope_from(p, j.rope_theta.unwrap_or(10_000.0), what)?;
            Ok([r, r])
        }
        Arch::Gemma3 => {
            // A flat set (no per-type keys) is not read: each type gets its own entry.
            let mut p = match &j.rope_parameters {
                Some(v) if !v.is_null() => object(v, "rope_parameters")?,
                _ => Map::from_iter(LayerType::ALL.map(|t| {
                    (
                        t.name().to_string(),
                        serde_json::json!({"rope_type": "default"}),
                    )
                })),
            };
            let mut entry = |k: &str| -> std::result::Result<Option<Map>, String> {
                match p.remove(k) {
                    Some(Value::Null) | None => Ok(None),
                    Some(v) => object(&v, &format!("rope_parameters.{k}")).map(Some),
                }
            };
            let default = || Map::from_iter([("rope_type".to_string(), "default".into())]);
            let full = entry(LayerType::Full.name())?;
            let sliding = entry(LayerType::Sliding.name())?.unwrap_or_else(default);
            // Published dialect: rope_scaling updates the global layers' set only (4B+).
            let full = match (full, scaling) {
                (Some(mut f), Some(s)) => {
                    f.extend(object(s, "rope_scaling")?);
                    f
                }
                (None, Some(_)) => {
                    return Err(
                        "rope_scaling with a rope_parameters that has no full_attention entry (transformers cannot load this)"
                            .into(),
                    )
                }
                (f, None) => f.unwrap_or_else(default),
            };
            Ok([
                rope_from(
                    full,
                    j.rope_theta.unwrap_or(1_000_000.0),
                    "rope_parameters.full_attention",
                )?,
                rope_from(
                    sliding,
                    j.rope_local_base_freq.unwrap_or(10_000.0),
                    "rope_parameters.sliding_attention",
                )?,
            ])
        }
    }
}

fn resolve(arch: Arch, j: GemmaConfigJson) -> std::result::Result<Config, String> {
    // transformers' class defaults: Gemma2Config, Gemma3TextConfig (5.x).
    let (vocab, pattern, soft_attn, soft_final) = match arch {
        Arch::Gemma2 => (256_000, 2, Some(50.0), Some(30.0)),
        Arch::Gemma3 => (262_208, j.sliding_window_pattern.unwrap_or(6), None, None),
    };
    let n = j.num_hidden_layers.unwrap_or(26);
    let heads = j.num_attention_heads.unwrap_or(8);
    let kv_heads = j.num_key_value_heads.unwrap_or(4);
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(format!(
            "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv_heads}"
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
    let gelu_tanh = match j
        .hidden_activation
        .as_deref()
        .unwrap_or("gelu_pytorch_tanh")
    {
        "gelu_pytorch_tanh" | "gelu_tanh" => true,
        "gelu" => false,
        other => return Err(format!("unsupported hidden_activation {other:?}")),
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
                .map(|s| {
                    LayerType::ALL
                        .into_iter()
                        .find(|t| t.name() == s)
                        .ok_or_else(|| format!("unsupported layer type {s:?}"))
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
    let rope = resolve_rope(arch, &j, &layer_types)?;
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
        vocab_size: j.vocab_size.unwrap_or(vocab),
        hidden_size: j.hidden_size.unwrap_or(2304),
        intermediate_size: j.intermediate_size.unwrap_or(9216),
        num_hidden_layers: n,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: j.head_dim.unwrap_or(256),
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

    // The expected values below are what transformers 5.24 resolves for the same text
    // (`Gemma2Config` / `Gemma3TextConfig` / `Gemma3Config.from_dict`), checked when written.

    #[test]
    fn missing_keys_take_the_transformers_class_defaults() {
        for (text, vocab) in [
            (r#"{"model_type": "gemma2"}"#, 256_000),
            (r#"{"model_type": "gemma3_text"}"#, 262_208),
            (r#"{"model_type": "gemma3"}"#, 262_208),
        ] {
            let c = Config::parse(text).unwrap();
            assert_eq!(c.vocab_size, vocab, "{text}");
            assert_eq!(
                (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
                (2304, 9216, 26),
                "{text}"
            );
            assert_eq!(
                (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
                (8, 4, 256),
                "{text}"
            );
            assert!(c.gelu_tanh, "{text}");
        }
        // head_dim is 256, not hidden_size / num_attention_heads.
        let c = Config::parse(
            r#"{"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 4}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 256);
    }

    #[test]
    fn hidden_act_is_ignored_and_null_is_refused() {
        for ty in ["gemma2", "gemma3_text"] {
            let c = Config::parse(&format!(
                r#"{{"model_type": "{ty}", {BASE}, "hidden_act": "gelu"}}"#
            ))
            .unwrap();
            assert!(c.gelu_tanh, "{ty}");
        }
        let c = Config::parse(&format!(
            r#"{{"model_type": "gemma2", {BASE}, "hidden_activation": "gelu", "hidden_act": "gelu_pytorch_tanh"}}"#
        ))
        .unwrap();
        assert!(!c.gelu_tanh);
        // transformers refuses null for these keys rather than taking the default.
        let base = BASE.replace(r#""head_dim": 4"#, r#""head_dim": null"#);
        let e = Config::parse(&format!(r#"{{"model_type": "gemma3_text", {base}}}"#)).unwrap_err();
        assert_eq!(e, "head_dim is null");
        let base = BASE.replace(r#""vocab_size": 10"#, r#""vocab_size": null"#);
        let e = Config::parse(&format!(r#"{{"model_type": "gemma2", {base}}}"#)).unwrap_err();
        assert_eq!(e, "vocab_size is null");
    }

    fn ropes(text: &str) -> [(f64, f64); 2] {
        let c = Config::parse(text).unwrap();
        c.rope.map(|r| (r.theta, r.factor))
    }

    #[test]
    fn gemma3_rope_sets_without_theta_take_the_top_level_keys() {
        let g3 = |rest: &str| format!(r#"{{"model_type": "gemma3_text", {BASE}, {rest}}}"#);
        let top = r#""rope_theta": 2e6, "rope_local_base_freq": 2e4"#;
        assert_eq!(
            ropes(&g3(&format!(
                r#"{top}, "rope_parameters": {{"full_attention": {{"rope_type": "default"}},
                "sliding_attention": {{"rope_type": "default"}}}}"#
            ))),
            [(2e6, 1.0), (2e4, 1.0)]
        );
        // A missing or null set is a default one.
        assert_eq!(
            ropes(&g3(&format!(
                r#"{top}, "rope_parameters": {{"full_attention": {{"rope_type": "linear", "factor": 8.0}}}}"#
            ))),
            [(2e6, 8.0), (2e4, 1.0)]
        );
        assert_eq!(
            ropes(&g3(r#""rope_parameters": {"full_attention": null,
                "sliding_attention": {"rope_type": "default", "rope_theta": 3e4}}"#)),
            [(1e6, 1.0), (3e4, 1.0)]
        );
    }

    #[test]
    fn gemma3_flat_rope_parameters_are_not_read() {
        let g3 = |rest: &str| format!(r#"{{"model_type": "gemma3_text", {BASE}, {rest}}}"#);
        let flat =
            r#""rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}"#;
        assert_eq!(ropes(&g3(flat)), [(1e6, 1.0), (1e4, 1.0)]);
        assert_eq!(
            ropes(&g3(&format!(
                r#"{flat}, "rope_theta": 2e6, "rope_local_base_freq": 2e4"#
            ))),
            [(2e6, 1.0), (2e4, 1.0)]
        );
        // rope_scaling updates the full_attention set, which a flat one lacks.
        let e = Config::parse(&g3(
            r#""rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "rope_parameters": {"rope_type": "default", "rope_theta": 3e6}"#,
        ))
        .unwrap_err();
        assert!(e.contains("full_attention"), "{e}");
        assert_eq!(
            ropes(&g3(
                r#""rope_scaling": {"rope_type": "linear", "factor": 8.0},
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 3e6}}"#
            )),
            [(3e6, 8.0), (1e4, 1.0)]
        );
        // The default set's rope_type wins over rope_scaling's old `type` key; its own
        // rope_theta over the top-level one.
        assert_eq!(
            ropes(&g3(r#""rope_scaling": {"type": "linear", "factor": 8.0}"#)),
            [(1e6, 1.0), (1e4, 1.0)]
        );
        assert_eq!(
            ropes(&g3(
                r#""rope_theta": 2e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0, "rope_theta": 7.0}"#
            )),
            [(7.0, 8.0), (1e4, 1.0)]
        );
    }

    #[test]
    fn gemma2_rope_is_one_set() {
        let g2 = |rest: &str| format!(r#"{{"model_type": "gemma2", {BASE}, {rest}}}"#);
        assert_eq!(
            ropes(&g2(
                r#""rope_theta": 5000.0, "rope_parameters": {"rope_type": "default"}"#
            )),
            [(5000.0, 1.0); 2]
        );
        // A non-empty rope_scaling replaces rope_parameters.
        assert_eq!(
            ropes(&g2(
                r#""rope_theta": 5000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                "rope_parameters": {"rope_type": "default", "rope_theta": 9.0}"#
            )),
            [(5000.0, 2.0); 2]
        );
        assert_eq!(
            ropes(&g2(r#""rope_scaling": {"type": "linear", "factor": 2.0}"#)),
            [(1e4, 2.0); 2]
        );
        // transformers loads this config, then its Gemma2 model fails on it (KeyError).
        let e = Config::parse(&g2(
            r#""rope_parameters": {"full_attention": {"rope_type": "default"},
            "sliding_attention": {"rope_type": "default", "rope_theta": 3.0}}"#,
        ))
        .unwrap_err();
        assert!(e.contains("per layer type"), "{e}");
    }
}
