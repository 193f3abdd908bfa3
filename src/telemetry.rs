//! Everything the service measures. This module owns every metric name, label and help
//! text; the rest of the code calls methods here. Counts are kept twice: as Prometheus
//! metrics (through the `metrics` facade, exported by metrics-exporter-prometheus) and as
//! plain atomics that tests, logs and the demo read without an exporter.
//!
//! Labels are bounded: path (2), action (3), error code (7), rule id and mode (the rule
//! count), key group signature (the group count), result (2). Never a card, device or
//! merchant value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics::{Counter, Gauge, Histogram, Unit};

use crate::decision::Action;
use crate::engine::{Evicted, StateStats};
use crate::rules::{Mode, RuleSet};
use crate::txn::ErrorCode;

/// Metric names. Dashboards, alerts and tests use exactly these.
pub mod names {
    pub const RECEIVED: &str = "fraudgate_transactions_received_total";
    pub const DECISIONS: &str = "fraudgate_decisions_total";
    pub const INVALID: &str = "fraudgate_invalid_inputs_total";
    pub const DUPLICATES: &str = "fraudgate_duplicates_total";
    pub const LATE_DROPPED: &str = "fraudgate_late_events_dropped_total";
    pub const TS_CLAMPED: &str = "fraudgate_future_timestamps_clamped_total";
    pub const PUBLISH_ERRORS: &str = "fraudgate_publish_errors_total";
    pub const DECISION_FAILURES: &str = "fraudgate_decision_failures_total";
    pub const DECISION_SECONDS: &str = "fraudgate_decision_duration_seconds";
    pub const END_TO_END_SECONDS: &str = "fraudgate_end_to_end_duration_seconds";
    pub const RULE_HITS: &str = "fraudgate_rule_hits_total";
    pub const RELOADS: &str = "fraudgate_rule_reloads_total";
    pub const RULES_INFO: &str = "fraudgate_rules_info";
    pub const RULES_LOADED: &str = "fraudgate_rules_loaded";
    pub const LAST_RELOAD: &str = "fraudgate_rules_last_reload_timestamp_seconds";
    pub const STATE_KEYS: &str = "fraudgate_state_keys";
    pub const STATE_BYTES: &str = "fraudgate_state_bytes";
    pub const DEDUPE_ENTRIES: &str = "fraudgate_dedupe_entries";
    pub const EVICTED_KEYS: &str = "fraudgate_state_evicted_keys_total";
    pub const EVICTED_IDS: &str = "fraudgate_dedupe_evicted_total";
    pub const CAPPED_KEYS: &str = "fraudgate_state_capped_keys_total";
    pub const REPLAYED: &str = "fraudgate_replayed_transactions_total";
    pub const ACK_ERRORS: &str = "fraudgate_jetstream_ack_errors_total";
    pub const IN_FLIGHT: &str = "fraudgate_in_flight";
    pub const NATS_CONNECTED: &str = "fraudgate_nats_connected";
    pub const NATS_RECONNECTS: &str = "fraudgate_nats_reconnects_total";
    pub const NATS_DISCONNECTS: &str = "fraudgate_nats_disconnects_total";
    pub const NATS_SLOW_CONSUMER: &str = "fraudgate_nats_slow_consumer_total";
    pub const BUILD_INFO: &str = "fraudgate_build_info";
    pub const RULES_DIR_VALID: &str = "fraudgate_rules_dir_valid";
    pub const NATS_PENDING: &str = "fraudgate_nats_pending_messages";
    pub const SNAPSHOTS: &str = "fraudgate_snapshots_total";
    pub const SNAPSHOT_BYTES: &str = "fraudgate_snapshot_bytes";
    pub const SNAPSHOT_SECONDS: &str = "fraudgate_snapshot_duration_seconds";
    pub const LAST_SNAPSHOT: &str = "fraudgate_snapshot_last_success_timestamp_seconds";
    pub const STALLED: &str = "fraudgate_stalled";
    pub const STALLS: &str = "fraudgate_stalls_total";
}

/// The `kind` label of the stall metrics, in [`Counters::stall`]'s order.
const STALL_KINDS: [&str; 2] = ["worker", "runtime"];

/// How long an unset gauge survives in the exporter.
pub const GAUGE_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// Histogram buckets for every `*_duration_seconds` metric: 10 µs to 1 s, finer around
/// 100 µs, the engine's own share of a request that the latency target allows.
pub const DURATION_BUCKETS: [f64; 18] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_075, 0.000_1, 0.000_15, 0.000_25, 0.000_5, 0.001, 0.002_5,
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot serve metrics on {addr}: {message}")]
    Exporter { addr: SocketAddr, message: String },
}

/// Installs the Prometheus exporter serving `/metrics` on `addr` and describes every
/// metric. Call before creating [`Counters`] (handles made earlier are no-ops).
///
/// The exporter runs on a thread of its own with a one-thread runtime, never on the
/// service's: when a bug blocks the service's threads, `/metrics` still answers, with the
/// watchdog's stall gauges, instead of going dark (the exporter's own `install` would
/// spawn it on the caller's runtime).
pub fn install_exporter(addr: SocketAddr) -> Result<(), TelemetryError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use metrics_util::MetricKindMask;
    let fail = |message: String| TelemetryError::Exporter { addr, message };
    // Built on the exporter's thread, inside its runtime, and the outcome sent back: the
    // listener is bound there (a taken port fails this call), and a runtime that could not
    // start serving is dropped there too, never inside the caller's async context (where
    // tokio refuses to drop a runtime).
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("fraudgate-metrics".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let built = {
                let _in = runtime.enter();
                PrometheusBuilder::new()
                    .with_http_listener(addr)
                    // Gauges nobody sets for 10 minutes go (e.g. the info series of a
                    // replaced rules version); live gauges are refreshed by
                    // `Counters::refresh` on every sweep.
                    .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
                    .set_buckets_for_metric(
                        Matcher::Suffix("_duration_seconds".into()),
                        &DURATION_BUCKETS,
                    )
                    .and_then(|b| b.build())
            };
            match built {
                Ok((recorder, exporter)) => {
                    if tx.send(Ok(recorder)).is_ok() {
                        if let Err(e) = runtime.block_on(exporter) {
                            tracing::error!(error = ?e, "the metrics exporter stopped");
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        })
        .map_err(|e| fail(e.to_string()))?;
    let recorder = rx
        .recv()
        .map_err(|_| fail("the exporter thread ended".into()))?
        .map_err(fail)?;
    metrics::set_global_recorder(recorder).map_err(|e| fail(e.to_string()))?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(
        SNAPSHOTS,
        Unit::Count,
        "State snapshots written, by result (success, failure)."
    );
    describe_gauge!(
        SNAPSHOT_BYTES,
        Unit::Bytes,
        "Size of the last state snapshot written."
    );
    describe_gauge!(
        SNAPSHOT_SECONDS,
        Unit::Seconds,
        "Time the last state snapshot took (copy, encode, write, fsync)."
    );
    describe_gauge!(
        LAST_SNAPSHOT,
        Unit::Seconds,
        "Unix time of the last state snapshot written successfully."
    );
    describe_counter!(
        RECEIVED,
        Unit::Count,
        "Messages taken from NATS, by path (check = request-reply, stream = fraud.txn)."
    );
    describe_counter!(
        DECISIONS,
        Unit::Count,
        "Decisions published, by path and action (retries answered from the dedupe table included)."
    );
    describe_counter!(
        INVALID,
        Unit::Count,
        "Inputs refused, by stable error code."
    );
    describe_counter!(
        REPLAYED,
        Unit::Count,
        "Transactions re-applied to the windows from JetStream at start (after the snapshot's cut), not decided or published again, by path."
    );
    describe_counter!(
        ACK_ERRORS,
        Unit::Count,
        "JetStream acknowledgements that could not be sent (the message is delivered again and answered from the dedupe table)."
    );
    describe_counter!(
        DUPLICATES,
        Unit::Count,
        "Retries answered from the dedupe table (counted once in the windows)."
    );
    describe_counter!(
        LATE_DROPPED,
        Unit::Count,
        "Events older than their key's retention: decided, added to nothing."
    );
    describe_counter!(
        TS_CLAMPED,
        Unit::Count,
        "Event times too far in the future, replaced by the receive time."
    );
    describe_counter!(
        PUBLISH_ERRORS,
        Unit::Count,
        "Decisions or error replies that could not be published."
    );
    describe_counter!(
        DECISION_FAILURES,
        Unit::Count,
        "Transactions the engine failed to decide (a bug), by path: answered with an `internal` error, or forwarded to the invalid subject."
    );
    describe_histogram!(
        DECISION_SECONDS,
        Unit::Seconds,
        "Engine time of one decision (windows, rules, dedupe), by path."
    );
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "From message receipt to the decision published, by path."
    );
    describe_counter!(RULE_HITS, Unit::Count, "Rules that fired, by rule id, mode (active or shadow) and the rule's own action (block, reject, hold, allow or score).");
    describe_counter!(
        RELOADS,
        Unit::Count,
        "Rule reloads, by result (success or failure)."
    );
    describe_gauge!(
        RULES_INFO,
        "The loaded rules version (1 for the active version, 0 for earlier ones)."
    );
    describe_gauge!(
        RULES_LOADED,
        Unit::Count,
        "Rules in the active set, by mode."
    );
    describe_gauge!(
        LAST_RELOAD,
        Unit::Seconds,
        "Unix time of the last successful rule load."
    );
    describe_gauge!(
        STATE_KEYS,
        Unit::Count,
        "Tracked keys, by key group (card, device, merchant, ...)."
    );
    describe_gauge!(
        STATE_BYTES,
        Unit::Bytes,
        "Estimated window-state memory, by key group."
    );
    describe_gauge!(
        DEDUPE_ENTRIES,
        Unit::Count,
        "Transaction ids remembered for retries."
    );
    describe_counter!(
        EVICTED_KEYS,
        Unit::Count,
        "Keys evicted after being idle longer than their longest window."
    );
    describe_counter!(
        CAPPED_KEYS,
        Unit::Count,
        "Keys evicted (least recently used first) because their key group reached max_keys, by group."
    );
    describe_counter!(
        EVICTED_IDS,
        Unit::Count,
        "Transaction ids evicted after the dedupe horizon."
    );
    describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Transactions taken in and not yet decided (queued in workers), by path."
    );
    describe_gauge!(
        STALLED,
        "Stalled now, by kind: decision workers holding one transaction longer than [service] stall_after (worker), or 1 while the async runtime has not run its heartbeat task for that long, its threads blocked (runtime)."
    );
    describe_counter!(
        STALLS,
        Unit::Count,
        "Stalls the watchdog found, by kind (worker, runtime): the transactions of a stalled worker's cards wait, and a stalled runtime takes nothing in."
    );
    describe_gauge!(
        NATS_CONNECTED,
        "1 while connected to NATS, 0 while disconnected."
    );
    describe_counter!(
        NATS_RECONNECTS,
        Unit::Count,
        "Successful reconnects to NATS."
    );
    describe_counter!(NATS_DISCONNECTS, Unit::Count, "Disconnects from NATS.");
    describe_counter!(
        NATS_SLOW_CONSUMER,
        Unit::Count,
        "Slow-consumer events: the NATS client dropped messages of a full subscription."
    );
    describe_gauge!(BUILD_INFO, "Build information (always 1).");
    describe_gauge!(RULES_DIR_VALID, "1 while the rule directory compiles, 0 after a failed load (the previous rules stay active).");
    describe_gauge!(NATS_PENDING, Unit::Count, "Messages the NATS client has received and the engine has not taken yet (subscription buffers; with JetStream, requests only: the stream's backlog is the consumer's pending count on the server).");
}

/// Which intake a transaction came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Request-reply.
    Check,
    /// Asynchronous stream.
    Stream,
}

impl Path {
    pub const ALL: [Path; 2] = [Path::Check, Path::Stream];
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

/// A counter kept both as an atomic (readable in-process) and as a Prometheus metric.
#[derive(Debug)]
struct Both {
    n: AtomicU64,
    metric: Counter,
}

impl Both {
    fn new(metric: Counter) -> Both {
        // Registering with 0 makes the series exist from the start (no absent series).
        metric.increment(0);
        Both {
            n: AtomicU64::new(0),
            metric,
        }
    }
    fn inc(&self) {
        self.n.fetch_add(1, Relaxed);
        self.metric.increment(1);
    }
    fn add(&self, v: u64) {
        self.n.fetch_add(v, Relaxed);
        self.metric.increment(v);
    }
    fn get(&self) -> u64 {
        self.n.load(Relaxed)
    }
}

/// Handles of the active rule set's per-rule metrics.
#[derive(Default)]
struct RuleMetrics {
    version: String,
    /// Rules by mode (active, shadow).
    loaded: [usize; 2],
    /// Unix seconds of the load.
    loaded_at: f64,
    hits: HashMap<Arc<str>, Counter>,
}

/// Service counters and metric handles. Cheap to bump from any task.
pub struct Counters {
    received: [Both; 2],
    decided: [[Both; 3]; 2],
    invalid: [Both; 7],
    duplicates: Both,
    late_dropped: Both,
    ts_clamped: Both,
    publish_errors: Both,
    decision_failures: [Both; 2],
    reloads_ok: Both,
    reloads_failed: Both,
    disconnects: Both,
    connects: AtomicU64,
    reconnects: Counter,
    connected: Gauge,
    is_connected: std::sync::atomic::AtomicBool,
    dir_valid: std::sync::atomic::AtomicBool,
    slow_consumer: Both,
    no_reply: AtomicU64,
    evicted_keys: Counter,
    evicted_ids: Counter,
    snapshots_ok: Both,
    snapshots_failed: Both,
    /// The last snapshot written: bytes, seconds it took, when (unix seconds). Set again on
    /// every refresh: while snapshots fail, the exporter would otherwise drop these gauges
    /// after its idle timeout, and "time since the last snapshot" would go blank exactly
    /// when it matters.
    last_snapshot: std::sync::Mutex<Option<(u64, f64, f64)>>,
    replayed: [Both; 2],
    ack_errors: Both,
    /// Stalls reported by the watchdog: [worker, runtime].
    stalls: [Both; 2],
    stalled: [Gauge; 2],
    decision_seconds: [Histogram; 2],
    end_to_end_seconds: [Histogram; 2],
    in_flight: [Gauge; 2],
    queued: [std::sync::atomic::AtomicI64; 2],
    rules: ArcSwap<RuleMetrics>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters::new()
    }
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
    pub ts_clamped: u64,
    /// Invalid inputs by error code, in [`ErrorCode::ALL`] order.
    pub invalid: [u64; 7],
    pub publish_errors: u64,
    /// Decisions that failed (a bug): [check, stream].
    pub decision_failures: [u64; 2],
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub disconnects: u64,
    pub connects: u64,
    pub slow_consumer: u64,
    pub no_reply: u64,
    pub snapshots_ok: u64,
    pub snapshots_failed: u64,
    /// Re-applied at start from JetStream: [check, stream].
    pub replayed: [u64; 2],
    pub ack_errors: u64,
    /// Stalls reported by the watchdog: [worker, runtime].
    pub stalls: [u64; 2],
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
    /// Registers every fixed series (with the installed recorder, if any).
    pub fn new() -> Counters {
        use metrics::{counter, gauge, histogram};
        use names::*;
        let path_counter =
            |name: &'static str| Path::ALL.map(|p| Both::new(counter!(name, "path" => p.as_str())));
        let decided = Path::ALL.map(|p| {
            Action::ALL.map(|a| {
                Both::new(counter!(DECISIONS, "path" => p.as_str(), "action" => a.as_str()))
            })
        });
        let invalid = ErrorCode::ALL.map(|c| Both::new(counter!(INVALID, "code" => c.as_str())));
        let reloads = |r: &'static str| Both::new(counter!(RELOADS, "result" => r));
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        let connected = gauge!(NATS_CONNECTED);
        connected.set(0.0);
        let reconnects = counter!(NATS_RECONNECTS);
        reconnects.increment(0);
        let evicted_keys = counter!(EVICTED_KEYS);
        evicted_keys.increment(0);
        let evicted_ids = counter!(EVICTED_IDS);
        evicted_ids.increment(0);
        let in_flight = Path::ALL.map(|p| gauge!(IN_FLIGHT, "path" => p.as_str()));
        for g in &in_flight {
            g.set(0.0);
        }
        Counters {
            received: path_counter(RECEIVED),
            decided,
            invalid,
            duplicates: Both::new(counter!(DUPLICATES)),
            late_dropped: Both::new(counter!(LATE_DROPPED)),
            ts_clamped: Both::new(counter!(TS_CLAMPED)),
            publish_errors: Both::new(counter!(PUBLISH_ERRORS)),
            decision_failures: path_counter(DECISION_FAILURES),
            reloads_ok: reloads("success"),
            reloads_failed: reloads("failure"),
            disconnects: Both::new(counter!(NATS_DISCONNECTS)),
            connects: AtomicU64::new(0),
            reconnects,
            connected,
            is_connected: std::sync::atomic::AtomicBool::new(false),
            dir_valid: std::sync::atomic::AtomicBool::new(true),
            slow_consumer: Both::new(counter!(NATS_SLOW_CONSUMER)),
            no_reply: AtomicU64::new(0),
            evicted_keys,
            evicted_ids,
            snapshots_ok: Both::new(counter!(SNAPSHOTS, "result" => "success")),
            snapshots_failed: Both::new(counter!(SNAPSHOTS, "result" => "failure")),
            last_snapshot: std::sync::Mutex::new(None),
            replayed: path_counter(REPLAYED),
            ack_errors: Both::new(counter!(ACK_ERRORS)),
            stalls: STALL_KINDS.map(|k| Both::new(counter!(STALLS, "kind" => k))),
            stalled: STALL_KINDS.map(|k| {
                let g = gauge!(STALLED, "kind" => k);
                g.set(0.0);
                g
            }),
            decision_seconds: Path::ALL.map(|p| histogram!(DECISION_SECONDS, "path" => p.as_str())),
            end_to_end_seconds: Path::ALL
                .map(|p| histogram!(END_TO_END_SECONDS, "path" => p.as_str())),
            in_flight,
            queued: Default::default(),
            rules: ArcSwap::from_pointee(RuleMetrics::default()),
        }
    }

    pub fn received(&self, p: Path) {
        self.received[p.idx()].inc();
    }
    pub fn decided(&self, p: Path, a: Action) {
        self.decided[p.idx()][action_idx(a)].inc();
    }
    pub fn replayed(&self, path: Path, n: u64) {
        self.replayed[path.idx()].add(n);
    }
    pub fn ack_error(&self) {
        self.ack_errors.inc();
    }
    /// The watchdog found a worker (`runtime` false) or the runtime stalled.
    pub fn stall(&self, runtime: bool) {
        self.stalls[runtime as usize].inc();
    }
    /// Stalled now: how many workers, and whether the runtime (set by the watchdog on
    /// every tick, so the gauges stay fresh).
    pub fn stalled_now(&self, workers: usize, runtime: bool) {
        self.stalled[0].set(workers as f64);
        self.stalled[1].set(if runtime { 1.0 } else { 0.0 });
    }
    pub fn duplicate(&self) {
        self.duplicates.inc();
    }
    pub fn too_late(&self) {
        self.late_dropped.inc();
    }
    pub fn ts_clamped(&self) {
        self.ts_clamped.inc();
    }
    pub fn invalid(&self, c: ErrorCode) {
        self.invalid[code_idx(c)].inc();
    }
    pub fn publish_error(&self) {
        self.publish_errors.inc();
    }
    pub fn decision_failed(&self, p: Path) {
        self.decision_failures[p.idx()].inc();
    }
    pub fn reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.inc();
        } else {
            self.reloads_failed.inc();
        }
    }
    pub fn disconnected(&self) {
        self.disconnects.inc();
        self.is_connected.store(false, Relaxed);
        self.connected.set(0.0);
    }
    pub fn connected(&self) {
        if self.connects.fetch_add(1, Relaxed) > 0 {
            self.reconnects.increment(1);
        }
        self.is_connected.store(true, Relaxed);
        self.connected.set(1.0);
    }
    pub fn slow_consumer(&self) {
        self.slow_consumer.inc();
    }
    pub fn no_reply(&self) {
        self.no_reply.fetch_add(1, Relaxed);
    }
    /// Engine time of one decision.
    pub fn decision_time(&self, p: Path, secs: f64) {
        self.decision_seconds[p.idx()].record(secs);
    }
    /// Receipt to publish.
    pub fn end_to_end_time(&self, p: Path, secs: f64) {
        self.end_to_end_seconds[p.idx()].record(secs);
    }
    /// Whether the last load of the rule directory compiled.
    pub fn rules_dir_valid(&self, ok: bool) {
        self.dir_valid.store(ok, Relaxed);
        metrics::gauge!(names::RULES_DIR_VALID).set(if ok { 1.0 } else { 0.0 });
    }

    /// NATS state, read from the client (events can be missed): connected, and messages
    /// received by the client but not yet taken by the intake.
    /// The connection state, and the messages the client holds that intake has not taken:
    /// `in_messages` received on the subscriptions counted, less those taken and those
    /// dropped as a slow consumer. `stream_counted`: whether `in_messages` includes the
    /// stream connection (core NATS). With JetStream it must not: that connection also
    /// receives pull statuses, heartbeats, API replies and the start's replay, which no
    /// intake takes, and the gauge grew without end.
    pub fn nats(&self, connected: bool, in_messages: u64, stream_counted: bool) {
        self.is_connected.store(connected, Relaxed);
        self.connected.set(if connected { 1.0 } else { 0.0 });
        metrics::gauge!(names::NATS_PENDING).set(self.pending(in_messages, stream_counted) as f64);
    }

    fn pending(&self, in_messages: u64, stream_counted: bool) -> u64 {
        let taken = self.received[0].get() + stream_counted as u64 * self.received[1].get();
        in_messages
            .saturating_sub(taken)
            .saturating_sub(self.slow_consumer.get())
    }

    /// Transactions handed to (positive) or taken by (negative) the workers.
    pub fn queued(&self, p: Path, delta: i64) {
        self.queued[p.idx()].fetch_add(delta, Relaxed);
    }
    /// Transactions handed to the workers and not decided yet.
    pub fn queued_now(&self, p: Path) -> i64 {
        self.queued[p.idx()].load(Relaxed).max(0)
    }

    /// Sets the in-flight gauges from the queued counts.
    pub fn publish_queued(&self) {
        for p in Path::ALL {
            self.in_flight[p.idx()].set(self.queued_now(p) as f64);
        }
    }

    /// A rule fired (counted for fresh decisions, not for answered retries).
    pub fn rule_hit(&self, id: &str) {
        if let Some(c) = self.rules.load().hits.get(id) {
            c.increment(1);
        }
    }

    /// A rule set became active: per-rule series, version info, rule counts, load time.
    pub fn rules_loaded(&self, rs: &RuleSet, unix_secs: f64) {
        use metrics::{counter, gauge};
        use names::*;
        let previous = self.rules.load();
        if !previous.version.is_empty() && previous.version != rs.version {
            gauge!(RULES_INFO, "version" => previous.version.clone()).set(0.0);
        }
        let loaded = [Mode::Active, Mode::Shadow]
            .map(|mode| rs.rules.iter().filter(|r| r.mode == mode).count());
        let hits = rs
            .rules
            .iter()
            .map(|r| {
                let action = match r.action {
                    Some(crate::rules::RuleAction::Block) => "block",
                    Some(crate::rules::RuleAction::Reject) => "reject",
                    Some(crate::rules::RuleAction::Hold) => "hold",
                    Some(crate::rules::RuleAction::Allow) => "allow",
                    None => "score",
                };
                let c = counter!(RULE_HITS, "rule" => r.id.to_string(), "mode" => mode_str(r.mode), "action" => action);
                c.increment(0);
                (r.id.clone(), c)
            })
            .collect();
        self.rules.store(Arc::new(RuleMetrics {
            version: rs.version.clone(),
            loaded,
            loaded_at: unix_secs,
            hits,
        }));
        self.refresh();
    }

    /// Sets every gauge that otherwise changes only on events (rules loaded, NATS state,
    /// build info), so the exporter's idle timeout keeps only live series.
    pub fn refresh(&self) {
        use metrics::gauge;
        use names::*;
        let r = self.rules.load();
        if !r.version.is_empty() {
            gauge!(RULES_INFO, "version" => r.version.clone()).set(1.0);
            for (i, mode) in [Mode::Active, Mode::Shadow].into_iter().enumerate() {
                gauge!(RULES_LOADED, "mode" => mode_str(mode)).set(r.loaded[i] as f64);
            }
            gauge!(LAST_RELOAD).set(r.loaded_at);
        }
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        gauge!(RULES_DIR_VALID).set(if self.dir_valid.load(Relaxed) {
            1.0
        } else {
            0.0
        });
        self.connected.set(if self.is_connected.load(Relaxed) {
            1.0
        } else {
            0.0
        });
        self.snapshot_gauges();
    }

    /// A state snapshot written: its size, how long it took, when.
    pub fn snapshot_written(&self, bytes: u64, secs: f64, unix_secs: f64) {
        self.snapshots_ok.inc();
        *self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((bytes, secs, unix_secs));
        self.snapshot_gauges();
    }

    fn snapshot_gauges(&self) {
        use metrics::gauge;
        use names::*;
        let last = *self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((bytes, secs, unix_secs)) = last {
            gauge!(SNAPSHOT_BYTES).set(bytes as f64);
            gauge!(SNAPSHOT_SECONDS).set(secs);
            gauge!(LAST_SNAPSHOT).set(unix_secs);
        }
    }

    /// A state snapshot that could not be written.
    pub fn snapshot_failed(&self) {
        self.snapshots_failed.inc();
    }

    /// Window-state sizes (from `Engine::stats`) and what a sweep evicted.
    pub fn state(&self, stats: &StateStats, evicted: &Evicted) {
        use metrics::gauge;
        use names::*;
        for (group, keys, bytes) in &stats.groups {
            gauge!(STATE_KEYS, "group" => group.clone()).set(*keys as f64);
            gauge!(STATE_BYTES, "group" => group.clone()).set(*bytes as f64);
        }
        gauge!(DEDUPE_ENTRIES).set(stats.dedupe_entries as f64);
        // Every group gets its series (0 until capped), so dashboards and alerts see it.
        for (group, _, _) in &stats.groups {
            let n = stats
                .capped
                .iter()
                .find(|(g, _)| g == group)
                .map_or(0, |c| c.1);
            metrics::counter!(CAPPED_KEYS, "group" => group.clone()).absolute(n);
        }
        self.evicted_keys.increment(evicted.keys as u64);
        self.evicted_ids.increment(evicted.dedupe as u64);
    }

    pub fn snapshot(&self) -> Snapshot {
        let arr3 = |a: &[Both; 3]| [a[0].get(), a[1].get(), a[2].get()];
        let mut invalid = [0; 7];
        for (i, a) in self.invalid.iter().enumerate() {
            invalid[i] = a.get();
        }
        Snapshot {
            received_check: self.received[0].get(),
            received_stream: self.received[1].get(),
            decided_check: arr3(&self.decided[0]),
            decided_stream: arr3(&self.decided[1]),
            duplicates: self.duplicates.get(),
            too_late: self.late_dropped.get(),
            ts_clamped: self.ts_clamped.get(),
            invalid,
            publish_errors: self.publish_errors.get(),
            decision_failures: [
                self.decision_failures[0].get(),
                self.decision_failures[1].get(),
            ],
            reloads_ok: self.reloads_ok.get(),
            reloads_failed: self.reloads_failed.get(),
            disconnects: self.disconnects.get(),
            connects: self.connects.load(Relaxed),
            slow_consumer: self.slow_consumer.get(),
            no_reply: self.no_reply.load(Relaxed),
            snapshots_ok: self.snapshots_ok.get(),
            snapshots_failed: self.snapshots_failed.get(),
            replayed: [self.replayed[0].get(), self.replayed[1].get()],
            ack_errors: self.ack_errors.get(),
            stalls: [self.stalls[0].get(), self.stalls[1].get()],
        }
    }

    /// Adds to the slow-consumer count (for events that report several drops).
    pub fn slow_consumer_n(&self, n: u64) {
        self.slow_consumer.add(n);
    }
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Active => "active",
        Mode::Shadow => "shadow",
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

    #[test]
    fn pending_counts_what_was_received_and_neither_taken_nor_dropped() {
        let c = Counters::new();
        for _ in 0..3 {
            c.received(Path::Check);
        }
        for _ in 0..5 {
            c.received(Path::Stream);
        }
        c.slow_consumer_n(2);
        // Core NATS: both connections' messages, both paths' intake.
        assert_eq!(c.pending(20, true), 10);
        // JetStream: the request connection only; what the stream intake took is not
        // subtracted from it.
        assert_eq!(c.pending(20, false), 15);
        assert_eq!(c.pending(4, true), 0, "never below zero");
    }

    #[test]
    fn every_name_is_prometheus_style() {
        use names::*;
        for n in [
            RECEIVED,
            DECISIONS,
            INVALID,
            DUPLICATES,
            LATE_DROPPED,
            TS_CLAMPED,
            PUBLISH_ERRORS,
            DECISION_FAILURES,
            RULE_HITS,
            RELOADS,
            EVICTED_KEYS,
            EVICTED_IDS,
            CAPPED_KEYS,
            REPLAYED,
            ACK_ERRORS,
            NATS_RECONNECTS,
            NATS_DISCONNECTS,
            NATS_SLOW_CONSUMER,
            STALLS,
        ] {
            assert!(n.starts_with("fraudgate_") && n.ends_with("_total"), "{n}");
        }
        for n in [DECISION_SECONDS, END_TO_END_SECONDS, LAST_RELOAD] {
            assert!(n.ends_with("_seconds"), "{n}");
        }
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(DURATION_BUCKETS[0], 0.000_01);
        assert_eq!(*DURATION_BUCKETS.last().unwrap(), 1.0);
    }
}
