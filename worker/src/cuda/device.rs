//! The GPU a rank runs on: context, stream, cuBLAS handle and the compiled kernels; and the
//! run-time checks that the libraries are there.

use std::sync::Arc;

use anyhow::bail;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use super::kernels::{self, BLOCK};
use super::{cu, no_panic};

/// Check that the CUDA libraries this path loads at run time are present, before anything
/// touches them (`cudarc` panics on first use of a missing library). `nccl`: also NCCL, needed
/// only by a tensor-parallel group. The error names the missing library and what to do.
pub fn check_libraries(nccl: bool) -> anyhow::Result<()> {
    // SAFETY: these only try to dlopen the candidate names and close them again.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!(
            "libcuda.so not found: run on a GPU node with the NVIDIA driver, or build without --features cuda (or use --device cpu)"
        );
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        bail!(
            "libcublas.so not found: install the CUDA 12 runtime libraries (cuBLAS; the CUDA worker image has them) or use --device cpu"
        );
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!(
            "libnvrtc.so not found: install the CUDA 12 runtime libraries (NVRTC, which compiles the worker's kernels) or use --device cpu"
        );
    }
    if nccl && !unsafe { cudarc::nccl::sys::is_culib_present() } {
        if dlopen_ok(c"libnccl.so.2") {
            bail!(
                "libnccl.so not found, though libnccl.so.2 is: the CUDA bindings look for libnccl.so; add a symlink libnccl.so -> libnccl.so.2 in a directory on LD_LIBRARY_PATH"
            );
        }
        bail!(
            "libnccl.so not found: install NCCL 2 (libnccl2) for tensor parallelism on GPUs, or run one rank"
        );
    }
    Ok(())
}

fn dlopen_ok(name: &std::ffi::CStr) -> bool {
    // SAFETY: dlopen/dlclose of a library name; a null handle means not found.
    unsafe {
        let h = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if h.is_null() {
            false
        } else {
            libc::dlclose(h);
            true
        }
    }
}

/// The compiled kernels (see [`kernels::SOURCE`]).
pub struct Kernels {
    pub rms_norm_f16: CudaFunction,
    pub rope: CudaFunction,
    pub silu_mul_f16: CudaFunction,
    pub add_inplace: CudaFunction,
    pub attention: CudaFunction,
}

/// One GPU: the context, the stream every operation of this rank runs on, a cuBLAS handle on
/// that stream and the kernels.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub kernels: Kernels,
    pub name: String,
}

impl CudaDevice {
    /// Open GPU `ordinal`, create the cuBLAS handle and compile the kernels with NVRTC.
    pub fn new(ordinal: usize) -> anyhow::Result<Self> {
        check_libraries(false)?;
        no_panic("opening the GPU", || {
            let count = cu("cuDeviceGetCount", CudaContext::device_count())?;
            if ordinal as i64 >= i64::from(count) {
                bail!("GPU {ordinal} requested, but the driver sees {count} GPU(s)");
            }
            let ctx = cu(
                &format!("creating a CUDA context on GPU {ordinal}"),
                CudaContext::new(ordinal),
            )?;
            let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
            let stream = ctx.default_stream();
            let blas = cu(
                "creating the cuBLAS handle",
                CudaBlas::new(Arc::clone(&stream)),
            )?;
            let ptx = compile_ptx_with_opts(
                kernels::SOURCE,
                CompileOptions {
                    name: Some("tessera_kernels.cu".into()),
                    ..Default::default()
                },
            )
            .map_err(|e| anyhow::anyhow!("NVRTC could not compile the worker's kernels: {e:?}"))?;
            let module = cu(
                "loading the kernels' PTX (is the driver older than NVRTC?)",
                ctx.load_module(ptx),
            )?;
            let f = |name: &str| cu(&format!("kernel {name}"), module.load_function(name));
            let kernels = Kernels {
                rms_norm_f16: f(kernels::NAMES[0])?,
                rope: f(kernels::NAMES[1])?,
                silu_mul_f16: f(kernels::NAMES[2])?,
                add_inplace: f(kernels::NAMES[3])?,
                attention: f(kernels::NAMES[4])?,
            };
            Ok(Self {
                ctx,
                stream,
                blas,
                kernels,
                name,
            })
        })
    }

    /// Wait for everything queued on the stream.
    pub fn sync(&self) -> anyhow::Result<()> {
        cu("synchronising the CUDA stream", self.stream.synchronize())
    }
}

/// `blocks` blocks of [`BLOCK`] threads.
pub fn blocks(blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs on every machine: without the driver (this build machine) the error must name
    /// libcuda and say what to do; with one, the check passes. Neither case opens a GPU.
    #[test]
    fn missing_libraries_are_an_error_not_a_panic() {
        match check_libraries(true) {
            Ok(()) => {
                eprintln!("CUDA libraries present: the missing-library error was not exercised")
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("not found"), "{msg}");
                assert!(msg.contains(".so"), "{msg}");
            }
        }
    }

    #[test]
    fn opening_a_gpu_without_a_driver_fails_cleanly() {
        // SAFETY: dlopen probe only.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("libcuda present: GPU opening is covered by scripts/cuda-check.sh, not here");
            return;
        }
        let err = CudaDevice::new(0).err().expect("no driver, no device");
        assert!(err.to_string().starts_with("libcuda.so not found"), "{err}");
    }
}
