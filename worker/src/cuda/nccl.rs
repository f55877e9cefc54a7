//! [`NcclCollective`]: the worker's [`Collective`] over NCCL, one GPU per rank.
//!
//! **Initialisation.** NCCL's ranks need one unique id (128 bytes) made by rank 0. It travels
//! over the rank group the worker already has (the TCP group of `crate::dist`, or any
//! [`Collective`]): rank 0 writes the id's bytes as f32 values 0..=255 into a 128-element
//! buffer, every other rank writes zeros, and one `all_reduce_sum` gives every rank the id
//! exactly (small integers are exact in f32). [`NcclCollective::init_over`] does this and then
//! `ncclCommInitRank`; [`NcclCollective::from_id`] takes an id exchanged some other way.
//!
//! **Use.** [`NcclCollective::all_reduce_device`] reduces a device buffer in place on the
//! rank's stream (what [`super::llama::CudaLlama`] calls twice per layer); the [`Collective`]
//! implementation reduces a host buffer through a device staging buffer, so the CPU-side code
//! can use it too. Both record the process-wide `ALLREDUCE_STATS` (the device path waits for
//! the reduction to finish so that the time is real).
//!
//! **Watchdog.** A reduction whose peer is gone never completes. With
//! [`NcclCollective::with_watchdog`] every reduction runs under a [`Watchdog`] guard naming it;
//! `serve` gives one that logs and exits the process (the pod fails, the controller recreates
//! the replica) when a reduction runs past its timeout.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::{check_libraries, cu, no_panic};
use crate::model::parallel::{ALLREDUCE_STATS, Collective};
use crate::watchdog::Watchdog;

/// Bytes in an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// The id's bytes as the f32 values one rank contributes to the exchange.
pub fn encode_id(id: &[u8; ID_BYTES]) -> Vec<f32> {
    id.iter().map(|&b| f32::from(b)).collect()
}

/// The id from the summed exchange buffer; every value must be a whole number 0..=255
/// (anything else means more than one rank wrote an id, or the buffer was corrupted).
pub fn decode_id(buf: &[f32]) -> anyhow::Result<[u8; ID_BYTES]> {
    if buf.len() != ID_BYTES {
        bail!(
            "NCCL id exchange: {} values, expected {ID_BYTES}",
            buf.len()
        );
    }
    let mut id = [0u8; ID_BYTES];
    for (i, (&v, out)) in buf.iter().zip(id.iter_mut()).enumerate() {
        if !(0.0..=255.0).contains(&v) || v.fract() != 0.0 {
            bail!("NCCL id exchange: byte {i} is {v}, not 0..=255 (did two ranks send an id?)");
        }
        *out = v as u8;
    }
    Ok(id)
}

/// Share rank 0's id with every rank of `group` (one all-reduce of 128 f32).
pub fn exchange_id(
    group: &dyn Collective,
    mine: Option<&[u8; ID_BYTES]>,
) -> anyhow::Result<[u8; ID_BYTES]> {
    let mut buf = match (group.rank(), mine) {
        (0, Some(id)) => encode_id(id),
        (0, None) => bail!("NCCL id exchange: rank 0 must provide the id"),
        (_, _) => vec![0f32; ID_BYTES],
    };
    group
        .all_reduce_sum(&mut buf)
        .context("NCCL id exchange over the rank group")?;
    decode_id(&buf)
}

/// An NCCL communicator (a raw pointer inside) made shareable: NCCL allows use from any thread
/// with the device's context current, and the mutex serialises the calls.
struct CommCell(Comm);
// SAFETY: see above; every use goes through the Mutex in NcclCollective.
unsafe impl Send for CommCell {}

/// The worker's collective over NCCL (one rank per GPU).
pub struct NcclCollective {
    comm: Mutex<CommCell>,
    stream: Arc<CudaStream>,
    staging: Mutex<Option<CudaSlice<f32>>>,
    rank: usize,
    world: usize,
    watchdog: Option<Watchdog>,
}

impl NcclCollective {
    /// Watch every reduction with `watchdog` (see the module docs).
    pub fn with_watchdog(mut self, watchdog: Watchdog) -> Self {
        self.watchdog = Some(watchdog);
        self
    }

    /// Join the NCCL group with rank 0's id sent over `group` (see the module docs). Every rank
    /// of `group` calls this at the same time; `stream` is the rank's GPU stream.
    pub fn init_over(group: &dyn Collective, stream: Arc<CudaStream>) -> anyhow::Result<Self> {
        check_libraries(true)?;
        let mine = if group.rank() == 0 {
            let id = no_panic("ncclGetUniqueId", || cu("ncclGetUniqueId", Id::new()))?;
            Some(id.internal().map(|c| c as u8))
        } else {
            None
        };
        let id = exchange_id(group, mine.as_ref())?;
        Self::from_id(id, group.rank(), group.world(), stream)
    }

    /// Join the NCCL group of `world` ranks identified by `id` as `rank` (blocks until every
    /// rank has joined).
    pub fn from_id(
        id: [u8; ID_BYTES],
        rank: usize,
        world: usize,
        stream: Arc<CudaStream>,
    ) -> anyhow::Result<Self> {
        check_libraries(true)?;
        anyhow::ensure!(
            rank < world,
            "NCCL: rank {rank} is outside a world of {world}"
        );
        let comm = no_panic("ncclCommInitRank", || {
            let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
            cu(
                &format!("ncclCommInitRank (rank {rank} of {world})"),
                Comm::from_rank(Arc::clone(&stream), rank, world, id),
            )
        })?;
        Ok(Self {
            comm: Mutex::new(CommCell(comm)),
            stream,
            staging: Mutex::new(None),
            rank,
            world,
            watchdog: None,
        })
    }

    /// Sum `buf` across the ranks, in place, on the rank's stream; waits for the result.
    pub fn all_reduce_device(&self, buf: &mut CudaViewMut<'_, f32>) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let n = buf.len();
        let _watch = self.watchdog.as_ref().map(|w| {
            w.guard(format!(
                "NCCL all-reduce of {n} floats (rank {} of {})",
                self.rank, self.world
            ))
        });
        {
            let comm = self
                .comm
                .lock()
                .map_err(|_| anyhow::anyhow!("NCCL communicator poisoned"))?;
            cu(
                "ncclAllReduce",
                comm.0.all_reduce_in_place(buf, &ReduceOp::Sum),
            )?;
        }
        cu("waiting for ncclAllReduce", self.stream.synchronize())?;
        ALLREDUCE_STATS.record(n * 4, t0.elapsed());
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> anyhow::Result<()> {
        let mut staging = self
            .staging
            .lock()
            .map_err(|_| anyhow::anyhow!("NCCL staging buffer poisoned"))?;
        if staging.as_ref().is_none_or(|s| s.len() < buf.len()) {
            *staging = Some(cu(
                "allocating the all-reduce staging buffer",
                self.stream.alloc_zeros::<f32>(buf.len()),
            )?);
        }
        let dev = staging.as_mut().expect("allocated above");
        let mut view = dev.slice_mut(..buf.len());
        cu(
            "copying to the GPU for all-reduce",
            self.stream.memcpy_htod(&*buf, &mut view),
        )?;
        self.all_reduce_device(&mut view)?;
        cu(
            "copying the all-reduce result back",
            self.stream.memcpy_dtoh(&view, buf),
        )?;
        cu("synchronising after all-reduce", self.stream.synchronize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn id_bytes_survive_the_f32_sum() {
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 37 % 256) as u8);
        // Rank 0's bytes plus seven other ranks' zeros.
        let mut sum = encode_id(&id);
        for _ in 1..8 {
            let zeros = [0f32; ID_BYTES];
            sum.iter_mut().zip(zeros).for_each(|(v, z)| *v += z);
        }
        assert_eq!(decode_id(&sum).unwrap(), id);
    }

    #[test]
    fn two_senders_or_a_short_buffer_are_errors() {
        let id = [200u8; ID_BYTES];
        let twice: Vec<f32> = encode_id(&id).iter().map(|v| v * 2.0).collect();
        let e = decode_id(&twice).unwrap_err().to_string();
        assert!(e.contains("byte 0 is 400"), "{e}");
        assert!(decode_id(&[1.5; ID_BYTES]).is_err());
        assert!(decode_id(&[0.0; 3]).is_err());
    }

    /// An in-memory group of threads (the same exchange the TCP group carries).
    struct Threads {
        rank: usize,
        world: usize,
        shared: Arc<(Mutex<Vec<f32>>, Barrier)>,
    }

    impl Collective for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> anyhow::Result<()> {
            let (acc, barrier) = &*self.shared;
            {
                let mut a = acc.lock().unwrap();
                a.resize(buf.len(), 0.0);
                a.iter_mut().zip(buf.iter()).for_each(|(a, b)| *a += b);
            }
            barrier.wait();
            buf.copy_from_slice(&acc.lock().unwrap());
            Ok(())
        }
    }

    #[test]
    fn every_rank_gets_rank_zeros_id() {
        let world = 3;
        let shared = Arc::new((Mutex::new(Vec::new()), Barrier::new(world)));
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| (255 - i) as u8);
        let got: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|rank| {
                    let g = Threads {
                        rank,
                        world,
                        shared: Arc::clone(&shared),
                    };
                    s.spawn(move || exchange_id(&g, (rank == 0).then_some(&id)).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| *g == id));
    }
}
