//! Cluster-load arbitration, pure: when several deployments want more GPUs than are free, who
//! gets them.
//!
//! Rules, in order:
//! 1. running replicas are never taken away: a claim's running replicas hold their GPUs
//!    already and are outside the free pool, so no deployment, whatever its priority, can evict
//!    them;
//! 2. higher `priority` is served first: a lower-priority claim gets a GPU only when every
//!    higher-priority claim is satisfied or cannot use what is left;
//! 3. within one priority, free GPUs go one replica at a time to the deployment furthest below
//!    its target: the largest load ratio (`metric / target`) *after* counting the replicas
//!    already granted (`ratio x running / (running + granted)`), so equal needs share evenly;
//!    ties go to the earlier claim.
//!
//! A replica needs `gpus_per_replica` GPUs; a claim whose next replica does not fit in what is
//! left is done (smaller claims may still fit).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One deployment's wish for more replicas.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    pub priority: i32,
    /// Replicas running now (never reduced by arbitration).
    pub running: u32,
    /// Replicas it wants in total.
    pub wanted: u32,
    /// GPUs one replica needs (tensor x pipeline).
    pub gpus_per_replica: u32,
    /// Load over target (`average / target`); above 1 is under-provisioned.
    pub ratio: f64,
}

/// Replicas granted to each claim (same order): `running` plus what the free GPUs allow, at
/// most `max(running, wanted)`.
pub fn arbitrate(claims: &[Claim], free_gpus: u64) -> Vec<u32> {
    let mut granted: Vec<u32> = claims.iter().map(|c| c.running).collect();
    let mut free = free_gpus;
    // Group by priority, highest first.
    let mut order: Vec<usize> = (0..claims.len())
        .filter(|&i| claims[i].wanted > claims[i].running)
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(claims[i].priority), i));
    let mut start = 0;
    while start < order.len() {
        let prio = claims[order[start]].priority;
        let end = order[start..]
            .iter()
            .position(|&i| claims[i].priority != prio)
            .map_or(order.len(), |p| start + p);
        let mut heap: BinaryHeap<Entry> = order[start..end]
            .iter()
            .map(|&i| Entry {
                need: need(&claims[i], 0),
                index: i,
            })
            .collect();
        while let Some(e) = heap.pop() {
            let c = &claims[e.index];
            let g = u64::from(c.gpus_per_replica.max(1));
            if g > free {
                continue;
            }
            free -= g;
            granted[e.index] += 1;
            let extra = granted[e.index] - c.running;
            if granted[e.index] < c.wanted {
                heap.push(Entry {
                    need: need(c, extra),
                    index: e.index,
                });
            }
        }
        start = end;
    }
    granted
}

/// Load ratio once `extra` more replicas share the load.
fn need(c: &Claim, extra: u32) -> f64 {
    let r = if c.ratio.is_finite() { c.ratio } else { 0.0 };
    let running = f64::from(c.running.max(1));
    r * running / (running + f64::from(extra))
}

struct Entry {
    need: f64,
    index: usize,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap: larger need first, then the lower index.
        self.need
            .total_cmp(&other.need)
            .then_with(|| other.index.cmp(&self.index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(priority: i32, running: u32, wanted: u32, gpus: u32, ratio: f64) -> Claim {
        Claim {
            priority,
            running,
            wanted,
            gpus_per_replica: gpus,
            ratio,
        }
    }

    #[test]
    fn higher_priority_wins_the_free_gpus() {
        let claims = [claim(0, 2, 6, 2, 3.0), claim(10, 1, 3, 2, 1.5)];
        // 6 free GPUs: priority 10 takes 2 replicas (4 GPUs), priority 0 gets 1.
        assert_eq!(arbitrate(&claims, 6), vec![3, 3]);
    }

    #[test]
    fn same_priority_goes_to_the_furthest_below_target() {
        let claims = [claim(0, 2, 4, 1, 1.2), claim(0, 2, 8, 1, 4.0)];
        // 3 GPUs: the 4.0 claim first (4.0 -> 2.67 -> 2.0), it stays ahead of 1.2 each time.
        assert_eq!(arbitrate(&claims, 3), vec![2, 5]);
        // Equal needs share evenly.
        let even = [claim(0, 2, 6, 1, 2.0), claim(0, 2, 6, 1, 2.0)];
        assert_eq!(arbitrate(&even, 4), vec![4, 4]);
    }

    #[test]
    fn running_replicas_are_never_taken() {
        // The low-priority claim runs 5 replicas; a high-priority claim with no room gets none
        // of them, and the low one keeps 5.
        let claims = [claim(-5, 5, 5, 8, 0.5), claim(100, 0, 4, 8, 9.0)];
        assert_eq!(arbitrate(&claims, 0), vec![5, 0]);
        // A claim that wants fewer than it runs keeps them too (scale-down is not ours).
        assert_eq!(arbitrate(&[claim(0, 4, 2, 1, 0.1)], 10), vec![4]);
    }

    #[test]
    fn a_big_replica_that_does_not_fit_lets_smaller_ones_through() {
        let claims = [claim(5, 1, 2, 8, 5.0), claim(0, 1, 3, 2, 1.5)];
        assert_eq!(arbitrate(&claims, 6), vec![1, 3]);
    }
}
