//! Everything the service counts. One place owns every counter (and, with the metrics
//! exporter, every metric name), so dashboards, logs and tests read the same numbers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::decision::Action;
use crate::txn::ErrorCode;

/// Which intake a transaction came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Request-reply.
    Check,
    /// Asynchronous stream.
    Stream,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Check => "check",
            Path::Stream => "stream",
        }
    }
    fn idx(self) -> usize {
        self as usize
    }
}

fn action_idx(a: Action) -> usize {
    a as usize
}

fn code_idx(c: ErrorCode) -> usize {
    ErrorCode::ALL.iter().position(|x| *x == c).unwrap_or(0)
}

/// Service counters. Cheap to bump from any task.
#[derive(Debug, Default)]
pub struct Counters {
    received: [AtomicU64; 2],
    decided: [[AtomicU64; 3]; 2],
    duplicates: AtomicU64,
    too_late: AtomicU64,
    invalid: [AtomicU64; 7],
    publish_errors: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    disconnects: AtomicU64,
    connects: AtomicU64,
    slow_consumer: AtomicU64,
    no_reply: AtomicU64,
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub received_check: u64,
    pub received_stream: u64,
    /// Decisions published, by path and action (approve, hold, reject).
    pub decided_check: [u64; 3],
    pub decided_stream: [u64; 3],
    pub duplicates: u64,
    pub too_late: u64,
    /// Invalid inputs by error code, in [`ErrorCode::ALL`] order.
    pub invalid: [u64; 7],
    pub publish_errors: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub disconnects: u64,
    pub connects: u64,
    pub slow_consumer: u64,
    pub no_reply: u64,
}

impl Snapshot {
    pub fn decided(&self) -> u64 {
        self.decided_check.iter().sum::<u64>() + self.decided_stream.iter().sum::<u64>()
    }
    pub fn invalid_total(&self) -> u64 {
        self.invalid.iter().sum()
    }
    pub fn invalid_of(&self, code: ErrorCode) -> u64 {
        self.invalid[code_idx(code)]
    }
}

impl Counters {
    pub fn received(&self, p: Path) {
        self.received[p.idx()].fetch_add(1, Relaxed);
    }
    pub fn decided(&self, p: Path, a: Action) {
        self.decided[p.idx()][action_idx(a)].fetch_add(1, Relaxed);
    }
    pub fn duplicate(&self) {
        self.duplicates.fetch_add(1, Relaxed);
    }
    pub fn too_late(&self) {
        self.too_late.fetch_add(1, Relaxed);
    }
    pub fn invalid(&self, c: ErrorCode) {
        self.invalid[code_idx(c)].fetch_add(1, Relaxed);
    }
    pub fn publish_error(&self) {
        self.publish_errors.fetch_add(1, Relaxed);
    }
    pub fn reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Relaxed);
        }
    }
    pub fn disconnected(&self) {
        self.disconnects.fetch_add(1, Relaxed);
    }
    pub fn connected(&self) {
        self.connects.fetch_add(1, Relaxed);
    }
    pub fn slow_consumer(&self) {
        self.slow_consumer.fetch_add(1, Relaxed);
    }
    pub fn no_reply(&self) {
        self.no_reply.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let l = |a: &AtomicU64| a.load(Relaxed);
        let arr3 = |a: &[AtomicU64; 3]| [l(&a[0]), l(&a[1]), l(&a[2])];
        let mut invalid = [0; 7];
        for (i, a) in self.invalid.iter().enumerate() {
            invalid[i] = l(a);
        }
        Snapshot {
            received_check: l(&self.received[0]),
            received_stream: l(&self.received[1]),
            decided_check: arr3(&self.decided[0]),
            decided_stream: arr3(&self.decided[1]),
            duplicates: l(&self.duplicates),
            too_late: l(&self.too_late),
            invalid,
            publish_errors: l(&self.publish_errors),
            reloads_ok: l(&self.reloads_ok),
            reloads_failed: l(&self.reloads_failed),
            disconnects: l(&self.disconnects),
            connects: l(&self.connects),
            slow_consumer: l(&self.slow_consumer),
            no_reply: l(&self.no_reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_path_action_and_code() {
        let c = Counters::default();
        c.received(Path::Check);
        c.decided(Path::Check, Action::Hold);
        c.decided(Path::Stream, Action::Reject);
        c.invalid(ErrorCode::NegativeAmount);
        let s = c.snapshot();
        assert_eq!(s.received_check, 1);
        assert_eq!(s.decided_check, [0, 1, 0]);
        assert_eq!(s.decided_stream, [0, 0, 1]);
        assert_eq!(s.decided(), 2);
        assert_eq!(s.invalid_of(ErrorCode::NegativeAmount), 1);
        assert_eq!(s.invalid_total(), 1);
    }
}
