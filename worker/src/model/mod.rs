//! Model files: the GGUF container, Hugging Face safetensors models, the Llama decoder, its KV
//! cache and the tensor-parallel seams (shards and collectives).

pub mod gguf;
pub mod kv_cache;
pub mod llama;
pub mod parallel;
pub mod safetensors;
pub mod source;

use std::path::Path;

/// A memory-mapped GGUF file: the parsed directory plus the bytes it points into.
///
/// A safetensors model uses the same type twice over (see [`safetensors`]): once for each mapped
/// `.safetensors` file (an empty directory; the bytes the weights borrow), and once, without a
/// map, for the model's metadata translated from `config.json` and `tokenizer.json` into GGUF
/// keys (what [`llama::LlamaConfig::from_gguf`] and the tokenizer read).
pub struct MappedGguf {
    pub gguf: gguf::Gguf,
    map: Option<memmap2::Mmap>,
}

impl MappedGguf {
    /// Open and parse a GGUF file. Errors name the file and what is wrong.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot open model file: {e}", path.display()))?;
        // SAFETY: the file is mapped read-only; Tessera never writes model files while serving
        // them, and a concurrent truncation by someone else is a SIGBUS we cannot prevent for
        // any mmap-based loader (llama.cpp has the same contract).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| anyhow::anyhow!("{}: cannot map model file: {e}", path.display()))?;
        let gguf = gguf::Gguf::parse(path, &map)?;
        Ok(Self {
            gguf,
            map: Some(map),
        })
    }

    /// A directory with the bytes of another mapped file (a safetensors file), or with none
    /// (metadata only).
    pub(crate) fn from_parts(gguf: gguf::Gguf, map: Option<memmap2::Mmap>) -> Self {
        Self { gguf, map }
    }

    /// The whole mapped file (empty for metadata only).
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Drop the mapped pages from this process's resident memory (they stay in the page cache
    /// and come back on the next access). Called after loading a shard: the rows a rank copied
    /// out of shared matrices, and tensors other ranks or stages hold, no longer count against
    /// this rank; pages it still reads in place are faulted back in lazily. Best effort.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Some(map) = &self.map {
            // SAFETY: the mapping is a read-only, file-backed private map; MADV_DONTNEED only
            // drops its resident pages, which are re-read from the unchanged file on the next
            // access, so no reference into it becomes invalid.
            let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Like [`MappedGguf::release_pages`] for `len` bytes from `start` only (widened to whole
    /// pages; pages shared with a neighbouring tensor go too and come back on the next access).
    pub fn release_range(&self, start: usize, len: usize) {
        #[cfg(unix)]
        if let Some(map) = &self.map
            && len > 0
            && start.saturating_add(len) <= map.len()
        {
            // SAFETY: as in `release_pages`: a read-only, file-backed private map whose dropped
            // pages are re-read from the unchanged file on the next access.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
            };
        }
        #[cfg(not(unix))]
        let _ = (start, len);
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, t: &gguf::TensorInfo) -> &[u8] {
        &self.bytes()[t.offset as usize..(t.offset + t.size) as usize]
    }
}
