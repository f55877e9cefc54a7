//! Helpers shared by the worker's test crates.

use std::sync::{Arc, Barrier, Mutex};

use tessera_worker::model::parallel::Collective;

/// An in-memory all-reduce for tensor-parallel ranks running as threads of one test.
struct Group {
    acc: Mutex<Vec<f32>>,
    barrier: Barrier,
    world: usize,
}

/// One rank of a [`thread_collectives`] group.
pub struct Member {
    group: Arc<Group>,
    rank: usize,
}

/// The collectives of `world` ranks that will run as threads (rank `i` is element `i`).
pub fn thread_collectives(world: usize) -> Vec<Member> {
    let group = Arc::new(Group {
        acc: Mutex::new(Vec::new()),
        barrier: Barrier::new(world),
        world,
    });
    (0..world)
        .map(|rank| Member {
            group: Arc::clone(&group),
            rank,
        })
        .collect()
}

impl Collective for Member {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> anyhow::Result<()> {
        {
            let mut acc = self.group.acc.lock().unwrap();
            if acc.is_empty() {
                acc.resize(buf.len(), 0.0);
            }
            acc.iter_mut().zip(buf.iter()).for_each(|(a, b)| *a += b);
        }
        self.group.barrier.wait();
        buf.copy_from_slice(&self.group.acc.lock().unwrap());
        if self.group.barrier.wait().is_leader() {
            self.group.acc.lock().unwrap().clear();
        }
        self.group.barrier.wait();
        Ok(())
    }
}
