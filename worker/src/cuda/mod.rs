//! The CUDA inference path (`--features cuda`, off by default): the same Llama forward pass as
//! the CPU core ([`crate::model::llama::Llama::forward`]), on one GPU per rank.
//!
//! - [`device`]: the CUDA context, stream, cuBLAS handle and the NVRTC-compiled kernels, and the
//!   run-time checks that the driver and libraries are there ([`check_libraries`]).
//! - [`kernels`]: the CUDA C source of the small kernels (RMSNorm, RoPE, SiLU x up, residual add,
//!   attention over one sequence's KV cache), compiled at run time with NVRTC.
//! - [`weights`]: host-side conversion of the GGUF-encoded matrices to f16 and their upload.
//! - [`gemm`]: the row-major `y = x Wᵀ` products as cuBLAS `GemmEx` calls (f16 weights and
//!   activations, f32 accumulation and output).
//! - [`nccl`]: [`nccl::NcclCollective`], the worker's [`Collective`](crate::model::parallel::Collective)
//!   over NCCL, initialised from a unique id exchanged over the existing rank group.
//! - [`llama`]: [`llama::CudaLlama`], a loaded shard on the GPU, its KV cache and forward pass;
//!   [`llama::generate_cli`] runs `tessera-worker generate --device cuda`.
//!
//! The CUDA libraries (`libcuda`, `libcublas`, `libnvrtc`, `libnccl`) are loaded at run time by
//! `cudarc`'s `dynamic-loading`, so this module builds without a CUDA toolkit. Touching a missing
//! library would panic inside `cudarc`; every entry point first calls [`check_libraries`], which
//! turns a missing library into an error naming it.

pub mod device;
pub mod gemm;
pub mod kernels;
pub mod llama;
pub mod nccl;
pub mod weights;

pub use device::{CudaDevice, check_libraries};

/// Where `generate` runs the model (`--device`, or `TESSERA_DEVICE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The CPU core (SIMD quantised kernels).
    #[default]
    Cpu,
    /// One NVIDIA GPU through CUDA (cuBLAS, NVRTC kernels).
    Cuda,
}

/// GPUs the driver shows this process (an error naming the missing library or the driver's
/// answer when none can be counted).
pub fn visible_gpus() -> anyhow::Result<usize> {
    check_libraries(false)?;
    no_panic("counting GPUs", || {
        let n = cu(
            "cuDeviceGetCount",
            cudarc::driver::CudaContext::device_count(),
        )?;
        Ok(usize::try_from(n).unwrap_or(0))
    })
}

/// Run `f`, turning a panic inside the CUDA bindings (a symbol missing from an older library,
/// for example) into an error naming `what`.
pub(crate) fn no_panic<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(anyhow::anyhow!("{what}: the CUDA bindings panicked: {msg}"))
        }
    }
}

/// Map any CUDA-side error into an `anyhow` error with context.
pub(crate) fn cu<T, E: std::fmt::Debug>(what: &str, r: Result<T, E>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what}: {e:?}"))
}
