//! Hugging Face safetensors Llama models: a directory with `config.json`, `tokenizer.json`
//! (`tokenizer_config.json` optional) and either `model.safetensors` or shards listed in
//! `model.safetensors.index.json`.
//!
//! - Weights: every `.safetensors` file is memory-mapped; F32, F16 and BF16 tensors are used in
//!   place (the CPU kernels multiply those encodings directly, unaligned), so resident memory is
//!   what a GGUF file of the same type takes. The exception is Q and K: Hugging Face orders each
//!   head's rows for "rotate half" RoPE, the decoder rotates adjacent pairs (llama.cpp's
//!   converter permutes GGUF files so), so the loader copies this rank's Q and K rows in
//!   interleaved order ([`super::source::interleave_qk`]); that copy is Q + K of the shard.
//! - Metadata: `config.json` and the tokenizer files are translated into the GGUF keys llama.cpp's
//!   converter writes (`llama.*`, `tokenizer.ggml.*`), so the configuration and the tokenizer
//!   are built by the same code as for a GGUF file ([`super::llama::LlamaConfig::from_gguf`],
//!   [`crate::tokenizer::Tokenizer::from_gguf`]).
//!
//! Errors name the file and the tensor or JSON field; nothing here panics on a bad file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use ::safetensors::{Dtype, SafeTensorError, SafeTensors};
use anyhow::{Context, bail};
use serde_json::Value as Json;

use super::MappedGguf;
use super::gguf::{GgmlType, Gguf, Value};
use super::source::{QkLayout, SourceTensor, TensorSource};
use crate::kernels::Bytes;

/// File names inside a model directory.
pub const CONFIG: &str = "config.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const SINGLE: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";

/// ggml token types (llama.cpp's converter).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;
/// Llama 3's pre-tokenizer regex as its tokenizer.json writes it.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The GGUF name of Llama 3.1's RoPE frequency factors.
const ROPE_FREQS: &str = "rope_freqs.weight";

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    len: usize,
}

/// A memory-mapped safetensors model.
pub struct SafetensorsModel {
    metadata: Arc<MappedGguf>,
    /// One per `.safetensors` file (empty directory, the map).
    files: Vec<Arc<MappedGguf>>,
    tensors: HashMap<String, Entry>,
    /// The index file and where it places each tensor (sharded models).
    index: Option<(PathBuf, HashMap<String, usize>)>,
    tied: bool,
    /// `rope_freqs.weight`, from config.json's `rope_scaling` (see [`llama3_rope_factors`]).
    rope_freqs: Option<Vec<f32>>,
    config: PathBuf,
}

/// The Hugging Face name of a tensor the loader asks for by its GGUF name.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match rest.strip_suffix(".weight")? {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}.weight"))
}

fn ggml_type(d: Dtype) -> Option<GgmlType> {
    match d {
        Dtype::F32 => Some(GgmlType::F32),
        Dtype::F16 => Some(GgmlType::F16),
        Dtype::BF16 => Some(GgmlType::BF16),
        _ => None,
    }
}

/// Where the weights are: one file or an index of shards.
enum Weights {
    Single(PathBuf),
    Index(PathBuf),
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The model directory and its weights, from a directory or a path to one of the files.
fn locate(path: &Path) -> anyhow::Result<(PathBuf, Weights)> {
    if path.is_dir() {
        let (index, single) = (path.join(INDEX), path.join(SINGLE));
        return if index.is_file() {
            Ok((path.to_owned(), Weights::Index(index)))
        } else if single.is_file() {
            Ok((path.to_owned(), Weights::Single(single)))
        } else {
            bail!(
                "{}: a model directory needs {SINGLE} or {INDEX} (with its shards), or a GGUF file instead",
                path.display()
            )
        };
    }
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(".index.json") {
        return Ok((dir, Weights::Index(path.to_owned())));
    }
    // A shard named in the directory's index stands for the whole model.
    let index = dir.join(INDEX);
    if index.is_file() && read_index(&index)?.0.contains(&name) {
        return Ok((dir, Weights::Index(index)));
    }
    Ok((dir, Weights::Single(path.to_owned())))
}

fn read_json(path: &Path) -> anyhow::Result<Json> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let v: Json = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?;
    if !v.is_object() {
        bail!("{}: expected a JSON object", path.display());
    }
    Ok(v)
}

/// An index's `weight_map`: the files it names, and the file of each tensor.
fn read_index(path: &Path) -> anyhow::Result<(HashSet<String>, HashMap<String, String>)> {
    let v = read_json(path)?;
    let map = v
        .get("weight_map")
        .and_then(Json::as_object)
        .with_context(|| {
            format!(
                "{}: field weight_map is missing or not an object",
                path.display()
            )
        })?;
    let mut files = HashSet::new();
    let mut placed = HashMap::new();
    for (tensor, file) in map {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: field weight_map.{tensor} is not a file name: {file}",
                path.display()
            )
        })?;
        let plain = Path::new(file)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !plain || file.is_empty() {
            bail!(
                "{}: field weight_map.{tensor} names {file:?}, not a file in the model directory",
                path.display()
            );
        }
        files.insert(file.to_owned());
        placed.insert(tensor.clone(), file.to_owned());
    }
    if files.is_empty() {
        bail!("{}: field weight_map lists no tensor", path.display());
    }
    Ok((files, placed))
}

/// Map one `.safetensors` file (the model's `index`-th) and read its header.
fn map_file(path: &Path, index: usize) -> anyhow::Result<(MappedGguf, Vec<(String, Entry)>)> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot open model file: {e}", path.display()))?;
    // SAFETY: as for GGUF files (see `MappedGguf::open`): mapped read-only, never written while
    // served.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| anyhow::anyhow!("{}: cannot map model file: {e}", path.display()))?;
    let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
        let why = match e {
            SafeTensorError::MetadataIncompleteBuffer
            | SafeTensorError::InvalidHeaderLength
            | SafeTensorError::HeaderTooSmall => "truncated or corrupt",
            _ => "invalid",
        };
        anyhow::anyhow!(
            "{}: not a valid safetensors file ({why}, {} bytes): {e}",
            path.display(),
            map.len()
        )
    })?;
    let data = 8 + n;
    let tensors = meta
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let (a, b) = t.data_offsets;
            let entry = Entry {
                file: index,
                dtype: t.dtype,
                shape: t.shape.clone(),
                start: data + a,
                len: b - a,
            };
            (name, entry)
        })
        .collect();
    let gguf = Gguf {
        path: path.to_owned(),
        version: 0,
        metadata: BTreeMap::new(),
        tensors: Vec::new(),
        data_offset: data as u64,
    };
    Ok((MappedGguf::from_parts(gguf, Some(map)), tensors))
}

impl SafetensorsModel {
    /// Open a model directory, or the model through one of its files (`model.safetensors`, a
    /// shard, or the index).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let (dir, weights) = locate(path)?;
        let (metadata, cfg) = hf_parts(&dir)?;
        let (tied, rope_freqs) = (cfg.tied, cfg.rope_freqs);
        let (names, index) = match &weights {
            Weights::Single(p) => (vec![p.clone()], None),
            Weights::Index(p) => {
                let (files, placed) = read_index(p)?;
                let mut names: Vec<String> = files.into_iter().collect();
                names.sort();
                let at: HashMap<&str, usize> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.as_str(), i))
                    .collect();
                let placed = placed
                    .into_iter()
                    .filter_map(|(t, f)| at.get(f.as_str()).map(|&i| (t, i)))
                    .collect();
                let dir = parent_dir(p);
                (
                    names.iter().map(|n| dir.join(n)).collect(),
                    Some((p.clone(), placed)),
                )
            }
        };
        let mut files = Vec::new();
        let mut tensors: HashMap<String, Entry> = HashMap::new();
        for (i, path) in names.iter().enumerate() {
            let (mapped, list) = map_file(path, i).with_context(|| match &index {
                Some((p, _)) => format!("a shard {} lists", p.display()),
                None => "the model's weights".to_owned(),
            })?;
            for (name, entry) in list {
                if let Some(e) = tensors.get(&name) {
                    bail!(
                        "{}: tensor {name} is also in {}",
                        path.display(),
                        names[e.file].display()
                    );
                }
                tensors.insert(name, entry);
            }
            files.push(Arc::new(mapped));
        }
        Ok(Self {
            metadata: Arc::new(metadata),
            files,
            tensors,
            index,
            tied,
            rope_freqs,
            config: dir.join(CONFIG),
        })
    }

    /// The mapped `.safetensors` files.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.gguf.path.as_path())
    }

    fn missing(&self, hf: &str) -> anyhow::Error {
        let hint = if hf == "lm_head.weight" {
            " (config.json does not set tie_word_embeddings, so the LM head must be stored)"
        } else {
            ""
        };
        match &self.index {
            Some((index, placed)) => match placed.get(hf) {
                Some(&f) => anyhow::anyhow!(
                    "{}: tensor {hf} is missing ({} places it in this file){hint}",
                    self.files[f].gguf.path.display(),
                    index.display()
                ),
                None => anyhow::anyhow!(
                    "{}: tensor {hf} is missing from weight_map{hint}",
                    index.display()
                ),
            },
            None => anyhow::anyhow!(
                "{}: tensor {hf} is missing{hint}",
                self.files[0].gguf.path.display()
            ),
        }
    }
}

impl TensorSource for SafetensorsModel {
    fn metadata(&self) -> &Arc<MappedGguf> {
        &self.metadata
    }

    fn tensor(&self, name: &str) -> anyhow::Result<SourceTensor> {
        if let (ROPE_FREQS, Some(f)) = (name, &self.rope_freqs) {
            let bytes: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
            return Ok(SourceTensor {
                file: self.config.clone(),
                name: "rope_scaling".into(),
                dims: vec![f.len() as u64],
                ty: GgmlType::F32,
                data: Bytes::Owned(bytes.into()),
                outermost_first: true,
            });
        }
        let hf = hf_name(name).with_context(|| {
            format!(
                "{}: tensor {name} has no Hugging Face name",
                self.metadata.gguf.path.display()
            )
        })?;
        let Some(e) = self.tensors.get(&hf) else {
            return Err(self.missing(&hf));
        };
        let file = &self.files[e.file];
        let Some(ty) = ggml_type(e.dtype) else {
            bail!(
                "{}: tensor {hf} has dtype {:?}, which is not supported (F32, F16 and BF16 are)",
                file.gguf.path.display(),
                e.dtype
            );
        };
        Ok(SourceTensor {
            file: file.gguf.path.clone(),
            name: hf,
            dims: e.shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            data: Bytes::Mapped {
                file: Arc::clone(file),
                start: e.start,
                len: e.len,
            },
            outermost_first: true,
        })
    }

    fn has(&self, name: &str) -> bool {
        if name == "output.weight" {
            // Tied: the embedding is the head, whatever else the files hold. Untied: it must be
            // there (loading it names the file when it is not).
            return !self.tied;
        }
        if name == ROPE_FREQS {
            return self.rope_freqs.is_some();
        }
        hf_name(name).is_some_and(|hf| self.tensors.contains_key(&hf))
    }

    fn qk_layout(&self) -> QkLayout {
        QkLayout::HalfSplit
    }
}

/// Typed reads of a JSON object's fields; errors name the file and the field.
struct Fields<'a> {
    path: &'a Path,
    v: &'a Json,
}

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Json> {
        self.v.get(field).filter(|v| !v.is_null())
    }

    fn err(&self, field: &str, what: &str) -> anyhow::Error {
        match self.get(field) {
            Some(v) => anyhow::anyhow!("{}: field {field} is not {what}: {v}", self.path.display()),
            None => anyhow::anyhow!("{}: field {field} is missing", self.path.display()),
        }
    }

    fn uint(&self, field: &str) -> anyhow::Result<Option<u64>> {
        self.get(field)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.err(field, "a non-negative integer"))
            })
            .transpose()
    }

    fn positive(&self, field: &str) -> anyhow::Result<u64> {
        match self.uint(field)? {
            Some(0) => Err(self.err(field, "positive")),
            Some(v) => Ok(v),
            None => Err(self.err(field, "present")),
        }
    }

    fn float(&self, field: &str) -> anyhow::Result<Option<f64>> {
        self.get(field)
            .map(|v| {
                v.as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| self.err(field, "a positive number"))
            })
            .transpose()
    }

    fn boolean(&self, field: &str) -> anyhow::Result<Option<bool>> {
        self.get(field)
            .map(|v| v.as_bool().ok_or_else(|| self.err(field, "true or false")))
            .transpose()
    }

    fn string(&self, field: &str) -> anyhow::Result<Option<&str>> {
        self.get(field)
            .map(|v| v.as_str().ok_or_else(|| self.err(field, "a string")))
            .transpose()
    }

    /// An id, or the first of a list of ids (`eos_token_id: [2, 3]`).
    fn token_id(&self, field: &str) -> anyhow::Result<Option<u32>> {
        match self.get(field) {
            None => Ok(None),
            Some(Json::Array(a)) => a
                .first()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| self.err(field, "a token id or a list of them"))
                })
                .transpose(),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.err(field, "a token id or a list of them")),
        }
    }
}

/// `model_type`s of Hugging Face mixture-of-experts models (refused, see [`read_config`]).
const SAFETENSORS_MOE_TYPES: &[&str] = &[
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "llama4",
    "gpt_oss",
    "dbrx",
    "olmoe",
    "phimoe",
    "granitemoe",
    "jamba",
];

/// `config.json` → `llama.*` keys, whether the LM head is tied, and the special token ids.
struct Config {
    keys: Vec<(String, Value)>,
    tied: bool,
    vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Llama 3.1's RoPE frequency factors (`rope_scaling` of type `llama3`), served as the
    /// `rope_freqs.weight` tensor the converter would write.
    rope_freqs: Option<Vec<f32>>,
}

fn read_config(path: &Path) -> anyhow::Result<Config> {
    let v = read_json(path)?;
    let f = Fields { path, v: &v };
    let p = path.display();
    let model_type = f.string("model_type")?;
    // Mixture-of-experts checkpoints (each expert its own tensors) are refused by name, before
    // the model type, so that the message says why.
    let mut moe = model_type
        .filter(|t| SAFETENSORS_MOE_TYPES.contains(t))
        .map(|t| format!("field model_type is {t:?}"));
    for field in ["num_local_experts", "num_experts", "n_routed_experts"] {
        if let Some(n) = f.uint(field)?
            && n > 0
        {
            moe = Some(format!("field {field} is {n}"));
        }
    }
    if let Some(why) = moe {
        bail!(
            "{p}: {why}: mixture-of-experts safetensors models are not supported yet; convert the checkpoint to GGUF with llama.cpp's convert_hf_to_gguf.py (Mixtral's becomes a llama-architecture GGUF with stacked experts, which the CPU engine serves)"
        );
    }
    match model_type {
        Some("llama") => {}
        Some(other) => bail!("{p}: field model_type {other:?} is not supported (llama is)"),
        None => bail!("{p}: field model_type is missing (llama is supported)"),
    }
    if let Some(act) = f.string("hidden_act")?
        && act != "silu"
    {
        bail!("{p}: field hidden_act {act:?} is not supported (silu is)");
    }
    for bias in ["attention_bias", "mlp_bias"] {
        if f.boolean(bias)? == Some(true) {
            bail!("{p}: field {bias} true is not supported (Llama has no biases)");
        }
    }
    let hidden = f.positive("hidden_size")?;
    let heads = f.positive("num_attention_heads")?;
    let kv_heads = match f.uint("num_key_value_heads")? {
        Some(0) => return Err(f.err("num_key_value_heads", "positive")),
        Some(v) => v,
        None => heads,
    };
    if !heads.is_multiple_of(kv_heads) {
        bail!(
            "{p}: field num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        );
    }
    let head_dim = match f.uint("head_dim")? {
        Some(d) => d,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => bail!(
            "{p}: field hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        ),
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!("{p}: head size {head_dim} is not a positive even number");
    }
    let vocab = f.positive("vocab_size")?;
    let rope_theta = f.float("rope_theta")?.unwrap_or(10_000.0);
    let (rope_keys, rope_freqs) = rope_scaling(&f, rope_theta, head_dim)?;
    let mut keys = vec![
        (
            "general.architecture".to_owned(),
            Value::String("llama".into()),
        ),
        (
            "llama.block_count".into(),
            Value::U64(f.positive("num_hidden_layers")?),
        ),
        ("llama.embedding_length".into(), Value::U64(hidden)),
        (
            "llama.feed_forward_length".into(),
            Value::U64(f.positive("intermediate_size")?),
        ),
        ("llama.attention.head_count".into(), Value::U64(heads)),
        ("llama.attention.head_count_kv".into(), Value::U64(kv_heads)),
        ("llama.attention.key_length".into(), Value::U64(head_dim)),
        ("llama.attention.value_length".into(), Value::U64(head_dim)),
        ("llama.rope.dimension_count".into(), Value::U64(head_dim)),
        (
            "llama.context_length".into(),
            Value::U64(match f.uint("max_position_embeddings")? {
                Some(0) => return Err(f.err("max_position_embeddings", "positive")),
                Some(n) => n,
                None => 2048, // transformers' LlamaConfig default
            }),
        ),
        ("llama.vocab_size".into(), Value::U64(vocab)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F64(f.float("rms_norm_eps")?.unwrap_or(1e-6)),
        ),
        ("llama.rope.freq_base".into(), Value::F64(rope_theta)),
    ];
    keys.extend(rope_keys);
    if let Some(name) = f.string("_name_or_path")? {
        keys.push(("general.name".into(), Value::String(name.to_owned())));
    }
    Ok(Config {
        keys,
        tied: f.boolean("tie_word_embeddings")?.unwrap_or(false),
        vocab: usize::try_from(vocab).context("vocab_size")?,
        bos: f.token_id("bos_token_id")?,
        eos: f.token_id("eos_token_id")?,
        rope_freqs,
    })
}

/// GGUF metadata keys and values.
type Keys = Vec<(String, Value)>;

/// `rope_scaling` as llama.cpp's converter writes it: `linear` becomes the
/// `llama.rope.scaling.{type,factor}` keys; `llama3` (Llama 3.1 and later) becomes the
/// `rope_freqs.weight` factors, one per rotated pair (see [`llama3_rope_factors`]; missing
/// fields take the converter's defaults: factor 8, low 1, high 4, original context 8192);
/// `default` or no field, plain RoPE. Anything else (YaRN, dynamic NTK, LongRoPE) is refused.
fn rope_scaling(
    f: &Fields<'_>,
    theta: f64,
    head_dim: u64,
) -> anyhow::Result<(Keys, Option<Vec<f32>>)> {
    let Some(s) = f.get("rope_scaling") else {
        return Ok((Vec::new(), None));
    };
    let p = f.path.display();
    let kind = ["rope_type", "type"]
        .iter()
        .find_map(|k| s.get(*k).and_then(Json::as_str));
    // A positive number at `k` of `rope_scaling`, or `default` when it is not there (the
    // converter's defaults for `llama3`).
    let num = |k: &str, default: Option<f64>| -> anyhow::Result<f64> {
        match (s.get(k).filter(|v| !v.is_null()), default) {
            (Some(v), _) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => bail!("{p}: field rope_scaling.{k} is not a positive number: {s}"),
            },
            (None, Some(d)) => Ok(d),
            (None, None) => bail!("{p}: field rope_scaling.{k} is missing: {s}"),
        }
    };
    match kind {
        Some("default") => Ok((Vec::new(), None)),
        Some("linear") => Ok((
            vec![
                (
                    "llama.rope.scaling.type".into(),
                    Value::String("linear".into()),
                ),
                (
                    "llama.rope.scaling.factor".into(),
                    Value::F64(num("factor", None)?),
                ),
            ],
            None,
        )),
        Some("llama3") => {
            // Hugging Face keeps the original context inside rope_scaling; the converter reads
            // it from the top level; either, else the converter's 8192.
            let key = "original_max_position_embeddings";
            let original = if s.get(key).is_some_and(|v| !v.is_null()) {
                num(key, None)?
            } else {
                match f.float(key)? {
                    Some(x) if x.is_finite() && x > 0.0 => x,
                    Some(_) => return Err(f.err(key, "a positive number")),
                    None => 8192.0,
                }
            };
            let (low, high) = (
                num("low_freq_factor", Some(1.0))?,
                num("high_freq_factor", Some(4.0))?,
            );
            if high <= low {
                bail!(
                    "{p}: field rope_scaling.high_freq_factor {high} is not above low_freq_factor {low}"
                );
            }
            let factors = llama3_rope_factors(
                theta,
                head_dim as usize,
                num("factor", Some(8.0))?,
                low,
                high,
                original,
            );
            Ok((Vec::new(), Some(factors)))
        }
        _ => bail!(
            "{p}: field rope_scaling {s} is not supported (rope_type llama3, linear and default are)"
        ),
    }
}

/// Llama 3.1's RoPE frequency factors, as llama.cpp's converter computes `rope_freqs.weight`
/// (and Hugging Face's `_compute_llama3_parameters`, which divides the frequencies by them):
/// pairs whose wavelength is below `original_context / high_freq_factor` keep their frequency
/// (factor 1), those above `original_context / low_freq_factor` are slowed by `factor`, and the
/// band between blends the two smoothly.
pub fn llama3_rope_factors(
    theta: f64,
    dim: usize,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_context: f64,
) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (
        original_context / low_freq_factor,
        original_context / high_freq_factor,
    );
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// The `tokenizer.ggml.pre` a tokenizer.json's pre-tokenizer corresponds to.
fn pre_tokenizer(path: &Path, v: Option<&Json>) -> anyhow::Result<&'static str> {
    let kind = |v: &Json| v.get("type").and_then(Json::as_str).map(str::to_owned);
    let byte_level = |v: &Json| {
        kind(v).as_deref() == Some("ByteLevel") && v.get("use_regex") != Some(&Json::Bool(false))
    };
    let digits = |v: &Json| {
        kind(v).as_deref() == Some("Digits")
            && v.get("individual_digits") == Some(&Json::Bool(true))
    };
    // Llama 3's: its split regex, isolated, then ByteLevel without GPT-2's regex.
    let llama3_split = |v: &Json| {
        kind(v).as_deref() == Some("Split")
            && v.pointer("/pattern/Regex").and_then(Json::as_str) == Some(LLAMA3_SPLIT)
            && v.get("behavior").and_then(Json::as_str) == Some("Isolated")
            && v.get("invert") != Some(&Json::Bool(true))
    };
    let bytes_only = |v: &Json| {
        kind(v).as_deref() == Some("ByteLevel") && v.get("use_regex") == Some(&Json::Bool(false))
    };
    let pre = match v {
        Some(v) if byte_level(v) => Some("gpt2"),
        Some(v) if kind(v).as_deref() == Some("Sequence") => {
            match v
                .get("pretokenizers")
                .and_then(Json::as_array)
                .map(Vec::as_slice)
            {
                Some([a, b]) if digits(a) && byte_level(b) => Some("smollm"),
                Some([a, b]) if llama3_split(a) && bytes_only(b) => Some("llama-bpe"),
                Some([a]) if byte_level(a) => Some("gpt2"),
                _ => None,
            }
        }
        _ => None,
    };
    pre.with_context(|| {
        let shown = v.map_or("null".to_owned(), Json::to_string);
        let shown: String = shown.chars().take(200).collect();
        format!(
            "{}: field pre_tokenizer {shown} is not supported (ByteLevel, optionally after Digits with individual_digits, and Llama 3's Split then ByteLevel are)",
            path.display()
        )
    })
}

/// `tokenizer.json` (and `tokenizer_config.json` when present) → `tokenizer.*` keys.
fn read_tokenizer(dir: &Path, cfg: &Config) -> anyhow::Result<Vec<(String, Value)>> {
    let path = dir.join(TOKENIZER);
    let v = read_json(&path)?;
    let p = path.display();
    let model = v
        .get("model")
        .filter(|m| m.is_object())
        .with_context(|| format!("{p}: field model is missing or not an object"))?;
    if let Some(t) = model.get("type").and_then(Json::as_str)
        && t != "BPE"
    {
        bail!("{p}: field model.type {t:?} is not supported (BPE is)");
    }
    if let Some(n) = v.get("normalizer").filter(|n| !n.is_null()) {
        let shown: String = n.to_string().chars().take(200).collect();
        bail!("{p}: field normalizer {shown} is not supported (byte-level BPE has none)");
    }
    let pre = pre_tokenizer(&path, v.get("pre_tokenizer").filter(|v| !v.is_null()))?;
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .with_context(|| format!("{p}: field model.vocab is missing or not an object"))?;
    let mut by_id: BTreeMap<u32, (String, i32)> = BTreeMap::new();
    let mut put = |id: u32, tok: &str, ty: i32| -> anyhow::Result<()> {
        if id as usize >= cfg.vocab {
            bail!(
                "{p}: token {tok:?} has id {id}, outside config.json's vocab_size {}",
                cfg.vocab
            );
        }
        match by_id.get_mut(&id) {
            Some((t, _)) if t != tok => {
                bail!("{p}: id {id} is both {t:?} and {tok:?}")
            }
            Some((_, old)) => *old = (*old).max(ty),
            None => {
                by_id.insert(id, (tok.to_owned(), ty));
            }
        }
        Ok(())
    };
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .with_context(|| format!("{p}: field model.vocab.{tok:?} is not a token id: {id}"))?;
        put(id, tok, TOKEN_NORMAL)?;
    }
    if let Some(added) = v.get("added_tokens").filter(|a| !a.is_null()) {
        let added = added
            .as_array()
            .with_context(|| format!("{p}: field added_tokens is not a list"))?;
        for (i, a) in added.iter().enumerate() {
            let id = a
                .get("id")
                .and_then(Json::as_u64)
                .and_then(|x| u32::try_from(x).ok())
                .with_context(|| {
                    format!("{p}: field added_tokens[{i}].id is missing or not a token id")
                })?;
            let content = a.get("content").and_then(Json::as_str).with_context(|| {
                format!("{p}: field added_tokens[{i}].content is missing or not a string")
            })?;
            let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
            put(
                id,
                content,
                if special {
                    TOKEN_CONTROL
                } else {
                    TOKEN_USER_DEFINED
                },
            )?;
        }
    }
    let merges = model
        .get("merges")
        .and_then(Json::as_array)
        .with_context(|| format!("{p}: field model.merges is missing or not a list"))?
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Json::String(s) if s.contains(' ') => Ok(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok(format!("{a} {b}")),
                _ => bail!("{p}: field model.merges[{i}] is not a pair of strings: {m}"),
            },
            _ => bail!("{p}: field model.merges[{i}] is not \"left right\" or a pair: {m}"),
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    // Every id below the model's vocabulary size gets a token; gaps are padding, as llama.cpp's
    // converter writes them.
    let n = cfg.vocab;
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for id in 0..n as u32 {
        match by_id.remove(&id) {
            Some((t, ty)) => {
                tokens.push(Value::String(t));
                types.push(Value::I32(ty));
            }
            None => {
                tokens.push(Value::String(format!("[PAD{id}]")));
                types.push(Value::I32(TOKEN_UNUSED));
            }
        }
    }
    let id_of = |field: &str, tok: &str, from: &Path| -> anyhow::Result<u32> {
        tokens
            .iter()
            .position(|t| t.as_str() == Some(tok))
            .map(|i| i as u32)
            .with_context(|| {
                format!(
                    "{}: field {field} {tok:?} is not in the vocabulary",
                    from.display()
                )
            })
    };
    let (mut bos, mut eos) = (cfg.bos, cfg.eos);
    let mut add_bos = None;
    let mut template = None;
    let tc_path = dir.join(TOKENIZER_CONFIG);
    if tc_path.exists() {
        let tc = read_json(&tc_path)?;
        let f = Fields {
            path: &tc_path,
            v: &tc,
        };
        // `"eos_token": "<|im_end|>"` or `{"content": "<|im_end|>", ...}`.
        let token = |field: &str| -> anyhow::Result<Option<u32>> {
            match f.get(field) {
                None => Ok(None),
                Some(Json::String(s)) => id_of(field, s, &tc_path).map(Some),
                Some(o) => match o.get("content").and_then(Json::as_str) {
                    Some(s) => id_of(field, s, &tc_path).map(Some),
                    None => Err(f.err(field, "a token or an object with its content")),
                },
            }
        };
        bos = token("bos_token")?.or(bos);
        eos = token("eos_token")?.or(eos);
        add_bos = f.boolean("add_bos_token")?;
        template = match f.get("chat_template") {
            None => None,
            Some(Json::String(s)) => Some(s.clone()),
            // Several named templates: the default one.
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_owned),
            Some(_) => return Err(f.err("chat_template", "a string or a list of named templates")),
        };
    }
    for (what, id) in [("bos", bos), ("eos", eos)] {
        if let Some(id) = id
            && id as usize >= n
        {
            bail!(
                "{}: the {what} token id {id} is outside the vocabulary of {n}",
                dir.display()
            );
        }
    }
    let mut keys = vec![
        (
            "tokenizer.ggml.model".to_owned(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
    ];
    if let Some(b) = bos {
        keys.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = eos {
        keys.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(a) = add_bos {
        keys.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(a)));
    }
    if let Some(t) = template {
        keys.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(keys)
}

/// A model directory's `config.json`, `tokenizer.json` and `tokenizer_config.json` as GGUF
/// metadata (the keys llama.cpp's converter writes; no tensors), and whether the LM head is tied
/// to the embedding. The directory is the metadata's path.
pub fn hf_metadata(dir: &Path) -> anyhow::Result<(MappedGguf, bool)> {
    let (metadata, cfg) = hf_parts(dir)?;
    Ok((metadata, cfg.tied))
}

fn hf_parts(dir: &Path) -> anyhow::Result<(MappedGguf, Config)> {
    let cfg = read_config(&dir.join(CONFIG))?;
    let tok = read_tokenizer(dir, &cfg)?;
    let metadata = cfg.keys.iter().cloned().chain(tok).collect();
    let gguf = Gguf {
        path: dir.to_owned(),
        version: 3,
        metadata,
        tensors: Vec::new(),
        data_offset: 0,
    };
    Ok((MappedGguf::from_parts(gguf, None), cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1 8B's rope_scaling (theta 500000, head size 128, factor 8, low 1, high 4,
    /// original context 8192): the factors llama.cpp's converter writes, computed with its
    /// formula in Python: 29 pairs at 1, 29 at 8, and the blend between.
    #[test]
    fn llama3_rope_factors_of_llama_3_1() {
        let f = llama3_rope_factors(500_000.0, 128, 8.0, 1.0, 4.0, 8192.0);
        assert_eq!(f.len(), 64);
        assert!(f[..29].iter().all(|&v| v == 1.0), "{:?}", &f[..29]);
        assert!(f[35..].iter().all(|&v| v == 8.0), "{:?}", &f[35..]);
        let blend = [1.207484, 1.553415, 2.026313, 2.69453, 3.684253, 5.257327];
        for (i, want) in (29..35).zip(blend) {
            assert!((f[i] - want).abs() < 1e-5, "pair {i}: {} vs {want}", f[i]);
        }
    }

    #[test]
    fn names_map_onto_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.1.attn_q.bias"), None);
    }
}
