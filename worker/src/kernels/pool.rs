//! A small spinning thread pool for the kernels.
//!
//! A decode step of a small model is a few hundred parallel sections of tens of microseconds
//! each, so waking sleeping threads (futex round trips, as rayon does after a short spin) costs a
//! large share of the step. Like ggml's thread pool, workers here spin on an epoch counter while
//! work is coming (yielding the core every 64 spins, which keeps an oversubscribed machine
//! usable: 4 threads on 2 cores decode at 90 tokens/s instead of 45), then park after 2 ms
//! without work.
//!
//! A parallel section hands out task indices `0..n` through one atomic cursor that packs the
//! section's epoch with the next index, so a worker that wakes late can never claim a task of a
//! later section with a stale job.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type TaskFn<'a> = &'a (dyn Fn(usize) + Sync);

struct Job {
    f: TaskFn<'static>,
    n: usize,
    epoch: u64,
}

struct Shared {
    /// `epoch << 32 | next task index`.
    cursor: AtomicU64,
    job: AtomicPtr<Job>,
    done: AtomicUsize,
    /// Workers between loading `job` and finishing with it; `run` waits for zero.
    active: AtomicUsize,
    /// Workers parked on `wake` (only then does `run` take the lock to notify).
    sleepers: AtomicUsize,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

pub(crate) struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// One parallel section at a time (the pool may be shared by several callers).
    section: Mutex<()>,
}

const SPIN_FOR: Duration = Duration::from_millis(2);

impl Shared {
    /// Claim and run tasks of `epoch` until none is left.
    fn work(&self, epoch: u64, job: &Job) {
        loop {
            let c = self.cursor.load(Ordering::Acquire);
            if c >> 32 != epoch || (c & 0xFFFF_FFFF) as usize >= job.n {
                return;
            }
            if self
                .cursor
                .compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                (job.f)((c & 0xFFFF_FFFF) as usize);
                self.done.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

fn worker(shared: Arc<Shared>) {
    let mut seen = shared.cursor.load(Ordering::Acquire) >> 32;
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let epoch = shared.cursor.load(Ordering::Acquire) >> 32;
        if epoch != seen {
            seen = epoch;
            shared.active.fetch_add(1, Ordering::SeqCst);
            let job = shared.job.load(Ordering::SeqCst);
            if !job.is_null() {
                // SAFETY: the job lives on the stack of `run`, which clears `job` and then waits
                // for `active` to drop to zero before returning, so a pointer loaded while
                // `active` counts this worker stays valid until the decrement below.
                let job = unsafe { &*job };
                // A job of a later section (published before its cursor) is left for later.
                if job.epoch == epoch {
                    shared.work(epoch, job);
                }
            }
            shared.active.fetch_sub(1, Ordering::SeqCst);
            idle_since = Instant::now();
            spins = 0;
            continue;
        }
        spins += 1;
        if spins.is_multiple_of(1024) && idle_since.elapsed() > SPIN_FOR {
            let guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            if shared.cursor.load(Ordering::SeqCst) >> 32 == seen
                && !shared.stop.load(Ordering::SeqCst)
            {
                // `run` notifies under the lock when it sees a sleeper, so no wake-up is lost
                // between the check above and the wait; the timeout is only a safety net.
                let _ = shared.wake.wait_timeout(guard, Duration::from_millis(100));
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
        } else if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

impl SpinPool {
    /// A pool of `threads` (the calling thread counts as one: `threads - 1` workers start).
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            cursor: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("tessera-cpu-{i}"))
                    .spawn(move || worker(s))?,
            );
        }
        Ok(Self {
            shared,
            workers,
            section: Mutex::new(()),
        })
    }

    /// Run `f(i)` for every `i in 0..n` on the calling thread and the workers.
    pub(crate) fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        if self.workers.is_empty() || n == 1 {
            (0..n).for_each(f);
            return;
        }
        assert!(n < u32::MAX as usize, "too many tasks");
        let _section = self.section.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the 'static lifetime is a lie told to the workers only for the duration of
        // this call: it waits below until all n tasks are done, and no task can be claimed after.
        let f: TaskFn<'static> = unsafe { std::mem::transmute::<TaskFn<'_>, TaskFn<'static>>(f) };
        let epoch = (s.cursor.load(Ordering::Acquire) >> 32) + 1;
        let job = Job { f, n, epoch };
        s.done.store(0, Ordering::Release);
        s.job
            .store(&job as *const Job as *mut Job, Ordering::SeqCst);
        s.cursor.store(epoch << 32, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            drop(s.lock.lock().unwrap_or_else(|e| e.into_inner()));
            s.wake.notify_all();
        }
        s.work(epoch, &job);
        // Wait for tasks other threads claimed. Yield now and then: on an oversubscribed machine
        // the thread we wait for may need this core.
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < n {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        s.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        while s.active.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        drop(self.shared.lock.lock().unwrap_or_else(|e| e.into_inner()));
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_sections() {
        let pool = SpinPool::new(3).unwrap();
        for n in [1usize, 2, 3, 7, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
        }
    }

    #[test]
    fn idle_workers_wake_up() {
        let pool = SpinPool::new(2).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let sum = AtomicUsize::new(0);
        pool.run(100, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }
}
