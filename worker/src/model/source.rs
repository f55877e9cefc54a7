//! Where the Llama loader gets its tensors: a GGUF file or a Hugging Face safetensors model,
//! behind one trait, so that sharding for tensor and pipeline parallelism is the same code for
//! both (see `Llama::load_from`).
//!
//! Tensors are asked for by their GGUF names (`blk.N.attn_q.weight`, ...); a source maps them
//! onto its own (`model.layers.N.self_attn.q_proj.weight`, ...) and names its own file and
//! tensor in every error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::MappedGguf;
use super::gguf::GgmlType;
use crate::kernels::{Bytes, QMatrix};

/// How the rows of each attention head of the Q and K projections are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkLayout {
    /// llama.cpp's converter permuted them so that RoPE rotates adjacent pairs `(2i, 2i + 1)`:
    /// what the decoder applies. GGUF files.
    Interleaved,
    /// Hugging Face's order: RoPE rotates `(i, i + head_dim / 2)` ("rotate half"). The loader
    /// reorders these rows into [`QkLayout::Interleaved`] (see [`interleave_qk`]).
    HalfSplit,
}

/// One tensor as a source holds it.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    /// The file it is in.
    pub file: PathBuf,
    /// Its name in that file.
    pub name: String,
    /// Dimensions in GGUF order: innermost (row length) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: Bytes,
    /// Whether the file writes shapes outermost first (safetensors, PyTorch) rather than GGUF's
    /// innermost first; error messages use the file's own order.
    pub outermost_first: bool,
}

impl SourceTensor {
    /// `dims` (GGUF order) written the way this tensor's file writes shapes.
    pub fn shape_text(&self, dims: &[u64]) -> String {
        let mut d = dims.to_vec();
        if self.outermost_first {
            d.reverse();
        }
        format!("{d:?}")
    }
}

/// Tensors and metadata of one model.
pub trait TensorSource: Send + Sync {
    /// The model's metadata in GGUF keys (`llama.*`, `tokenizer.*`): the GGUF file itself, or
    /// the translation of a safetensors model's JSON files.
    fn metadata(&self) -> &Arc<MappedGguf>;

    /// A tensor by its GGUF name. Errors name the file and the tensor as stored.
    fn tensor(&self, name: &str) -> anyhow::Result<SourceTensor>;

    /// Whether the model has a tensor of this GGUF name (the loader uses it for `output.weight`:
    /// without one, the LM head is tied to the token embedding).
    fn has(&self, name: &str) -> bool;

    /// The row order of the Q and K projections.
    fn qk_layout(&self) -> QkLayout {
        QkLayout::Interleaved
    }
}

/// A GGUF file as a tensor source (zero-copy: tensors borrow the map).
pub struct GgufSource(pub Arc<MappedGguf>);

impl TensorSource for GgufSource {
    fn metadata(&self) -> &Arc<MappedGguf> {
        &self.0
    }

    fn tensor(&self, name: &str) -> anyhow::Result<SourceTensor> {
        let g = &self.0.gguf;
        let t = g
            .tensor(name)
            .with_context(|| format!("{}: tensor {name} is missing", g.path.display()))?;
        Ok(SourceTensor {
            file: g.path.clone(),
            name: name.to_owned(),
            dims: t.dims.clone(),
            ty: t.ggml_type,
            data: Bytes::Mapped {
                file: Arc::clone(&self.0),
                start: t.offset as usize,
                len: t.size as usize,
            },
            outermost_first: false,
        })
    }

    fn has(&self, name: &str) -> bool {
        self.0.gguf.tensor(name).is_some()
    }
}

/// Which format a model path holds: a directory, a `.safetensors` file or a
/// `model.safetensors.index.json` is a safetensors model; any other file must be GGUF.
pub fn is_safetensors(path: &Path) -> bool {
    if path.is_dir() {
        return true;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") {
        return true;
    }
    // A file with another name: GGUF if it says so, safetensors if it parses as one (an
    // 8-byte header length followed by a JSON object); GGUF errors otherwise.
    let mut head = [0u8; 9];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    n == 9 && &head[..4] != b"GGUF" && head[8] == b'{'
}

/// Open a model by what the path is: a GGUF file, or a safetensors model (a directory with
/// `config.json`, `tokenizer.json` and `model.safetensors` or a sharded set with
/// `model.safetensors.index.json`; or a path to one of those files).
pub fn open(path: &Path) -> anyhow::Result<Box<dyn TensorSource>> {
    if !path.exists() {
        anyhow::bail!("{}: no such model file or directory", path.display());
    }
    if is_safetensors(path) {
        Ok(Box::new(super::safetensors::SafetensorsModel::open(path)?))
    } else {
        Ok(Box::new(GgufSource(Arc::new(MappedGguf::open(path)?))))
    }
}

/// Reorder the rows of each `head_dim`-row head of a Q or K projection from Hugging Face's
/// rotate-half order into the interleaved order the decoder's RoPE expects: output row `2i + j`
/// of a head is input row `j * head_dim / 2 + i` (the inverse of what llama.cpp's converter
/// writes into GGUF files). Rows are moved whole, so any encoding works; the result is owned.
pub fn interleave_qk(m: &QMatrix, head_dim: usize) -> Result<QMatrix, String> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !m.rows.is_multiple_of(head_dim) {
        return Err(format!(
            "{} rows do not split into heads of an even size {head_dim}",
            m.rows
        ));
    }
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(m.bytes().len());
    for head in 0..m.rows / head_dim {
        for i in 0..half {
            for j in 0..2 {
                out.extend_from_slice(m.row(head * head_dim + j * half + i));
            }
        }
    }
    QMatrix::new(m.ty, m.rows, m.cols, Bytes::Owned(out.into()))
}
