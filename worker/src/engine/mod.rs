//! The engine: a loaded model with its tokenizer, CPU pool and collective, sampling and
//! generation of one sequence ([`Engine::generate`]), and continuous batching of many
//! ([`scheduler`]).

pub mod detok;
pub mod device;
pub mod generate;
pub mod runner;
pub mod sampling;
pub mod scheduler;

use std::path::Path;

use crate::kernels::Pool;
use crate::model::llama::Llama;
use crate::model::parallel::{Collective, Identity, Shard, Stage};
use crate::model::source;
use std::sync::Arc;

use crate::tokenizer::Tokenizer;

pub use generate::{FinishReason, GenerateParams, Generation, Usage};
pub use sampling::{Sampler, SamplingParams};

/// A model ready to generate.
pub struct Engine {
    pub model: Llama,
    /// Shared with the scheduler, which detokenises for every request.
    pub tokenizer: Arc<Tokenizer>,
    pub pool: Pool,
    pub collective: Box<dyn Collective>,
}

impl Engine {
    /// Load a model (a GGUF file or a safetensors model directory or file) on one rank (`threads` CPU threads, 0 = all).
    pub fn open(path: &Path, threads: usize) -> anyhow::Result<Self> {
        Self::open_shard(path, threads, Box::new(Identity))
    }

    /// Load this rank's tensor-parallel shard of a model (GGUF or safetensors); the shard (rank and world size)
    /// comes from the collective that joins the group.
    pub fn open_shard(
        path: &Path,
        threads: usize,
        collective: Box<dyn Collective>,
    ) -> anyhow::Result<Self> {
        Self::open_stage(path, threads, collective, Stage::WHOLE)
    }

    /// Load this rank's tensor-parallel shard of one pipeline stage's layers; the collective
    /// joins the stage's tensor-parallel group (rank and world size within the stage).
    pub fn open_stage(
        path: &Path,
        threads: usize,
        collective: Box<dyn Collective>,
        stage: Stage,
    ) -> anyhow::Result<Self> {
        let src = source::open(path)?;
        let tokenizer = Arc::new(Tokenizer::from_gguf(&src.metadata().gguf)?);
        let shard = Shard::new(collective.rank(), collective.world())?;
        let model = Llama::load_from(src.as_ref(), shard, stage)?;
        if shard.world > 1 || stage != Stage::WHOLE {
            // A rank reads only its share of the file; let go of the pages loading touched.
            if let Some(f) = model.file() {
                f.release_pages();
            }
        }
        Ok(Self {
            model,
            tokenizer,
            pool: Pool::new(threads)?,
            collective,
        })
    }
}
