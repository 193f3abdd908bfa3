//! `fraudgate run`: the engine as a NATS service.
//!
//! ```text
//!  fraud.check ──► intake (decode, size limit) ──┐            ┌─► reply to the requester
//!                                               ├─► worker k ─┤
//!  fraud.txn   ──► intake (decode, size limit) ──┘  (card k)  └─► fraud.decision.<action>
//! ```
//! Transactions are sharded over workers by card, so one card's transactions are applied
//! in arrival order. Each worker has a request-reply queue and a stream queue and always
//! serves the request-reply queue first, so a stream backlog never delays `fraud.check`.
//! Rules reload on file changes (debounced) and on SIGHUP through [`crate::rules::load_dir`];
//! a set that does not compile leaves the old one active. SIGTERM/SIGINT drain the
//! subscriptions, finish every queued transaction, flush and exit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{parse_duration, EngineConfig, FileConfig, OnBadSnapshot};
use crate::decision::Decision;
use crate::engine::{Cursor, Engine, SweepStep};
use crate::keyhash::HashKey;
use crate::telemetry::{Counters, Path as IntakePath, Snapshot};
use crate::transport::{self, Reply, TransportError, Wire};
use crate::txn::{ErrorCode, Transaction};
use crate::watchdog::{Beats, Event as StallEvent, Watchdog, WorkerBeat};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("rules in {dir} do not compile:\n{rendered}")]
    Rules { dir: String, rendered: String },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("config: {0}")]
    Config(String),
    #[error("cannot watch the rule directory {dir}: {source}")]
    Watch { dir: String, source: notify::Error },
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::TelemetryError),
    #[error("{0}\n(set [snapshot] on_bad = \"start-empty\" to move the file aside and start with empty windows, or with JetStream on_bad = \"rebuild\" to rebuild them from the streams)")]
    Snapshot(crate::snapshot::SnapshotFileError),
}

/// The Prometheus recorder is process-wide: install it once (the demo and tests may start
/// several services in one process).
static EXPORTER: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();

fn unix_secs() -> f64 {
    now_ms() as f64 / 1000.0
}

/// Everything `fraudgate run` needs.
#[derive(Debug)]
pub struct RunOptions {
    pub rules_dir: PathBuf,
    pub nats_url: String,
    pub engine: EngineConfig,
    pub file: FileConfig,
}

struct Job {
    txn: Transaction,
    received_ms: i64,
    received_at: Instant,
    reply: Reply,
    /// JetStream intake: the message's stream sequence and its acknowledgement.
    js: Option<(u64, transport::Ack)>,
}

/// JetStream messages taken in and not yet decided, by stream sequence: where a snapshot's
/// cut stands in the stream (every message below [`InFlight::low`] is in the windows), and
/// the clock idle state is evicted by.
#[derive(Default)]
struct InFlight {
    /// Sequence -> (deliveries not yet decided, the message's store time).
    pending: std::collections::BTreeMap<u64, (u32, i64)>,
    /// One past the highest sequence taken in (or the replay's end).
    next: u64,
    /// The consumer's ack floor, as read before this snapshot (`None` when that read
    /// failed): a message delivered but lost before intake took it is above it, and comes
    /// again.
    ack_floor: Option<u64>,
    /// Messages taken in the last `hold`, by the second they were taken in: (when the
    /// second began, the lowest store time taken in it). See [`InFlight::clock`].
    recent: std::collections::VecDeque<(Instant, i64)>,
    /// Until when the eviction clock is held at a store time: after a restart, at the
    /// first unacknowledged message's, until its redelivery is surely in.
    pin: Option<(i64, Instant)>,
    /// How long after a message is taken its redelivery may still come (a lost ack brings
    /// it back after `ack_wait`): `2 x ack_wait`. Within it the clock keeps the message's
    /// id for the retry horizon (longer than `ack_wait`) of wall time since it was taken.
    hold: Duration,
    /// When the transaction stream these sequences are in was created (epoch ns), as read
    /// at the start: a snapshot's cursor names it.
    stream_created_ns: Option<i64>,
    /// The stream was made again under a consumer this engine did not make: the
    /// sequences taken are of two streams, and snapshots go without a position.
    position_unknown: bool,
    /// Where each pull made again in the last `hold / 2` (the consumer's redelivery
    /// time) started: `next` then, and when. Messages from there on may have been on
    /// their way to the pull that was dropped; the server counts them as delivered and
    /// sends them again only after that time. Until then a consumer made again starts
    /// there, not past them ([`InFlight::resume_at`]).
    pulls: std::collections::VecDeque<(u64, Instant)>,
}

impl InFlight {
    fn taken(&mut self, seq: u64, stored_ms: i64) {
        self.taken_at(seq, stored_ms, Instant::now());
    }
    fn taken_at(&mut self, seq: u64, stored_ms: i64, now: Instant) {
        self.pending.entry(seq).or_insert((0, stored_ms)).0 += 1;
        self.next = self.next.max(seq + 1);
        match self.recent.back_mut() {
            Some((at, low)) if now.duration_since(*at) < RECENT_SLOT => {
                *low = (*low).min(stored_ms);
            }
            _ => self.recent.push_back((now, stored_ms)),
        }
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= self.hold + RECENT_SLOT)
        {
            self.recent.pop_front();
        }
    }
    fn decided(&mut self, seq: u64) {
        if let std::collections::btree_map::Entry::Occupied(mut o) = self.pending.entry(seq) {
            o.get_mut().0 -= 1;
            if o.get().0 == 0 {
                o.remove();
            }
        }
    }
    /// The stream was deleted and made again under the same name (another creation
    /// time): its sequence numbers start over, so what was taken of the old one says
    /// nothing about it. A consumer made again starts at its first message, and a
    /// snapshot's cursor names the new stream from here on. (The intake waits for the old
    /// stream's messages still queued before it makes the consumer: one of them decided
    /// later could meet a new message of the same sequence in `pending`.)
    fn stream_made_again(&mut self, created_ns: i64, first: u64) -> u64 {
        self.pending.clear();
        self.pulls.clear();
        self.position_unknown = false;
        self.next = first;
        self.ack_floor = None;
        self.stream_created_ns = Some(created_ns);
        first
    }
    /// Where a consumer made again must start: the oldest message taken and not yet
    /// decided, or the next one after all taken. (Not the ack floor, which may be old:
    /// what comes again from below this was decided, and if its id had left the retry
    /// table it would be counted twice.)
    ///
    /// Nor past a message that may still be on its way to a pull dropped in the last
    /// redelivery time: a consumer made again past it would never deliver it (the old
    /// consumer would have, after `ack_wait`). What comes again from there that was
    /// decided was taken within that time, and its id is still in the retry table.
    fn resume_at(&mut self) -> u64 {
        self.resume_at_on(Instant::now())
    }
    fn resume_at_on(&mut self, now: Instant) -> u64 {
        self.forget_pulls(now);
        let pulled = self.pulls.iter().map(|p| p.0).min();
        let oldest = self.pending.keys().next().copied().unwrap_or(self.next);
        oldest.min(pulled.unwrap_or(u64::MAX)).max(1)
    }
    /// A pull is made again at `now`: see [`InFlight::pulls`]. (From `next`: every
    /// message below it was taken. Not from a message still undecided, which holds
    /// `resume_at` down only while it is, as it holds the eviction clock: ids decided
    /// since then may have left the retry table.) Pulls made again without anything
    /// taken between them (a server away for a while) keep one entry, at the last time.
    fn pull_started(&mut self, now: Instant) {
        self.forget_pulls(now);
        match self.pulls.back_mut() {
            Some(last) if last.0 == self.next => last.1 = now,
            _ => self.pulls.push_back((self.next, now)),
        }
    }
    fn forget_pulls(&mut self, now: Instant) {
        let redelivery = self.hold / 2;
        while (self.pulls.front()).is_some_and(|p| now.duration_since(p.1) >= redelivery) {
            self.pulls.pop_front();
        }
    }
    /// The ack floor as just read, or `None` when it could not be read: then no floor at
    /// all, never an older one. An old floor may lie below messages decided so long ago
    /// that their ids have left the retry table: a restart would replay them from there and
    /// count them twice (NATS unreachable for a few snapshots, then a restart). Without a
    /// floor, a message delivered but never taken is not replayed; it is not acknowledged
    /// either, so the server delivers it again and it is decided then.
    fn floor_read(&mut self, floor: Option<u64>) {
        self.ack_floor = floor;
    }
    /// The snapshot cursor: the lowest sequence that may be missing from the windows.
    fn low(&self) -> u64 {
        let low = self.pending.keys().next().copied().unwrap_or(self.next);
        match self.ack_floor {
            Some(f) => low.min(f + 1),
            None => low,
        }
    }
    /// The clock idle state is evicted by. Ids are remembered by the store time of their
    /// message (or of a later retry's), so while a backlog is worked through (store times behind the wall clock,
    /// and moving faster than it) eviction must follow the stream: never past the oldest
    /// message still undecided, nor a restart's pin, nor, for a message taken in the last
    /// `hold`, its store time plus the wall time since it was taken. An ack lost now means
    /// a redelivery within `ack_wait`, and the message's id must still be there when it
    /// comes, however far the backlog has moved on meanwhile. Otherwise ids a redelivery
    /// or the next replay must find would be gone, and counted twice. In real time (store
    /// times at the wall clock) that is the wall clock less a second; when the stream is
    /// quiet, the wall clock (request ids are kept by it).
    fn clock(&self, now_ms: i64) -> i64 {
        self.clock_at(now_ms, Instant::now())
    }
    fn clock_at(&self, now_ms: i64, now: Instant) -> i64 {
        let oldest = self.pending.values().map(|v| v.1).min();
        // A message of the second that began at `at` was taken at most `age` ago.
        let recent = self
            .recent
            .iter()
            .filter(|(at, _)| now.duration_since(*at) < self.hold + RECENT_SLOT)
            .map(|(at, low)| {
                let age = now.duration_since(*at).saturating_sub(RECENT_SLOT);
                low.saturating_add(age.as_millis() as i64)
            })
            .min();
        let pinned = self.pin.filter(|(_, until)| now < *until).map(|p| p.0);
        [Some(now_ms), oldest, recent, pinned]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now_ms)
    }
}

type Tracker = Arc<std::sync::Mutex<InFlight>>;

/// How finely [`InFlight`] remembers when recent messages were taken.
const RECENT_SLOT: Duration = Duration::from_secs(1);

/// The first and the longest pause between JetStream pulls that end without a message.
const PULL_PAUSE_MIN: Duration = Duration::from_millis(100);
const PULL_PAUSE_MAX: Duration = Duration::from_secs(5);

fn lock(t: &Tracker) -> std::sync::MutexGuard<'_, InFlight> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Jobs travel in batches: under load, one channel operation and one wake-up carry many
/// transactions instead of one each.
type Batch = Vec<Job>;

/// Most messages taken from a subscription in one go.
const MAX_BATCH: usize = 64;

struct Shard {
    check: mpsc::Sender<Batch>,
    stream: mpsc::Sender<Batch>,
}

/// The workers' queues, as the intake tasks see them.
struct Workers {
    shards: Vec<Shard>,
    unpublished: Arc<Unpublished>,
}

impl Workers {
    fn len(&self) -> usize {
        self.shards.len()
    }
}

/// Stream decisions made and not yet taken by the stream connection, because its
/// client's queue was full: the connection down or reconnecting, or a server (in a
/// cluster, another node than the request connection's) that stopped reading. A worker
/// never waits for the stream connection: it leaves such a decision to its [`Outbox`]
/// and goes on, so the requests of its cards are answered on the request connection
/// meanwhile. The stream intake takes no more while `limit` decisions wait (their
/// transactions then wait in the subscription, or, with JetStream, in the stream).
/// Refusals of stream transactions (`id_reused`, a failed decision) go the same way.
struct Unpublished {
    count: std::sync::atomic::AtomicUsize,
    room: tokio::sync::Notify,
    limit: usize,
}

impl Unpublished {
    fn new(limit: usize) -> Unpublished {
        Unpublished {
            count: Default::default(),
            room: Default::default(),
            limit: limit.max(2),
        }
    }

    fn now(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn add(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// One waiting decision was taken by the connection. The intake, when it waits, goes
    /// on once half of the limit is left.
    fn done(&self) {
        let before = self.count.fetch_sub(1, Ordering::Relaxed);
        if before == self.limit / 2 + 1 || before == 1 {
            self.room.notify_waiters();
        }
    }

    /// Returns at once when fewer than `limit` decisions wait; otherwise once half of
    /// them are out.
    async fn room(&self) {
        loop {
            let more = self.room.notified();
            if self.now() < self.limit {
                return;
            }
            more.await;
        }
    }
}

/// A worker's stream decisions that the stream connection did not take at once, in
/// order, for the worker's [`publish_unsent`] loop. While any wait, the worker's next
/// decisions queue behind them (one worker's decisions go out in the order made).
struct Outbox<'a> {
    tx: mpsc::UnboundedSender<Unsent>,
    /// This worker's decisions waiting (queued, or being published by the loop).
    mine: &'a std::sync::atomic::AtomicUsize,
    all: &'a Unpublished,
}

/// What a worker leaves for the stream connection.
enum Unsent {
    /// A stream decision.
    Decision {
        decision: Decision,
        body: Bytes,
        received_at: Instant,
        js: Option<(u64, transport::Ack)>,
    },
    /// A stream transaction refused or failed after decoding, for fraud.invalid.
    Refused {
        txn: Transaction,
        why: Refused,
        js: Option<(u64, transport::Ack)>,
    },
}

/// Why a decoded transaction got no decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Its id is the retry table's for another payment ([`id_reused`]).
    IdReused,
    /// Its decision failed (a bug; [`failed`]).
    Failed,
}

impl Refused {
    fn refusal(self, id: &str) -> transport::Refusal<'_> {
        match self {
            Refused::IdReused => transport::Refusal::id_reused(id),
            Refused::Failed => transport::Refusal::internal(id),
        }
    }
}

impl Outbox<'_> {
    /// Publishes the decision of `job` on the stream connection, or, when that would wait,
    /// queues it. Never waits.
    fn send(
        &self,
        wire: &Wire,
        counters: &Counters,
        acks: Option<&Acks>,
        job: &mut Job,
        decision: Decision,
        json: Vec<u8>,
    ) {
        let body = Bytes::from(json);
        if self.mine.load(Ordering::Acquire) == 0 {
            let epoch = wire.stream_epoch();
            if let Some(res) = wire.try_publish_decision(&decision, body.clone()) {
                let js = job.js.take();
                published(res, counters, acks, (&decision, job.received_at, js), epoch);
                return;
            }
        }
        self.queue(
            Unsent::Decision {
                decision,
                body,
                received_at: job.received_at,
                js: job.js.take(),
            },
            counters,
        );
    }

    /// Leaves `u` to the worker's [`publish_unsent`] loop, behind what waits already.
    fn queue(&self, u: Unsent, counters: &Counters) {
        self.mine.fetch_add(1, Ordering::AcqRel);
        self.all.add();
        if self.tx.send(u).is_err() {
            // The loop ends only after the worker: not reached.
            self.mine.fetch_sub(1, Ordering::AcqRel);
            self.all.done();
            counters.publish_error();
        }
    }
}

/// Publishes a worker's queued stream decisions ([`Outbox`]), waiting for the stream
/// connection as long as it takes. Ends when the worker has dropped its outbox and every
/// queued decision is out.
async fn publish_unsent(
    mut rx: mpsc::UnboundedReceiver<Unsent>,
    wire: &Wire,
    counters: &Counters,
    acks: Option<&Acks>,
    (mine, all): (&std::sync::atomic::AtomicUsize, &Unpublished),
) {
    while let Some(u) = rx.recv().await {
        match u {
            Unsent::Decision {
                decision,
                body,
                received_at,
                js,
            } => {
                let epoch = wire.stream_epoch();
                let res = wire.publish_decision(&decision, body).await;
                published(res, counters, acks, (&decision, received_at, js), epoch);
            }
            Unsent::Refused { txn, why, js } => {
                send_refusal(wire, counters, acks, (&txn, &Reply::Stream), why, js).await;
            }
        }
        mine.fetch_sub(1, Ordering::AcqRel);
        all.done();
    }
}

/// Counts a stream decision handed to the stream connection (on connection `epoch`) and
/// hands its JetStream acknowledgement to the acker.
fn published(
    res: Result<(), async_nats::PublishError>,
    counters: &Counters,
    acks: Option<&Acks>,
    (d, received_at, js): (&Decision, Instant, Option<(u64, transport::Ack)>),
    epoch: u64,
) {
    match res {
        Ok(()) => {
            counters.decided(IntakePath::Stream, d.action);
            counters.end_to_end_time(IntakePath::Stream, received_at.elapsed().as_secs_f64());
            if let (Some((_, ack)), Some(acks)) = (js, acks) {
                acks.hand(Handed::new(epoch, ack, &d.id));
            }
        }
        Err(e) => {
            counters.publish_error();
            tracing::warn!(error = %e, id = %d.id, "could not publish a decision");
        }
    }
}

/// Shutdown budgets, so a NATS server that is down or hangs cannot hold the process
/// forever, nor take the time of the steps that do not need it. Draining the
/// subscriptions (and deciding what they still deliver) gives up after `DRAIN`; the
/// workers then get `WORKER_GRACE` to finish what they hold; the final snapshot is local
/// disk and gets `SNAPSHOT` of its own whatever NATS did; the last flush and close get
/// `FLUSH`. With JetStream, the acknowledgements the workers handed over get `ACKS`
/// after the workers, and the ack floor's reads before the snapshot `ACK_FLOOR`. At
/// most 26 s in all, inside the 30 s a supervisor such as Kubernetes grants by
/// default; the process then exits
/// without waiting for a snapshot write still stuck (main's runtime shutdown). With NATS
/// healthy the first two steps end as soon as the queues are empty, but never later than
/// 10 s after the signal.
pub mod shutdown_budget {
    use std::time::Duration;
    pub const DRAIN: Duration = Duration::from_secs(8);
    pub const WORKER_GRACE: Duration = Duration::from_secs(2);
    pub const SNAPSHOT: Duration = Duration::from_secs(10);
    pub const FLUSH: Duration = Duration::from_secs(3);
    pub const ACKS: Duration = Duration::from_secs(1);
    pub const ACK_FLOOR: Duration = Duration::from_secs(2);
}

/// A running service. [`Running::shutdown`] stops it cleanly.
pub struct Running {
    engine: Arc<Engine>,
    counters: Arc<Counters>,
    wire: Wire,
    stop: watch::Sender<bool>,
    intake: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    /// Stream decisions the workers left for the stream connection and it has not taken.
    unpublished: Arc<Unpublished>,
    /// JetStream intake: the task that acknowledges decided messages.
    acker: Option<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    snapshots: Option<Snapshots>,
    watchdog: Watchdog,
    /// The first task the service needs that ended while it ran (see [`supervised`]).
    ended: watch::Receiver<Option<&'static str>>,
}

/// Spawns a task the service needs for as long as it runs (an intake, a worker, the sweep,
/// the rule reload, the snapshots). If it ends before the stop, by a panic or otherwise
/// (a subscription the client closed), it is logged and said on `ended`: the engine no
/// longer does its whole job (without its check intake it answers no request, yet looks
/// up), so the binary shuts it down and exits non-zero for its supervisor to restart it.
/// A panic is passed on to the task's handle, so the shutdown sees it.
fn supervised<F>(
    name: &'static str,
    task: F,
    ended: &watch::Sender<Option<&'static str>>,
    stop: &watch::Receiver<bool>,
) -> JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    use futures::FutureExt;
    let (ended, stop) = (ended.clone(), stop.clone());
    tokio::spawn(async move {
        let result = std::panic::AssertUnwindSafe(task).catch_unwind().await;
        // A closed stop channel is a stop too: a start that failed half-way dropped it, and
        // its own error says what went wrong.
        if !*stop.borrow() && stop.has_changed().is_ok() {
            tracing::error!(
                task = name,
                panicked = result.is_err(),
                "a task the engine needs ended while it runs: shutting down"
            );
            ended.send_if_modified(|first| first.is_none() && first.replace(name).is_none());
        }
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    })
}

/// Where and how the window state is saved. The lock keeps the periodic and the final
/// snapshot from writing at the same time.
#[derive(Clone)]
struct Snapshots {
    path: PathBuf,
    writing: Arc<std::sync::Mutex<()>>,
    /// JetStream intake: where the transaction stream stands at a cut.
    tracker: Option<Tracker>,
    /// Requests are captured: replay them from the cut minus this (the dedupe horizon:
    /// any request decided before the cut within it is in the retry table and skipped).
    capture_margin_ms: Option<i64>,
    /// JetStream intake: its consumer, to read the ack floor before each snapshot, and
    /// the transaction stream, to see whether it is still the one the position is in.
    consumer: Option<async_nats::jetstream::consumer::PullConsumer>,
    stream: Option<async_nats::jetstream::stream::Stream>,
}

impl Snapshots {
    /// Reads the consumer's ack floor into the tracker, before a cut. A failed read leaves
    /// no floor (see [`InFlight::floor_read`]).
    async fn refresh_ack_floor(&self) {
        // Both reads in one budget: at shutdown it is part of the whole's.
        let by = tokio::time::Instant::now() + shutdown_budget::ACK_FLOOR;
        if let (Some(s), Some(t)) = (&self.stream, &self.tracker) {
            // The stream made again (with its consumer, by a tool re-applying both) while
            // the engine pulled on: its sequences start over, and no position this engine
            // tracked is one in it. Snapshots then go without a position (the consumer's
            // own state says where it stands at the next start), instead of naming the new
            // stream with an old position (replayed from the first message: counted twice).
            // The name it knows is left as it is: if the consumer went with the stream, the
            // intake compares it with the new one when it finds the consumer gone, and
            // starts over in the new stream (`InFlight::stream_made_again`, which also
            // makes the position known again).
            let read = tokio::time::timeout_at(by, Wire::stream_identity(s));
            if let Ok(Some((created, _))) = read.await {
                let mut t = lock(t);
                if t.stream_created_ns.is_some_and(|c| c != created) && !t.position_unknown {
                    tracing::warn!(
                        "the transaction stream was made again while the engine ran: snapshots go without a stream position until the engine starts over in it or restarts"
                    );
                    t.position_unknown = true;
                }
            }
        }
        if let (Some(c), Some(t)) = (&self.consumer, &self.tracker) {
            let mut c = c.clone();
            let read = tokio::time::timeout_at(by, Wire::ack_floor(&mut c));
            let floor = read.await.ok().flatten();
            if floor.is_none() {
                tracing::warn!(
                    "could not read the consumer's ack floor; the snapshot cursor goes without it"
                );
            }
            lock(t).floor_read(floor);
        }
    }

    /// Writes one snapshot (blocking); logs and counts the outcome, and says whether it
    /// was written.
    fn write(&self, engine: &Engine, counters: &Counters) -> bool {
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let at_cut = || {
            // Position and stream read together: a stream made again between two reads
            // would pair one stream's position with the other's name.
            let (txn_next_seq, txn_stream_created_ns) = match &self.tracker {
                Some(t) => {
                    let t = lock(t);
                    ((!t.position_unknown).then(|| t.low()), t.stream_created_ns)
                }
                None => (None, None),
            };
            Cursor {
                txn_next_seq,
                check_from_ms: self.capture_margin_ms.map(|m| now_ms() - m),
                txn_stream_created_ns,
            }
        };
        match crate::snapshot::save(engine, &self.path, now_ms(), at_cut) {
            Ok((bytes, cursor)) => {
                let secs = started.elapsed().as_secs_f64();
                counters.snapshot_written(bytes, secs, unix_secs());
                tracing::info!(
                    path = %self.path.display(),
                    bytes,
                    took_ms = (secs * 1000.0) as u64,
                    txn_next_seq = cursor.txn_next_seq,
                    "snapshot written"
                );
                true
            }
            Err(e) => {
                counters.snapshot_failed();
                tracing::error!(error = %e, "snapshot failed; decisions continue");
                false
            }
        }
    }
}

/// How the windows start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// No snapshot file (or none configured): with JetStream, rebuilt from the retention.
    NoSnapshot,
    Restored(Cursor),
    /// An unusable snapshot, `on_bad = start-empty`: empty, nothing replayed.
    Empty,
    /// An unusable snapshot, `on_bad = rebuild`: rebuilt from the streams' retention.
    Rebuild,
}

/// Loads the snapshot at start; with `on_bad = start-empty` or `rebuild`, an unusable file
/// is moved aside (kept for inspection).
fn restore_snapshot(
    engine: &Engine,
    path: &Path,
    on_bad: OnBadSnapshot,
) -> Result<Start, ServiceError> {
    match crate::snapshot::load(engine, path) {
        Ok(None) => {
            tracing::info!(path = %path.display(), "no snapshot yet: starting with empty windows");
            Ok(Start::NoSnapshot)
        }
        Ok(Some(r)) => {
            tracing::info!(
                path = %path.display(),
                keys = r.keys,
                ids = r.ids,
                dropped_groups = r.dropped_groups,
                skipped_ids = r.skipped_ids,
                txn_next_seq = r.cursor.txn_next_seq,
                "state restored from snapshot"
            );
            Ok(Start::Restored(r.cursor))
        }
        Err(e) if on_bad == OnBadSnapshot::Fail => Err(ServiceError::Snapshot(e)),
        Err(e) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".bad-{}", now_ms()));
            let aside = PathBuf::from(aside);
            let moved = std::fs::rename(path, &aside);
            tracing::error!(
                error = %e,
                moved_to = %aside.display(),
                moved = moved.is_ok(),
                on_bad = ?on_bad,
                "unusable snapshot: starting with empty windows{}",
                if on_bad == OnBadSnapshot::Rebuild { ", rebuilt from the streams" } else { "" }
            );
            Ok(if on_bad == OnBadSnapshot::Rebuild {
                Start::Rebuild
            } else {
                Start::Empty
            })
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn duration(field: &str, v: &str) -> Result<Duration, ServiceError> {
    parse_duration(v).map_err(|e| ServiceError::Config(format!("{field}: {e}")))
}

/// Which worker a card goes to.
fn shard_of(card: &str, n: usize) -> usize {
    // FNV-1a: cheap and stable; only spreads load, no secrecy needed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in card.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    (h % n as u64) as usize
}

impl Running {
    /// Loads the rules, connects, subscribes and starts the workers.
    pub async fn start(opts: RunOptions) -> Result<Running, ServiceError> {
        // The watcher first: an edit while the rules are read, or anywhere in the start
        // (a snapshot restore can take minutes), is then seen. Its error waits for the
        // rules' own (a missing directory is said better by the rule loader).
        let watching = watch_rules(&opts.rules_dir);
        opts.file.validate().map_err(ServiceError::Config)?;
        let rs = crate::rules::load_dir(&opts.rules_dir, &opts.engine).map_err(|e| {
            ServiceError::Rules {
                dir: opts.rules_dir.display().to_string(),
                rendered: e.render(),
            }
        })?;
        if opts.engine.hash_key == HashKey::default() {
            // The snapshot holds every card's window state under its keyed hash. Under the
            // built-in key, which anyone can read in this source, the hash of each of the
            // ~10^5 card numbers that fit a decision's masked card (first six and last
            // four digits) can be tried in moments: the file would give the numbers back.
            if opts.file.snapshot.path.is_some() {
                return Err(ServiceError::Config(
                    "[snapshot] path is set but no entity hash key is: set [engine] \
                     hash_key_env (or hash_key) to a secret, or the snapshot would let the \
                     card numbers be recovered"
                        .into(),
                ));
            }
            tracing::warn!(
                "using the built-in entity hash key; set [engine] hash_key_env in production"
            );
        }
        tracing::info!(version = %rs.version, "rules loaded: {}", rs.summary());
        for w in &rs.warnings {
            tracing::warn!("{w}");
        }
        // Fault injection for tests: a slow start between the rule load and the watcher
        // (as a large snapshot restore makes it).
        fail::fail_point!("rules_loaded");
        if let Some(addr) = &opts.file.metrics.addr {
            use std::net::ToSocketAddrs;
            let addr: std::net::SocketAddr = addr
                .to_socket_addrs()
                .map_err(|e| ServiceError::Config(format!("[metrics] addr `{addr}`: {e}")))?
                .next()
                .ok_or_else(|| {
                    ServiceError::Config(format!("[metrics] addr `{addr}` resolves to nothing"))
                })?;
            match EXPORTER.get() {
                Some(existing) => {
                    tracing::warn!(%existing, "metrics exporter already running in this process")
                }
                None => {
                    crate::telemetry::install_exporter(addr)?;
                    let _ = EXPORTER.set(addr);
                    tracing::info!("metrics on http://{addr}/metrics");
                }
            }
        }
        let counters = Arc::new(Counters::new());
        counters.rules_loaded(&rs, unix_secs());
        let engine = Arc::new(Engine::new(rs, opts.engine.clone()));
        let snap_cfg = &opts.file.snapshot;
        let js_cfg = &opts.file.jetstream;
        if snap_cfg.on_bad == OnBadSnapshot::Rebuild && !js_cfg.enabled {
            return Err(ServiceError::Config(
                "[snapshot] on_bad = \"rebuild\" needs [jetstream] enabled = true".into(),
            ));
        }
        let (tracker, ack_wait): (Option<Tracker>, Duration) = match js_cfg.enabled {
            false => (None, Duration::ZERO),
            true => {
                // Read here, before the first subscription, though only the stream setup
                // (after it) uses them: a typo must not make the engine take its share of
                // requests and then exit without answering them.
                duration("[jetstream] max_age", &js_cfg.max_age)?;
                duration("[jetstream] duplicate_window", &js_cfg.duplicate_window)?;
                let ack_wait = duration("[jetstream] ack_wait", &js_cfg.ack_wait)?;
                if opts.engine.dedupe_horizon <= ack_wait {
                    // A redelivery comes ack_wait after the first delivery; it must still
                    // find the id, or it is counted again.
                    return Err(ServiceError::Config(format!(
                        "[engine] dedupe_horizon ({:?}) must be longer than [jetstream] ack_wait ({ack_wait:?})",
                        opts.engine.dedupe_horizon
                    )));
                }
                let tracker = Arc::new(std::sync::Mutex::new(InFlight {
                    hold: 2 * ack_wait,
                    ..Default::default()
                }));
                (Some(tracker), ack_wait)
            }
        };
        let capture_margin_ms = (js_cfg.enabled && !js_cfg.capture_stream.is_empty())
            .then_some(opts.engine.dedupe_horizon.as_millis() as i64);
        let snap_every = duration("[snapshot] interval", &snap_cfg.interval)?;
        let mut restored = Start::NoSnapshot;
        let mut snapshots = match &snap_cfg.path {
            Some(path) => {
                restored = restore_snapshot(&engine, path, snap_cfg.on_bad)?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if let Err(e) = std::fs::create_dir_all(dir) {
                        tracing::error!(dir = %dir.display(), error = %e, "cannot create the snapshot directory");
                    }
                }
                Some(Snapshots {
                    path: path.clone(),
                    writing: Arc::new(std::sync::Mutex::new(())),
                    tracker: tracker.clone(),
                    capture_margin_ms,
                    consumer: None,
                    stream: None,
                })
            }
            None => None,
        };
        // Everything that can refuse the configuration comes before the first
        // subscription: an engine that took its share of the traffic and then stopped
        // would leave those requests unanswered.
        let (stop, stop_rx) = watch::channel(false);
        // (Their bounds were checked by `FileConfig::validate`, first.)
        let sweep_every = duration("sweep_interval", &opts.file.service.sweep_interval)?;
        let stall_after = duration("[service] stall_after", &opts.file.service.stall_after)?;
        let (watcher, mut changes) = watching?;
        let debounce = duration("reload_debounce", &opts.file.service.reload_debounce)?;
        // The rules changed since they were read (the start may have taken minutes):
        // reloaded now, before any transaction (a JetStream replay) is decided. Without a
        // change, nothing is read again.
        let mut changed = false;
        let mut writing = Writing::default();
        while let Ok(c) = changes.try_recv() {
            changed = true;
            writing.note(&c, tokio::time::Instant::now());
        }
        if changed {
            // Files still being written: loaded once closed, as a reload would (at most
            // MAX_WRITE_WAIT), so the replay does not run on a half-written set.
            let deadline = tokio::time::Instant::now() + MAX_WRITE_WAIT;
            while writing.settling(tokio::time::Instant::now()) {
                match tokio::time::timeout_at(deadline, changes.recv()).await {
                    Ok(Some(c)) => writing.note(&c, tokio::time::Instant::now()),
                    _ => break,
                }
            }
            self::reload(
                &opts.rules_dir,
                &opts.engine,
                &engine,
                &counters,
                "change during startup",
            )
            .await;
        }
        let (ended_tx, ended) = watch::channel(None);
        let reload = supervised(
            "rule reload",
            reload_task(
                changes,
                watcher,
                opts.rules_dir.clone(),
                opts.engine.clone(),
                engine.clone(),
                counters.clone(),
                debounce,
                stop_rx.clone(),
            ),
            &ended_tx,
            &stop_rx,
        );
        let client =
            transport::connect(&opts.file.nats, &opts.nats_url, "check", counters.clone()).await?;
        let stream =
            transport::connect(&opts.file.nats, &opts.nats_url, "stream", counters.clone()).await?;
        let mut wire = Wire::new(
            client,
            stream,
            opts.file.subjects.clone(),
            opts.file.limits.max_payload,
        );
        if !opts.file.subjects.outcome.is_empty() {
            let conn =
                transport::connect(&opts.file.nats, &opts.nats_url, "outcome", counters.clone())
                    .await?;
            wire = wire.with_outcome_connection(conn);
        }
        // With a request capture, the recovery runs before the engine subscribes to
        // requests: a request arriving during a replay (minutes, for a long capture) is
        // not queued behind it, to be answered after the switch has given up, with the
        // fresh requests waiting behind those; nor does this engine take a share of a
        // queue group's requests it cannot answer. Such a request is captured; the
        // catch-up applies it (and the switch's retry finds its decision). The catch-up
        // is done in rounds until little is left, then once more after the subscription,
        // from where the last round ended: a request arriving meanwhile is caught up or
        // in the subscription (or both: then it is answered from the dedupe table). (One
        // routed just before the subscription and stored by the server only after the
        // last round read the capture's end would be neither: a window of the server's
        // store latency.) Without a capture nothing could catch a request up, so the
        // engine subscribes first and such a request waits in the subscription.
        let captured = tracker.is_some() && !js_cfg.capture_stream.is_empty();
        let mut check_sub = None;
        if !captured {
            check_sub = Some(wire.subscribe_check().await?);
            wire.flush(Duration::from_secs(5)).await;
        }
        let durable = match &tracker {
            Some(t) => Some(recover(&wire, js_cfg, &engine, &counters, restored, t).await?),
            None => None,
        };
        // Fault injection for tests: a long replay.
        fail::fail_point!("recovered");
        let mut capture = durable.as_ref().and_then(|d| d.capture.clone());
        if let Some(c) = capture.as_mut() {
            catch_up(&wire, &engine, &counters, c, CATCH_UP_ROUNDS).await?;
        }
        let check_sub = match check_sub {
            Some(s) => s,
            None => {
                let s = wire.subscribe_check().await?;
                wire.flush(Duration::from_secs(5)).await;
                s
            }
        };
        if let Some(c) = capture.as_mut() {
            // Subscribed now: a failure here must not end the start, which would leave
            // the requests already taken unanswered.
            if let Err(e) = catch_up(&wire, &engine, &counters, c, 1).await {
                tracing::warn!(
                    error = %e,
                    "requests captured during the start could not be read; any not re-applied is counted when the switch retries it"
                );
            }
        }
        // The restart's pin on the eviction clock lasts `hold` from when intake starts,
        // not from the end of the replay (the catch-up came between).
        if let Some(t) = &tracker {
            let mut t = lock(t);
            let until = Instant::now() + t.hold;
            if let Some(pin) = t.pin.as_mut() {
                pin.1 = until;
            }
        }
        let durable = durable.map(|d| (d.consumer, d.stream));
        if let Some(s) = snapshots.as_mut() {
            s.consumer = durable.as_ref().map(|d| d.0.clone());
            s.stream = durable.as_ref().map(|d| d.1.clone());
        }
        let svc = &opts.file.service;
        let n = if svc.workers > 0 {
            svc.workers
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        };
        // Capacity in batches; a batch holds up to MAX_BATCH transactions.
        let depth = svc.queue_depth.div_ceil(MAX_BATCH).max(2);
        let mut shards = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        let beats = Beats::new(n);
        // JetStream intake: the acknowledgements go through the acker.
        let (ack_tx, acker) = match &tracker {
            Some(t) => {
                // An existing consumer that redelivers later than the configured ack_wait
                // (recover raised `hold` for it): acks are tried until its redelivery.
                let ack_wait = ack_wait.max(lock(t).hold / 2);
                let (acks, rx) = Acks::new();
                let probe = transport::confirm_subject(&js_cfg.stream, &js_cfg.consumer);
                let task = acker(
                    (rx, acks.outstanding.clone()),
                    (wire.clone(), probe),
                    counters.clone(),
                    ack_wait,
                );
                (
                    Some(acks),
                    Some(supervised("acker", task, &ended_tx, &stop_rx)),
                )
            }
            None => (None, None),
        };
        // The stream intake pauses once a worker queue's worth of stream decisions wait for
        // the stream connection (what the workers' queues hold then is decided too: at
        // most `queue_depth` x (workers + 1) wait).
        let unpublished = Arc::new(Unpublished::new(svc.queue_depth));
        for k in 0..n {
            let (ctx, crx) = mpsc::channel(depth);
            let (stx, srx) = mpsc::channel(depth);
            shards.push(Shard {
                check: ctx,
                stream: stx,
            });
            workers.push(supervised(
                "worker",
                worker(
                    (crx, srx),
                    engine.clone(),
                    wire.clone(),
                    counters.clone(),
                    tracker.clone().zip(ack_tx.clone()),
                    (beats.clone(), k),
                    unpublished.clone(),
                ),
                &ended_tx,
                &stop_rx,
            ));
        }
        let shards = Arc::new(Workers {
            shards,
            unpublished: unpublished.clone(),
        });
        let stream_intake = match durable.zip(tracker.clone().zip(ack_tx)) {
            Some(((consumer, txn_stream), t)) => supervised(
                "stream intake",
                intake_jetstream(
                    consumer,
                    (txn_stream, js_cfg.clone()),
                    wire.clone(),
                    shards.clone(),
                    counters.clone(),
                    t,
                    stop_rx.clone(),
                ),
                &ended_tx,
                &stop_rx,
            ),
            None => supervised(
                "stream intake",
                intake(
                    wire.subscribe_txn().await?,
                    IntakePath::Stream,
                    wire.clone(),
                    shards.clone(),
                    counters.clone(),
                    stop_rx.clone(),
                ),
                &ended_tx,
                &stop_rx,
            ),
        };
        let outcome_sub = wire.subscribe_outcome().await?;
        // The subscriptions exist on the server once the client has sent them.
        wire.flush(Duration::from_secs(5)).await;
        let mut intake = vec![
            supervised(
                "check intake",
                intake(
                    check_sub,
                    IntakePath::Check,
                    wire.clone(),
                    shards,
                    counters.clone(),
                    stop_rx.clone(),
                ),
                &ended_tx,
                &stop_rx,
            ),
            stream_intake,
        ];
        if let Some(sub) = outcome_sub {
            intake.push(supervised(
                "outcome intake",
                outcome_intake(sub, wire.clone(), counters.clone(), stop_rx.clone()),
                &ended_tx,
                &stop_rx,
            ));
        }
        let sweep = supervised(
            "sweep",
            sweeper(
                engine.clone(),
                wire.clone(),
                counters.clone(),
                tracker.clone(),
                sweep_every,
                stop_rx.clone(),
            ),
            &ended_tx,
            &stop_rx,
        );
        let mut background = vec![reload, sweep];
        if let Some(snaps) = &snapshots {
            background.push(supervised(
                "snapshots",
                snapshotter(
                    snaps.clone(),
                    engine.clone(),
                    counters.clone(),
                    snap_every,
                    stop_rx.clone(),
                ),
                &ended_tx,
                &stop_rx,
            ));
        }
        background.push(tokio::spawn(queue_monitor(
            counters.clone(),
            unpublished.clone(),
            stop_rx,
        )));
        // Ticks until aborted at shutdown, after the watchdog has stopped watching it.
        background.push(tokio::spawn(heartbeat(beats.clone())));
        let watchdog = start_watchdog(beats, stall_after, counters.clone())
            .map_err(|e| ServiceError::Config(format!("cannot start the watchdog thread: {e}")))?;
        tracing::info!(
            check = %wire.subjects.check,
            txn = %wire.subjects.txn,
            outcome = %wire.subjects.outcome,
            queue_group = %wire.subjects.queue_group,
            workers = n,
            jetstream = js_cfg.enabled,
            "fraudgate is taking transactions"
        );
        Ok(Running {
            engine,
            counters,
            wire,
            stop,
            intake,
            workers,
            unpublished,
            acker,
            background,
            snapshots,
            watchdog,
            ended,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Resolves when a task the service needs has ended while it runs (see
    /// [`supervised`]), with the task's name: shut down, and exit non-zero.
    pub async fn failed(&mut self) -> &'static str {
        loop {
            if let Some(name) = *self.ended.borrow_and_update() {
                return name;
            }
            if self.ended.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Where `/metrics` is served, when the exporter runs.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        EXPORTER.get().copied()
    }

    /// Stops taking messages, decides and publishes everything already received, writes
    /// the final snapshot, flushes and closes the connection. Each step has its own
    /// deadline ([`shutdown_budget`]); what could not be finished is logged, and the
    /// result says whether every step finished.
    pub async fn shutdown(mut self) -> Stopped {
        use tokio::time::Instant as TokioInstant;
        let budget = |d: Duration| TokioInstant::now() + d;
        tracing::info!("shutting down: draining subscriptions");
        let _ = self.stop.send(true);
        let mut clean = true;
        let drained_by = budget(shutdown_budget::DRAIN);
        for mut t in self.intake {
            match tokio::time::timeout_at(drained_by, &mut t).await {
                Ok(Ok(())) => {}
                // A panic (logged by the hook, and as the task ended).
                Ok(Err(_)) => clean = false,
                Err(_) => {
                    clean = false;
                    tracing::error!("intake did not drain in time (is NATS reachable?)");
                    t.abort();
                    // Gone for sure (its queue senders dropped) before the workers are timed.
                    let _ = t.await;
                }
            }
        }
        // The intake tasks held the only senders: the workers finish their queues and stop.
        let finished_by = drained_by.max(TokioInstant::now()) + shutdown_budget::WORKER_GRACE;
        for mut t in self.workers {
            match tokio::time::timeout_at(finished_by, &mut t).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => clean = false,
                Err(_) => {
                    clean = false;
                    tracing::error!("a worker did not finish in time (publishing to NATS?)");
                    t.abort();
                    // Gone for sure (its outbox with it) before what it left is counted.
                    let _ = t.await;
                }
            }
        }
        // Stream decisions and refusals of the workers stopped above that their stream
        // connection never took: with core NATS they are lost (decided and counted in the
        // windows, never published); with JetStream they come again.
        let unpublished = self.unpublished.now();
        if unpublished > 0 {
            clean = false;
            tracing::error!(
                unpublished,
                "stream decisions made but never taken by the stream connection before the \
                 stop: lost with core NATS (counted in the windows, not published), \
                 delivered again with JetStream"
            );
        }
        // The workers held the acker's senders: it acknowledges what they handed over
        // (once the server confirms it read the decisions) and stops. Anything not
        // acknowledged comes again after a restart, answered from the snapshot's retry
        // table.
        if let Some(mut t) = self.acker {
            let acked_by = TokioInstant::now() + shutdown_budget::ACKS;
            if tokio::time::timeout_at(acked_by, &mut t).await.is_err() {
                // Not a loss (they come again, answered from the snapshot's retry
                // table), but a step that did not finish.
                clean = false;
                tracing::warn!("acknowledgements still waiting for the server at shutdown; those messages come again");
                t.abort();
            }
        }
        if self.ended.borrow().is_some() {
            clean = false;
        }
        let undecided: i64 = [IntakePath::Check, IntakePath::Stream]
            .iter()
            .map(|p| self.counters.queued_now(*p))
            .sum();
        if undecided > 0 {
            clean = false;
            tracing::error!(
                undecided,
                "transactions taken in and not decided: with JetStream they come again, \
                 with core NATS they are lost"
            );
        }
        // Before the heartbeat stops (it is a background task): a stopped heartbeat is
        // no stall.
        self.watchdog.stop();
        for t in self.background {
            t.abort();
        }
        // Every decided transaction is in the windows now: save them for the next start.
        if let Some(snaps) = self.snapshots.clone() {
            snaps.refresh_ack_floor().await;
            let (engine, counters) = (self.engine.clone(), self.counters.clone());
            let write = tokio::task::spawn_blocking(move || snaps.write(&engine, &counters));
            match tokio::time::timeout(shutdown_budget::SNAPSHOT, write).await {
                Ok(Ok(true)) => {}
                // Failed: logged by the write.
                Ok(_) => clean = false,
                Err(_) => {
                    clean = false;
                    tracing::error!("the final snapshot did not finish in time");
                }
            }
        }
        let flushed_by = budget(shutdown_budget::FLUSH);
        let left = || flushed_by.saturating_duration_since(TokioInstant::now());
        if !self.wire.flush(left()).await {
            clean = false;
            tracing::warn!("NATS flush did not complete before exit");
        }
        self.wire.close(left()).await;
        let s = self.counters.snapshot();
        tracing::info!(
            received_check = s.received_check,
            received_stream = s.received_stream,
            decided = s.decided(),
            invalid = s.invalid_total(),
            no_reply = s.no_reply,
            outcomes = s.outcomes.iter().flatten().sum::<u64>(),
            outcomes_repeated = s.outcomes_repeated,
            outcomes_refused = s.outcomes_refused,
            outcomes_lost = s.outcomes_lost.iter().sum::<u64>(),
            publish_errors = s.publish_errors,
            unpublished,
            acks_withheld = s.acks_withheld,
            decision_failures = s.decision_failures.iter().sum::<u64>(),
            snapshots_ok = s.snapshots_ok,
            snapshots_failed = s.snapshots_failed,
            clean,
            "stopped"
        );
        Stopped { counts: s, clean }
    }
}

/// The outcome of [`Running::shutdown`].
#[derive(Debug, Clone)]
pub struct Stopped {
    /// The counters at the end.
    pub counts: Snapshot,
    /// Every step finished in its time: nothing taken in was left undecided, the last
    /// JetStream acknowledgements went out, the final snapshot (if any) was written, NATS
    /// was flushed.
    pub clean: bool,
}

async fn intake(
    mut sub: async_nats::Subscriber,
    path: IntakePath,
    wire: Wire,
    shards: Arc<Workers>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut draining = false;
    let mut batches: Vec<Batch> = (0..shards.len()).map(|_| Vec::new()).collect();
    // Fault injection for tests (feature `failpoints`): the check intake ends at once,
    // as if the client had closed its subscription.
    #[cfg(feature = "failpoints")]
    if path == IntakePath::Check {
        fail::fail_point!("check_intake_ends", |_| {});
    }
    loop {
        let (msgs, emptied) = tokio::select! {
            msg = sub.next() => {
                let Some(first) = msg else { break };
                with_buffered(first, &mut sub)
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                // Unsubscribe; messages already delivered to the client still arrive,
                // then the stream ends.
                if let Err(e) = sub.drain().await {
                    tracing::warn!(error = %e, path = path.as_str(), "drain failed");
                    break;
                }
                continue;
            }
        };
        if emptied {
            // Everything the connection had received is in this batch, taken before, or
            // dropped: the NATS pending gauge starts again from here. Read now, not after
            // the batch is taken (what arrives meanwhile is waiting).
            counters.subscription_empty(path, wire.in_messages(path), msgs.len() as u64);
        }
        let received_ms = now_ms();
        let received_at = Instant::now();
        for msg in msgs {
            if let Some(job) = take(msg, path, &wire, &counters, received_ms, received_at).await {
                batches[shard_of(&job.txn.card, shards.len())].push(job);
            }
        }
        dispatch(&mut batches, &shards, path, &counters).await;
    }
}

/// Outcomes reported after a decision ([`crate::feedback`]): each counted once per
/// transaction and outcome within [`crate::feedback::REMEMBERED_FOR_MS`] (by action and
/// by the rules of the decision sent with it), and answered when asked. A bad one is
/// answered with the error, or, published without a reply subject, forwarded to the
/// invalid subject. Nothing here reads or changes the engine: one task, on a connection
/// of its own, in front of neither a request nor a stream transaction.
async fn outcome_intake(
    mut sub: async_nats::Subscriber,
    wire: Wire,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = crate::feedback::Seen::default();
    let mut draining = false;
    loop {
        let msg = tokio::select! {
            msg = sub.next() => match msg {
                Some(m) => m,
                None => break,
            },
            _ = stop.changed(), if !draining => {
                draining = true;
                if let Err(e) = sub.drain().await {
                    tracing::warn!(error = %e, "outcome drain failed");
                    break;
                }
                continue;
            }
        };
        let sent = match wire.decode_outcome(&msg.payload) {
            Err(e) => {
                counters.outcome_refused(e.code);
                tracing::debug!(code = e.code.as_str(), "invalid outcome: {}", e.message);
                match msg.reply {
                    Some(inbox) => wire.reply_outcome_error(inbox, &(&e).into()).await,
                    None => wire.forward_bad_outcome(msg.payload, &(&e).into()).await,
                }
            }
            Ok(f) => {
                let counted = seen.first(&f.id, f.kind, now_ms());
                if counted {
                    counters.outcome(&f);
                } else {
                    counters.outcome_repeated(f.kind);
                }
                match msg.reply {
                    Some(inbox) => wire.reply_outcome(inbox, &f, counted).await,
                    None => Ok(()),
                }
            }
        };
        if sent.is_err() {
            // Not a transaction or a decision lost: counted apart from publish errors.
            counters.outcome_unanswered();
        }
    }
}

/// `first` and what the stream already holds (taken without waiting), up to a batch; and
/// whether the stream then held nothing more.
fn with_buffered<S: futures::Stream + Unpin>(first: S::Item, s: &mut S) -> (Vec<S::Item>, bool) {
    use futures::FutureExt;
    let mut msgs = vec![first];
    while msgs.len() < MAX_BATCH {
        match s.next().now_or_never() {
            Some(Some(m)) => msgs.push(m),
            Some(None) => break,
            None => return (msgs, true),
        }
    }
    (msgs, false)
}

/// Hands each worker its batch.
async fn dispatch(batches: &mut [Batch], workers: &Workers, path: IntakePath, counters: &Counters) {
    if path == IntakePath::Stream && batches.iter().any(|b| !b.is_empty()) {
        // Not while the stream connection leaves too many decisions waiting: the
        // transactions wait where they are (see [`Unpublished`]).
        workers.unpublished.room().await;
    }
    for (i, batch) in batches.iter_mut().enumerate() {
        if batch.is_empty() {
            continue;
        }
        let tx = match path {
            IntakePath::Check => &workers.shards[i].check,
            IntakePath::Stream => &workers.shards[i].stream,
        };
        let n = batch.len();
        counters.queued(path, n as i64);
        // Waits when the worker's queue is full: back-pressure into the subscription
        // buffer rather than unbounded memory.
        if tx.send(std::mem::take(batch)).await.is_err() {
            // Only after a worker died: never drop silently.
            counters.queued(path, -(n as i64));
            for _ in 0..n {
                counters.publish_error();
            }
            tracing::error!(
                lost = n,
                path = path.as_str(),
                "a decision worker is gone; transactions not decided"
            );
        }
    }
}

/// JetStream intake: pulls from the durable consumer. Every message taken is tracked by
/// sequence until decided (for the snapshot's cursor) and acknowledged after its
/// decision is published; invalid ones go to the invalid subject and are acknowledged.
/// The pull is restarted when it fails (the server restarting, say). At shutdown it just
/// stops pulling: messages not taken yet are delivered again to the next engine.
async fn intake_jetstream(
    consumer: async_nats::jetstream::consumer::PullConsumer,
    (txn_stream, cfg): (
        async_nats::jetstream::stream::Stream,
        crate::config::JetStreamSection,
    ),
    wire: Wire,
    shards: Arc<Workers>,
    counters: Arc<Counters>,
    (tracker, acks): (Tracker, Acks),
    mut stop: watch::Receiver<bool>,
) {
    let path = IntakePath::Stream;
    let mut batches: Vec<Batch> = (0..shards.len()).map(|_| Vec::new()).collect();
    // Pauses between pulls that ended without delivering anything: a pull the server
    // refuses at once (a consumer deleted, or configured so that it rejects our pull
    // requests) must not become a loop that takes a core and hides the problem.
    let mut pause = PULL_PAUSE_MIN;
    let mut pulled_before = false;
    'pull: loop {
        if pause > PULL_PAUSE_MIN {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => break 'pull,
            }
        }
        pause = (pause * 2).min(PULL_PAUSE_MAX);
        let gone = tokio::select! {
            g = Wire::consumer_gone(&txn_stream, &cfg.consumer) => g,
            _ = stop.changed() => break 'pull,
        };
        if gone {
            // Deleted while we ran (by hand, say): made again where this engine stands,
            // at the oldest transaction taken and not yet decided (or the next one). What
            // comes again that was decided is answered from the retry table. Unless the
            // stream itself was deleted and made again (its consumer goes with it): then
            // from the new stream's first message, which no position of the old one says
            // anything about.
            let identity = Wire::stream_identity(&txn_stream).await;
            let remade = identity.is_some_and(|(created, _)| {
                lock(&tracker)
                    .stream_created_ns
                    .is_some_and(|c| c != created)
            });
            if remade {
                // The old stream's messages still queued are decided and their acks sent
                // first (they go nowhere: no consumer yet): a new message of the same
                // sequence taken meanwhile would share their entry in the tracker, and an
                // old ack could acknowledge it.
                let until = Instant::now() + Duration::from_secs(10);
                // Decisions still in the workers' outboxes hand their acks over later.
                while (!lock(&tracker).pending.is_empty()
                    || acks.outstanding() > 0
                    || shards.unpublished.now() > 0)
                    && Instant::now() < until
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let start = {
                let mut t = lock(&tracker);
                match identity {
                    Some((created, first)) if t.stream_created_ns.is_some_and(|c| c != created) => {
                        tracing::warn!(
                            stream = %cfg.stream,
                            from_seq = first,
                            "the transaction stream was made again while the engine ran; its messages are taken from its first"
                        );
                        t.stream_made_again(created, first)
                    }
                    _ => t.resume_at(),
                }
            };
            match wire.durable_consumer(&txn_stream, &cfg, Some(start)).await {
                Ok(_) => tracing::warn!(
                    consumer = %cfg.consumer,
                    from_seq = start,
                    "the JetStream consumer was gone; made it again"
                ),
                Err(e) => tracing::warn!(
                    consumer = %cfg.consumer,
                    error = %e,
                    "the JetStream consumer is gone and could not be made again"
                ),
            }
        }
        // A pull made again: the one before may have been dropped with messages on their
        // way (the first has none before it).
        if pulled_before {
            lock(&tracker).pull_started(Instant::now());
        }
        pulled_before = true;
        let messages = match Wire::consume(&consumer).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?pause, "JetStream pull failed");
                continue 'pull;
            }
        };
        let mut messages = std::pin::pin!(messages);
        let mut last_error = None;
        let mut failed = false;
        loop {
            let msgs = if failed {
                // This pull is over: take what it already holds (delivered to us, so
                // otherwise back only after ack_wait), then make it again.
                use futures::FutureExt;
                match messages.next().now_or_never() {
                    Some(Some(first)) => with_buffered(first, &mut messages).0,
                    _ => {
                        tracing::warn!(
                            error = last_error.as_deref().unwrap_or("none"),
                            retry_in = ?pause,
                            "JetStream pull failed; pulling again"
                        );
                        continue 'pull;
                    }
                }
            } else {
                tokio::select! {
                    m = messages.next() => {
                        let Some(first) = m else {
                            tracing::warn!(
                                last_error = last_error.as_deref().unwrap_or("none"),
                                retry_in = ?pause,
                                "JetStream pull ended; pulling again"
                            );
                            continue 'pull;
                        };
                        with_buffered(first, &mut messages).0
                    }
                    _ = stop.changed() => break 'pull,
                }
            };
            let received_at = Instant::now();
            for m in msgs {
                let d = match m {
                    Ok(d) => {
                        pause = PULL_PAUSE_MIN;
                        d
                    }
                    Err(e) => {
                        // Missed heartbeats, the consumer deleted, no responders (a pull
                        // request to a consumer gone): this pull is over, whether or not
                        // async-nats ends it. What it holds is taken, then the pull is
                        // made again above (the consumer with it, if gone).
                        tracing::debug!(error = %e, "JetStream pull error");
                        last_error = Some(e);
                        failed = true;
                        continue;
                    }
                };
                counters.received(path);
                match wire.decode(&d.payload) {
                    Err(e) => {
                        counters.invalid(e.code);
                        let epoch = wire.stream_epoch();
                        if wire.publish_invalid(d.payload, &(&e).into()).await.is_err() {
                            counters.publish_error();
                        } else {
                            // After the server has read the forward, like a decision.
                            let id = e.id.as_deref().unwrap_or_default();
                            acks.hand(Handed::new(epoch, d.ack, id));
                        }
                    }
                    Ok(txn) => {
                        lock(&tracker).taken(d.seq, d.stored_ms);
                        let job = Job {
                            txn,
                            // The time the server stored it: replay after a crash sees
                            // the same receive time.
                            received_ms: d.stored_ms,
                            received_at,
                            reply: Reply::Stream,
                            js: Some((d.seq, d.ack)),
                        };
                        batches[shard_of(&job.txn.card, shards.len())].push(job);
                    }
                }
            }
            dispatch(&mut batches, &shards, path, &counters).await;
        }
    }
}

/// What a recovery replay did: transactions re-applied (new to the snapshot), and those
/// read again that the snapshot already held (found in its retry table).
#[derive(Debug, Default, Clone, Copy)]
struct Replay {
    applied: u64,
    already: u64,
}

/// Applies one replayed message to the windows (its decision is kept in the dedupe table,
/// published to no one); invalid ones were answered the first time and are skipped.
///
/// `keep`: for requests: each replayed id is kept in the retry table for a horizon from the
/// time it is replayed ([`Engine::keep_id`]), as the switch may retry it only now.
fn replay_into<'a>(
    wire: &'a Wire,
    engine: &'a Engine,
    n: &'a mut Replay,
    keep: bool,
) -> impl FnMut(transport::Replayed) + 'a {
    move |r| {
        if let Ok(txn) = wire.decode(&r.payload) {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.decide(&txn, r.stored_ms)
            }));
            // Only ids new to the snapshot: one the snapshot held was answered before the
            // crash, and keeps the horizon of its last sighting.
            if keep && matches!(&out, Ok(o) if !o.duplicate && !o.id_reused) {
                engine.keep_id(&txn.id, now_ms());
            }
            // A decision that failed (its panic is logged) re-applied nothing, nor did a
            // transaction refused for its reused id (refused the first time too).
            match out {
                Ok(o) if o.id_reused => {}
                Ok(o) if o.duplicate => n.already += 1,
                Ok(_) => n.applied += 1,
                Err(_) => {}
            }
        }
    }
}

/// What the recovery hands to the intake.
struct Recovered {
    /// The durable consumer to take new stream work from, and its stream.
    consumer: async_nats::jetstream::consumer::PullConsumer,
    stream: async_nats::jetstream::stream::Stream,
    /// The request capture, and the last sequence of it applied (or skipped, on an empty
    /// start): requests after it came while the engine was starting.
    capture: Option<(async_nats::jetstream::stream::Stream, u64)>,
}

/// How many catch-up rounds of captured requests at most before the engine subscribes
/// to requests; a round that finds fewer than [`CATCH_UP_SMALL`] new ones is the last.
const CATCH_UP_ROUNDS: usize = 4;
const CATCH_UP_SMALL: u64 = 10_000;

/// Re-applies the requests captured after `capture.1` up to the capture's end now (as
/// the recovery does: decided, kept in the retry table, answered to no one), in up to
/// `rounds` rounds, each from where the last ended, until a round finds little.
async fn catch_up(
    wire: &Wire,
    engine: &Engine,
    counters: &Counters,
    capture: &mut (async_nats::jetstream::stream::Stream, u64),
    rounds: usize,
) -> Result<(), ServiceError> {
    for _ in 0..rounds {
        let last = Wire::last_seq(&capture.0).await?;
        if last <= capture.1 {
            return Ok(());
        }
        let started = Instant::now();
        let mut n = Replay::default();
        Wire::replay(
            &capture.0,
            &wire.subjects.check,
            transport::ReplayFrom::Seq(capture.1 + 1),
            last,
            Duration::from_secs(10),
            replay_into(wire, engine, &mut n, true),
        )
        .await?;
        let found = last - capture.1;
        capture.1 = last;
        counters.replayed(IntakePath::Check, n.applied);
        tracing::info!(
            requests = n.applied,
            already = n.already,
            to_seq = last,
            took_ms = started.elapsed().as_millis() as u64,
            "requests captured during the start re-applied"
        );
        if found < CATCH_UP_SMALL {
            break;
        }
    }
    Ok(())
}

/// JetStream recovery at start, before intake: re-applies to the windows what the streams
/// hold after the snapshot's cut (or everything, with no snapshot), without deciding
/// anew for anyone or publishing; then returns the durable consumer to take new work
/// from. Transactions re-applied here that the consumer delivers again (never
/// acknowledged) are answered from the dedupe table with the decision made here.
async fn recover(
    wire: &Wire,
    cfg: &crate::config::JetStreamSection,
    engine: &Arc<Engine>,
    counters: &Counters,
    start: Start,
    tracker: &Tracker,
) -> Result<Recovered, ServiceError> {
    use transport::ReplayFrom;
    let setup = wire.jetstream_setup(cfg).await?;
    if let Some(after) = setup.redelivery_after {
        // An existing consumer keeps its own ack_wait (and backoff): ids must outlive
        // its redeliveries, not the configured ones.
        let horizon = engine.config().dedupe_horizon;
        if horizon <= after {
            return Err(ServiceError::Config(format!(
                "consumer {} redelivers after {after:?}, not before [engine] dedupe_horizon \
                 ({horizon:?}): a redelivery would be counted again. Make the horizon longer, \
                 or the consumer's ack_wait shorter",
                cfg.consumer
            )));
        }
        let mut t = lock(tracker);
        if 2 * after > t.hold {
            tracing::warn!(
                consumer = %cfg.consumer,
                redelivery_after = ?after,
                "the existing consumer redelivers later than [jetstream] ack_wait; ids are kept for its redeliveries"
            );
            t.hold = 2 * after;
        }
    }
    // Start empty: nothing is replayed; the consumer goes on from where it was.
    let empty = start == Start::Empty;
    let restored = match start {
        Start::Restored(c) => Some(c),
        _ => None,
    };
    let idle = Duration::from_secs(10);
    let started = Instant::now();
    // Requests first: they were answered live, so their decisions are settled; then the
    // transaction stream up to what the consumer delivered.
    let mut checks = Replay::default();
    if let Some(capture) = setup.capture.as_ref().filter(|_| !empty) {
        let from = match restored {
            None => Some(ReplayFrom::First),
            Some(c) => c.check_from_ms.map(ReplayFrom::TimeMs),
        };
        match from {
            Some(from) => {
                Wire::replay(
                    capture,
                    &wire.subjects.check,
                    from,
                    setup.capture_last,
                    idle,
                    replay_into(wire, engine, &mut checks, true),
                )
                .await?;
            }
            None => tracing::warn!(
                "the snapshot has no request-capture position (taken without JetStream): requests are not replayed"
            ),
        }
    }
    let mut txns = Replay::default();
    let first = setup.txn_first.max(1);
    lock(tracker).stream_created_ns = Some(setup.txn_created_ns);
    // The snapshot's position is in the stream it names. A stream deleted and made again
    // since (to change its storage, say) numbers its messages from 1 again: a consumer
    // made at the old position would skip the messages the new stream holds below it,
    // never deciding them. They are all after the snapshot, so they are taken from the
    // first. Its creation time tells; a snapshot of format 2 does not name its stream,
    // and then only a position past the stream's end tells (its sequence numbers never
    // go back while it exists, a purge keeps them).
    let from = match restored.map(|c| (c.txn_next_seq, c.txn_stream_created_ns)) {
        Some((Some(seq), created)) => {
            let other = created.is_some_and(|c| c != setup.txn_created_ns);
            if other || seq > setup.txn_last.saturating_add(1) {
                tracing::warn!(
                    stream = %cfg.stream,
                    snapshot_next_seq = seq,
                    stream_last_seq = setup.txn_last,
                    snapshot_stream_created_ns = created,
                    stream_created_ns = setup.txn_created_ns,
                    "the transaction stream was made again since the snapshot (another creation time, or the snapshot's position past its end); its messages are taken from its first"
                );
                Some(first)
            } else {
                Some(seq)
            }
        }
        _ => None,
    };
    let consumer = match setup.consumer.clone() {
        Some(c) => {
            let start = match (restored, from) {
                _ if empty => None,
                (_, Some(seq)) => Some(seq),
                (None, None) => Some(first),
                // A snapshot without a stream position (taken without JetStream): what the
                // consumer delivered before is assumed in it.
                (Some(_), None) => None,
            };
            if let Some(start) = start {
                Wire::replay(
                    &setup.txn_stream,
                    &wire.subjects.txn,
                    ReplayFrom::Seq(start),
                    setup.delivered,
                    idle,
                    replay_into(wire, engine, &mut txns, false),
                )
                .await?;
            }
            // Messages after the ack floor come again; until they have, ids are kept by
            // the stream's time from the first of them, however long the engine was down.
            let pin = match setup.ack_floor < setup.delivered {
                true => Wire::stored_ms_of(&setup.txn_stream, setup.ack_floor + 1).await,
                false => None,
            };
            let mut t = lock(tracker);
            t.next = start.unwrap_or(first).max(setup.delivered + 1);
            t.ack_floor = Some(setup.ack_floor);
            t.pin = pin.map(|ms| (ms, Instant::now() + t.hold));
            drop(t);
            c
        }
        None => {
            let c = wire.durable_consumer(&setup.txn_stream, cfg, from).await?;
            // As above: messages from `from` on come now, some of them decided before the
            // cut (their ids are in the restored retry table); until they have come, ids
            // are kept by the stream's time from the first of them, not evicted by the
            // wall clock after a downtime longer than the horizon.
            // (The first message still stored, when `from` has expired or was purged.)
            let pin = match from {
                Some(seq) => Wire::stored_ms_of(&setup.txn_stream, seq.max(first)).await,
                None => None,
            };
            let mut t = lock(tracker);
            t.next = from.unwrap_or(first);
            t.pin = pin.map(|ms| (ms, Instant::now() + t.hold));
            drop(t);
            c
        }
    };
    counters.replayed(IntakePath::Check, checks.applied);
    counters.replayed(IntakePath::Stream, txns.applied);
    tracing::info!(
        requests = checks.applied,
        transactions = txns.applied,
        already_in_snapshot = checks.already + txns.already,
        from_seq = from,
        delivered_seq = setup.delivered,
        took_ms = started.elapsed().as_millis() as u64,
        stream = %cfg.stream,
        consumer = %cfg.consumer,
        "JetStream recovery: state rebuilt from the streams"
    );
    Ok(Recovered {
        consumer,
        stream: setup.txn_stream,
        capture: setup.capture.map(|c| (c, setup.capture_last)),
    })
}

/// Counts and decodes one message. Bad input is answered here (error reply, or
/// fraud.invalid); a valid transaction becomes a job for a worker.
async fn take(
    msg: async_nats::Message,
    path: IntakePath,
    wire: &Wire,
    counters: &Counters,
    received_ms: i64,
    received_at: Instant,
) -> Option<Job> {
    counters.received(path);
    match wire.decode(&msg.payload) {
        Err(e) => {
            counters.invalid(e.code);
            let sent = match path {
                IntakePath::Check => match msg.reply {
                    Some(inbox) => wire.reply_error(inbox, &(&e).into()).await,
                    None => {
                        counters.no_reply();
                        Ok(())
                    }
                },
                IntakePath::Stream => wire.publish_invalid(msg.payload, &(&e).into()).await,
            };
            if sent.is_err() {
                counters.publish_error();
            }
            tracing::debug!(
                code = e.code.as_str(),
                path = path.as_str(),
                "invalid input: {}",
                e.message
            );
            None
        }
        Ok(txn) => {
            let reply = match path {
                IntakePath::Check => {
                    if msg.reply.is_none() {
                        counters.no_reply();
                    }
                    Reply::Check(msg.reply)
                }
                IntakePath::Stream => Reply::Stream,
            };
            Some(Job {
                txn,
                received_ms,
                received_at,
                reply,
                js: None,
            })
        }
    }
}

async fn worker(
    (check, stream): (mpsc::Receiver<Batch>, mpsc::Receiver<Batch>),
    engine: Arc<Engine>,
    wire: Wire,
    counters: Arc<Counters>,
    js: Option<(Tracker, Acks)>,
    (beats, k): (Arc<Beats>, usize),
    unpublished: Arc<Unpublished>,
) {
    let tracker = js.as_ref().map(|j| &j.0);
    let acks = js.as_ref().map(|j| &j.1);
    let (tx, rx) = mpsc::unbounded_channel();
    let mine = std::sync::atomic::AtomicUsize::new(0);
    let outbox = Outbox {
        tx,
        mine: &mine,
        all: &unpublished,
    };
    let decide = decide_loop(
        (check, stream),
        (&engine, &wire, &counters),
        (tracker, acks),
        outbox,
        (beats.worker(k), k),
    );
    let publish = publish_unsent(rx, &wire, &counters, acks, (&mine, &unpublished));
    // One task: the loop that publishes what the stream connection left waiting runs
    // beside the decisions and ends after them, once the last is out.
    tokio::join!(decide, publish);
}

async fn decide_loop(
    (mut check, mut stream): (mpsc::Receiver<Batch>, mpsc::Receiver<Batch>),
    (engine, wire, counters): (&Engine, &Wire, &Counters),
    (tracker, acks): (Option<&Tracker>, Option<&Acks>),
    outbox: Outbox<'_>,
    (beat, k): (&WorkerBeat, usize),
) {
    let out = (&outbox, acks);
    loop {
        let (mut batch, path) = tokio::select! {
            biased;
            Some(b) = check.recv() => (b, IntakePath::Check),
            Some(b) = stream.recv() => (b, IntakePath::Stream),
            else => break,
        };
        // Jobs are decided in place (by reference): moved out of the batch and into each
        // decision's future, a job was copied twice (a few hundred bytes each time).
        for job in batch.iter_mut() {
            if path == IntakePath::Stream {
                // Request-reply first, even in the middle of a stream batch.
                while let Ok(mut urgent) = check.try_recv() {
                    for j in urgent.iter_mut() {
                        beat.begin();
                        let path = IntakePath::Check;
                        decide_one(engine, wire, counters, (tracker, out), j, path).await;
                        stalled_on(beat, j, IntakePath::Check, k);
                    }
                }
            }
            beat.begin();
            decide_one(engine, wire, counters, (tracker, out), job, path).await;
            stalled_on(beat, job, path, k);
        }
    }
}

/// Ends a worker's hold on `job`; if the watchdog reported that hold as a stall, logs
/// which transaction it was (only the worker knows).
fn stalled_on(beat: &WorkerBeat, job: &Job, path: IntakePath, worker: usize) {
    if beat.end() {
        tracing::warn!(
            worker,
            id = %job.txn.id,
            path = path.as_str(),
            "the transaction a stalled worker held is done"
        );
    }
}

/// The async runtime's heartbeat for the watchdog: when every runtime thread is blocked,
/// it stops.
async fn heartbeat(beats: Arc<Beats>) {
    let mut tick = tokio::time::interval(crate::watchdog::HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        beats.runtime_tick();
    }
}

/// The watchdog thread: logs each stall when it is found and when it ends, counts it,
/// and keeps the stall gauges current.
fn start_watchdog(
    beats: Arc<Beats>,
    after: Duration,
    counters: Arc<Counters>,
) -> std::io::Result<Watchdog> {
    let after_ms = after.as_millis() as u64;
    Watchdog::start(beats, after, move |events, (workers, runtime)| {
        for e in events {
            match *e {
                StallEvent::WorkerStalled { worker, held } => {
                    counters.stall(false);
                    tracing::error!(
                        worker,
                        held_ms = held.as_millis() as u64,
                        stall_after_ms = after_ms,
                        "a decision worker has held one transaction too long: the transactions \
                         of its cards wait behind it (a bug, or a publish that cannot go out: \
                         is NATS reachable?); its id is logged when it is done"
                    );
                }
                StallEvent::WorkerMoving { worker, lasted } => tracing::warn!(
                    worker,
                    lasted_ms = lasted.as_millis() as u64,
                    "a stalled decision worker moves again"
                ),
                StallEvent::RuntimeStalled { quiet } => {
                    counters.stall(true);
                    tracing::error!(
                        quiet_ms = quiet.as_millis() as u64,
                        stall_after_ms = after_ms,
                        "the async runtime has not run its heartbeat: its threads are blocked \
                         (a bug); intake, decisions and replies wait"
                    );
                }
                StallEvent::RuntimeMoving { lasted } => tracing::warn!(
                    lasted_ms = lasted.as_millis() as u64,
                    "the async runtime runs again"
                ),
            }
        }
        counters.stalled_now(workers, runtime);
    })
}

async fn decide_one(
    engine: &Engine,
    wire: &Wire,
    counters: &Counters,
    (tracker, (outbox, acks)): (Option<&Tracker>, (&Outbox<'_>, Option<&Acks>)),
    job: &mut Job,
    path: IntakePath,
) {
    counters.queued(path, -1);
    // A bug must cost one transaction, not the worker (and every card routed to it).
    let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.decide(&job.txn, job.received_ms)
    }));
    if let (Some((seq, _)), Some(t)) = (&job.js, tracker) {
        // In the windows now (after a panic, maybe in part): below the next cut.
        lock(t).decided(*seq);
    }
    let out = match decided {
        Ok(out) => out,
        Err(_) => {
            failed(wire, counters, (outbox, acks), job, path).await;
            return;
        }
    };
    if out.id_reused {
        id_reused(wire, counters, (outbox, acks), job, path).await;
        return;
    }
    if out.duplicate {
        // Answered from the dedupe table: no engine time of its own, no rule hits.
        counters.duplicate();
    } else {
        counters.decision_time(path, out.decision.engine_us as f64 / 1e6);
        for r in &out.decision.rules {
            counters.rule_hit(r);
        }
    }
    if out.too_late {
        counters.too_late();
    }
    if out.ts_clamped {
        counters.ts_clamped();
    }
    // Fault injection for tests (feature `failpoints`): a worker stuck while it publishes,
    // as on a connection whose buffer is full (`deliver=return(ms)`: waits, yielding).
    #[cfg(feature = "failpoints")]
    if out.decision.id.starts_with("failpoint-") {
        if let Some(Some(ms)) = fail::eval("deliver", |arg| arg.and_then(|a| a.parse().ok())) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    if let Reply::Stream = job.reply {
        outbox.send(wire, counters, acks, job, out.decision, out.json);
        return;
    }
    let epoch = wire.stream_epoch();
    match wire.deliver(&job.reply, &out.decision, out.json).await {
        Ok(()) => {
            counters.decided(path, out.decision.action);
            counters.end_to_end_time(path, job.received_at.elapsed().as_secs_f64());
            // Acknowledged only once the server has read the decision: a crash or a
            // broken connection before that means a redelivery, answered from the
            // dedupe table.
            hand_ack(acks, job, epoch);
        }
        Err(e) => {
            counters.publish_error();
            tracing::warn!(error = %e, id = %out.decision.id, "could not publish a decision");
        }
    }
}

/// A decision that panicked (a bug): the requester gets an `internal` error at once instead
/// of waiting out its timeout, and a stream transaction goes to fraud.invalid, re-encoded,
/// where its payload is kept for a person to look at.
async fn failed(
    wire: &Wire,
    counters: &Counters,
    out: (&Outbox<'_>, Option<&Acks>),
    job: &mut Job,
    path: IntakePath,
) {
    counters.decision_failed(path);
    tracing::error!(
        id = %job.txn.id,
        path = path.as_str(),
        "decision failed (a bug); answered as an internal error"
    );
    refuse(wire, counters, out, job, Refused::Failed).await;
}

/// Sends the refusal of a decoded transaction: an error reply to a request, at once; the
/// re-encoded transaction on fraud.invalid for a stream one, through the worker's outbox
/// (a worker never waits for the stream connection).
async fn refuse(
    wire: &Wire,
    counters: &Counters,
    (outbox, acks): (&Outbox<'_>, Option<&Acks>),
    job: &mut Job,
    why: Refused,
) {
    let js = job.js.take();
    match job.reply {
        Reply::Stream => {
            let txn = job.txn.clone();
            outbox.queue(Unsent::Refused { txn, why, js }, counters);
        }
        Reply::Check(_) => {
            send_refusal(wire, counters, acks, (&job.txn, &job.reply), why, js).await;
        }
    }
}

/// Publishes a refusal (see [`refuse`]) and settles its JetStream message: an `id_reused`
/// one is acknowledged once the server has read the refusal (unsent, it comes again); a
/// failed one is terminated either way.
async fn send_refusal(
    wire: &Wire,
    counters: &Counters,
    acks: Option<&Acks>,
    (txn, reply): (&Transaction, &Reply),
    why: Refused,
    js: Option<(u64, transport::Ack)>,
) {
    let epoch = wire.stream_epoch();
    let refusal = why.refusal(&txn.id);
    let sent = match reply {
        Reply::Check(Some(inbox)) => wire.reply_error(inbox.clone(), &refusal).await,
        Reply::Check(None) => Ok(()),
        Reply::Stream => wire.publish_refused(txn, &refusal).await,
    };
    match why {
        Refused::IdReused => {
            if sent.is_err() {
                // With JetStream, not acknowledged: it comes again after `ack_wait`, is
                // refused again, and its report is tried again.
                counters.publish_error();
                return;
            }
            if let (Some((_, ack)), Some(acks)) = (js, acks) {
                acks.hand(Handed::new(epoch, ack, &txn.id));
            }
        }
        Refused::Failed => {
            if let Err(e) = sent {
                counters.publish_error();
                tracing::error!(error = %e, id = %txn.id, "could not report a failed decision");
            }
            if let Some((_, ack)) = js {
                // Not again, even when the report above failed: a redelivery would fail
                // the same way, and each try may have counted it in the windows again. The
                // message stays in the stream's storage, and the server announces its
                // termination.
                if ack.term().await.is_err() {
                    counters.ack_error();
                }
            }
        }
    }
}

/// A transaction under an id the retry table holds for another payment: refused as
/// `id_reused`, like invalid input, nothing counted in the windows.
/// Logged with its id, since it means a switch that reuses ids (wrapped counters, two
/// terminals with one id range), whose transactions would otherwise have been answered
/// with another transaction's decision.
async fn id_reused(
    wire: &Wire,
    counters: &Counters,
    out: (&Outbox<'_>, Option<&Acks>),
    job: &mut Job,
    path: IntakePath,
) {
    counters.invalid(ErrorCode::IdReused);
    // A switch whose counter wrapped sends them by the thousand: one line per 10 s, with
    // how many more there were (the metric counts each).
    static LOG: Throttle = Throttle::new();
    if let Some(more) = LOG.pass(now_ms(), 10_000) {
        tracing::warn!(
            id = %job.txn.id,
            path = path.as_str(),
            refused_since_last_line = more,
            "transaction id reused within the dedupe horizon for another payment; refused (id_reused)"
        );
    }
    refuse(wire, counters, out, job, Refused::IdReused).await;
}

/// Lets through at most one event per interval (a log line that could come for every
/// message), counting the others.
struct Throttle {
    last_ms: std::sync::atomic::AtomicI64,
    skipped: std::sync::atomic::AtomicU64,
}

impl Throttle {
    const fn new() -> Self {
        Throttle {
            last_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            skipped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(events held back since the last one let through)` when `every_ms` have
    /// passed since then (always the first time); `None`, counted, otherwise.
    fn pass(&self, now_ms: i64, every_ms: i64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= every_ms
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.skipped.swap(0, Ordering::Relaxed))
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A JetStream message whose decision (or refusal) was handed to the stream connection
/// while it was connection `epoch` ([`Wire::stream_epoch`]): acknowledged by [`acker`]
/// once the server is known to have read what was handed over.
struct Handed {
    epoch: u64,
    ack: transport::Ack,
    at: Instant,
    /// Fault injection for tests: the transaction's id starts with `failpoint-`.
    #[cfg(feature = "failpoints")]
    failpoint: bool,
}

impl Handed {
    fn new(epoch: u64, ack: transport::Ack, _id: &str) -> Self {
        Handed {
            epoch,
            ack,
            at: Instant::now(),
            #[cfg(feature = "failpoints")]
            failpoint: _id.starts_with("failpoint-"),
        }
    }
}

/// Where the acknowledgements of decided JetStream messages go ([`acker`]), and how many
/// are on their way there or waiting in it.
#[derive(Clone)]
struct Acks {
    tx: mpsc::UnboundedSender<Handed>,
    outstanding: Arc<std::sync::atomic::AtomicUsize>,
}

impl Acks {
    fn new() -> (Acks, mpsc::UnboundedReceiver<Handed>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let outstanding = Arc::default();
        (Acks { tx, outstanding }, rx)
    }

    fn hand(&self, h: Handed) {
        use std::sync::atomic::Ordering::SeqCst;
        self.outstanding.fetch_add(1, SeqCst);
        // The acker gone (it ended: the service is stopping): not acknowledged, so the
        // message comes again and is answered from the dedupe table.
        if self.tx.send(h).is_err() {
            self.outstanding.fetch_sub(1, SeqCst);
        }
    }

    /// Acknowledgements handed over and not yet sent or withheld.
    fn outstanding(&self) -> usize {
        self.outstanding.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Fault injection for tests: whether fail point `name` is set for this acknowledgement
/// (its transaction's id starts with `failpoint-`).
#[cfg(feature = "failpoints")]
fn injected(name: &str, h: &Handed) -> bool {
    h.failpoint && fail::eval(name, |_| ()).is_some()
}

#[cfg(not(feature = "failpoints"))]
fn injected(_: &str, _: &Handed) -> bool {
    false
}

/// Hands `job`'s acknowledgement (JetStream intake only) to the acker, for what was
/// published for it on connection `epoch`.
fn hand_ack(acks: Option<&Acks>, job: &mut Job, epoch: u64) {
    if let (Some((_, ack)), Some(acks)) = (job.js.take(), acks) {
        acks.hand(Handed::new(epoch, ack, &job.txn.id));
    }
}

/// How long a confirming round trip may take, and the shortest time between two: under
/// load one round trip covers every acknowledgement handed over meanwhile, and at a
/// trickle there are at most a few hundred a second of them.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
const CONFIRM_EVERY: Duration = Duration::from_millis(2);

/// Acknowledges JetStream messages once the server has read their decisions.
///
/// A publish returns once the client has queued it. If the connection breaks, what it
/// had not yet delivered is dropped, while what is still queued goes out on the next
/// connection; an ack sent right after its decision could then reach the server without
/// the decision, and the transaction would be lost though acknowledged. So the workers
/// hand each acknowledgement over with the connection its decision went out on, and this
/// task acknowledges in rounds: one request round trip on the stream connection
/// ([`Wire::stream_read_on`]) proves the server read everything handed over before it on
/// that same connection; acknowledgements from an earlier connection are withheld (the
/// messages come again after `ack_wait` and are answered from the dedupe table, counted
/// once). Without an answer the round is tried again, until `ack_wait` has passed (the
/// message is then delivered again anyway). Ends when every sender is gone (the workers
/// and the stream intake, at shutdown) and nothing is left waiting.
async fn acker(
    (mut rx, outstanding): (
        mpsc::UnboundedReceiver<Handed>,
        Arc<std::sync::atomic::AtomicUsize>,
    ),
    (wire, probe): (Wire, async_nats::Subject),
    counters: Arc<Counters>,
    ack_wait: Duration,
) {
    let settled = || outstanding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    let mut waiting: Vec<Handed> = Vec::new();
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(h) => waiting.push(h),
                None => break,
            }
        }
        // Everything handed over meanwhile rides on this round.
        while let Ok(h) = rx.try_recv() {
            waiting.push(h);
        }
        let started = tokio::time::Instant::now();
        let epoch = wire.stream_epoch();
        let read = wire.stream_read_on(epoch, &probe, CONFIRM_TIMEOUT).await;
        let mut kept = Vec::new();
        for h in waiting.drain(..) {
            // Fault injection for tests (feature `failpoints`): `ack`, an acknowledgement
            // lost on the way; `ack_reconnect`, a decision handed to a connection that was
            // replaced before the server confirmed it.
            let replaced = injected("ack_reconnect", &h);
            if h.epoch != epoch || replaced || (!read && h.at.elapsed() >= ack_wait) {
                counters.ack_withheld();
            } else if !read {
                kept.push(h);
                continue;
            } else if !injected("ack", &h) {
                if let Err(e) = h.ack.ack().await {
                    counters.ack_error();
                    tracing::warn!(error = %e, "could not acknowledge");
                }
            }
            settled();
        }
        waiting = kept;
        if !waiting.is_empty() {
            static LOG: Throttle = Throttle::new();
            if let Some(more) = LOG.pass(now_ms(), 10_000) {
                tracing::warn!(
                    waiting = waiting.len(),
                    rounds_since_last_line = more,
                    "the server did not confirm that it read the published decisions; their acknowledgements wait"
                );
            }
        }
        tokio::time::sleep_until(started + CONFIRM_EVERY).await;
    }
}

/// Evicts idle keys and old ids, then publishes the state sizes. A pass over the state is
/// spread over `every` in [`Engine::sweep_steps`] steps (a slice of one table shard each),
/// so the scan never takes a core for long: a whole sweep at once (tens of ms at a few
/// hundred thousand keys and ids) delayed every decision made meanwhile and left the
/// caches cold. Steps run right here on the runtime, a fraction of a millisecond each:
/// handed to the blocking pool, every step woke a thread of its own, and those wake-ups
/// (hundreds a second) cost more latency than the scans (docs/PERFORMANCE.md). A step
/// that would wait for a snapshot's copy, a swap or a cap eviction is tried again at the
/// next tick. The gauges and the debug line come once per pass.
async fn sweeper(
    engine: Arc<Engine>,
    wire: Wire,
    counters: Arc<Counters>,
    tracker: Option<Tracker>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // The step count follows the rule set's key groups (read once per pass).
        let steps = engine.sweep_steps().max(1);
        let (tick, per_tick) = sweep_cadence(every, steps);
        let mut pass = SweepStep::default();
        let mut busy = Duration::ZERO;
        let mut step = 0;
        'pass: while step < steps {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => return,
            }
            let started = Instant::now();
            let clock = tracker
                .as_ref()
                .map_or_else(now_ms, |t| lock(t).clock(now_ms()));
            for _ in 0..per_tick.min(steps - step) {
                // A step that panicked counts as empty; the pass goes on with the next one.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine.try_sweep_step(clock, step)
                })) {
                    Ok(None) => continue 'pass, // busy: the same step at the next tick
                    Ok(Some(st)) => pass.absorb(st),
                    Err(_) => {}
                }
                step += 1;
            }
            busy += started.elapsed();
        }
        counters.refresh();
        // With JetStream the stream connection carries more than transactions (see
        // `Counters::nats`): only the request connection is counted.
        let core = tracker.is_none();
        counters.nats(
            wire.connected(),
            [
                Some(wire.in_messages(IntakePath::Check)),
                core.then(|| wire.in_messages(IntakePath::Stream)),
            ],
        );
        let ev = &pass.evicted;
        counters.state(&engine.stats_with_heap(&pass.heap), ev);
        tracing::debug!(
            keys = ev.keys,
            ids = ev.dedupe,
            took_ms = busy.as_millis() as u64,
            "swept idle state"
        );
    }
}

/// How often the sweeper ticks and how many steps it runs per tick, for a pass of `steps`
/// over `every` (at least 100 ms): one step per tick, ticks spread over the interval;
/// below the timer's resolution (a short interval, as in tests) several steps per tick,
/// so a pass still takes about `every`.
fn sweep_cadence(every: Duration, steps: usize) -> (Duration, usize) {
    let every = every.max(Duration::from_millis(100));
    let steps = steps.max(1);
    let tick = (every / steps as u32).max(Duration::from_millis(2));
    let per_tick = (steps as u128 * tick.as_nanos() / every.as_nanos()).max(1) as usize;
    (tick, per_tick)
}

/// Writes a snapshot every `every`, off the async runtime.
async fn snapshotter(
    snaps: Snapshots,
    engine: Arc<Engine>,
    counters: Arc<Counters>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = every.max(Duration::from_secs(1));
    counters.snapshot_interval(every.as_secs_f64());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the state was just loaded
    loop {
        tokio::select! {
            _ = tick.tick() => {
                snaps.refresh_ack_floor().await;
                let (s, e, c) = (snaps.clone(), engine.clone(), counters.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    s.write(&e, &c);
                })
                .await;
            }
            _ = stop.changed() => break,
        }
    }
}

/// Publishes how many transactions wait in the workers' queues, every second.
async fn queue_monitor(
    counters: Arc<Counters>,
    unpublished: Arc<Unpublished>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => counters.publish_queued(unpublished.now()),
            _ = stop.changed() => break,
        }
    }
}

/// Watches the rule directory (recursively: list files live in subdirectories): one
/// message per change. Started before the rules are first read, so that no edit is missed.
///
/// inotify watches the directory's inode, not its path: a directory replaced under the same
/// path (`mv rules.new rules`, `rm -rf rules && cp -r ...`, a release symlink switched to
/// another directory) would never be heard from again, and every later edit (a freeze
/// written to a list file) would wait for a SIGHUP. So [`RulesWatch::follow`], called every
/// second by the reload task, compares what the path leads to now with what is watched,
/// and watches the new directory when they differ.
struct RulesWatch {
    dir: PathBuf,
    tx: mpsc::UnboundedSender<Change>,
    watcher: notify::RecommendedWatcher,
    /// What `dir` led to when it was watched (real path, device, inode).
    identity: Option<DirIdentity>,
    /// Set by the watcher when the watched directory itself was removed or moved: then it
    /// is watched again even if the directory now at the path has the same identity (a
    /// file system may give a new directory the inode just freed by `rm -rf`).
    root_gone: Arc<AtomicBool>,
}

type DirIdentity = (PathBuf, u64, u64);

/// What `dir` leads to now (symlinks followed), or `None` while it does not exist.
fn dir_identity(dir: &Path) -> Option<DirIdentity> {
    let real = std::fs::canonicalize(dir).ok()?;
    let meta = std::fs::metadata(&real).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((real, meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Some((real, 0, 0))
    }
}

/// Files that are not the rules and change often: editors' swap, backup and lock files
/// (vim writes its swap file every few seconds while a file is open) and a git checkout's
/// own directory. A change that touches nothing else reloads nothing.
fn not_rules(dir: &Path, path: &Path) -> bool {
    let rel = path.strip_prefix(dir).unwrap_or(path);
    if rel.components().any(|c| c.as_os_str() == ".git") {
        return true;
    }
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.ends_with('~')
        || [".swp", ".swx", ".swo"].iter().any(|x| name.ends_with(x))
        || name.starts_with(".#")
        || (name.starts_with('#') && name.ends_with('#'))
        || name == "4913" // vim's test of whether it may write in the directory
}

impl RulesWatch {
    fn new(dir: &Path, tx: mpsc::UnboundedSender<Change>) -> Result<RulesWatch, ServiceError> {
        // What the path leads to is read before the watch starts: a replacement in between
        // then shows at the first `follow`.
        let identity = dir_identity(dir);
        let root_gone = Arc::new(AtomicBool::new(false));
        let watcher = Self::watcher(dir, tx.clone(), root_gone.clone())?;
        Ok(RulesWatch {
            dir: dir.to_path_buf(),
            tx,
            watcher,
            identity,
            root_gone,
        })
    }

    fn watcher(
        dir: &Path,
        tx: mpsc::UnboundedSender<Change>,
        root_gone: Arc<AtomicBool>,
    ) -> Result<notify::RecommendedWatcher, ServiceError> {
        use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
        use notify::{EventKind, RecursiveMode, Watcher};
        // Event paths are absolute (notify makes a relative watch path absolute).
        let root = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(ev) = res else { return };
            if matches!(
                ev.kind,
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
            ) && ev.paths.contains(&root)
            {
                root_gone.store(true, Ordering::Relaxed);
            }
            // Editors save by writing a temp file and renaming it over the original:
            // creations, modifications, renames and removals all count, unless every
            // path of the event is an editor's or git's own file (an event without a
            // path, a rescan, counts).
            let paths: Vec<&PathBuf> = ev.paths.iter().filter(|p| !not_rules(&root, p)).collect();
            if !ev.paths.is_empty() && paths.is_empty() {
                return;
            }
            let each = |f: fn(PathBuf) -> Change| {
                for p in &paths {
                    let _ = tx.send(f((*p).clone()));
                }
            };
            match ev.kind {
                // A file written to is complete when its writer closes it.
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => each(Change::Done),
                EventKind::Access(_) => {}
                // Only inotify (Linux) reports closes: elsewhere a write is a plain change.
                // A link made (`ln -s`, `ln`, a checkout) is never closed after writing:
                // only a new regular file of one name is waited for.
                #[cfg(any(target_os = "linux", target_os = "android"))]
                EventKind::Create(notify::event::CreateKind::File) => {
                    for p in &paths {
                        let _ = tx.send(match new_regular_file(p) {
                            true => Change::Writing((*p).clone()),
                            false => Change::Touched,
                        });
                    }
                }
                #[cfg(any(target_os = "linux", target_os = "android"))]
                EventKind::Modify(ModifyKind::Data(_)) => each(Change::Writing),
                // Gone from under its name: nothing to wait for there.
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                    each(Change::Done)
                }
                _ => {
                    let _ = tx.send(Change::Touched);
                }
            }
        })
        .map_err(|source| ServiceError::Watch {
            dir: dir.display().to_string(),
            source,
        })?;
        watcher
            .watch(dir, RecursiveMode::Recursive)
            .map_err(|source| ServiceError::Watch {
                dir: dir.display().to_string(),
                source,
            })?;
        Ok(watcher)
    }

    /// Watches what the path leads to now, if that is another directory than the one
    /// watched; true when it did (the caller reloads). A path that leads nowhere for the
    /// moment (between `rm -rf` and `cp -r`) keeps the old watch until it does.
    fn follow(&mut self) -> bool {
        let Some(now) = dir_identity(&self.dir) else {
            return false;
        };
        let gone = self.root_gone.swap(false, Ordering::Relaxed);
        if !gone && self.identity.as_ref() == Some(&now) {
            return false;
        }
        match Self::watcher(&self.dir, self.tx.clone(), self.root_gone.clone()) {
            Ok(w) => {
                tracing::info!(
                    dir = %self.dir.display(),
                    now = %now.0.display(),
                    "the rules directory was replaced: watching the new one"
                );
                self.watcher = w;
                self.identity = Some(now);
                true
            }
            Err(e) => {
                self.root_gone.store(gone, Ordering::Relaxed);
                tracing::warn!(error = %e, "could not watch the replaced rules directory; trying again");
                false
            }
        }
    }
}

/// What the watcher saw.
#[derive(Debug)]
enum Change {
    /// Something in the rules directory changed.
    Touched,
    /// A file was made or written to, and its writer may still be at it.
    Writing(PathBuf),
    /// A file written to was closed, or went away from under its name.
    Done(PathBuf),
}

/// Whether `p` is a regular file with one name (not a symlink, not a hard link): a file
/// whose writer will close it.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn new_regular_file(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file() && m.nlink() == 1)
}

/// Files being written (made or written to, and not closed yet), since when.
#[derive(Default)]
struct Writing(std::collections::HashMap<PathBuf, tokio::time::Instant>);

impl Writing {
    /// Takes in what the watcher saw at `now`.
    fn note(&mut self, change: &Change, now: tokio::time::Instant) {
        match change {
            Change::Writing(p) => {
                self.0.entry(p.clone()).or_insert(now);
            }
            Change::Done(p) => {
                self.0.remove(p);
            }
            Change::Touched => {}
        }
    }

    /// Whether a file is still being written, after giving up (with a warning) on each
    /// one written for longer than [`MAX_WRITE_WAIT`]: one writer that keeps its file open
    /// neither holds reloads back nor lets another file be loaded half written.
    fn settling(&mut self, now: tokio::time::Instant) -> bool {
        let mut expired = Vec::new();
        self.0.retain(|p, since| {
            let keep = now.saturating_duration_since(*since) < MAX_WRITE_WAIT;
            if !keep {
                expired.push(p.display().to_string());
            }
            keep
        });
        if !expired.is_empty() {
            tracing::warn!(
                files = %expired.join(", "),
                "rule files still being written after {MAX_WRITE_WAIT:?}: loaded as they are"
            );
        }
        !self.0.is_empty()
    }
}

fn watch_rules(dir: &Path) -> Result<(RulesWatch, mpsc::UnboundedReceiver<Change>), ServiceError> {
    let (tx, rx) = mpsc::unbounded_channel::<Change>();
    Ok((RulesWatch::new(dir, tx)?, rx))
}

/// How long a run of changes may put a reload off, in debounce periods: a file that keeps
/// changing (a feed appending to a list every 200 ms) must not hold every reload back.
const MAX_DEFER_DEBOUNCES: u32 = 10;

/// How long a reload waits for files that are being written (made or written to, and not
/// closed yet): a list exported slowly into place (`export > lists/blocked_cards.txt`) is
/// empty or half there until its writer closes it, and such a set often compiles (an empty
/// list, a rule file missing its windows): loaded, it is the half-loaded rule set the
/// reload must never activate, and the key groups it drops lose their history. A writer
/// that keeps a file open longer than this does not hold reloads back for good.
const MAX_WRITE_WAIT: Duration = Duration::from_secs(30);

/// How long the state of key groups a reload dropped is kept for a reload that brings them
/// back (a deploy in two steps, a file caught half copied), before it is freed.
const RETIRED_GRACE: Duration = Duration::from_secs(300);

/// Reloads on the watcher's changes (`rx`, from [`watch_rules`]) after `debounce` of quiet
/// (at most [`MAX_DEFER_DEBOUNCES`] debounces after the first change of a run) once no file
/// is being written (at most [`MAX_WRITE_WAIT`]), when the directory is replaced (after the
/// same quiet), and at once on SIGHUP.
#[allow(clippy::too_many_arguments)]
async fn reload_task(
    mut rx: mpsc::UnboundedReceiver<Change>,
    mut watch: RulesWatch,
    dir: PathBuf,
    cfg: EngineConfig,
    engine: Arc<Engine>,
    counters: Arc<Counters>,
    debounce: Duration,
    mut stop: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut pending: Option<tokio::time::Instant> = None;
    let mut first: Option<tokio::time::Instant> = None;
    let mut replaced = false;
    let mut writing = Writing::default();
    // When to free the key groups the last reload dropped (kept meanwhile in case the
    // next reload brings them back: see `Engine::swap_rules`).
    let mut free_retired: Option<tokio::time::Instant> = None;
    let mut look = tokio::time::interval(Duration::from_secs(1));
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        // Debounce: a change arms a deadline; more changes push it back, up to a cap
        // from the first; SIGHUP reloads at once whatever is pending.
        let quiet = async {
            match pending {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending::<()>().await,
            }
        };
        let mut changed = |pending: &mut Option<tokio::time::Instant>| {
            let now = tokio::time::Instant::now();
            let first = *first.get_or_insert(now);
            *pending = Some((now + debounce).min(first + debounce * MAX_DEFER_DEBOUNCES));
        };
        let cause = tokio::select! {
            Some(change) = rx.recv() => {
                writing.note(&change, tokio::time::Instant::now());
                changed(&mut pending);
                continue;
            }
            _ = async {
                match free_retired {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending::<()>().await,
                }
            } => {
                free_retired = None;
                let e = engine.clone();
                // A big table takes a while to free: off the runtime.
                if let Ok(n) = tokio::task::spawn_blocking(move || e.free_retired()).await {
                    if n > 0 {
                        tracing::info!(groups = n, "freed the state of the key groups the rules dropped");
                    }
                }
                continue;
            }
            _ = look.tick() => {
                // A directory copied into place may still be filling: reload after
                // the same quiet as for any change.
                if watch.follow() {
                    replaced = true;
                    changed(&mut pending);
                }
                continue;
            }
            _ = quiet => {
                if writing.settling(tokio::time::Instant::now()) {
                    // Look again after another quiet period (a close also wakes it).
                    pending = Some(tokio::time::Instant::now() + debounce);
                    continue;
                }
                if std::mem::take(&mut replaced) { "rules directory replaced" } else { "file change" }
            }
            _ = sighup => "SIGHUP",
            _ = stop.changed() => break,
        };
        pending = None;
        first = None;
        replaced = false;
        if reload(&dir, &cfg, &engine, &counters, cause).await > 0 {
            free_retired = Some(tokio::time::Instant::now() + RETIRED_GRACE);
        }
    }
}

/// Compiles the directory and swaps it in, or logs every error and keeps the old rules.
pub async fn reload(
    dir: &Path,
    cfg: &EngineConfig,
    engine: &Arc<Engine>,
    counters: &Counters,
    cause: &str,
) -> usize {
    let mut retired = 0;
    let (d, c) = (dir.to_path_buf(), cfg.clone());
    let loaded = match tokio::task::spawn_blocking(move || crate::rules::load_dir(&d, &c)).await {
        Ok(r) => r,
        Err(e) => {
            counters.reload(false);
            tracing::error!(error = %e, "rule reload task failed");
            return 0;
        }
    };
    let current = engine.rules().version.clone();
    match loaded {
        Ok(rs) if rs.version == current => {
            counters.rules_dir_valid(true);
            tracing::debug!(version = %current, cause, "rules unchanged");
        }
        Ok(rs) => {
            let summary = rs.summary();
            for w in &rs.warnings {
                tracing::warn!(version = %rs.version, "{w}");
            }
            let e = engine.clone();
            // What changed in the lists, for the audit trail (never an entry in clear):
            // off the runtime with the swap, as a big list takes a while to compare.
            let swap = move || {
                let changes: Vec<String> = rs
                    .list_changes(&e.rules())
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                (e.swap_rules(rs), changes)
            };
            match tokio::task::spawn_blocking(swap).await {
                Ok((sw, changes)) => {
                    retired = sw.dropped;
                    let lists = if changes.is_empty() {
                        "unchanged".to_string()
                    } else {
                        changes.join("; ")
                    };
                    counters.reload(true);
                    counters.rules_dir_valid(true);
                    counters.rules_loaded(&engine.rules(), unix_secs());
                    tracing::info!(
                        version = %sw.version,
                        previous = %current,
                        cause,
                        kept_groups = sw.kept,
                        migrated_groups = sw.migrated,
                        migrated_keys = sw.migrated_keys,
                        new_groups = sw.added,
                        dropped_groups = sw.dropped,
                        revived_groups = sw.revived,
                        lists = %lists,
                        "rules reloaded: {summary}"
                    );
                }
                Err(e) => {
                    counters.reload(false);
                    tracing::error!(error = %e, "rule swap failed");
                }
            }
        }
        Err(e) => {
            counters.reload(false);
            counters.rules_dir_valid(false);
            tracing::error!(
                errors = e.diagnostics.len(),
                keeping = %current,
                cause,
                "rule reload failed; the previous rules stay active\n{}",
                e.render()
            );
        }
    }
    retired
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_through_per_interval_and_counts_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.pass(1_000, 10_000), Some(0));
        assert_eq!(t.pass(1_001, 10_000), None);
        assert_eq!(t.pass(10_999, 10_000), None);
        assert_eq!(t.pass(11_000, 10_000), Some(2));
        assert_eq!(t.pass(30_000, 10_000), Some(0));
    }

    /// A consumer made again starts no later than where a pull of the last redelivery
    /// time started: messages on their way to a dropped pull come again only from the
    /// old consumer, after its `ack_wait`.
    #[test]
    fn a_consumer_made_again_starts_where_a_recent_pull_did() {
        let t0 = Instant::now();
        let mut f = InFlight {
            next: 11,
            hold: Duration::from_secs(60),
            ..Default::default()
        };
        f.pull_started(t0);
        // That pull is dropped with 11..=15 on their way; the next one delivers from 16.
        let t1 = t0 + Duration::from_secs(5);
        f.pull_started(t1);
        for seq in 16..=20 {
            f.taken_at(seq, 1_000, t1);
            f.decided(seq);
        }
        assert_eq!(f.resume_at_on(t1), 11, "not past 11..=15");
        // (The second pull started at 11 too: nothing was taken before it.)
        assert_eq!(f.resume_at_on(t1 + Duration::from_secs(29)), 11);
        // After the redelivery time (30 s) the old consumer has sent them again.
        assert_eq!(f.resume_at_on(t1 + Duration::from_secs(30)), 21);
        // An undecided message holds it down as before.
        f.taken_at(21, 1_000, t1);
        assert_eq!(f.resume_at_on(t1 + Duration::from_secs(40)), 21);
        // A pull made again while 21 is undecided starts from 22 (below it, all was
        // taken); once 21 is decided, only that pull's start holds the position down.
        let t2 = t1 + Duration::from_secs(41);
        f.pull_started(t2);
        f.decided(21);
        assert_eq!(f.resume_at_on(t2), 22);
        // Pulls made again with nothing taken between them keep one entry.
        for s in 1..=10 {
            f.pull_started(t2 + Duration::from_secs(s));
        }
        assert_eq!(f.pulls.len(), 1);
        assert_eq!(f.resume_at_on(t2 + Duration::from_secs(39)), 22);
        assert_eq!(
            f.pulls.len(),
            1,
            "the last of them within its redelivery time"
        );
        f.resume_at_on(t2 + Duration::from_secs(40));
        assert!(f.pulls.is_empty());
    }

    /// A stream made again starts the position over at its first message, whatever was
    /// taken of the old one, and the cursor names the new stream.
    #[test]
    fn in_flight_starts_over_in_a_stream_made_again() {
        let t0 = Instant::now();
        let mut f = InFlight {
            next: 40,
            hold: Duration::from_secs(60),
            stream_created_ns: Some(1),
            ..Default::default()
        };
        f.taken_at(40, 1_000, t0);
        f.taken_at(41, 1_000, t0);
        f.floor_read(Some(39));
        assert_eq!(f.stream_made_again(2, 1), 1);
        assert_eq!((f.low(), f.resume_at()), (1, 1));
        assert_eq!(f.stream_created_ns, Some(2));
        f.decided(40); // an old message finished late: nothing of the new stream moves
        f.taken_at(1, 2_000, t0);
        assert_eq!(f.low(), 1);
        f.decided(1);
        assert_eq!(f.low(), 2);
    }

    #[test]
    fn in_flight_cursor_and_eviction_clock() {
        // One instant for "now" throughout: a stall of the test cannot move the clock.
        let t0 = Instant::now();
        let mut f = InFlight {
            next: 10,
            hold: Duration::from_secs(60),
            ..Default::default()
        };
        assert_eq!(f.low(), 10);
        assert_eq!(f.clock_at(5_000, t0), 5_000);
        // A backlog: messages stored long before now.
        f.taken_at(10, 1_000, t0);
        f.taken_at(11, 1_100, t0);
        f.taken_at(12, 1_200, t0);
        assert_eq!(f.low(), 10);
        assert_eq!(f.resume_at(), 10, "at the oldest undecided");
        assert_eq!(
            f.clock_at(5_000, t0),
            1_000,
            "eviction follows the oldest undecided"
        );
        f.decided(11);
        assert_eq!(f.low(), 10, "out of order: 10 is still undecided");
        f.decided(10);
        assert_eq!(f.low(), 12);
        assert_eq!(
            f.clock_at(5_000, t0),
            1_000,
            "12 is the oldest undecided, but 10 was decided a moment ago"
        );
        // A redelivery of 12 while the first delivery is undecided: both must finish.
        f.taken_at(12, 1_200, t0);
        f.decided(12);
        assert_eq!(f.low(), 12);
        f.decided(12);
        assert_eq!(f.low(), 13, "all taken are decided: one past the highest");
        assert_eq!(
            f.clock_at(5_000, t0),
            1_000,
            "all decided, but 10 was taken a moment ago: its ack may be lost"
        );
        assert_eq!(f.clock_at(900, t0), 900);
        // A message delivered but never taken (lost on the way) holds the ack floor down.
        f.ack_floor = Some(7);
        assert_eq!(f.low(), 8);
        // A consumer made again starts after what was decided, whatever the ack floor.
        assert_eq!(f.resume_at(), 13);
        f.ack_floor = Some(12);
        assert_eq!(f.low(), 13);
        // A floor that could not be read is no floor, not the last one read: that one may
        // lie below ids long gone from the retry table.
        f.ack_floor = Some(7);
        f.floor_read(None);
        assert_eq!(f.low(), 13);
        // The stream goes quiet: the wall clock again (request ids are kept by it).
        f.hold = Duration::ZERO;
        assert_eq!(f.clock_at(5_000, t0 + RECENT_SLOT), 5_000);
        // After a restart: held at the first unacknowledged message's store time.
        f.pin = Some((800, t0 + Duration::from_secs(60)));
        assert_eq!(f.clock_at(5_000, t0), 800);
        f.pin = Some((800, t0 + Duration::from_secs(1)));
        assert_eq!(f.clock_at(5_000, t0 + RECENT_SLOT), 5_000, "the pin ends");
    }

    /// A backlog worked through at many times the speed it was stored: the eviction clock
    /// moves from a message's store time at the wall clock's pace, not the backlog's, so
    /// the id of a message whose ack was lost is still there when it comes again.
    #[test]
    fn the_eviction_clock_ages_recent_messages_at_the_wall_clocks_pace() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut f = InFlight {
            hold: Duration::from_secs(60),
            ..Default::default()
        };
        // Ten minutes of stored traffic, taken and decided within one second.
        f.taken_at(1, 0, t0);
        for seq in 2..=600 {
            f.taken_at(seq, seq as i64 * 1_000, t0 + Duration::from_millis(seq));
        }
        for seq in 1..=600 {
            f.decided(seq);
        }
        let now_ms = 3_600_000;
        assert_eq!(f.clock_at(now_ms, s(1)), 0, "message 1 was taken just now");
        // Its redelivery comes within 2 x ack_wait: 30 s later the clock is 29 s on from
        // message 1's store time (one second of slack), not at the backlog's end.
        assert_eq!(f.clock_at(now_ms, s(30)), 29_000);
        // Later messages, stored later, bound the clock less.
        f.taken_at(601, 601_000, s(30));
        f.decided(601);
        assert_eq!(f.clock_at(now_ms, s(31)), 30_000);
        // After `hold`, nothing taken then can come again: the wall clock.
        assert_eq!(f.clock_at(now_ms, s(92)), now_ms);
        // In real time, the wall clock less the slot.
        let mut g = InFlight {
            hold: Duration::from_secs(60),
            ..Default::default()
        };
        g.taken_at(1, now_ms, t0);
        g.decided(1);
        assert_eq!(g.clock_at(now_ms + 10_000, s(10)), now_ms + 9_000);
    }

    #[tokio::test]
    async fn the_configuration_is_refused_before_any_connection() {
        // No server on this port: an engine that connected (and subscribed) before it
        // checked its configuration would fail on the connection, or worse, take
        // traffic first and then stop.
        let port = crate::demo::free_port().unwrap();
        for (field, value) in [
            ("sweep_interval", "10m"),
            ("reload_debounce", "soon"),
            ("stall_after", "10ms"),
            ("max_age", "1 day"),
            ("duplicate_window", "2 min"),
            // Snapshots under the built-in entity hash key.
            ("hash_key", "/tmp/fraudgate-never-written.snap"),
        ] {
            let mut file = crate::config::FileConfig::default();
            match field {
                "sweep_interval" => file.service.sweep_interval = value.into(),
                "stall_after" => file.service.stall_after = value.into(),
                "max_age" => {
                    file.jetstream.enabled = true;
                    file.jetstream.max_age = value.into();
                }
                "duplicate_window" => {
                    file.jetstream.enabled = true;
                    file.jetstream.duplicate_window = value.into();
                }
                "hash_key" => file.snapshot.path = Some(value.into()),
                _ => file.service.reload_debounce = value.into(),
            }
            let started = Running::start(RunOptions {
                rules_dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"),
                nats_url: format!("nats://127.0.0.1:{port}"),
                engine: EngineConfig::default(),
                file,
            })
            .await;
            match started {
                Err(ServiceError::Config(m)) => assert!(m.contains(field), "{m}"),
                Err(e) => panic!("{field}: not a configuration error: {e}"),
                Ok(_) => panic!("{field} = {value:?} accepted"),
            }
        }
    }

    #[test]
    fn a_sweep_pass_takes_its_interval() {
        for (every_ms, steps) in [
            (10_000u64, 2_560usize),
            (100, 2_560),
            (300_000, 3_072),
            (1_000, 7),
        ] {
            let (tick, per_tick) = sweep_cadence(Duration::from_millis(every_ms), steps);
            assert!(tick >= Duration::from_millis(2), "{every_ms} ms: {tick:?}");
            let pass = tick * steps.div_ceil(per_tick) as u32;
            let every = Duration::from_millis(every_ms);
            assert!(
                pass >= every * 9 / 10 && pass <= every * 11 / 10,
                "{every_ms} ms: {pass:?}"
            );
        }
        // The shipped default: one step per tick.
        assert_eq!(sweep_cadence(Duration::from_secs(10), 2_560).1, 1);
    }

    /// The stream intake waits while the limit of decisions wait for the stream connection,
    /// and goes on once half of them are out.
    #[tokio::test]
    async fn the_stream_intake_waits_for_room_among_unpublished_decisions() {
        use futures::FutureExt;
        let u = Arc::new(Unpublished::new(4));
        for _ in 0..3 {
            u.add();
        }
        assert!(u.room().now_or_never().is_some(), "3 of 4: room");
        u.add();
        let waiting = tokio::spawn({
            let u = u.clone();
            async move { u.room().await }
        });
        tokio::task::yield_now().await;
        u.done();
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "3 of 4: still waits for half to go");
        u.done();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken at half")
            .unwrap();
        assert_eq!(u.now(), 2);
        u.done();
        u.done();
        assert_eq!(u.now(), 0);
    }

    #[test]
    fn shards_spread_and_are_stable() {
        let n = 8;
        let mut seen = vec![0; n];
        for i in 0..8_000 {
            seen[shard_of(&format!("4{i:015}"), n)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 700), "{seen:?}");
        assert_eq!(
            shard_of("4111111111111111", n),
            shard_of("4111111111111111", n)
        );
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fraudgate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), &target).unwrap();
            }
        }
    }

    async fn heard(rx: &mut mpsc::UnboundedReceiver<Change>, within: Duration) -> bool {
        let got = tokio::time::timeout(within, rx.recv()).await.is_ok();
        // The rest of the same change's events.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        got
    }

    /// A rules directory moved away and another moved into its place: the old watch
    /// hears nothing of the new one, `follow` sees the replacement once, and edits of the
    /// new directory are heard from then on.
    #[tokio::test]
    async fn a_rules_directory_moved_into_place_is_watched() {
        let base = temp_dir("rewatch-mv");
        let dir = base.join("rules");
        std::fs::create_dir_all(dir.join("lists")).unwrap();
        std::fs::write(dir.join("a.toml"), "").unwrap();
        let (mut w, mut rx) = watch_rules(&dir).unwrap();
        std::fs::write(dir.join("a.toml"), "# 1").unwrap();
        assert!(heard(&mut rx, Duration::from_secs(5)).await);
        assert!(!w.follow(), "nothing replaced yet");
        std::fs::rename(&dir, base.join("rules.old")).unwrap();
        let new = base.join("rules.new");
        std::fs::create_dir_all(new.join("lists")).unwrap();
        std::fs::write(new.join("a.toml"), "").unwrap();
        std::fs::rename(&new, &dir).unwrap();
        heard(&mut rx, Duration::from_millis(300)).await;
        std::fs::write(dir.join("lists/l.txt"), "x\n").unwrap();
        let before = heard(&mut rx, Duration::from_millis(500)).await;
        assert!(w.follow(), "the replacement is seen");
        assert!(!w.follow(), "and only once");
        std::fs::write(dir.join("lists/l.txt"), "y\n").unwrap();
        let after = heard(&mut rx, Duration::from_secs(5)).await;
        let _ = std::fs::remove_dir_all(&base);
        assert!(!before, "the old watch heard the new directory");
        assert!(after, "an edit of the new directory was not heard");
    }

    /// `rm -rf rules` and a new directory made at the same path (the file system may give
    /// it the inode just freed, so path, device and inode can all match): the watch of the
    /// removed directory is gone, so the new one is watched whatever its identity.
    #[tokio::test]
    async fn a_rules_directory_removed_and_made_again_is_watched() {
        let base = temp_dir("rewatch-rm");
        let dir = base.join("rules");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.toml"), "").unwrap();
        let (mut w, mut rx) = watch_rules(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        heard(&mut rx, Duration::from_millis(300)).await;
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.toml"), "# new").unwrap();
        heard(&mut rx, Duration::from_millis(300)).await;
        assert!(w.follow(), "the directory made again is not watched");
        std::fs::write(dir.join("a.toml"), "# edited").unwrap();
        let after = heard(&mut rx, Duration::from_secs(5)).await;
        let _ = std::fs::remove_dir_all(&base);
        assert!(after, "an edit of the new directory was not heard");
    }

    /// A release symlink switched to another directory (no event at all reaches the old
    /// watch): `follow` watches the new target, and the old one is no longer heard.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_switched_release_symlink_is_followed() {
        let base = temp_dir("rewatch-ln");
        let (r1, r2) = (base.join("r1"), base.join("r2"));
        for r in [&r1, &r2] {
            std::fs::create_dir_all(r).unwrap();
            std::fs::write(r.join("a.toml"), "").unwrap();
        }
        let current = base.join("current");
        std::os::unix::fs::symlink(&r1, &current).unwrap();
        let (mut w, mut rx) = watch_rules(&current).unwrap();
        let flip = base.join("current.tmp");
        std::os::unix::fs::symlink(&r2, &flip).unwrap();
        std::fs::rename(&flip, &current).unwrap();
        std::fs::write(r2.join("a.toml"), "# 2").unwrap();
        let before = heard(&mut rx, Duration::from_millis(500)).await;
        let followed = w.follow();
        std::fs::write(r2.join("a.toml"), "# 3").unwrap();
        let after = heard(&mut rx, Duration::from_secs(5)).await;
        std::fs::write(r1.join("a.toml"), "# old").unwrap();
        let old = heard(&mut rx, Duration::from_millis(500)).await;
        let _ = std::fs::remove_dir_all(&base);
        assert!(
            !before && followed && after && !old,
            "{before} {followed} {after} {old}"
        );
    }

    #[test]
    fn editor_and_git_files_are_not_rules() {
        let d = Path::new("/etc/fraudgate/rules");
        for p in [
            "lists/.blocked_cards.txt.swp",
            ".limits.toml.swx",
            "limits.toml~",
            ".#limits.toml",
            "#limits.toml#",
            "4913",
            ".git/FETCH_HEAD",
            ".git/objects/ab/cdef",
        ] {
            assert!(not_rules(d, &d.join(p)), "{p}");
        }
        for p in [
            "limits.toml",
            "lists/blocked_cards.txt",
            "..data",
            "..2026_11_27_10_00_00.123/limits.toml",
            "",
        ] {
            assert!(!not_rules(d, &d.join(p)), "{p}");
        }
    }

    /// A copy of the shipped rules under `base/rules` and an engine on them.
    fn shipped_copy(name: &str) -> (PathBuf, PathBuf, EngineConfig, Arc<Engine>) {
        let base = temp_dir(name);
        let dir = base.join("rules");
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"), &dir);
        let cfg = EngineConfig::default();
        let engine = Arc::new(Engine::new(
            crate::rules::load_dir(&dir, &cfg).unwrap(),
            cfg.clone(),
        ));
        (base, dir, cfg, engine)
    }

    /// The reload task on `dir`, fed by `rx`; its stop switch and handle.
    fn spawn_reload(
        rx: mpsc::UnboundedReceiver<Change>,
        dir: &Path,
        cfg: EngineConfig,
        engine: &Arc<Engine>,
        debounce: Duration,
    ) -> (watch::Sender<bool>, JoinHandle<()>) {
        let (watch, _) = watch_rules(dir).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(reload_task(
            rx,
            watch,
            dir.to_path_buf(),
            cfg,
            engine.clone(),
            Arc::new(Counters::new()),
            debounce,
            stop_rx,
        ));
        (stop_tx, task)
    }

    /// Changes every 100 ms for longer than any debounce: the reload comes after at most
    /// MAX_DEFER_DEBOUNCES debounces (3 s here), not when the changes stop (they never
    /// would, for a feed appending to a list file).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_that_keeps_changing_does_not_hold_reloads_back() {
        let (base, dir, cfg, engine) = shipped_copy("reload-cap");
        let v0 = engine.rules().version.clone();
        let head = dir.join("00-ruleset.toml");
        let text = std::fs::read_to_string(&head).unwrap();
        let bumped = text.replacen("version = \"", "version = \"9", 1);
        assert_ne!(text, bumped);
        std::fs::write(&head, bumped).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_tx, task) = spawn_reload(rx, &dir, cfg, &engine, Duration::from_millis(300));
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(6) && engine.rules().version == v0 {
            let _ = tx.send(Change::Touched);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = start.elapsed();
        let _ = stop_tx.send(true);
        let _ = task.await;
        let _ = std::fs::remove_dir_all(&base);
        assert_ne!(engine.rules().version, v0, "no reload in {took:?}");
        assert!(took >= Duration::from_millis(2_500), "{took:?}");
    }

    /// A list file written slowly (emptied, half written, its writer pausing for longer
    /// than the debounce): nothing is loaded while it is open, then the whole list is. The
    /// half-written list (one of two cards) compiles, and was loaded before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_being_written_is_loaded_once_it_is_closed() {
        use std::io::Write;
        let (base, dir, cfg, engine) = shipped_copy("reload-open");
        let v0 = engine.rules().version.clone();
        let (_watch, rx) = watch_rules(&dir).unwrap();
        let (stop_tx, task) = spawn_reload(rx, &dir, cfg, &engine, Duration::from_millis(200));
        let mut f = std::fs::File::create(dir.join("lists/blocked_cards.txt")).unwrap();
        f.write_all(b"4111111111111111\n").unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let during = engine.rules().version.clone();
        f.write_all(b"5500000000000004\n").unwrap();
        drop(f);
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) && engine.rules().version == v0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop_tx.send(true);
        let _ = task.await;
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(during, v0, "a half-written list was loaded");
        assert_ne!(
            engine.rules().version,
            v0,
            "the written list was not loaded"
        );
        assert_eq!(engine.rules().lists["blocked_cards"], 2);
    }

    /// Each file being written is given up on by itself after MAX_WRITE_WAIT: a writer that
    /// keeps one file open neither holds reloads back for good nor lets another file,
    /// written later, be loaded before it is closed.
    #[test]
    fn files_being_written_are_given_up_on_one_by_one() {
        let t0 = tokio::time::Instant::now();
        let s = Duration::from_secs;
        let mut w = Writing::default();
        w.note(&Change::Writing(PathBuf::from("feed.txt")), t0);
        w.note(&Change::Writing(PathBuf::from("export.txt")), t0 + s(25));
        w.note(&Change::Touched, t0 + s(25));
        assert!(w.settling(t0 + s(25)));
        // feed.txt is past the wait, export.txt is not.
        assert!(
            w.settling(t0 + s(35)),
            "the later file was given up on with the first"
        );
        assert_eq!(w.0.len(), 1);
        w.note(&Change::Done(PathBuf::from("export.txt")), t0 + s(36));
        assert!(!w.settling(t0 + s(36)));
    }

    /// What the watcher reports for a file made and held open (being written, then done at
    /// its close) and for a symlink made (a change, never waited for: no writer closes it).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_file_held_open_is_being_written_and_a_symlink_is_not() {
        use std::io::Write;
        let base = temp_dir("writing");
        let dir = base.join("rules");
        std::fs::create_dir_all(&dir).unwrap();
        let (_w, mut rx) = watch_rules(&dir).unwrap();
        let drain = |rx: &mut mpsc::UnboundedReceiver<Change>| {
            let mut got = Vec::new();
            while let Ok(c) = rx.try_recv() {
                got.push(c);
            }
            got
        };
        let mut f = std::fs::File::create(dir.join("a.toml")).unwrap();
        f.write_all(b"# half").unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let open = drain(&mut rx);
        drop(f);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let closed = drain(&mut rx);
        std::os::unix::fs::symlink(dir.join("a.toml"), dir.join("b.toml")).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let linked = drain(&mut rx);
        let _ = std::fs::remove_dir_all(&base);
        let now = tokio::time::Instant::now();
        let mut w = Writing::default();
        open.iter().for_each(|c| w.note(c, now));
        assert!(w.settling(now), "{open:?}");
        closed.iter().for_each(|c| w.note(c, now));
        assert!(!w.settling(now), "{closed:?}");
        assert!(!linked.is_empty());
        linked.iter().for_each(|c| w.note(c, now));
        assert!(!w.settling(now), "a symlink is waited for: {linked:?}");
    }
}
