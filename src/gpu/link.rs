//! The host-GPU link as a job sees it: every byte that goes up (weights, KV pages, hidden states,
//! queries, attention outputs, routing tables, kernel parameters) and every byte that comes back
//! (logits, new keys and values, hidden states, routing choices, queries) passes through the
//! context's upload and readback calls, which count it here and, when a rate is set, hold it to
//! that rate, so that a software adapter reproduces a discrete GPU's link.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Holds transfers to a byte rate.
pub struct RateLimit {
    bytes_per_s: f64,
    state: Mutex<Option<(Instant, u64)>>,
}

impl RateLimit {
    pub fn new(bytes_per_s: u64) -> Self {
        RateLimit { bytes_per_s: bytes_per_s as f64, state: Mutex::new(None) }
    }

    pub fn bytes_per_s(&self) -> f64 {
        self.bytes_per_s
    }

    /// Waits until `bytes` more may go. The link is busy while one transfer waits, as a real one is.
    pub fn admit(&self, bytes: usize) {
        let mut state = self.state.lock().unwrap();
        let now = Instant::now();
        let (start, sent) = state.get_or_insert((now, 0));
        // An idle link does not bank credit for later bursts.
        let due_before = Duration::from_secs_f64(*sent as f64 / self.bytes_per_s);
        if now.duration_since(*start) > due_before {
            *start = now;
            *sent = 0;
        }
        *sent += bytes as u64;
        let due = Duration::from_secs_f64(*sent as f64 / self.bytes_per_s);
        let elapsed = start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// Both directions of the link: counters, and the rates they are held to (none: as fast as the
/// hardware goes).
#[derive(Default)]
pub struct Link {
    up: Option<RateLimit>,
    down: Option<RateLimit>,
    uploaded: AtomicU64,
    downloaded: AtomicU64,
}

impl Link {
    pub fn new(up: Option<u64>, down: Option<u64>) -> Self {
        Link { up: up.map(RateLimit::new), down: down.map(RateLimit::new), ..Default::default() }
    }

    pub(crate) fn send(&self, bytes: usize) {
        if let Some(l) = &self.up {
            l.admit(bytes);
        }
        self.uploaded.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn receive(&self, bytes: usize) {
        if let Some(l) = &self.down {
            l.admit(bytes);
        }
        self.downloaded.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Bytes sent to the GPU so far.
    pub fn uploaded(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }

    /// Bytes read back from the GPU so far.
    pub fn downloaded(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_link_takes_its_bytes_over_time_and_counts_them() {
        let link = Link::new(Some(1_000_000), Some(2_000_000));
        let t = Instant::now();
        link.send(100_000);
        link.send(100_000);
        let up = t.elapsed();
        let t = Instant::now();
        link.receive(200_000);
        let down = t.elapsed();
        assert!(up >= Duration::from_millis(190), "200 KB at 1 MB/s took {up:?}");
        assert!(down >= Duration::from_millis(90), "200 KB at 2 MB/s took {down:?}");
        assert_eq!((link.uploaded(), link.downloaded()), (200_000, 200_000));
        let free = Link::new(None, None);
        let t = Instant::now();
        free.send(1 << 30);
        assert!(t.elapsed() < Duration::from_millis(50));
        assert_eq!(free.uploaded(), 1 << 30);
    }
}
