//! Everything the service measures. This module owns every metric name, label and help
//! text; the rest of the code calls methods here. Counts are kept twice: as Prometheus
//! metrics (through the `metrics` facade, exported by metrics-exporter-prometheus) and as
//! plain atomics that tests, logs and the demo read without an exporter.
//!
//! Labels are bounded: path (2), action (3, or 4 with `unknown` for outcomes), error code
//! (8), outcome (4), rule id and mode (the rule count; for outcomes, at most
//! [`MAX_OUTCOME_RULES`] ids beyond the active set), key group signature (the group
//! count), result (2). Never a card, device or merchant value, nor a transaction id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics::{Counter, Histogram, Unit};

use crate::decision::{Action, FiredRule};
use crate::engine::{Evicted, StateStats};
use crate::feedback::{Feedback, Kind};
use crate::rules::{Mode, RuleAction, RuleSet};
use crate::txn::ErrorCode;

/// Metric names. Dashboards, alerts and tests use exactly these.
pub mod names {
    pub const RECEIVED: &str = "fraudgate_transactions_received_total";
    pub const DECISIONS: &str = "fraudgate_decisions_total";
    pub const INVALID: &str = "fraudgate_invalid_inputs_total";
    pub const DUPLICATES: &str = "fraudgate_duplicates_total";
    pub const NO_REPLY: &str = "fraudgate_requests_without_reply_total";
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
    pub const ACKS_WITHHELD: &str = "fraudgate_jetstream_acks_withheld_total";
    pub const IN_FLIGHT: &str = "fraudgate_in_flight";
    pub const UNPUBLISHED: &str = "fraudgate_decisions_unpublished";
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
    pub const SNAPSHOT_INTERVAL: &str = "fraudgate_snapshot_interval_seconds";
    pub const STALLED: &str = "fraudgate_stalled";
    pub const STALLS: &str = "fraudgate_stalls_total";
    pub const OUTCOMES: &str = "fraudgate_outcomes_total";
    pub const RULE_OUTCOMES: &str = "fraudgate_rule_outcomes_total";
    pub const OUTCOMES_REPEATED: &str = "fraudgate_outcomes_repeated_total";
    pub const OUTCOMES_REFUSED: &str = "fraudgate_outcomes_refused_total";
    pub const OUTCOMES_LOST: &str = "fraudgate_outcomes_lost_total";
}

/// The `action` label of [`names::OUTCOMES`]: the reported decision's action, or
/// `unknown` for an outcome sent without its decision.
const OUTCOME_ACTIONS: [&str; 4] = ["approve", "hold", "reject", "unknown"];

/// Rule ids outside the active rule set (when first seen) that get a label of their own
/// in [`names::RULE_OUTCOMES`] (rules since removed or renamed: outcomes come weeks after
/// their decisions); past that, [`OTHER_RULES`]. The label stays bounded whatever is sent.
pub const MAX_OUTCOME_RULES: usize = 512;

/// The `rule` label of outcomes past [`MAX_OUTCOME_RULES`]: no rule id can be written so.
pub const OTHER_RULES: &str = "(other)";

/// The `reason` label of [`names::OUTCOMES_LOST`].
const OUTCOME_LOSSES: [&str; 2] = ["dropped", "unanswered"];

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
    describe_gauge!(
        SNAPSHOT_INTERVAL,
        Unit::Seconds,
        "Configured time between state snapshots (absent when snapshots are off)."
    );
    describe_counter!(
        RECEIVED,
        Unit::Count,
        "Messages taken from NATS, by path (check = request-reply, stream = fraud.txn)."
    );
    describe_counter!(
        DECISIONS,
        Unit::Count,
        "Decisions published, by path and action (retries answered from the dedupe table included, and requests without a reply subject, which are answered to no one: see fraudgate_requests_without_reply_total)."
    );
    describe_counter!(
        INVALID,
        Unit::Count,
        "Inputs refused, by stable error code."
    );
    describe_counter!(
        REPLAYED,
        Unit::Count,
        "Transactions re-applied to the windows from JetStream at start (after the snapshot's cut; those the snapshot already held are not counted), not decided or published again, by path."
    );
    describe_counter!(
        ACK_ERRORS,
        Unit::Count,
        "JetStream acknowledgements that could not be sent (the message is delivered again and answered from the dedupe table)."
    );
    describe_counter!(
        ACKS_WITHHELD,
        Unit::Count,
        "JetStream acknowledgements not sent because the server did not confirm, on the same connection, that it had read the message's decision (a reconnect in between, or no answer within ack_wait): the message is delivered again and answered from the dedupe table."
    );
    describe_counter!(
        DUPLICATES,
        Unit::Count,
        "Retries answered from the dedupe table (counted once in the windows)."
    );
    describe_counter!(
        NO_REPLY,
        Unit::Count,
        "Requests on the check subject without a reply subject: decided and counted (in decisions too), answered to no one (a requester that published instead of requesting)."
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
        "Decisions or error replies that could not be published, and transactions lost with a decision worker that died."
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
        "From the message taken off its NATS subscription to the decision handed to the client for publishing, by path. Time waiting in the client's subscription buffer is not in it (see fraudgate_nats_pending_messages)."
    );
    describe_counter!(RULE_HITS, Unit::Count, "Rules that fired, by rule id, mode (active or shadow) and the rule's own action (block, reject, hold, allow or score).");
    describe_counter!(
        RELOADS,
        Unit::Count,
        "Rule reloads, by result: success (new rules active) or failure (the files do not compile; the previous rules stay). A reload that finds the files unchanged counts as neither."
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
        "Unix time of the last rule load that changed the active rules (a reload that finds the files unchanged does not count)."
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
        UNPUBLISHED,
        Unit::Count,
        "Stream decisions (and refusals of stream transactions) made and waiting for the stream connection to take them (down, reconnecting, or a server not reading); the stream intake pauses once [service] queue_depth wait, until half are out. Requests are answered meanwhile."
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
        "1 while both NATS connections that decide (request-reply, stream) are up, 0 while one is down (the outcome connection is not counted: its losses are fraudgate_outcomes_lost_total)."
    );
    describe_counter!(
        NATS_RECONNECTS,
        Unit::Count,
        "Successful reconnects to NATS (a connection's first connect is not counted)."
    );
    describe_counter!(NATS_DISCONNECTS, Unit::Count, "Disconnects from NATS.");
    describe_counter!(
        NATS_SLOW_CONSUMER,
        Unit::Count,
        "Slow-consumer events: the NATS client dropped messages of a full subscription. A lower bound: the client reports drops through a small queue and loses reports in a burst."
    );
    describe_counter!(
        OUTCOMES,
        Unit::Count,
        "Outcomes reported on the outcome subject (chargeback, fraud, refund, genuine), by outcome and by the action of the decision sent with it (unknown without one). Counted once per transaction and outcome (a repeat within 24 hours is counted in fraudgate_outcomes_repeated_total)."
    );
    describe_counter!(
        RULE_OUTCOMES,
        Unit::Count,
        "Outcomes by rule that fired in the reported decision (active and shadow), by rule id, the rule's mode in that decision, and outcome: with fraudgate_rule_hits_total, a rule's precision on live traffic. Ids outside the active set get labels of their own up to 512, then count as `(other)`."
    );
    describe_counter!(
        OUTCOMES_REPEATED,
        Unit::Count,
        "Outcomes reported again for the same transaction within 24 hours to the same engine (retries, a report read twice): not counted again."
    );
    describe_counter!(
        OUTCOMES_REFUSED,
        Unit::Count,
        "Outcome messages refused, by stable error code (answered with the error, or forwarded to the invalid subject)."
    );
    describe_counter!(
        OUTCOMES_LOST,
        Unit::Count,
        "Outcome messages lost, by reason: dropped by their full subscription (slow consumer on the outcome connection; not in fraudgate_nats_slow_consumer_total, which is about transactions), or unanswered (the answer or the forward to the invalid subject could not be published)."
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

/// Every connection that decides (all but the outcome connection) is up: what
/// `fraudgate_nats_connected` says, and what the disconnected page is about. The outcome
/// connection's state is logged, and its losses are counted, apart.
fn deciding_up(links: &[(String, u64, bool)]) -> bool {
    links.iter().filter(|l| l.0 != "outcome").all(|l| l.2)
}

fn kind_idx(k: Kind) -> usize {
    Kind::ALL.iter().position(|x| *x == k).unwrap_or(0)
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
    /// Key group signatures (the `group` label).
    groups: Vec<String>,
}

/// Service counters and metric handles. Cheap to bump from any task.
pub struct Counters {
    received: [Both; 2],
    decided: [[Both; 3]; 2],
    invalid: [Both; ErrorCode::ALL.len()],
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
    /// Per NATS connection (by role: check, stream, outcome): connects seen, and up now.
    links: std::sync::Mutex<Vec<(String, u64, bool)>>,
    is_connected: std::sync::atomic::AtomicBool,
    dir_valid: std::sync::atomic::AtomicBool,
    slow_consumer: Both,
    /// Per path: slow-consumer drops reported on its connection, and messages its
    /// connection counted that were neither taken nor reported dropped, as found the last
    /// time its subscription was empty (drops whose report the client lost).
    dropped: [AtomicU64; 2],
    unseen: [AtomicU64; 2],
    no_reply: Both,
    evicted_keys: Counter,
    evicted_ids: Counter,
    snapshots_ok: Both,
    snapshots_failed: Both,
    /// The last snapshot written: bytes, seconds it took, when (unix seconds). Set again on
    /// every refresh: while snapshots fail, the exporter would otherwise drop these gauges
    /// after its idle timeout, and "time since the last snapshot" would go blank exactly
    /// when it matters.
    last_snapshot: std::sync::Mutex<Option<(u64, f64, f64)>>,
    /// Seconds between snapshots, as f64 bits; 0 while snapshots are off.
    snapshot_every: AtomicU64,
    replayed: [Both; 2],
    ack_errors: Both,
    acks_withheld: Both,
    /// Stalls reported by the watchdog: [worker, runtime].
    stalls: [Both; 2],
    // No gauge handles are kept: the exporter deletes a gauge nobody set for its idle
    // timeout (a start that replays for longer, a long stall), and a kept handle then
    // writes to a value it never shows again. `gauge!` finds or makes the live one.
    decision_seconds: [Histogram; 2],
    end_to_end_seconds: [Histogram; 2],
    queued: [std::sync::atomic::AtomicI64; 2],
    rules: ArcSwap<RuleMetrics>,
    /// Outcomes by kind ([`Kind::ALL`] order) and action ([`OUTCOME_ACTIONS`] order).
    outcomes: [[Both; 4]; 4],
    outcomes_repeated: [Both; 4],
    outcomes_refused: [Both; ErrorCode::ALL.len()],
    /// Outcome messages dropped by their full subscription, and answers or forwards of
    /// outcomes that could not be published.
    outcomes_lost: [Both; 2],
    /// Outcomes per rule label and kind, and how many labels are ids outside the active
    /// set (bounded: [`MAX_OUTCOME_RULES`]).
    rule_outcomes: std::sync::Mutex<(HashMap<String, [u64; 4]>, usize)>,
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
    pub invalid: [u64; ErrorCode::ALL.len()],
    pub publish_errors: u64,
    /// Decisions that failed (a bug): [check, stream].
    pub decision_failures: [u64; 2],
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub disconnects: u64,
    pub connects: u64,
    /// Connects after a connection's first.
    pub reconnects: u64,
    /// Every NATS connection is up (by the last events, or the last sweep's look).
    pub connected: bool,
    pub slow_consumer: u64,
    pub no_reply: u64,
    pub snapshots_ok: u64,
    pub snapshots_failed: u64,
    /// Re-applied at start from JetStream: [check, stream].
    pub replayed: [u64; 2],
    pub ack_errors: u64,
    pub acks_withheld: u64,
    /// Stalls reported by the watchdog: [worker, runtime].
    pub stalls: [u64; 2],
    /// Outcomes counted, by kind ([`Kind::ALL`] order) and the decision's action
    /// (approve, hold, reject, unknown).
    pub outcomes: [[u64; 4]; 4],
    /// Outcomes reported again within the horizon, outcome messages refused, and
    /// outcome messages lost ([dropped, unanswered]).
    pub outcomes_repeated: u64,
    pub outcomes_refused: u64,
    pub outcomes_lost: [u64; 2],
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
        gauge!(NATS_CONNECTED).set(0.0);
        let reconnects = counter!(NATS_RECONNECTS);
        reconnects.increment(0);
        let evicted_keys = counter!(EVICTED_KEYS);
        evicted_keys.increment(0);
        let evicted_ids = counter!(EVICTED_IDS);
        evicted_ids.increment(0);
        for p in Path::ALL {
            gauge!(IN_FLIGHT, "path" => p.as_str()).set(0.0);
        }
        gauge!(UNPUBLISHED).set(0.0);
        for k in STALL_KINDS {
            gauge!(STALLED, "kind" => k).set(0.0);
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
            links: Default::default(),
            is_connected: std::sync::atomic::AtomicBool::new(false),
            dir_valid: std::sync::atomic::AtomicBool::new(true),
            slow_consumer: Both::new(counter!(NATS_SLOW_CONSUMER)),
            dropped: Default::default(),
            unseen: Default::default(),
            no_reply: Both::new(counter!(NO_REPLY)),
            evicted_keys,
            evicted_ids,
            snapshots_ok: Both::new(counter!(SNAPSHOTS, "result" => "success")),
            snapshots_failed: Both::new(counter!(SNAPSHOTS, "result" => "failure")),
            last_snapshot: std::sync::Mutex::new(None),
            snapshot_every: AtomicU64::new(0),
            replayed: path_counter(REPLAYED),
            ack_errors: Both::new(counter!(ACK_ERRORS)),
            acks_withheld: Both::new(counter!(ACKS_WITHHELD)),
            stalls: STALL_KINDS.map(|k| Both::new(counter!(STALLS, "kind" => k))),
            decision_seconds: Path::ALL.map(|p| histogram!(DECISION_SECONDS, "path" => p.as_str())),
            end_to_end_seconds: Path::ALL
                .map(|p| histogram!(END_TO_END_SECONDS, "path" => p.as_str())),
            queued: Default::default(),
            rules: ArcSwap::from_pointee(RuleMetrics::default()),
            outcomes: Kind::ALL.map(|k| {
                OUTCOME_ACTIONS
                    .map(|a| Both::new(counter!(OUTCOMES, "outcome" => k.as_str(), "action" => a)))
            }),
            outcomes_repeated: Kind::ALL
                .map(|k| Both::new(counter!(OUTCOMES_REPEATED, "outcome" => k.as_str()))),
            outcomes_refused: ErrorCode::ALL
                .map(|c| Both::new(counter!(OUTCOMES_REFUSED, "code" => c.as_str()))),
            outcomes_lost: OUTCOME_LOSSES
                .map(|r| Both::new(counter!(OUTCOMES_LOST, "reason" => r))),
            rule_outcomes: Default::default(),
        }
    }

    /// The answer or forward of an outcome could not be published.
    pub fn outcome_unanswered(&self) {
        self.outcomes_lost[1].inc();
    }

    /// An outcome reported for the first time: counted by the decision's action and by
    /// each rule that fired in it.
    pub fn outcome(&self, f: &Feedback) {
        let k = kind_idx(f.kind);
        let a = f.action.map_or(3, action_idx);
        self.outcomes[k][a].inc();
        if f.rules.is_empty() {
            return;
        }
        let known = self.rules.load();
        let mut guard = self.rule_outcomes.lock().unwrap_or_else(|e| e.into_inner());
        let (per_rule, others) = &mut *guard;
        for r in &f.rules {
            let label = if known.hits.contains_key(r.id.as_str()) || per_rule.contains_key(&r.id) {
                r.id.as_str()
            } else if *others < MAX_OUTCOME_RULES {
                *others += 1;
                r.id.as_str()
            } else {
                OTHER_RULES
            };
            per_rule.entry(label.to_string()).or_default()[k] += 1;
            metrics::counter!(names::RULE_OUTCOMES, "rule" => label.to_string(), "mode" => mode_str(r.mode), "outcome" => f.kind.as_str()).increment(1);
        }
    }

    /// An outcome reported again within the horizon: not counted again.
    pub fn outcome_repeated(&self, kind: Kind) {
        self.outcomes_repeated[kind_idx(kind)].inc();
    }

    /// An outcome message refused.
    pub fn outcome_refused(&self, code: ErrorCode) {
        self.outcomes_refused[code_idx(code)].inc();
    }

    /// Outcomes counted for rule label `rule` (a rule id or [`OTHER_RULES`]), by kind.
    pub fn rule_outcomes(&self, rule: &str) -> [u64; 4] {
        let guard = self.rule_outcomes.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.get(rule).copied().unwrap_or_default()
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
    pub fn ack_withheld(&self) {
        self.acks_withheld.inc();
    }
    /// The watchdog found a worker (`runtime` false) or the runtime stalled.
    pub fn stall(&self, runtime: bool) {
        self.stalls[runtime as usize].inc();
    }
    /// Stalled now: how many workers, and whether the runtime (set by the watchdog on
    /// every tick, so the gauges stay fresh).
    pub fn stalled_now(&self, workers: usize, runtime: bool) {
        metrics::gauge!(names::STALLED, "kind" => STALL_KINDS[0]).set(workers as f64);
        metrics::gauge!(names::STALLED, "kind" => STALL_KINDS[1]).set(if runtime {
            1.0
        } else {
            0.0
        });
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
    /// NATS connection `role` is down.
    pub fn disconnected(&self, role: &str) {
        self.disconnects.inc();
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        match links.iter_mut().find(|l| l.0 == role) {
            Some(l) => l.2 = false,
            None => links.push((role.to_string(), 0, false)),
        }
        let deciding = deciding_up(&links);
        self.set_connected(deciding);
    }
    /// NATS connection `role` is up. Its first connect is not a reconnect, whatever
    /// other connection came before it.
    pub fn connected(&self, role: &str) {
        self.connects.fetch_add(1, Relaxed);
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let i = match links.iter().position(|l| l.0 == role) {
            Some(i) => i,
            None => {
                links.push((role.to_string(), 0, false));
                links.len() - 1
            }
        };
        links[i].1 += 1;
        links[i].2 = true;
        if links[i].1 > 1 {
            self.reconnects.increment(1);
        }
        let deciding = deciding_up(&links);
        self.set_connected(deciding);
    }
    fn set_connected(&self, up: bool) {
        self.is_connected.store(up, Relaxed);
        metrics::gauge!(names::NATS_CONNECTED).set(if up { 1.0 } else { 0.0 });
    }
    /// A message dropped by a full subscription of NATS connection `role`.
    pub fn slow_consumer(&self, role: &str) {
        if role == "outcome" {
            // An outcome, not a transaction: the lost-messages page is not for it.
            self.outcomes_lost[0].inc();
            return;
        }
        if let Some(p) = Path::ALL.into_iter().find(|p| p.as_str() == role) {
            self.dropped[p.idx()].fetch_add(1, Relaxed);
        }
        self.slow_consumer.inc();
    }
    pub fn no_reply(&self) {
        self.no_reply.inc();
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

    /// The connection state (read from the client: events can be missed), and the
    /// messages the client holds that intake has not taken: per path, what its connection
    /// received (`in_messages`, by path), less what was taken, reported dropped, or found
    /// missing when its subscription was last empty. `None` for a connection not counted:
    /// with JetStream the stream connection also receives pull statuses, heartbeats, API
    /// replies and the start's replay, which no intake takes, and the gauge grew without end.
    pub fn nats(&self, connected: bool, in_messages: [Option<u64>; 2]) {
        self.set_connected(connected);
        metrics::gauge!(names::NATS_PENDING).set(self.pending(in_messages) as f64);
    }

    fn pending(&self, in_messages: [Option<u64>; 2]) -> u64 {
        Path::ALL
            .into_iter()
            .filter_map(|p| {
                let i = p.idx();
                let gone = self.received[i].get()
                    + self.dropped[i].load(Relaxed)
                    + self.unseen[i].load(Relaxed);
                in_messages[i].map(|n| n.saturating_sub(gone))
            })
            .sum()
    }

    /// Path `p`'s subscription held nothing after intake took a batch of `taking`
    /// messages (not counted as received yet), when its connection had received
    /// `in_messages`: whatever of those was neither taken nor reported dropped is not
    /// waiting either (the client reports drops through a small queue and loses reports in
    /// a burst, which left the gauge high for good).
    pub fn subscription_empty(&self, p: Path, in_messages: u64, taking: u64) {
        let i = p.idx();
        let explained = self.received[i].get() + taking + self.dropped[i].load(Relaxed);
        self.unseen[i].store(in_messages.saturating_sub(explained), Relaxed);
    }

    /// Transactions handed to (positive) or taken by (negative) the workers.
    pub fn queued(&self, p: Path, delta: i64) {
        self.queued[p.idx()].fetch_add(delta, Relaxed);
    }
    /// Transactions handed to the workers and not decided yet.
    pub fn queued_now(&self, p: Path) -> i64 {
        self.queued[p.idx()].load(Relaxed).max(0)
    }

    /// Sets the in-flight gauges from the queued counts, and the gauge of stream
    /// decisions waiting for the stream connection to `unpublished`.
    pub fn publish_queued(&self, unpublished: usize) {
        for p in Path::ALL {
            metrics::gauge!(names::IN_FLIGHT, "path" => p.as_str()).set(self.queued_now(p) as f64);
        }
        metrics::gauge!(names::UNPUBLISHED).set(unpublished as f64);
    }

    /// A rule fired (counted for fresh decisions, not for answered retries). A rule the
    /// handles do not hold (yet, or any more) is counted all the same: a reload swaps the
    /// engine's rules before these handles, and a decision made on either set may be
    /// counted in between.
    pub fn rule_hit(&self, r: &FiredRule) {
        match self.rules.load().hits.get(&r.id) {
            Some(c) => c.increment(1),
            None => metrics::counter!(names::RULE_HITS, "rule" => r.id.to_string(), "mode" => mode_str(r.mode), "action" => action_str(r.action)).increment(1),
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
                let c = counter!(RULE_HITS, "rule" => r.id.to_string(), "mode" => mode_str(r.mode), "action" => action_str(r.action));
                c.increment(0);
                // Its outcome series from the start, so the first outcome is an increase.
                for k in Kind::ALL {
                    counter!(RULE_OUTCOMES, "rule" => r.id.to_string(), "mode" => mode_str(r.mode), "outcome" => k.as_str()).increment(0);
                }
                (r.id.clone(), c)
            })
            .collect();
        let groups: Vec<String> = rs.groups.iter().map(|g| g.signature.clone()).collect();
        for g in &groups {
            // The cap's series from the start (at 0), so that keys evicted at the cap
            // before the first sweep (a start's replay) are an increase, not its first
            // value, which alerts cannot see.
            counter!(CAPPED_KEYS, "group" => g.clone()).absolute(0);
        }
        for gone in previous.groups.iter().filter(|g| !groups.contains(g)) {
            // A group the new rules dropped holds nothing now; its last sizes would
            // otherwise stay in the totals until the exporter's idle timeout.
            gauge!(STATE_KEYS, "group" => gone.clone()).set(0.0);
            gauge!(STATE_BYTES, "group" => gone.clone()).set(0.0);
        }
        self.rules.store(Arc::new(RuleMetrics {
            version: rs.version.clone(),
            loaded,
            loaded_at: unix_secs,
            hits,
            groups,
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
        self.set_connected(self.is_connected.load(Relaxed));
        self.snapshot_gauges();
    }

    /// A state snapshot written: its size, how long it took, when.
    pub fn snapshot_written(&self, bytes: u64, secs: f64, unix_secs: f64) {
        self.snapshots_ok.inc();
        *self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((bytes, secs, unix_secs));
        self.snapshot_gauges();
    }

    /// Snapshots are on, every `secs` seconds (alerts compare the last one's age to it).
    pub fn snapshot_interval(&self, secs: f64) {
        self.snapshot_every.store(secs.to_bits(), Relaxed);
        self.snapshot_gauges();
    }

    fn snapshot_gauges(&self) {
        use metrics::gauge;
        use names::*;
        let every = f64::from_bits(self.snapshot_every.load(Relaxed));
        if every > 0.0 {
            gauge!(SNAPSHOT_INTERVAL).set(every);
        }
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
        let mut invalid = [0; ErrorCode::ALL.len()];
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
            reconnects: self
                .links
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|l| l.1.saturating_sub(1))
                .sum(),
            connected: self.is_connected.load(Relaxed),
            slow_consumer: self.slow_consumer.get(),
            no_reply: self.no_reply.get(),
            snapshots_ok: self.snapshots_ok.get(),
            snapshots_failed: self.snapshots_failed.get(),
            replayed: [self.replayed[0].get(), self.replayed[1].get()],
            ack_errors: self.ack_errors.get(),
            acks_withheld: self.acks_withheld.get(),
            stalls: [self.stalls[0].get(), self.stalls[1].get()],
            outcomes: self
                .outcomes
                .each_ref()
                .map(|a| a.each_ref().map(Both::get)),
            outcomes_repeated: self.outcomes_repeated.iter().map(Both::get).sum(),
            outcomes_refused: self.outcomes_refused.iter().map(Both::get).sum(),
            outcomes_lost: [self.outcomes_lost[0].get(), self.outcomes_lost[1].get()],
        }
    }

    /// Adds to the slow-consumer count (for events that report several drops).
    pub fn slow_consumer_n(&self, p: Path, n: u64) {
        self.dropped[p.idx()].fetch_add(n, Relaxed);
        self.slow_consumer.add(n);
    }
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Active => "active",
        Mode::Shadow => "shadow",
    }
}

/// The `action` label of a rule's hits: its action, or `score` for a scoring rule.
fn action_str(a: Option<RuleAction>) -> &'static str {
    match a {
        Some(RuleAction::Block) => "block",
        Some(RuleAction::Reject) => "reject",
        Some(RuleAction::Hold) => "hold",
        Some(RuleAction::Allow) => "allow",
        None => "score",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_rule_labels_stay_bounded_whatever_is_sent() {
        use crate::feedback::{Feedback, FiredRule, Kind};
        let c = Counters::default();
        let rs = crate::rules::load_dir(
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/rules")),
            &crate::EngineConfig::default(),
        )
        .unwrap();
        c.rules_loaded(&rs, 0.0);
        let active = rs.rules[0].id.to_string();
        let report = |ids: Vec<String>, kind| Feedback {
            id: "t".into(),
            kind,
            action: Some(Action::Approve),
            rules: ids
                .into_iter()
                .map(|id| FiredRule {
                    id,
                    mode: Mode::Shadow,
                })
                .collect(),
        };
        // Ids outside the active set: MAX_OUTCOME_RULES get labels of their own.
        let unknown: Vec<String> = (0..MAX_OUTCOME_RULES)
            .map(|i| format!("gone-{i}"))
            .collect();
        c.outcome(&report(unknown, Kind::Chargeback));
        // Past them: `(other)`; an id already labelled and an active rule keep theirs.
        c.outcome(&report(
            vec![
                "new-1".into(),
                "new-2".into(),
                "gone-7".into(),
                active.clone(),
            ],
            Kind::Fraud,
        ));
        assert_eq!(c.rule_outcomes(OTHER_RULES), [0, 2, 0, 0]);
        assert_eq!(c.rule_outcomes("new-1"), [0; 4]);
        assert_eq!(c.rule_outcomes("gone-7"), [1, 1, 0, 0]);
        assert_eq!(c.rule_outcomes(&active), [0, 1, 0, 0]);
        assert_eq!(c.snapshot().outcomes[0], [1, 0, 0, 0]);
        assert_eq!(c.snapshot().outcomes[1], [1, 0, 0, 0]);
        // Without the decision: counted under `unknown`, no rule credited.
        c.outcome(&Feedback {
            id: "u".into(),
            kind: Kind::Refund,
            action: None,
            rules: vec![],
        });
        assert_eq!(c.snapshot().outcomes[2], [0, 0, 0, 1]);
        // An outcome dropped on its own connection is not a transaction dropped, and that
        // connection down is not the engine disconnected.
        c.slow_consumer("outcome");
        let s = c.snapshot();
        assert_eq!((s.outcomes_lost, s.slow_consumer), ([1, 0], 0));
        for role in ["check", "stream", "outcome"] {
            c.connected(role);
        }
        c.disconnected("outcome");
        assert!(c.snapshot().connected);
        c.disconnected("stream");
        assert!(!c.snapshot().connected);
    }

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

    /// The exporter deletes a gauge nobody set for its idle timeout (10 minutes in service:
    /// a start that replays for longer, a long stall). Set again, it must come back: a kept
    /// handle wrote to the deleted value, which no scrape showed again.
    #[test]
    fn gauges_come_back_after_the_exporters_idle_timeout() {
        use metrics_exporter_prometheus::PrometheusBuilder;
        use metrics_util::MetricKindMask;
        let recorder = PrometheusBuilder::new()
            .idle_timeout(
                MetricKindMask::GAUGE,
                Some(std::time::Duration::from_millis(300)),
            )
            .build_recorder();
        let handle = recorder.handle();
        let c = metrics::with_local_recorder(&recorder, Counters::new);
        assert!(handle.render().contains("fraudgate_nats_connected 0"));
        std::thread::sleep(std::time::Duration::from_millis(700));
        let idle = handle.render();
        assert!(!idle.contains("fraudgate_nats_connected"), "{idle}");
        metrics::with_local_recorder(&recorder, || {
            c.connected("check");
            c.stalled_now(1, false);
            c.queued(Path::Check, 2);
            c.publish_queued(5);
        });
        let text = handle.render();
        for line in [
            "fraudgate_nats_connected 1",
            "fraudgate_stalled{kind=\"worker\"} 1",
            "fraudgate_in_flight{path=\"check\"} 2",
            "fraudgate_decisions_unpublished 5",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }

    /// The service has two NATS connections: the second one's first connect is not a
    /// reconnect (every clean start showed one), and one down is down.
    #[test]
    fn reconnects_and_the_connected_state_are_per_connection() {
        let c = Counters::new();
        c.connected("check");
        c.connected("stream");
        let s = c.snapshot();
        assert_eq!((s.connects, s.reconnects, s.connected), (2, 0, true));
        c.disconnected("stream");
        assert!(!c.snapshot().connected);
        c.connected("check"); // a late event of the other one: still one down
        assert!(!c.snapshot().connected);
        c.connected("stream");
        let s = c.snapshot();
        assert_eq!((s.connects, s.reconnects, s.connected), (4, 2, true));
    }

    /// A hit of a rule the handles do not hold (a reload swaps the engine's rules before
    /// the handles) is counted with that rule's labels, not dropped; a request without a
    /// reply subject is a series of its own.
    #[test]
    fn a_hit_of_a_rule_not_yet_in_the_handles_is_counted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let c = metrics::with_local_recorder(&recorder, Counters::new);
        let fired = FiredRule {
            id: "new_rule".into(),
            action: Some(RuleAction::Hold),
            score: 0,
            mode: Mode::Shadow,
            reason: "r".into(),
            values: Default::default(),
            when: "amount > 1".into(),
        };
        metrics::with_local_recorder(&recorder, || {
            c.rule_hit(&fired);
            c.rule_hit(&fired);
            c.no_reply();
        });
        let text = handle.render();
        assert!(
            text.contains(
                "fraudgate_rule_hits_total{rule=\"new_rule\",mode=\"shadow\",action=\"hold\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("fraudgate_requests_without_reply_total 1"),
            "{text}"
        );
        assert_eq!(c.snapshot().no_reply, 1);
    }

    /// Each key group has its cap series from the load (so an eviction before the first
    /// sweep is an increase), and a group the next rules drop shows 0 keys, not its last
    /// size.
    #[test]
    fn key_group_series_follow_the_rule_sets() {
        use crate::rules::{compile, SourceFile};
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let head = "[ruleset]\nversion = \"t\"\nhold_at = 50\nreject_at = 100\n";
        let set = |body: &str| {
            let files = vec![SourceFile {
                name: "r/a.toml".into(),
                text: format!("{head}{body}"),
            }];
            let none = |_: &str| Err(std::io::Error::other("no lists"));
            compile(files, &none, &Default::default()).unwrap()
        };
        let with_window = set("[windows]\nw = { agg = \"count\", by = \"device\", over = \"1h\" }\n[[rule]]\nid = \"r\"\ndescription = \"d\"\nwhen = \"w > 3\"\nscore = 1\n");
        let without =
            set("[[rule]]\nid = \"r\"\ndescription = \"d\"\nwhen = \"amount > 3\"\nscore = 1\n");
        let c = metrics::with_local_recorder(&recorder, Counters::new);
        // From the load on, before any sweep's figures.
        metrics::with_local_recorder(&recorder, || c.rules_loaded(&with_window, 1.0));
        let text = handle.render();
        assert!(
            text.contains("fraudgate_state_capped_keys_total{group=\"device\"} 0"),
            "{text}"
        );
        metrics::with_local_recorder(&recorder, || {
            let stats = StateStats {
                groups: vec![("device".into(), 7, 700)],
                ..Default::default()
            };
            c.state(&stats, &Default::default());
        });
        let text = handle.render();
        assert!(
            text.contains("fraudgate_state_keys{group=\"device\"} 7"),
            "{text}"
        );
        metrics::with_local_recorder(&recorder, || c.rules_loaded(&without, 2.0));
        let text = handle.render();
        assert!(
            text.contains("fraudgate_state_keys{group=\"device\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("fraudgate_state_bytes{group=\"device\"} 0"),
            "{text}"
        );
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
        c.slow_consumer_n(Path::Stream, 2);
        // Core NATS: both connections' messages, both paths' intake.
        assert_eq!(c.pending([Some(6), Some(14)]), 3 + 7);
        // JetStream: the request connection only.
        assert_eq!(c.pending([Some(6), None]), 3);
        assert_eq!(c.pending([Some(1), Some(1)]), 0, "never below zero");
    }

    /// Drops the client never reported (its event queue was full) left the gauge high for
    /// good; an empty subscription now resets what counts as waiting.
    #[test]
    fn an_empty_subscription_clears_drops_nobody_reported() {
        let c = Counters::new();
        for _ in 0..10 {
            c.received(Path::Stream);
        }
        c.slow_consumer_n(Path::Stream, 5);
        // 10 000 received, 10 taken, 5 drops reported: the rest were dropped unreported.
        assert_eq!(c.pending([Some(0), Some(10_000)]), 9_985);
        // Found empty with a batch of 5 still to take: those are not written off.
        c.subscription_empty(Path::Stream, 10_000, 5);
        assert_eq!(c.pending([Some(0), Some(10_000)]), 5);
        for _ in 0..5 {
            c.received(Path::Stream);
        }
        assert_eq!(c.pending([Some(0), Some(10_000)]), 0);
        // New traffic counts again: 30 more received, 20 of them taken.
        for _ in 0..20 {
            c.received(Path::Stream);
        }
        assert_eq!(c.pending([Some(0), Some(10_030)]), 10);
        // The other path is not touched.
        assert_eq!(c.pending([Some(4), Some(10_030)]), 4 + 10);
    }

    #[test]
    fn every_name_is_prometheus_style() {
        use names::*;
        for n in [
            RECEIVED,
            DECISIONS,
            INVALID,
            DUPLICATES,
            NO_REPLY,
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
            ACKS_WITHHELD,
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
