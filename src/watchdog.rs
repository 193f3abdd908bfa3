//! Stall detection: a decision worker that makes no progress on the transaction it holds,
//! or an async runtime whose timers stop (every thread blocked).
//!
//! A stalled worker holds every card routed to it: its queue fills, the intake waits on
//! it, and within milliseconds under load the whole path stops, while nothing fails and
//! no histogram gets an observation. Without this, the first sign was the "no traffic"
//! alert fifteen minutes later. The watchdog runs on a plain thread of its own (a blocked
//! runtime cannot run it), and the metrics exporter too (`telemetry::install_exporter`),
//! so the stall is seen while it lasts.
//!
//! Cost on the decision path: a store when a worker takes a transaction and an exchange
//! when it is done, on a cache line of that worker's own; no clock read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bit 0 of a worker's word: it holds a transaction now.
const BUSY: u64 = 1;
/// Bit 1: the watchdog found it stalled on that transaction.
const STALLED: u64 = 2;
/// The rest counts transactions taken (so the word changes with every one).
const ONE: u64 = 4;

/// One worker's progress word, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerBeat {
    word: AtomicU64,
}

impl WorkerBeat {
    /// The worker takes a transaction.
    #[inline]
    pub fn begin(&self) {
        let w = self.word.load(Relaxed) & !(BUSY | STALLED);
        self.word.store(w | BUSY, Relaxed);
    }

    /// The worker is done with it. True when the watchdog reported this transaction as
    /// stalled: the worker then logs its id, which only the worker knows.
    #[inline]
    pub fn end(&self) -> bool {
        let w = self.word.load(Relaxed);
        // An exchange, not a store: the watchdog may set STALLED in between.
        self.word.swap((w & !(BUSY | STALLED)) + ONE, Relaxed) & STALLED != 0
    }
}

/// What the workers and the runtime share with the watchdog thread.
#[derive(Debug)]
pub struct Beats {
    workers: Box<[WorkerBeat]>,
    /// Bumped by a runtime task every [`HEARTBEAT`].
    runtime: AtomicU64,
}

/// How often the runtime's heartbeat task ticks.
pub const HEARTBEAT: Duration = Duration::from_millis(100);

impl Beats {
    pub fn new(workers: usize) -> Arc<Beats> {
        Arc::new(Beats {
            workers: (0..workers).map(|_| WorkerBeat::default()).collect(),
            runtime: AtomicU64::new(0),
        })
    }

    pub fn worker(&self, i: usize) -> &WorkerBeat {
        &self.workers[i]
    }

    /// One heartbeat of the async runtime.
    pub fn runtime_tick(&self) {
        self.runtime.fetch_add(1, Relaxed);
    }
}

/// What the watchdog saw change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Worker `i` has held one transaction for `held`.
    WorkerStalled { worker: usize, held: Duration },
    /// Worker `i` moved on after a stall that was reported; `lasted` is how long the
    /// watchdog saw it hold the transaction (to within a tick of the watchdog).
    WorkerMoving { worker: usize, lasted: Duration },
    /// The runtime's heartbeat task has not run for `quiet`: every runtime thread is
    /// blocked, or the one whose queue holds the heartbeat is.
    RuntimeStalled { quiet: Duration },
    /// The runtime ticks again.
    RuntimeMoving { lasted: Duration },
}

/// One watched word: its last value, since when, and whether a stall was reported.
#[derive(Debug, Clone, Copy, Default)]
struct Track {
    last: u64,
    since: Duration,
    stalled: bool,
}

impl Track {
    /// `Some(true)`: stalled now; `Some(false)`: moving again after a stall. `judge`
    /// false: changes are taken, but no new stall is declared this round.
    fn observe(
        &mut self,
        value: u64,
        busy: bool,
        now: Duration,
        after: Duration,
        judge: bool,
    ) -> Option<bool> {
        if value != self.last {
            let was = std::mem::replace(
                self,
                Track {
                    last: value,
                    since: now,
                    stalled: false,
                },
            );
            return was.stalled.then_some(false);
        }
        if judge && busy && !self.stalled && now.saturating_sub(self.since) >= after {
            self.stalled = true;
            return Some(true);
        }
        None
    }
}

/// The pure part of the watchdog: fed the words it reads and the time they were read
/// (from any fixed origin), it says what started or stopped stalling. No clock, no
/// thread, so it is tested by feeding it.
#[derive(Debug)]
pub struct Detector {
    after: Duration,
    workers: Vec<Track>,
    runtime: Track,
    /// When the last check ran.
    last: Duration,
}

impl Detector {
    pub fn new(workers: usize, after: Duration, now: Duration) -> Detector {
        let t = Track {
            since: now,
            ..Track::default()
        };
        Detector {
            after,
            workers: vec![t; workers],
            runtime: t,
            last: now,
        }
    }

    /// Reads every word of `beats` at `now`. A worker found stalled is marked in its word
    /// (only if the word is still the one read: a worker that moved on meanwhile is not
    /// stalled), so that the worker logs the transaction's id when it is done.
    ///
    /// A check that comes late by half of `after` or more (the watchdog itself was not
    /// scheduled: a paused VM, a starved machine) declares no new stall: everything was
    /// frozen alike, and the heartbeat and the workers get a round to show progress first.
    pub fn check(&mut self, beats: &Beats, now: Duration, out: &mut Vec<Event>) {
        let judge = now.saturating_sub(self.last) < self.after / 2;
        self.last = now;
        for (i, (t, b)) in self
            .workers
            .iter_mut()
            .zip(beats.workers.iter())
            .enumerate()
        {
            let w = b.word.load(Relaxed);
            let value = w & !STALLED;
            let held = now.saturating_sub(t.since);
            match t.observe(value, w & BUSY != 0, now, self.after, judge) {
                Some(true) => {
                    if b.word
                        .compare_exchange(w, w | STALLED, Relaxed, Relaxed)
                        .is_ok()
                    {
                        out.push(Event::WorkerStalled { worker: i, held });
                    } else {
                        // It moved on between the read and the mark: progress, no stall.
                        t.stalled = false;
                    }
                }
                Some(false) => out.push(Event::WorkerMoving {
                    worker: i,
                    lasted: held,
                }),
                None => {}
            }
        }
        let quiet = now.saturating_sub(self.runtime.since);
        match self
            .runtime
            .observe(beats.runtime.load(Relaxed), true, now, self.after, judge)
        {
            Some(true) => out.push(Event::RuntimeStalled { quiet }),
            Some(false) => out.push(Event::RuntimeMoving { lasted: quiet }),
            None => {}
        }
    }

    /// Workers stalled now, and whether the runtime is.
    pub fn stalled(&self) -> (usize, bool) {
        (
            self.workers.iter().filter(|t| t.stalled).count(),
            self.runtime.stalled,
        )
    }
}

/// The watchdog thread; stops when dropped or [`Watchdog::stop`]ped.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `beats`: every quarter of `after` (at least every 250 ms, at most
    /// every 10 ms) it reads them and hands what changed, with the current counts, to
    /// `report`.
    pub fn start<F>(beats: Arc<Beats>, after: Duration, mut report: F) -> std::io::Result<Watchdog>
    where
        F: FnMut(&[Event], (usize, bool)) + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let tick = (after / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let thread = std::thread::Builder::new()
            .name("fraudgate-watchdog".into())
            .spawn(move || {
                let origin = Instant::now();
                let mut d = Detector::new(beats.workers.len(), after, Duration::ZERO);
                let mut events = Vec::new();
                while !stopping.load(Relaxed) {
                    // Woken early by `stop` (or spuriously: one more check is harmless).
                    std::thread::park_timeout(tick);
                    if stopping.load(Relaxed) {
                        break;
                    }
                    events.clear();
                    d.check(&beats, origin.elapsed(), &mut events);
                    report(&events, d.stalled());
                }
            })?;
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (woken at once, so no longer than a check).
    pub fn stop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn run(d: &mut Detector, beats: &Beats, at: u64) -> Vec<Event> {
        let mut out = Vec::new();
        d.check(beats, ms(at), &mut out);
        out
    }

    #[test]
    fn a_worker_holding_one_transaction_past_the_limit_is_stalled_once_then_moving() {
        let beats = Beats::new(2);
        let mut d = Detector::new(2, AFTER, ms(0));
        beats.worker(1).begin();
        beats.runtime_tick();
        assert_eq!(run(&mut d, &beats, 100), vec![]);
        beats.runtime_tick();
        assert_eq!(run(&mut d, &beats, 900), vec![]);
        beats.runtime_tick();
        assert_eq!(
            run(&mut d, &beats, 1200),
            vec![Event::WorkerStalled {
                worker: 1,
                held: ms(1100)
            }]
        );
        assert_eq!(d.stalled(), (1, false));
        beats.runtime_tick();
        assert_eq!(run(&mut d, &beats, 1500), vec![], "reported once");
        // The worker finishes: it learns that it was reported, and the watchdog sees it
        // move on.
        assert!(beats.worker(1).end());
        beats.runtime_tick();
        assert_eq!(
            run(&mut d, &beats, 1700),
            vec![Event::WorkerMoving {
                worker: 1,
                lasted: ms(1600)
            }]
        );
        assert_eq!(d.stalled(), (0, false));
        // The next transaction of that worker was not stalled.
        beats.worker(1).begin();
        assert!(!beats.worker(1).end());
    }

    #[test]
    fn an_idle_worker_is_never_stalled_and_a_busy_one_that_moves_is_not_either() {
        let beats = Beats::new(2);
        let mut d = Detector::new(2, AFTER, ms(0));
        let mut at = 0;
        for _ in 0..50 {
            // Worker 0 decides one transaction after another; worker 1 waits for work.
            beats.worker(0).begin();
            at += 300;
            beats.runtime_tick();
            assert_eq!(run(&mut d, &beats, at), vec![], "at {at} ms");
            assert!(!beats.worker(0).end());
        }
        assert_eq!(d.stalled(), (0, false));
    }

    #[test]
    fn a_runtime_without_heartbeats_is_stalled_until_it_ticks() {
        let beats = Beats::new(1);
        let mut d = Detector::new(1, AFTER, ms(0));
        beats.runtime_tick();
        assert_eq!(run(&mut d, &beats, 100), vec![]);
        assert_eq!(run(&mut d, &beats, 1000), vec![]);
        assert_eq!(
            run(&mut d, &beats, 1100),
            vec![Event::RuntimeStalled { quiet: ms(1000) }]
        );
        assert_eq!(d.stalled(), (0, true));
        assert_eq!(run(&mut d, &beats, 2000), vec![]);
        beats.runtime_tick();
        assert_eq!(
            run(&mut d, &beats, 2100),
            vec![Event::RuntimeMoving { lasted: ms(2000) }]
        );
        assert_eq!(d.stalled(), (0, false));
    }

    #[test]
    fn a_late_check_declares_nothing_and_a_real_stall_is_declared_a_round_later() {
        let beats = Beats::new(1);
        let mut d = Detector::new(1, AFTER, ms(0));
        beats.runtime_tick();
        assert_eq!(run(&mut d, &beats, 100), vec![]);
        // The watchdog itself was frozen for 3 s (a paused VM): no verdict from this check.
        assert_eq!(run(&mut d, &beats, 3100), vec![]);
        // The heartbeat ticks right after the pause: no stall at all.
        beats.runtime_tick();
        assert_eq!(run(&mut d, &beats, 3200), vec![]);
        // Then it stops for real: declared once it has been quiet for `AFTER`.
        let mut at = 3200;
        let mut got = vec![];
        while got.is_empty() {
            at += 250;
            got = run(&mut d, &beats, at);
        }
        assert_eq!(at, 4200);
        assert_eq!(got, vec![Event::RuntimeStalled { quiet: ms(1000) }]);
    }

    #[test]
    fn a_worker_that_moves_on_between_the_read_and_the_mark_is_not_reported() {
        let beats = Beats::new(1);
        let mut d = Detector::new(1, AFTER, ms(0));
        beats.worker(0).begin();
        assert_eq!(run(&mut d, &beats, 100), vec![]);
        // The read in `check` sees the word before the worker's end; simulate the race
        // by ending between two checks and asserting the mark is refused: the word the
        // detector read is gone, so its exchange fails.
        let w = beats.workers[0].word.load(Relaxed);
        assert!(!beats.worker(0).end());
        assert!(beats.workers[0]
            .word
            .compare_exchange(w, w | STALLED, Relaxed, Relaxed)
            .is_err());
        beats.worker(0).begin();
        assert!(
            !beats.worker(0).end(),
            "no stale mark on a later transaction"
        );
    }

    #[test]
    fn the_thread_reports_a_stall_and_stops() {
        let beats = Beats::new(1);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut w = Watchdog::start(beats.clone(), ms(40), move |ev, now| {
            for e in ev {
                let _ = tx.send((*e, now));
            }
        })
        .unwrap();
        beats.worker(0).begin();
        // The runtime has no heartbeat task here, so it is reported too: wait for the
        // worker's report.
        loop {
            let (e, now) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            if matches!(e, Event::WorkerStalled { worker: 0, .. }) {
                assert_eq!(now.0, 1, "{now:?}");
                break;
            }
        }
        w.stop();
        assert!(beats.worker(0).end(), "the worker learns it was reported");
    }
}
