//! Where `serve` and `local` run the model: the CPU core, or the CUDA engine when this binary
//! was built with `--features cuda` and the process sees a GPU (`TESSERA_DEVICE`: `auto`, the
//! default, `cpu` or `cuda`). The choice is plain data in, plain data out, so it is tested
//! without a GPU; [`crate::cuda::visible_gpus`] supplies the count on GPU builds.

/// What was asked for (`TESSERA_DEVICE`, `local --device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceRequest {
    /// CUDA when the binary has it and a GPU is visible, else the CPU.
    #[default]
    Auto,
    /// The CPU core, even with a GPU.
    Cpu,
    /// One GPU per rank; an error when there is none.
    #[value(alias = "gpu")]
    Cuda,
}

impl DeviceRequest {
    /// `auto`, `cpu` or `cuda` (any case; clap's own parsing of `--device`).
    pub fn parse(v: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(v, true).ok()
    }

    /// The value as `TESSERA_DEVICE` and `--device` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        }
    }
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// What the process found: whether the binary has the CUDA engine, and the GPUs it sees
/// (`Err`: why none could be counted, such as a missing driver library).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFacts {
    pub built_with_cuda: bool,
    pub gpus: Result<usize, String>,
}

impl DeviceFacts {
    /// This process's facts (counting GPUs only on a CUDA build).
    pub fn probe() -> Self {
        #[cfg(feature = "cuda")]
        {
            Self {
                built_with_cuda: true,
                gpus: crate::cuda::visible_gpus().map_err(|e| format!("{e:#}")),
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            Self {
                built_with_cuda: false,
                gpus: Err("this tessera-worker was built without CUDA".into()),
            }
        }
    }
}

/// The device for a rank, and for `auto` the reason in words (for the log). `ordinal`: the GPU
/// this rank takes among those visible; `pipeline_parallel`: stages of the replica (CUDA runs
/// whole models per rank so far).
pub fn choose(
    request: DeviceRequest,
    facts: &DeviceFacts,
    ordinal: usize,
    pipeline_parallel: usize,
) -> anyhow::Result<(Device, String)> {
    let cuda_ready = || -> Result<(), String> {
        if !facts.built_with_cuda {
            return Err(
                "this tessera-worker was built without CUDA (cargo feature `cuda`); use the CUDA worker image, or TESSERA_DEVICE=cpu".into(),
            );
        }
        match &facts.gpus {
            Err(why) => Err(format!("no GPU can be used: {why}")),
            Ok(0) => Err(
                "the driver sees no GPU (does the pod request nvidia.com/gpu?); request GPUs, or TESSERA_DEVICE=cpu".into(),
            ),
            Ok(n) if ordinal >= *n => Err(format!(
                "this rank takes GPU {ordinal}, but the process sees {n}; give the pod one GPU per local rank"
            )),
            Ok(_) => Ok(()),
        }
    };
    let pp_refused = || {
        anyhow::anyhow!(
            "TESSERA_PP={pipeline_parallel}: pipeline-parallel stages are not implemented on CUDA yet (each rank must hold every layer); use a layout without pipeline parallelism (parallelism.pipeline: 1), or TESSERA_DEVICE=cpu"
        )
    };
    match request {
        DeviceRequest::Cpu => Ok((Device::Cpu, "TESSERA_DEVICE=cpu".into())),
        DeviceRequest::Cuda => {
            cuda_ready().map_err(|why| anyhow::anyhow!("TESSERA_DEVICE=cuda: {why}"))?;
            if pipeline_parallel > 1 {
                return Err(pp_refused());
            }
            Ok((Device::Cuda, format!("TESSERA_DEVICE=cuda, GPU {ordinal}")))
        }
        DeviceRequest::Auto => match cuda_ready() {
            Ok(()) if pipeline_parallel > 1 => Err(pp_refused()),
            Ok(()) => Ok((
                Device::Cuda,
                format!(
                    "a GPU is visible (GPU {ordinal} of {})",
                    facts.gpus.clone().unwrap_or(0)
                ),
            )),
            Err(why) => Ok((Device::Cpu, format!("no CUDA: {why}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(built: bool, gpus: Result<usize, &str>) -> DeviceFacts {
        DeviceFacts {
            built_with_cuda: built,
            gpus: gpus.map_err(str::to_owned),
        }
    }

    #[test]
    fn auto_takes_a_visible_gpu_on_a_cuda_build_and_the_cpu_otherwise() {
        let auto = DeviceRequest::Auto;
        assert_eq!(
            choose(auto, &facts(true, Ok(8)), 3, 1).unwrap().0,
            Device::Cuda
        );
        for (f, why) in [
            (facts(false, Err("built without")), "without CUDA"),
            (facts(true, Ok(0)), "sees no GPU"),
            (
                facts(true, Err("libcuda.so not found")),
                "libcuda.so not found",
            ),
            (facts(true, Ok(2)), "takes GPU 3, but the process sees 2"),
        ] {
            let (d, reason) = choose(auto, &f, 3, 1).unwrap();
            assert_eq!(d, Device::Cpu, "{f:?}");
            assert!(reason.contains(why), "{reason}");
        }
    }

    #[test]
    fn an_explicit_request_is_honoured_or_refused_with_the_fix() {
        let (d, _) = choose(DeviceRequest::Cpu, &facts(true, Ok(8)), 0, 1).unwrap();
        assert_eq!(d, Device::Cpu);
        let e = choose(DeviceRequest::Cuda, &facts(false, Err("x")), 0, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("TESSERA_DEVICE=cuda") && e.contains("cargo feature `cuda`"),
            "{e}"
        );
        let e = choose(DeviceRequest::Cuda, &facts(true, Ok(0)), 0, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nvidia.com/gpu"), "{e}");
    }

    #[test]
    fn pipeline_stages_on_a_gpu_are_refused_rather_than_run_on_the_cpu() {
        for req in [DeviceRequest::Auto, DeviceRequest::Cuda] {
            let e = choose(req, &facts(true, Ok(8)), 0, 2)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("TESSERA_PP=2") && e.contains("parallelism.pipeline: 1"),
                "{e}"
            );
        }
        // Without a GPU, stages run on the CPU as always.
        let (d, _) = choose(DeviceRequest::Auto, &facts(false, Err("x")), 0, 2).unwrap();
        assert_eq!(d, Device::Cpu);
    }

    #[test]
    fn the_setting_parses_in_any_case() {
        assert_eq!(DeviceRequest::parse("CUDA"), Some(DeviceRequest::Cuda));
        assert_eq!(DeviceRequest::parse("auto"), Some(DeviceRequest::Auto));
        assert_eq!(DeviceRequest::parse("tpu"), None);
    }
}
