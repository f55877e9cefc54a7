//! A watchdog for an operation that may never return: a GPU collective whose peer is gone
//! blocks inside the library with no timeout of its own worth waiting for. Each operation runs
//! under a [`Guard`]; a thread checks the one in flight and, once it has run longer than the
//! timeout, calls `on_stuck` once with its name and age (for the worker: log, then exit so that
//! the pod fails and the controller recreates the replica). Slow is not stuck: the timeout is
//! the caller's, sized far above a healthy operation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type OnStuck = Box<dyn Fn(&str, Duration) + Send + Sync>;

struct Inner {
    /// The operation in flight: its name, when it started, and a number that tells one
    /// operation from the next.
    current: Mutex<Option<(String, Instant, u64)>>,
    next_id: AtomicU64,
    stop: AtomicBool,
}

/// See the module documentation.
pub struct Watchdog {
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// An operation under watch; dropping it (the operation returned) ends the watch.
pub struct Guard<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Watchdog {
    /// Start watching: every `poll`, an operation older than `timeout` is reported to
    /// `on_stuck` (once per operation).
    pub fn start(
        timeout: Duration,
        poll: Duration,
        on_stuck: impl Fn(&str, Duration) + Send + Sync + 'static,
    ) -> Self {
        let inner = Arc::new(Inner {
            current: Mutex::new(None),
            next_id: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let watched = Arc::clone(&inner);
        let on_stuck: OnStuck = Box::new(on_stuck);
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut reported = None;
                while !watched.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(poll);
                    let stuck = {
                        let cur = watched.current.lock().unwrap_or_else(|p| p.into_inner());
                        cur.as_ref()
                            .filter(|(_, t, id)| t.elapsed() > timeout && reported != Some(*id))
                            .map(|(what, t, id)| (what.clone(), t.elapsed(), *id))
                    };
                    if let Some((what, age, id)) = stuck {
                        reported = Some(id);
                        on_stuck(&what, age);
                    }
                }
            })
            .ok();
        Self { inner, thread }
    }

    /// Watch the operation `what` until the guard is dropped.
    pub fn guard(&self, what: impl Into<String>) -> Guard<'_> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        *self.inner.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((what.into(), Instant::now(), id));
        Guard {
            inner: &self.inner,
            id,
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let mut cur = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_ref().is_some_and(|(_, _, id)| *id == self.id) {
            *cur = None;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Seen = Arc<Mutex<Vec<String>>>;

    fn recorder() -> (Seen, impl Fn(&str, Duration) + Send + Sync) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        (seen, move |what: &str, age: Duration| {
            s.lock()
                .unwrap()
                .push(format!("{what} {}", age.as_millis() >= 100));
        })
    }

    #[test]
    fn a_stuck_operation_is_reported_once_with_its_name() {
        let (seen, f) = recorder();
        let w = Watchdog::start(Duration::from_millis(100), Duration::from_millis(10), f);
        {
            let _g = w.guard("all-reduce after attention of layer 3");
            std::thread::sleep(Duration::from_millis(400));
        }
        drop(w);
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["all-reduce after attention of layer 3 true".to_owned()]
        );
    }

    #[test]
    fn operations_that_finish_in_time_are_never_reported() {
        let (seen, f) = recorder();
        let w = Watchdog::start(Duration::from_millis(200), Duration::from_millis(5), f);
        // Many short operations over a span far longer than the timeout.
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(600) {
            let _g = w.guard("all-reduce");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(w);
        assert!(
            seen.lock().unwrap().is_empty(),
            "{:?}",
            seen.lock().unwrap()
        );
    }
}
