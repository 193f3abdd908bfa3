//! `fraudgate loadgen`: drives generated traffic against a running engine over NATS and
//! reports throughput, latency, errors and detection quality.
//!
//! - **Open loop** (`rate`): transaction *i* is due at `start + i / rate`; latency is
//!   measured from that scheduled time, so a stall shows up in the latency instead of
//!   silently slowing the sender (no coordinated omission).
//! - **Closed loop** (`concurrency`): N transactions in flight; each answer releases the
//!   next. Latency is measured from the send (after a slot was free).
//! - **check** path: request-reply on the check subject. **stream** path: publish on the
//!   txn subject; latency runs from the (scheduled) publish to the decision received on
//!   `<decision_prefix>.>`. A decision that does not come within the timeout counts as
//!   lost (and gives its slot back), as a request without an answer does (stream: from
//!   the (scheduled) publish; check: from the request).
//! - **Detection**: per injected pattern, transactions flagged (held or rejected) and
//!   instances caught (an instance is one card-testing burst, one duplicate pair ...:
//!   caught when any of its transactions is flagged; a rule that needs four tiny amounts
//!   cannot flag the first three, so per transaction a perfect rule set stays below 100 %).
//!   Fraud transactions carry the same background signals as normal ones (an address
//!   mismatch holds ~2 % of either), so a 45-transaction spike is often "caught" by chance:
//!   the report also counts the instances flagged with one of the pattern's own rules among
//!   those that fired
//!   ([`Pattern::target_rules`]), and shows the share of normal traffic flagged. Instances
//!   the run cut short (transactions still to come when it ended) are left out.
//! - A request or stream decision that does not come in time is recorded in the latency
//!   histogram at the timeout (a lower bound), so a quantile is not taken over the fast
//!   survivors only.
//!
//! Payloads are generated before the run (with their event times, [`prepare`]), so the
//! generator's cost is not part of the measurement.

use std::collections::HashMap;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;

use crate::config::SubjectsSection;
use crate::loadgen::{GenConfig, Generator, Pattern};

/// The longest `timeout` of a run: its latency histogram (µs) ends there, so a later
/// answer or a timeout is still in the percentiles.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPath {
    Check,
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadMode {
    /// Transactions per second, on schedule.
    Open(f64),
    /// Transactions in flight.
    Closed(usize),
    /// Everything at once, as fast as the client can publish (stream throughput).
    Flood,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub path: LoadPath,
    pub mode: LoadMode,
    /// How many transactions to send.
    pub count: usize,
    pub gen: GenConfig,
    /// An answer later than this counts as a timeout.
    pub timeout: Duration,
    pub subjects: SubjectsSection,
    /// Print a progress line every second.
    pub progress: bool,
    /// Event time of the last transaction (None: now). The others go back from it at the
    /// generator's density and time-of-day profile ([`crate::loadgen::timeline`]).
    pub events_end_ms: Option<i64>,
}

/// Per injected pattern: transactions answered, and held or rejected.
pub type PatternTally = HashMap<Pattern, (u64, u64)>;

/// Per injected pattern: instances with an answered transaction, those with a transaction
/// held or rejected, and those with a transaction held or rejected with one of the
/// pattern's own rules among those that fired.
pub type InstanceTally = HashMap<Pattern, (u64, u64, u64)>;

#[derive(Debug, Clone)]
pub struct LoadReport {
    pub sent: u64,
    pub answered: u64,
    pub errors: u64,
    pub timeouts: u64,
    /// Wall time from the first send to the last answer.
    pub elapsed: Duration,
    /// Latency in microseconds.
    pub latency_us: Histogram<u64>,
    /// approve, hold, reject.
    pub actions: [u64; 3],
    pub patterns: PatternTally,
    pub instances: InstanceTally,
    /// Normal (unlabelled) transactions answered, and those held or rejected (false
    /// positives).
    pub normal: u64,
    pub false_positives: u64,
}

impl LoadReport {
    pub fn throughput(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Of the held or rejected transactions, the share that was injected fraud; NaN when
    /// nothing was flagged.
    pub fn precision(&self) -> f64 {
        let tp: u64 = self.patterns.values().map(|p| p.1).sum();
        tp as f64 / (tp + self.false_positives) as f64
    }
    /// Of the injected fraud transactions, the share held or rejected.
    pub fn recall(&self) -> f64 {
        flagged_share(&self.patterns)
    }
    /// Of the injected pattern instances, the share with a transaction held or rejected.
    pub fn instance_recall(&self) -> f64 {
        let (n, flagged) = (self.instances.values()).fold((0, 0), |a, i| (a.0 + i.0, a.1 + i.1));
        flagged as f64 / n.max(1) as f64
    }
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    /// A human-readable report.
    pub fn render(&self) -> String {
        let mut s = format!(
            "sent {}  answered {}  errors {}  no decision in time (lost) {}  in {:.2} s  =>  {:.0} decisions/s\n",
            self.sent,
            self.answered,
            self.errors,
            self.timeouts,
            self.elapsed.as_secs_f64(),
            self.throughput()
        );
        s += &format!(
            "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}{}\n",
            self.quantile_ms(0.5),
            self.quantile_ms(0.9),
            self.quantile_ms(0.99),
            self.quantile_ms(0.999),
            self.latency_us.max() as f64 / 1000.0,
            if self.timeouts > 0 {
                "  (those without a decision counted at the timeout)"
            } else {
                ""
            }
        );
        let total = self.actions.iter().sum::<u64>().max(1) as f64;
        s += &format!(
            "decisions   approve {:.2}%  hold {:.2}%  reject {:.2}%\n",
            100.0 * self.actions[0] as f64 / total,
            100.0 * self.actions[1] as f64 / total,
            100.0 * self.actions[2] as f64 / total
        );
        if !self.patterns.is_empty() {
            s += "detection   pattern             transactions  flagged   missed   instances   caught   missed   by its rule\n";
            let mut pats: Vec<_> = self.patterns.iter().collect();
            pats.sort();
            for (p, (n, caught)) in pats {
                let (i, ic, by_rule) = self.instances.get(p).copied().unwrap_or_default();
                s += &format!(
                    "            {:<18} {:>13} {:>8} {:>8} {:>11} {:>8} {:>8} {:>13}\n",
                    p.name(),
                    n,
                    caught,
                    n - caught,
                    i,
                    ic,
                    i - ic,
                    by_rule
                );
            }
            let precision = self.precision();
            s += &format!(
                "            precision {}  recall {:.3} of transactions, {:.3} of instances  (normal transactions held or rejected: {} of {}, {:.2} %: the chance share of any fraud transaction)\n",
                if precision.is_nan() {
                    "n/a".to_string()
                } else {
                    format!("{precision:.3}")
                },
                self.recall(),
                self.instance_recall(),
                self.false_positives,
                self.normal,
                100.0 * self.false_positives as f64 / self.normal.max(1) as f64
            );
        }
        s
    }
}

/// Flagged over all, summed across the patterns of `t`.
fn flagged_share(t: &PatternTally) -> f64 {
    let (n, flagged) = t.values().fold((0, 0), |a, p| (a.0 + p.0, a.1 + p.1));
    flagged as f64 / n.max(1) as f64
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("NATS: {0}")]
    Nats(String),
}

struct Item {
    id: String,
    payload: Bytes,
    pattern: Option<Pattern>,
    instance: u64,
}

/// The transactions of one run, generated before it ([`prepare`]).
pub struct Prepared {
    items: Vec<Item>,
    /// Injected instances the run would cut short: not counted as instances.
    incomplete: std::collections::HashSet<(Pattern, u64)>,
}

/// An injected transaction's label: its pattern and instance.
type Label = Option<(Pattern, u64)>;

/// Shared outcome counters of a run.
struct Tally {
    answered: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    inner: Mutex<TallyInner>,
}

struct TallyInner {
    hist: Histogram<u64>,
    actions: [u64; 3],
    patterns: PatternTally,
    /// Per injected instance: whether any of its transactions was flagged, and whether one
    /// was flagged with one of the pattern's own rules among those that fired.
    instances: HashMap<(Pattern, u64), (bool, bool)>,
    normal: u64,
    false_positives: u64,
    last_answer: Option<Instant>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            answered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            inner: Mutex::new(TallyInner {
                hist: Histogram::new_with_bounds(1, MAX_TIMEOUT.as_micros() as u64, 3)
                    .expect("valid bounds"),
                actions: [0; 3],
                patterns: HashMap::new(),
                instances: HashMap::new(),
                normal: 0,
                false_positives: 0,
                last_answer: None,
            }),
        }
    }

    /// Records one decision (its JSON) answered `latency` after it was due.
    fn answer(&self, body: &[u8], latency: Duration, label: Label) {
        let action = action_of(body);
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match action {
            Some(i) => {
                // The throughput is decisions over the time to the last of them: an error
                // answered later does not stretch it.
                t.last_answer = Some(Instant::now());
                self.answered.fetch_add(1, Relaxed);
                let _ = t.hist.record((latency.as_micros() as u64).max(1));
                t.actions[i] += 1;
                let flagged = i > 0;
                match label {
                    Some((p, instance)) => {
                        let e = t.patterns.entry(p).or_insert((0, 0));
                        e.0 += 1;
                        e.1 += u64::from(flagged);
                        // Caught by its rule: flagged, with one of the pattern's rules among
                        // those that fired (several only add a score below the hold mark).
                        let by_rule = flagged && fired_any(body, p.target_rules());
                        let i = t.instances.entry((p, instance)).or_default();
                        i.0 |= flagged;
                        i.1 |= by_rule;
                    }
                    None => {
                        t.normal += 1;
                        t.false_positives += u64::from(flagged);
                    }
                }
            }
            None => {
                self.errors.fetch_add(1, Relaxed);
            }
        }
    }
}

impl Tally {
    /// `n` transactions without a decision in time: counted, and recorded in the latency
    /// histogram at the timeout (what is known of them: at least that long).
    fn lost(&self, n: u64, timeout: Duration) {
        if n == 0 {
            return;
        }
        self.timeouts.fetch_add(n, Relaxed);
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = t.hist.record_n((timeout.as_micros() as u64).max(1), n);
    }
}

/// Whether a decision JSON lists one of `ids` among its fired rules (active or shadow).
/// Parsed in full, but only for injected transactions (a few in a thousand).
fn fired_any(body: &[u8], ids: &[&str]) -> bool {
    #[derive(serde::Deserialize)]
    struct Fired<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
    }
    #[derive(serde::Deserialize)]
    struct Decision<'a> {
        #[serde(borrow, default)]
        rules: Vec<Fired<'a>>,
    }
    serde_json::from_slice::<Decision<'_>>(body)
        .is_ok_and(|d| d.rules.iter().any(|r| ids.contains(&&*r.id)))
}

/// The action of a decision JSON without parsing all of it (`"action":"hold"`).
fn action_of(body: &[u8]) -> Option<usize> {
    let s = std::str::from_utf8(body).ok()?;
    let at = s.find("\"action\":\"")? + 10;
    let rest = &s[at..];
    if rest.starts_with("approve") {
        Some(0)
    } else if rest.starts_with("hold") {
        Some(1)
    } else if rest.starts_with("reject") {
        Some(2)
    } else {
        None
    }
}

/// Generates the run's `count` transactions, on the generator's timeline ending at
/// `events_end_ms` (now when unset): cards, devices, merchants and injected patterns keep
/// their real spacing (minutes to hours) however fast the run sends, and no event time lies
/// in the future.
pub fn prepare(opts: &LoadOptions) -> Prepared {
    let end_ms = opts.events_end_ms.unwrap_or_else(crate::service::now_ms);
    let mut g = Generator::new(opts.gen.clone());
    let items = crate::loadgen::timeline(&opts.gen, end_ms, opts.count)
        .into_iter()
        .map(|ts| {
            let l = g.next_at(ts);
            Item {
                id: l.txn.id.clone(),
                payload: Bytes::from(l.txn.to_json()),
                pattern: l.pattern,
                instance: l.instance,
            }
        })
        .collect();
    Prepared {
        items,
        incomplete: g.pending_instances().into_iter().collect(),
    }
}

/// Runs one load against `client`.
pub async fn run(client: async_nats::Client, opts: LoadOptions) -> Result<LoadReport, LoadError> {
    let prepared = prepare(&opts);
    run_prepared(client, opts, prepared).await
}

/// Runs one load of transactions [`prepare`]d before (so that a caller measuring the run
/// does not measure their making).
pub async fn run_prepared(
    client: async_nats::Client,
    opts: LoadOptions,
    prepared: Prepared,
) -> Result<LoadReport, LoadError> {
    let Prepared { items, incomplete } = prepared;
    let items = Arc::new(items);
    let tally = Arc::new(Tally::new());
    let sent = Arc::new(AtomicU64::new(0));
    // Stream path: decisions come back on the decision subjects; match them by id.
    type Waiting = HashMap<String, (Instant, Label)>;
    let waiting: Arc<Mutex<Waiting>> = Arc::new(Mutex::new(HashMap::with_capacity(opts.count)));
    let slots = Arc::new(Semaphore::new(match opts.mode {
        LoadMode::Closed(n) => n.max(1),
        _ => Semaphore::MAX_PERMITS,
    }));
    // Stream transactions settled (answered, lost or never published), and whether the
    // sender is done: the collector stops when both say everything is accounted for.
    let settled = Arc::new(AtomicU64::new(0));
    let sending_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let closed = matches!(opts.mode, LoadMode::Closed(_));
    let mut collector = None;
    if opts.path == LoadPath::Stream {
        let decisions = client
            .subscribe(format!("{}.>", opts.subjects.decision_prefix))
            .await
            .map_err(|e| LoadError::Nats(e.to_string()))?;
        // Refused and failed transactions go to the invalid subject, with their id: an
        // error at once, not a decision lost after the timeout.
        let invalid_subject = opts.subjects.invalid.clone();
        let invalid = client
            .subscribe(invalid_subject.clone())
            .await
            .map_err(|e| LoadError::Nats(e.to_string()))?;
        let mut sub = futures::stream::select(decisions, invalid);
        client
            .flush()
            .await
            .map_err(|e| LoadError::Nats(e.to_string()))?;
        let (tally, waiting, slots) = (tally.clone(), waiting.clone(), slots.clone());
        let (settled, sending_done, sent) = (settled.clone(), sending_done.clone(), sent.clone());
        let timeout = opts.timeout;
        collector = Some(tokio::spawn(async move {
            // Decisions overdue by more than the timeout are lost: counted as such, and
            // in a closed loop their slots come back (or the run would stall for good
            // once `concurrency` decisions went missing).
            let expire_every =
                (timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
            let mut next_expiry = Instant::now() + expire_every;
            // Acquire pairs with the sender's Release: once `sending_done` is seen, `sent`
            // is final.
            while !(sending_done.load(Acquire) && settled.load(Relaxed) >= sent.load(Relaxed)) {
                let wait = next_expiry.saturating_duration_since(Instant::now());
                match tokio::time::timeout(wait, sub.next()).await {
                    Ok(None) => break,
                    Ok(Some(m)) => {
                        let Some(id) = m
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(crate::transport::HEADER_MSG_ID))
                        else {
                            continue;
                        };
                        let entry = waiting
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(id.as_str());
                        if let Some((due, label)) = entry {
                            // Later than the timeout but before the expiry tick: lost,
                            // as it would have been a tick earlier.
                            let latency = due.elapsed();
                            if latency >= timeout {
                                tally.lost(1, timeout);
                            } else if m.subject.as_str() == invalid_subject {
                                tally.errors.fetch_add(1, Relaxed);
                            } else {
                                tally.answer(&m.payload, latency, label);
                            }
                            if closed {
                                slots.add_permits(1);
                            }
                            settled.fetch_add(1, Relaxed);
                        }
                    }
                    Err(_) => {}
                }
                if Instant::now() >= next_expiry {
                    let lost = {
                        let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
                        let before = w.len();
                        w.retain(|_, (due, _)| due.elapsed() < timeout);
                        (before - w.len()) as u64
                    };
                    if lost > 0 {
                        tally.lost(lost, timeout);
                        settled.fetch_add(lost, Relaxed);
                        if closed {
                            slots.add_permits(lost as usize);
                        }
                    }
                    next_expiry = Instant::now() + expire_every;
                }
            }
            // Nothing gives slots back any more (the subscription may have ended): a
            // sender still waiting for one gets an error instead of waiting forever.
            slots.close();
        }));
    }

    let started = Instant::now();
    let progress = opts.progress.then(|| {
        let (tally, sent) = (tally.clone(), sent.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let (mut last, mut last_at) = (0, Instant::now());
            loop {
                tick.tick().await;
                let a = tally.answered.load(Relaxed);
                // Per second of the real interval: a tick that came late covers more.
                let secs = last_at.elapsed().as_secs_f64().max(1e-3);
                last_at = Instant::now();
                eprintln!(
                    "  {:>4} s  sent {:>9}  answered {:>9}  {:>8.0} /s  errors {}  timeouts {}",
                    started.elapsed().as_secs(),
                    sent.load(Relaxed),
                    a,
                    (a - last) as f64 / secs,
                    tally.errors.load(Relaxed),
                    tally.timeouts.load(Relaxed)
                );
                last = a;
            }
        })
    });

    // Open loop: a plain thread keeps the schedule (the async runtime's timer has 1 ms
    // granularity, which would blur sub-millisecond latencies); each tick releases one send.
    let mut pacer = match opts.mode {
        LoadMode::Open(rate) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            let n = items.len();
            std::thread::spawn(move || {
                for i in 0..n {
                    let due = started + Duration::from_secs_f64(i as f64 / rate.max(1e-9));
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if tx.send(due).is_err() {
                        return;
                    }
                }
            });
            Some(rx)
        }
        _ => None,
    };
    let mut tasks = Vec::new();
    let mut prune_at = 4096;
    for (i, item) in items.iter().enumerate() {
        let scheduled = match pacer.as_mut() {
            Some(rx) => match rx.recv().await {
                Some(due) => Some(due),
                None => break,
            },
            None => None,
        };
        let permit = match opts.mode {
            // Closed only by the stream collector when it stops early (its subscription
            // ended): nothing more can be answered, so stop sending.
            LoadMode::Closed(_) => match slots.clone().acquire_owned().await {
                Ok(p) => Some(p),
                Err(_) => break,
            },
            _ => None,
        };
        // Open loop: from the scheduled time. Otherwise from the send, after a slot was
        // free (the wait for a slot is the load client's, not the engine's).
        let due = scheduled.unwrap_or_else(Instant::now);
        let label = item.pattern.map(|p| (p, item.instance));
        sent.fetch_add(1, Relaxed);
        match opts.path {
            LoadPath::Check => {
                let (client, tally, items) = (client.clone(), tally.clone(), items.clone());
                let (subject, timeout) = (opts.subjects.check.clone(), opts.timeout);
                tasks.push(tokio::spawn(async move {
                    let item = &items[i];
                    // The request carries a timeout past ours (ours ends it, as a timeout):
                    // the client's default (10 s) would cut a longer --timeout short and
                    // count an error.
                    let request = async_nats::Request::new()
                        .payload(item.payload.clone())
                        .timeout(Some(timeout + Duration::from_secs(1)));
                    // From when it was due, as its latency is (a sender behind schedule
                    // must not give a late request more time).
                    let deadline = tokio::time::Instant::from_std(due + timeout);
                    let r =
                        tokio::time::timeout_at(deadline, client.send_request(subject, request))
                            .await;
                    match r {
                        Ok(Ok(m)) => tally.answer(&m.payload, due.elapsed(), label),
                        Ok(Err(_)) => {
                            tally.errors.fetch_add(1, Relaxed);
                        }
                        Err(_) => tally.lost(1, timeout),
                    }
                    drop(permit);
                }));
            }
            LoadPath::Stream => {
                if let Some(p) = permit {
                    // Released by the collector when the decision arrives.
                    p.forget();
                }
                waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(item.id.clone(), (due, label));
                if client
                    .publish(opts.subjects.txn.clone(), item.payload.clone())
                    .await
                    .is_err()
                {
                    // Not sent: an error, not also a lost decision (unless the collector
                    // has already expired it).
                    let unsent = waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&item.id)
                        .is_some();
                    if unsent {
                        tally.errors.fetch_add(1, Relaxed);
                        settled.fetch_add(1, Relaxed);
                        if closed {
                            slots.add_permits(1);
                        }
                    }
                }
            }
        }
        // Keep the task list short in long runs; with many in flight, not a scan per send.
        if tasks.len() >= prune_at {
            tasks.retain(|t| !t.is_finished());
            prune_at = (2 * tasks.len()).max(4096);
        }
    }
    sending_done.store(true, Release);
    let _ = client.flush().await;
    for t in tasks {
        let _ = t.await;
    }
    if let Some(mut c) = collector {
        // It ends once every decision came or was given up (within the timeout); the
        // margin covers an expiry tick. Whatever is still waiting after it is lost.
        if tokio::time::timeout(opts.timeout + Duration::from_secs(2), &mut c)
            .await
            .is_err()
        {
            // Stopped before the drain below, so no decision is half-counted.
            c.abort();
            let _ = (&mut c).await;
        }
        let lost = waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .count() as u64;
        tally.lost(lost, opts.timeout);
    }
    if let Some(p) = progress {
        p.abort();
    }
    let inner = tally.inner.lock().unwrap_or_else(|e| e.into_inner());
    let elapsed = inner
        .last_answer
        .map_or(started.elapsed(), |t| t.duration_since(started));
    Ok(LoadReport {
        sent: sent.load(Relaxed),
        answered: tally.answered.load(Relaxed),
        errors: tally.errors.load(Relaxed),
        timeouts: tally.timeouts.load(Relaxed),
        elapsed,
        latency_us: inner.hist.clone(),
        actions: inner.actions,
        patterns: inner.patterns.clone(),
        instances: inner
            .instances
            .iter()
            .filter(|(key, _)| !incomplete.contains(key))
            .fold(HashMap::new(), |mut m, ((p, _), &(caught, by_rule))| {
                let e: &mut (u64, u64, u64) = m.entry(*p).or_default();
                e.0 += 1;
                e.1 += u64::from(caught);
                e.2 += u64::from(by_rule);
                m
            }),
        normal: inner.normal,
        false_positives: inner.false_positives,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_action() {
        assert_eq!(
            action_of(br#"{"id":"a","action":"hold","score":1}"#),
            Some(1)
        );
        assert_eq!(action_of(br#"{"id":"a","error":{"code":"x"}}"#), None);
    }

    #[test]
    fn precision_and_recall() {
        let mut r = LoadReport {
            sent: 10,
            answered: 10,
            errors: 0,
            timeouts: 0,
            elapsed: Duration::from_secs(1),
            latency_us: Histogram::new(3).unwrap(),
            actions: [6, 2, 2],
            patterns: HashMap::new(),
            instances: HashMap::new(),
            normal: 6,
            false_positives: 1,
        };
        r.patterns.insert(Pattern::CardTesting, (4, 3));
        r.instances.insert(Pattern::CardTesting, (2, 1, 1));
        assert!((r.precision() - 0.75).abs() < 1e-9);
        assert!((r.recall() - 0.75).abs() < 1e-9);
        assert!((r.instance_recall() - 0.5).abs() < 1e-9);
        let text = r.render();
        assert!(text.contains("card_testing"), "{text}");
        assert!(text.contains("0.500 of instances"), "{text}");
        assert!(text.contains("1 of 6, 16.67 %"), "{text}");
        // Nothing flagged: precision is undefined, not 0.
        r.patterns.insert(Pattern::CardTesting, (4, 0));
        r.false_positives = 0;
        assert!(r.render().contains("precision n/a"), "{}", r.render());
    }

    #[test]
    fn an_instance_is_caught_when_any_of_its_transactions_is_flagged() {
        let t = Tally::new();
        let approve = br#"{"id":"a","action":"approve"}"#;
        let hold = br#"{"id":"a","action":"hold"}"#;
        let by_rule = br#"{"id":"a","action":"reject","rules":[{"id":"phone_address_mismatch"},{"id":"card_testing","when":"x \"id\":\"y"}]}"#;
        let by_other = br#"{"id":"a","action":"hold","rules":[{"id":"phone_address_mismatch"}]}"#;
        let ms = Duration::from_millis(1);
        // Card testing: three approved lead-ins, then flagged by its rule; a second burst
        // never caught; a third held for another reason only.
        for _ in 0..3 {
            t.answer(approve, ms, Some((Pattern::CardTesting, 1)));
        }
        t.answer(by_rule, ms, Some((Pattern::CardTesting, 1)));
        t.answer(approve, ms, Some((Pattern::CardTesting, 2)));
        t.answer(by_other, ms, Some((Pattern::CardTesting, 3)));
        // A fourth: its rule fired but only scored, and the transaction was approved.
        let scored = br#"{"id":"a","action":"approve","rules":[{"id":"card_testing"}]}"#;
        t.answer(scored, ms, Some((Pattern::CardTesting, 4)));
        t.answer(hold, ms, None);
        t.answer(approve, ms, None);
        let inner = t.inner.lock().unwrap();
        assert_eq!(inner.patterns[&Pattern::CardTesting], (7, 2));
        assert_eq!(inner.instances[&(Pattern::CardTesting, 4)], (false, false));
        assert_eq!(inner.instances[&(Pattern::CardTesting, 1)], (true, true));
        assert_eq!(inner.instances[&(Pattern::CardTesting, 2)], (false, false));
        assert_eq!(inner.instances[&(Pattern::CardTesting, 3)], (true, false));
        assert_eq!((inner.normal, inner.false_positives), (2, 1));
    }

    /// A transaction without a decision in time is in the latency histogram at the
    /// timeout: a p99 is not taken over the fast ones only.
    #[test]
    fn timeouts_count_in_the_latency_at_the_timeout() {
        let t = Tally::new();
        let approve = br#"{"id":"a","action":"approve"}"#;
        for _ in 0..97 {
            t.answer(approve, Duration::from_millis(1), None);
        }
        t.lost(3, Duration::from_secs(2));
        let inner = t.inner.lock().unwrap();
        assert_eq!(t.timeouts.load(Relaxed), 3);
        assert!(inner.hist.value_at_quantile(0.99) >= 1_999_000);
        assert!(inner.hist.value_at_quantile(0.9) < 2_000);
    }
}
