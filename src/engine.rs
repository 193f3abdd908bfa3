//! The decision core: windows + rules + idempotency. Pure: the clock is passed in, no IO.
//!
//! [`Engine::decide`] may be called from many threads at once. Window state lives in one
//! sharded map per key group; a decision holds at most one shard lock of one map at a time
//! (plus the dedupe-table shard of its transaction id), so there is no lock-order cycle.
//!
//! Rules are swapped atomically with [`Engine::swap_rules`]: a decision reads the active
//! rule set once ([`ArcSwap`]) and finishes on it. Window state survives a swap: groups
//! (entity keys) and slots (aggregate + value + filter) are matched by signature, new ones
//! start empty, removed groups are kept until the next swap (which takes one back with its
//! state if it returns) or until the service frees them. When a kept group's slots change, its keys are
//! rewritten to the new layout while decisions wait on the swap barrier, so no update is
//! lost or applied to the wrong layout. A snapshot's cut takes the same barrier, for as long
//! as the decisions in flight take; nothing else holds it for longer than one decision.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};

use chrono::{Datelike, TimeZone, Timelike};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use rust_decimal::Decimal;
use smallvec::SmallVec;

use crate::config::EngineConfig;
use crate::decision::{combine, Decision, FiredRule};
use crate::keyhash::{KeyHash, PreHashed, StateKey};
use crate::rules::expr::FieldHashes;
use crate::rules::{Ctx, Field, KeyField, RuleSet, Tri, WindowRead};
use crate::txn::{AttrValue, Transaction};
use crate::window::{Added, Contribution, KeyState, Layout};

/// The key states of one key group.
pub type StateMap = DashMap<StateKey, KeyState, PreHashed>;

/// The window state of one key group under the active rules.
pub struct GroupStore {
    pub signature: String,
    pub layout: Layout,
    /// Slot signatures (counts, sums, distincts), to match slots across reloads.
    slots: [Vec<String>; 3],
    /// Shared with the previous rule set's store when the group survives a reload.
    pub map: Arc<StateMap>,
    /// Keys inserted, to check the key cap every so many inserts (`len()` locks every
    /// shard, too dear for each insert).
    inserts: AtomicU32,
}

impl GroupStore {
    /// This store as a dropped group kept for a later swap (same state, shared).
    fn retire(&self) -> Self {
        GroupStore {
            signature: self.signature.clone(),
            layout: self.layout.clone(),
            slots: self.slots.clone(),
            map: self.map.clone(),
            inserts: AtomicU32::new(0),
        }
    }

    fn new(g: &crate::rules::Group, map: Arc<StateMap>) -> Self {
        GroupStore {
            signature: g.signature.clone(),
            layout: g.layout.clone(),
            slots: slot_sigs(g),
            map,
            inserts: AtomicU32::new(0),
        }
    }
}

fn slot_sigs(g: &crate::rules::Group) -> [Vec<String>; 3] {
    [
        g.counts.iter().map(|s| s.0.clone()).collect(),
        g.sums.iter().map(|s| s.0.clone()).collect(),
        g.distincts.iter().map(|s| s.0.clone()).collect(),
    ]
}

/// A key group's table, with `reserve` slots allocated up front.
fn new_map(reserve: usize) -> Arc<StateMap> {
    Arc::new(DashMap::with_capacity_and_hasher_and_shard_amount(
        reserve, PreHashed, SHARDS,
    ))
}

/// A compiled rule set with the state stores its windows read.
struct Active {
    rules: Arc<RuleSet>,
    stores: Vec<GroupStore>,
    /// Per group: indexes of its windows in `rules.windows`.
    group_windows: Vec<Vec<usize>>,
    /// `rules.version`, shared by every decision.
    version: Arc<str>,
}

impl Active {
    fn new(rules: Arc<RuleSet>, maps: impl Fn(&crate::rules::Group) -> Arc<StateMap>) -> Active {
        Active {
            stores: rules
                .groups
                .iter()
                .map(|g| GroupStore::new(g, maps(g)))
                .collect(),
            group_windows: group_windows(&rules),
            version: rules.version.as_str().into(),
            rules,
        }
    }
}

/// What [`Engine::swap_rules`] did with the window state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swapped {
    pub version: String,
    /// Groups kept as they were (same key, same slots).
    pub kept: usize,
    /// Groups kept whose keys were rewritten for added or removed slots.
    pub migrated: usize,
    /// Keys rewritten.
    pub migrated_keys: usize,
    /// New groups (empty).
    pub added: usize,
    /// Groups no window reads any more (their state is kept until the next swap, in case
    /// it brings them back, then freed).
    pub dropped: usize,
    /// Groups the swap before dropped and this one brought back, with their state (also
    /// counted as kept or migrated).
    pub revived: usize,
}

/// Shards per map: many more than cores, so two deciding threads rarely meet.
const SHARDS: usize = 64;

/// Key groups of one decision that went over the key cap.
type OverCap = SmallVec<[usize; 4]>;

/// Entity key per key group of one decision (`None`: a key field is missing).
type GroupKeys = SmallVec<[Option<KeyHash>; 8]>;

/// A retry-table entry: when the id was last seen (decided, or retried since) and the
/// decision's JSON, as published.
/// One heap block per id: the table holds every id of the dedupe horizon (at 100k/s and
/// two minutes, 12M of them), and a sweep frees the expired ones by the million.
///
/// `fingerprint` is a keyed hash of the payment ([`content_fingerprint`]), so that another
/// payment sent under the same id is told apart from a retry; 0 for a decision restored
/// from a snapshot written before it was kept (content unknown), until its first retry
/// gives it that retry's.
/// It costs no memory: a table slot is the 16-byte id hash and this entry, aligned to 16
/// bytes, and the fingerprint fills what was padding.
struct DedupeEntry {
    at_ms: i64,
    fingerprint: u64,
    json: Box<[u8]>,
}

/// A keyed hash of the payment a transaction describes, as decoded: card, amount,
/// currency, merchant, device, region and MCC. The same transaction sent again (in
/// another JSON key order, with an amount written `10.0` or `10.00`, a card in digit
/// groups, without the default currency or with it) has the same one. `ts` and `attrs`
/// are left out: a switch may stamp a retry with its send time (recorded traffic and the
/// golden retry cases carry the receive time in `ts`) or add an attempt counter, and
/// neither makes it another payment. Never 0 (which marks an entry whose content is
/// unknown).
///
/// The string fields enter as their keyed hashes from `c.hashes`, the ones the key groups
/// and lists of the decision use (computed once per decision; with the shipped rules all
/// but the currency's are needed anyway), so this is one more SipHash over 72 bytes:
/// ~0.11 µs on this machine with the field hashes at hand, against ~0.19 µs hashing the
/// fields' text again (a test loop of 2M calls, three rounds each).
fn content_fingerprint(c: &Ctx<'_>) -> u64 {
    let mut words = [0u64; 9];
    let fields = [
        Field::Card,
        Field::Currency,
        Field::Device,
        Field::Merchant,
        Field::Region,
    ];
    for (w, f) in words.iter_mut().zip(fields) {
        // 0 for a field that is absent (a present one hashing to 0: 2^-64).
        *w = c.hashes.get(f, c).map_or(0, |h| h as u64);
    }
    let amount = c.txn.amount.normalize().serialize();
    words[5] = u64::from_le_bytes(amount[..8].try_into().expect("8 bytes"));
    words[6] = u64::from_le_bytes(amount[8..].try_into().expect("8 bytes"));
    (words[7], words[8]) = c.txn.mcc.map_or((0, 0), |m| (1, m as u64));
    let mut bytes = [0u8; 72];
    for (chunk, w) in bytes.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    let mut h = c.key.hasher();
    h.part(&bytes);
    (h.finish() as u64).max(1)
}

/// Result of [`Engine::decide`].
#[derive(Debug, Clone)]
pub struct Outcome {
    pub decision: Decision,
    /// The decision's JSON ([`Decision::to_json_vec`]), for a duplicate the bytes stored
    /// with the original: what is published.
    pub json: Vec<u8>,
    /// The id was seen within the dedupe horizon (of its last sighting): this is the
    /// original decision, and nothing was counted again.
    pub duplicate: bool,
    /// The id was seen within the dedupe horizon for another payment: not a retry but
    /// another transaction under a used id. Nothing was counted or decided, the original's
    /// horizon is not extended, and `decision` and `json` are the original's, which this
    /// transaction must not be answered with: it is refused (`id_reused`).
    pub id_reused: bool,
    /// The event was older than every window of some key and added nothing there.
    pub too_late: bool,
    /// The event time was further in the future than `max_future_skew` and was replaced
    /// by the receive time.
    pub ts_clamped: bool,
}

/// Sizes of the engine's state, for metrics and memory measurements.
#[derive(Debug, Clone, Default)]
pub struct StateStats {
    /// Per key group: (signature, keys, approximate bytes).
    pub groups: Vec<(String, usize, usize)>,
    pub dedupe_entries: usize,
    /// Per key group: keys evicted so far because the group reached `max_keys`
    /// (cumulative since the engine started).
    pub capped: Vec<(String, u64)>,
}

/// Version of the snapshot format; any change to the snapshot types bumps it.
pub const SNAPSHOT_FORMAT: u32 = 4;
/// The format before the retry table kept each decision's content fingerprint
/// ([`KeptDecisionV3`]): still read (by [`crate::snapshot::read`]), so an upgrade keeps
/// the windows and the retry table.
pub const SNAPSHOT_FORMAT_V3: u32 = 3;
/// The format before the cursor named its transaction stream ([`CursorV2`]), with the
/// retry table of format 3: still read, as format 3 is.
pub const SNAPSHOT_FORMAT_V2: u32 = 2;

/// Where the inputs stood when a snapshot's cut was taken: replaying from here (skipping
/// ids in the snapshot's retry table) rebuilds exactly what came after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// JetStream intake: every message of the transaction stream before this sequence is
    /// in the snapshot; later ones may be (their ids are then in the retry table).
    pub txn_next_seq: Option<u64>,
    /// Request capture: requests stored at or after this time (epoch ms) may be missing
    /// from the snapshot; earlier ones are in it.
    pub check_from_ms: Option<i64>,
    /// JetStream intake: when the transaction stream was created (epoch ns, as the server
    /// reports it). `txn_next_seq` is a position in that stream: a stream deleted and made
    /// again numbers its messages from 1 again, and one created at another time is not the
    /// stream the position is in. `None`: unknown (no JetStream, or a format 2 snapshot).
    pub txn_stream_created_ns: Option<i64>,
}

/// The cursor of format 2 snapshots ([`SNAPSHOT_FORMAT_V2`]): no stream identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CursorV2 {
    pub txn_next_seq: Option<u64>,
    pub check_from_ms: Option<i64>,
}

impl From<CursorV2> for Cursor {
    /// The same positions, in a stream that is unknown.
    fn from(c: CursorV2) -> Cursor {
        Cursor {
            txn_next_seq: c.txn_next_seq,
            check_from_ms: c.check_from_ms,
            txn_stream_created_ns: None,
        }
    }
}

/// One decision of the retry table in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeptDecision {
    /// The transaction id's keyed hash.
    pub id: KeyHash,
    /// When the id was last seen (epoch ms): its horizon runs from here.
    pub at_ms: i64,
    /// The decision's JSON, as published.
    pub json: String,
    /// The payment's keyed hash ([`content_fingerprint`]; 0: unknown).
    pub fingerprint: u64,
}

/// A retry-table decision of format 2 and 3 snapshots: id hash, last seen, JSON; no
/// content fingerprint.
pub type KeptDecisionV3 = (KeyHash, i64, String);

/// An open point-in-time cut: the state each key had at the cut, kept by the first
/// decision that changes the key after it, and the ids decided after it.
struct Capture {
    /// Per store of the active rules: key -> its state at the cut (`None`: created after).
    before: Vec<DashMap<StateKey, Option<KeyState>, PreHashed>>,
    ids_after: DashMap<KeyHash, (), PreHashed>,
}

impl Capture {
    fn keep(&self, store: usize, key: StateKey, at_cut: Option<&KeyState>) {
        self.before[store]
            .entry(key)
            .or_insert_with(|| at_cut.cloned());
    }
}

/// All window state and the retry table (see [`Engine::snapshot`]). `C` is the cursor's
/// type and `K` the retry table's: [`CursorV2`] and [`KeptDecisionV3`] only to read the
/// snapshots of earlier formats (see [`StateSnapshot::upgrade`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StateSnapshot<C = Cursor, K = KeptDecision> {
    pub format: u32,
    /// Identifies the entity hash key: state hashed under another key is meaningless.
    pub key_fingerprint: u64,
    pub resolution_ms: i64,
    pub taken_at_ms: i64,
    /// Last applied stream sequence, when the intake knows it (JetStream).
    pub cursor: C,
    pub groups: Vec<GroupSnapshot>,
    /// Retry table.
    pub dedupe: Vec<K>,
}

impl<C: Into<Cursor>> StateSnapshot<C, KeptDecisionV3> {
    /// A format 2 or 3 snapshot as this format's: the same state; a format 2 cursor does
    /// not know its stream, and no kept decision knows its payment (the first transaction
    /// under one of those ids is taken for a retry, as those builds did, and its payment
    /// is kept from then on).
    pub fn upgrade(self) -> StateSnapshot {
        StateSnapshot {
            format: match self.format {
                SNAPSHOT_FORMAT_V2 | SNAPSHOT_FORMAT_V3 => SNAPSHOT_FORMAT,
                other => other,
            },
            key_fingerprint: self.key_fingerprint,
            resolution_ms: self.resolution_ms,
            taken_at_ms: self.taken_at_ms,
            cursor: self.cursor.into(),
            groups: self.groups,
            dedupe: self
                .dedupe
                .into_iter()
                .map(|(id, at_ms, json)| KeptDecision {
                    id,
                    at_ms,
                    json,
                    fingerprint: 0,
                })
                .collect(),
        }
    }
}

/// Uninstalls a snapshot's capture when dropped.
struct CaptureGuard<'a>(&'a ArcSwapOption<Capture>);

impl Drop for CaptureGuard<'_> {
    fn drop(&mut self) {
        self.0.store(None);
    }
}

/// A snapshot as [`Engine::snapshot`] takes it: the key states already encoded (bincode,
/// as `(StateKey, KeyState)` items) while each key's lock was held, so copying allocates
/// nothing under a lock. `header` holds everything else (its groups' `keys` are empty);
/// [`crate::snapshot::write`] puts the two together into the [`StateSnapshot`] encoding.
#[derive(Debug)]
pub struct EncodedSnapshot {
    pub header: StateSnapshot,
    /// Per group of `header.groups`, in order.
    pub keys: Vec<EncodedKeys>,
}

/// One group's key states: `count` encoded items, concatenated across `chunks`.
#[derive(Debug, Default)]
pub struct EncodedKeys {
    pub count: u64,
    pub chunks: Vec<Vec<u8>>,
}

impl EncodedSnapshot {
    /// Writes the bincode encoding of the whole [`StateSnapshot`]: the header's fields in
    /// declaration order, each group's key list as its length then the encoded items.
    pub fn encode_body(&self, w: &mut impl std::io::Write) -> Result<(), String> {
        let h = &self.header;
        put(w, &h.format)?;
        put(w, &h.key_fingerprint)?;
        put(w, &h.resolution_ms)?;
        put(w, &h.taken_at_ms)?;
        put(w, &h.cursor)?;
        put(w, &(h.groups.len() as u64))?;
        for (g, k) in h.groups.iter().zip(&self.keys) {
            put(w, &g.signature)?;
            put(w, &g.slots)?;
            put(w, &g.layout)?;
            put(w, &k.count)?;
            for c in &k.chunks {
                w.write_all(c).map_err(|e| e.to_string())?;
            }
        }
        put(w, &h.dedupe)
    }

    /// The decoded [`StateSnapshot`] (for tests and tools; the service writes it straight
    /// to the file).
    pub fn decode(&self) -> Result<StateSnapshot, String> {
        let mut body = Vec::new();
        self.encode_body(&mut body)?;
        bincode::serde::decode_from_slice(&body, bincode::config::standard())
            .map(|(s, _)| s)
            .map_err(|e| e.to_string())
    }
}

/// Appends the bincode encoding of `v` to `w`.
fn put(w: &mut impl std::io::Write, v: &impl serde::Serialize) -> Result<(), String> {
    bincode::serde::encode_into_std_write(v, w, bincode::config::standard())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Encoded key states are written into chunks of this size, each allocated before any
/// lock is taken; a new chunk is started when less than `CHUNK_ROOM` is left.
const CHUNK: usize = 4 << 20;
const CHUNK_ROOM: usize = 256 << 10;

/// One key group's state in a snapshot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GroupSnapshot {
    pub signature: String,
    pub slots: [Vec<String>; 3],
    pub layout: Layout,
    pub keys: Vec<(StateKey, KeyState)>,
}

/// What [`Engine::restore`] loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    pub keys: usize,
    pub ids: usize,
    /// Groups the current rules no longer have.
    pub dropped_groups: usize,
    pub skipped_ids: usize,
    /// Where the inputs stood at the snapshot's cut: replay from here.
    pub cursor: Cursor,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("snapshot format {found}; this build reads format {expected}")]
    Format { found: u32, expected: u32 },
    #[error("the snapshot was taken with another entity hash key")]
    Key,
    #[error("the snapshot's window resolution is {found} ms; the engine's is {expected} ms")]
    Resolution { found: i64, expected: i64 },
}

/// For each slot kind (count, sum, distinct), where each new slot's data is among the
/// old slots (by signature), if anywhere: what `KeyState::migrate` needs.
fn slot_mapping(old: &[Vec<String>; 3], new: &[Vec<String>; 3]) -> [Vec<Option<usize>>; 3] {
    std::array::from_fn(|i| {
        new[i]
            .iter()
            .map(|n| old[i].iter().position(|o| o == n))
            .collect()
    })
}

fn key_fingerprint(cfg: &EngineConfig) -> u64 {
    cfg.hash_key.hash_str("fraudgate snapshot key fingerprint") as u64
}

/// Counts from [`Engine::evict_idle`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evicted {
    pub keys: usize,
    pub dedupe: usize,
}

/// Parts a sweep visits each table shard in ([`Engine::sweep_step`]): at a few hundred
/// thousand keys a shard is a few thousand entries, and a part of it a fraction of a
/// millisecond of scanning under the shard's lock.
pub const SWEEP_PARTS: usize = 8;

/// What one [`Engine::sweep_step`] evicted, and the heap bytes of the keys it kept in
/// its part of a shard, per group signature (none for a retry-table step).
#[derive(Debug, Default)]
pub struct SweepStep {
    pub evicted: Evicted,
    pub heap: Vec<(String, usize)>,
}

impl SweepStep {
    /// Adds another step's figures: a pass is the sum of its steps.
    pub fn absorb(&mut self, step: SweepStep) {
        self.evicted.keys += step.evicted.keys;
        self.evicted.dedupe += step.evicted.dedupe;
        for (signature, bytes) in step.heap {
            match self.heap.iter_mut().find(|(s, _)| *s == signature) {
                Some((_, sum)) => *sum += bytes,
                None => self.heap.push((signature, bytes)),
            }
        }
    }
}

pub struct Engine {
    cfg: EngineConfig,
    active: ArcSwap<Active>,
    /// Decisions hold it shared; a swap that rewrites key states, a restore and a snapshot's
    /// cut hold it exclusively. Nothing holds it shared for longer than a decision (a
    /// waiting writer makes new readers wait).
    barrier: RwLock<()>,
    dedupe: DashMap<KeyHash, DedupeEntry, PreHashed>,
    res_ms: i64,
    /// Keys evicted at the cap, per group signature.
    capped: Mutex<BTreeMap<String, u64>>,
    /// Set while a snapshot copies the state (see [`Engine::snapshot`]).
    capture: ArcSwapOption<Capture>,
    /// Held for a whole snapshot, a rule swap, a restore, a sweep and a cap eviction: the
    /// operations that rewrite or remove many keys never overlap a snapshot's copy.
    snapshotting: Mutex<()>,
    /// Key groups the last rule swap dropped, with their state, until the next swap: a
    /// set that drops a group only for a moment (a deploy in two steps, a rule file
    /// caught half copied) gets its history back when the group returns.
    retired: Mutex<Vec<GroupStore>>,
}

impl Engine {
    pub fn new(rules: RuleSet, cfg: EngineConfig) -> Self {
        let reserve_ids = cfg.reserve_ids;
        Engine {
            active: ArcSwap::from_pointee(Active::new(Arc::new(rules), |_| {
                new_map(cfg.reserve_keys)
            })),
            barrier: RwLock::new(()),
            res_ms: cfg.resolution.as_millis().max(1) as i64,
            cfg,
            dedupe: DashMap::with_capacity_and_hasher_and_shard_amount(
                reserve_ids,
                PreHashed,
                SHARDS,
            ),
            capped: Mutex::new(BTreeMap::new()),
            capture: ArcSwapOption::empty(),
            snapshotting: Mutex::new(()),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// The active rule set.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.active.load().rules.clone()
    }

    /// Replaces the rule set. In-flight decisions finish on the old rules; the next ones
    /// use the new. Window state is carried over (see the module docs). Never fails: the
    /// new set was fully compiled before.
    pub fn swap_rules(&self, rules: RuleSet) -> Swapped {
        let rules = Arc::new(rules);
        // A snapshot's copy runs against one set of stores: swap after it.
        let _no_snapshot = self.snapshotting.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.active.load_full();
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = Swapped {
            version: rules.version.clone(),
            ..Default::default()
        };
        // Plan: per new group, the old store it continues (if any: one of the active set,
        // or one the swap before dropped) and whether its slots changed.
        let mut plans = Vec::new();
        for g in &rules.groups {
            let prev = old
                .stores
                .iter()
                .find(|s| s.signature == g.signature)
                .or_else(|| {
                    let back = retired.iter().find(|s| s.signature == g.signature);
                    report.revived += back.is_some() as usize;
                    back
                });
            let sigs = slot_sigs(g);
            match prev {
                None => {
                    report.added += 1;
                    plans.push((None, None));
                }
                Some(p) if p.slots == sigs => {
                    report.kept += 1;
                    plans.push((Some(p.map.clone()), None));
                }
                Some(p) => {
                    report.migrated += 1;
                    let mapping = slot_mapping(&p.slots, &sigs);
                    plans.push((Some(p.map.clone()), Some((p.layout.clone(), mapping))));
                }
            }
        }
        // What this swap drops is kept until the next one; what the last one dropped and
        // this one did not bring back is freed (when the old set's last decision ends).
        let dropped: Vec<GroupStore> = old
            .stores
            .iter()
            .filter(|s| !rules.groups.iter().any(|g| g.signature == s.signature))
            .map(GroupStore::retire)
            .collect();
        report.dropped = dropped.len();
        let next = Active {
            stores: rules
                .groups
                .iter()
                .zip(&plans)
                .map(|(g, (map, _))| {
                    let map = map
                        .clone()
                        .unwrap_or_else(|| new_map(self.cfg.reserve_keys));
                    GroupStore::new(g, map)
                })
                .collect(),
            group_windows: group_windows(&rules),
            version: rules.version.as_str().into(),
            rules: rules.clone(),
        };
        if plans.iter().any(|p| p.1.is_some()) {
            // Key states change shape: no decision may run on either layout meanwhile.
            let _excl = self.barrier.write().unwrap_or_else(|e| e.into_inner());
            for (store, (_, migration)) in next.stores.iter().zip(&plans) {
                if let Some((old_layout, mapping)) = migration {
                    store
                        .map
                        .alter_all(|_, st| st.migrate(old_layout, &store.layout, mapping));
                    report.migrated_keys += store.map.len();
                }
            }
            self.active.store(Arc::new(next));
        } else {
            self.active.store(Arc::new(next));
        }
        *retired = dropped;
        report
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Frees the state of the key groups the last rule swap dropped (kept until then in
    /// case the next swap brings them back); how many there were. The service calls it a
    /// while after a reload that dropped groups.
    pub fn free_retired(&self) -> usize {
        let retired = std::mem::take(&mut *self.retired.lock().unwrap_or_else(|e| e.into_inner()));
        retired.len()
    }

    /// Keeps a decided id in the retry table for a horizon from `seen_ms`, if that is
    /// later than when it was last seen. For requests a restart's replay re-applies: they
    /// are decided at the time they were captured, but the switch that got no answer may
    /// retry only once the engine is back, a horizon or more after the capture, and its
    /// retry must find the id rather than be counted again.
    pub fn keep_id(&self, id: &str, seen_ms: i64) {
        let h = self.cfg.hash_key.hash_str(id);
        if let Some(mut e) = self.dedupe.get_mut(&h) {
            e.at_ms = e.at_ms.max(seen_ms);
        }
    }

    /// Decides one transaction. `now_ms` is the receive time (epoch ms): the event time
    /// when the transaction has no `ts`, and the clock of the dedupe horizon.
    pub fn decide(&self, txn: &Transaction, now_ms: i64) -> Outcome {
        let start = Instant::now();
        let _shared = self.barrier.read().unwrap_or_else(|e| e.into_inner());
        let active = self.active.load();
        let capture = self.capture.load();
        let id_hash = self.cfg.hash_key.hash_str(&txn.id);
        let horizon = self.cfg.dedupe_horizon.as_millis() as i64;
        let mut over_cap: OverCap = SmallVec::new();
        let rs = &*active.rules;
        let skew = self.cfg.max_future_skew.as_millis() as i64;
        let ts_ms = txn.ts_ms.unwrap_or(now_ms);
        let ts_clamped = ts_ms > now_ms.saturating_add(skew);
        let ts_ms = if ts_clamped { now_ms } else { ts_ms };
        let currency = txn
            .currency
            .as_deref()
            .unwrap_or(self.cfg.default_currency.as_str());
        let attrs = resolve_attrs(rs, txn);
        let (local_hour, local_weekday) = if rs.needs_local_time {
            local_time(&self.cfg, ts_ms)
        } else {
            (0, 0)
        };
        let field_hashes = FieldHashes::default();
        let base = Ctx {
            txn,
            ts_ms,
            received_ms: now_ms,
            currency,
            attrs: &attrs,
            ints: &[],
            decs: &[],
            local_hour,
            local_weekday,
            key: &self.cfg.hash_key,
            hashes: &field_hashes,
        };
        let fingerprint = content_fingerprint(&base);
        let keys: GroupKeys = rs.groups.iter().map(|g| entity_key(&g.by, &base)).collect();
        // Start loading every table slot this decision needs (the retry table's, then each
        // key group's) before waiting on any of them: see `prefetch`. A retry answered from
        // the retry table pays for the keys too; retries are rare.
        crate::prefetch::map_slot(&self.dedupe, &id_hash);
        for (gi, key) in keys.iter().enumerate() {
            if let Some(key) = key {
                crate::prefetch::map_slot(&active.stores[gi].map, &StateKey::from(*key));
            }
        }
        // The dedupe shard stays locked while this id is decided, so a concurrent retry of
        // the same id waits and then gets this decision instead of being counted twice.
        let entry = self.dedupe.entry(id_hash);
        // A retry within the horizon gets the original back (parsed from its JSON: a
        // retry pays for that, a fresh decision keeps nothing but the bytes).
        // Another payment under the id is not a retry: answering it with the original's
        // decision would approve it unseen.
        let original = match &entry {
            Entry::Occupied(o) if now_ms.saturating_sub(o.get().at_ms) <= horizon => {
                let e = o.get();
                let reused = e.fingerprint != 0 && e.fingerprint != fingerprint;
                serde_json::from_slice::<Decision>(&e.json)
                    .ok()
                    .map(|d| (d, e.json.to_vec(), reused))
            }
            _ => None,
        };
        let out = match (original, entry) {
            (Some((decision, json, true)), _) => Outcome {
                decision,
                json,
                duplicate: false,
                id_reused: true,
                too_late: false,
                ts_clamped: false,
            },
            (Some((decision, json, false)), entry) => {
                // The horizon runs from the last time the id was seen: a retry keeps the
                // id for another horizon. A request replay after a restart starts a horizon
                // before the snapshot's cut, so every retry it re-applies finds its id,
                // however long ago the original was (else the retry was counted again).
                // An entry restored from an old snapshot (content unknown) takes this
                // retry's content, so later transactions under the id are compared.
                if let Entry::Occupied(mut o) = entry {
                    let e = o.get_mut();
                    e.at_ms = e.at_ms.max(now_ms);
                    if e.fingerprint == 0 {
                        e.fingerprint = fingerprint;
                    }
                }
                Outcome {
                    decision,
                    json,
                    duplicate: true,
                    id_reused: false,
                    too_late: false,
                    ts_clamped: false,
                }
            }
            (None, entry) => {
                let (mut decision, too_late) =
                    self.decide_fresh(&active, capture.as_deref(), &base, &keys, &mut over_cap);
                // Fault injection for tests (feature `failpoints`, compiled out otherwise):
                // a bug in the middle of a decision, the windows updated and the id's retry
                // table shard locked.
                // (The message holds the id, input text: the panic hooks must mask it.)
                fail::fail_point!("decide", txn.id.starts_with("failpoint-"), |_| {
                    panic!("failpoint: decide {}", txn.id)
                });
                if let Some(c) = capture.as_deref() {
                    // Under this id's dedupe shard lock, like the snapshot's read of it.
                    c.ids_after.insert(id_hash, ());
                }
                decision.engine_us = start.elapsed().as_micros() as u64;
                let json = decision.to_json_vec();
                let value = DedupeEntry {
                    at_ms: now_ms,
                    fingerprint,
                    json: json.as_slice().into(),
                };
                match entry {
                    Entry::Occupied(mut o) => {
                        o.insert(value);
                    }
                    Entry::Vacant(v) => {
                        v.insert(value);
                    }
                }
                Outcome {
                    decision,
                    json,
                    duplicate: false,
                    id_reused: false,
                    too_late,
                    ts_clamped,
                }
            }
        };
        // With the id's dedupe shard and the barrier released: eviction takes a while and
        // must hold up neither the retries of unrelated ids nor a snapshot's cut (a writer
        // waiting on the barrier would make every decision wait behind this scan).
        drop(_shared);
        for gi in over_cap {
            self.enforce_cap(&active.stores[gi]);
        }
        out
    }

    /// Evicts the least recently used keys of a group over `max_keys`, down to 15/16 of
    /// the cap (so the scan is paid once per cap/16 new keys, not per key). "Recently
    /// used" is the key's newest event time: every decision on a key adds an event.
    fn enforce_cap(&self, seen: &GroupStore) {
        let Some(cap) = self.cfg.max_keys else { return };
        // One eviction at a time, and never during a snapshot's copy, a rule swap or a
        // sweep (which hold this lock): the next insert checks again.
        let _one = match self.snapshotting.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        // `seen` is the store of the rules the decision ran on. A swap may have come
        // since (the decision let go of the barrier first): then the keys may have a new
        // row layout, or the group may be gone. The keys are read with the store active
        // now (no swap can start while this lock is held).
        let active = self.active.load();
        let Some(store) = active
            .stores
            .iter()
            .find(|s| Arc::ptr_eq(&s.map, &seen.map))
        else {
            return;
        };
        let len = store.map.len();
        if len > cap {
            let target = cap - cap / 16;
            let mut excess = len - target;
            let none = i64::MIN;
            let mut newest: Vec<i64> = store
                .map
                .iter()
                .map(|e| e.value().newest_bucket(&store.layout).unwrap_or(none))
                .collect();
            excess = excess.min(newest.len());
            if excess > 0 {
                let (_, &mut threshold, _) = newest.select_nth_unstable(excess - 1);
                let below = newest.iter().filter(|&&b| b < threshold).count();
                drop(newest);
                let mut ties = excess - below;
                let mut removed = 0u64;
                crate::prefetch::retain_ahead(&store.map, KeyState::touch, |st| {
                    let b = st.newest_bucket(&store.layout).unwrap_or(none);
                    let evict = b < threshold || (b == threshold && ties > 0);
                    if b == threshold && evict {
                        ties -= 1;
                    }
                    removed += evict as u64;
                    !evict
                });
                let mut capped = self.capped.lock().unwrap_or_else(|e| e.into_inner());
                *capped.entry(store.signature.clone()).or_default() += removed;
            }
        }
    }

    /// Decides a transaction not seen before: `base` holds it with its event time and
    /// resolved attributes, `keys` its entity key per key group.
    fn decide_fresh(
        &self,
        active: &Active,
        capture: Option<&Capture>,
        base: &Ctx<'_>,
        keys: &[Option<KeyHash>],
        over_cap: &mut OverCap,
    ) -> (Decision, bool) {
        let rs = &*active.rules;
        let (txn, ts_ms) = (base.txn, base.ts_ms);
        let mut ints: SmallVec<[Option<i64>; 32]> = SmallVec::from_elem(None, rs.int_features);
        let mut decs: SmallVec<[Option<Decimal>; 16]> = SmallVec::from_elem(None, rs.dec_features);
        let bucket = ts_ms.div_euclid(self.res_ms);
        let mut too_late = false;
        // Second pass: the slots are in cache or on their way (`decide` prefetched them);
        // look every key up and start loading its heap blocks, so that those misses also
        // overlap instead of being paid one group after another below.
        for (gi, key) in keys.iter().enumerate() {
            if let Some(key) = key {
                if let Some(state) = active.stores[gi].map.get(&StateKey::from(*key)) {
                    state.touch();
                }
            }
        }
        for (gi, g) in rs.groups.iter().enumerate() {
            let Some(key) = keys[gi] else {
                continue; // a key field is missing: the group's windows stay unknown
            };
            let pass =
                |f: &Option<crate::rules::BoolFn>| f.as_ref().is_none_or(|f| f(base) == Tri::True);
            let counts: SmallVec<[bool; 8]> = g.counts.iter().map(|(_, f)| pass(f)).collect();
            let sums: SmallVec<[Option<Decimal>; 4]> = g
                .sums
                .iter()
                .map(|(_, of, f)| if pass(f) { of.value(base) } else { None })
                .collect();
            let distincts: SmallVec<[Option<u64>; 4]> = g
                .distincts
                .iter()
                .map(|(_, of, f)| {
                    if pass(f) {
                        entity_key(std::slice::from_ref(of), base).map(|h| h as u64)
                    } else {
                        None
                    }
                })
                .collect();
            let store = &active.stores[gi];
            let mut state = match store.map.entry(StateKey::from(key)) {
                Entry::Occupied(o) => {
                    if let Some(c) = capture {
                        c.keep(gi, *o.key(), Some(o.get()));
                    }
                    o.into_ref()
                }
                Entry::Vacant(v) => {
                    if let Some(c) = capture {
                        c.keep(gi, *v.key(), None);
                    }
                    if let Some(cap) = self.cfg.max_keys {
                        // Check the cap (after this shard is released: `len` locks every
                        // shard) often enough that a flood overshoots it by at most this
                        // many keys per deciding thread.
                        let every = (cap / 64).clamp(1, 256) as u32;
                        let n = store
                            .inserts
                            .fetch_add(1, Ordering::Relaxed)
                            .wrapping_add(1);
                        if n.is_multiple_of(every) {
                            over_cap.push(gi);
                        }
                    }
                    v.insert(KeyState::new(&store.layout))
                }
            };
            let added = state.add(
                &store.layout,
                bucket,
                &Contribution {
                    counts: &counts,
                    sums: &sums,
                    distincts: &distincts,
                },
            );
            too_late |= added == Added::TooLate;
            for &wi in &active.group_windows[gi] {
                let w = &rs.windows[wi];
                match w.read {
                    WindowRead::Count(s) => {
                        ints[w.feature] =
                            Some(state.count(&store.layout, s, bucket, w.buckets) as i64)
                    }
                    WindowRead::Distinct(s) => {
                        ints[w.feature] = Some(state.distinct(s, bucket, w.buckets) as i64)
                    }
                    WindowRead::Sum(s) => {
                        decs[w.feature] = Some(state.sum(&store.layout, s, bucket, w.buckets))
                    }
                }
            }
        }
        let ctx = Ctx {
            ints: &ints,
            decs: &decs,
            ..*base
        };
        let mut fired = Vec::new();
        for r in &rs.rules {
            if (r.when)(&ctx) == Tri::True {
                fired.push(FiredRule {
                    id: r.id.clone(),
                    action: r.action,
                    score: r.score,
                    mode: r.mode,
                    reason: r.reason.clone(),
                    values: crate::decision::Values(
                        r.reads
                            .iter()
                            .map(|(name, rd)| (name.clone(), rd.read(&ctx)))
                            .collect(),
                    ),
                    when: r.condition.clone(),
                });
            }
        }
        let (action, score, decided_by) = combine(&fired, rs.hold_at, rs.reject_at);
        (
            Decision {
                id: txn.id.clone(),
                action,
                score,
                decided_by,
                card: txn.masked_card(),
                ts: ts_ms,
                rules: fired,
                rules_version: active.version.clone(),
                engine_us: 0,
            },
            too_late,
        )
    }

    /// Drops keys idle longer than their group's longest window (plus the lateness
    /// allowance) and dedupe entries older than the horizon, relative to `now_ms`.
    pub fn evict_idle(&self, now_ms: i64) -> Evicted {
        self.sweep(now_ms).0
    }

    /// [`Engine::evict_idle`], and the [`Engine::stats`] of what is left, measured in the
    /// same pass: a sweep visits every key once, not twice (on a shared machine the scan
    /// is CPU the decisions wait for). All [`Engine::sweep_steps`] steps of
    /// [`Engine::sweep_step`] in one go.
    pub fn sweep(&self, now_ms: i64) -> (Evicted, StateStats) {
        let mut pass = SweepStep::default();
        for step in 0..self.sweep_steps() {
            pass.absorb(self.sweep_step(now_ms, step));
        }
        let stats = self.stats_with_heap(&pass.heap);
        (pass.evicted, stats)
    }

    /// Steps in a pass of [`Engine::sweep_step`]: [`SWEEP_PARTS`] per shard of each key
    /// group's table and of the retry table.
    pub fn sweep_steps(&self) -> usize {
        (self.active.load().stores.len() + 1) * SHARDS * SWEEP_PARTS
    }

    /// One step of a sweep: one part of one shard of one table (step
    /// `(t * SHARDS + k) * SWEEP_PARTS + p`: part `p` of shard `k` of key group `t`, or of
    /// the retry table after the groups). A pass of [`Engine::sweep_steps`] steps visits
    /// every key and id once. The service spreads a pass over its sweep interval, so the
    /// scan never takes a core (and the caches) for long, and a shard's lock is held for a
    /// short part of it at a time. What a step evicts is freed after that lock is
    /// released: a decision waiting on the shard waits for the scan only. A step past the
    /// tables (after a swap to fewer groups) does nothing.
    pub fn sweep_step(&self, now_ms: i64, step: usize) -> SweepStep {
        // Not the barrier: a snapshot's cut waiting behind a sweep would stall every
        // decision. Snapshots, swaps and cap evictions wait for the step instead.
        let _one = self.snapshotting.lock().unwrap_or_else(|e| e.into_inner());
        self.sweep_step_held(now_ms, step)
    }

    /// [`Engine::sweep_step`], or `None` at once when a snapshot's copy, a rule swap, a
    /// restore or a cap eviction is running (they take seconds at millions of keys): for a
    /// caller on the async runtime, which must not wait for them.
    pub fn try_sweep_step(&self, now_ms: i64, step: usize) -> Option<SweepStep> {
        let _one = match self.snapshotting.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(self.sweep_step_held(now_ms, step))
    }

    /// A sweep step, with `snapshotting` held by the caller.
    fn sweep_step_held(&self, now_ms: i64, step: usize) -> SweepStep {
        let part = (step % SWEEP_PARTS, SWEEP_PARTS);
        let (t, k) = (step / SWEEP_PARTS / SHARDS, step / SWEEP_PARTS % SHARDS);
        let mut out = SweepStep::default();
        let now_b = now_ms.div_euclid(self.res_ms);
        let active = self.active.load();
        if let Some(s) = active.stores.get(t) {
            let keep_after = now_b - s.layout.max_window - s.layout.lateness;
            let mut heap = 0usize;
            let mut dead: Vec<KeyState> = Vec::new();
            let evicted =
                crate::prefetch::retain_part_ahead(&s.map, k, part, KeyState::touch, |st| {
                    let keep = st.newest_bucket(&s.layout).is_some_and(|n| n > keep_after);
                    if keep {
                        if st.has_expired(&s.layout) {
                            st.evict(&s.layout, true);
                        }
                        heap += st.heap_bytes();
                    } else {
                        dead.push(std::mem::take(st));
                    }
                    keep
                });
            drop(dead);
            out.evicted.keys = evicted;
            out.heap.push((s.signature.clone(), heap));
        } else if t == active.stores.len() {
            let horizon = self.cfg.dedupe_horizon.as_millis() as i64;
            let mut dead: Vec<Box<[u8]>> = Vec::new();
            // An id's expiry is in its slot: nothing behind it to prefetch.
            out.evicted.dedupe = crate::prefetch::retain_part_ahead(
                &self.dedupe,
                k,
                part,
                |_| {},
                |e| {
                    let keep = now_ms.saturating_sub(e.at_ms) <= horizon;
                    if !keep {
                        dead.push(std::mem::take(&mut e.json));
                    }
                    keep
                },
            );
            drop(dead);
        }
        out
    }

    /// [`Engine::stats`] with each group's key heap bytes given by signature (summed over
    /// a pass of [`Engine::sweep_step`]s) instead of measured again.
    pub fn stats_with_heap(&self, heap: &[(String, usize)]) -> StateStats {
        let bytes = |sig: &str| heap.iter().find(|(s, _)| s == sig).map_or(0, |h| h.1);
        let groups = (self.active.load().stores.iter())
            .map(|s| Self::group_stats(s, bytes(&s.signature)))
            .collect();
        self.stats_of(groups)
    }

    /// Key counts and approximate memory per group: the hash tables' allocated slots (not
    /// just the used ones) plus each key's heap blocks.
    pub fn stats(&self) -> StateStats {
        let groups = (self.active.load().stores.iter())
            .map(|s| Self::group_stats(s, s.map.iter().map(|e| e.value().heap_bytes()).sum()))
            .collect();
        self.stats_of(groups)
    }

    /// (signature, keys, bytes) of a group whose keys' heap blocks hold `heap` bytes.
    fn group_stats(s: &GroupStore, heap: usize) -> (String, usize, usize) {
        let per_slot = std::mem::size_of::<(StateKey, KeyState)>() + 1;
        (
            s.signature.clone(),
            s.map.len(),
            heap + s.map.capacity() * per_slot,
        )
    }

    fn stats_of(&self, groups: Vec<(String, usize, usize)>) -> StateStats {
        StateStats {
            groups,
            dedupe_entries: self.dedupe.len(),
            capped: self
                .capped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        }
    }

    /// A point-in-time copy of all window state and the retry table, for a snapshot.
    ///
    /// The cut is taken under the swap barrier (decisions in flight finish first, for
    /// microseconds); `at_cut` runs there, so the caller can record where its inputs stood
    /// ([`Cursor`]). The copy then runs while decisions go on: the first decision to change
    /// a key after the cut keeps the key's state at the cut for the copy, and ids decided
    /// after the cut are left out. So the snapshot holds exactly the decisions made before
    /// the cut, in every key and in the retry table: replaying what came after it,
    /// skipping ids in the table, counts nothing twice and loses nothing. Rule swaps,
    /// restores and evictions wait or skip while a copy runs.
    pub fn snapshot(&self, taken_at_ms: i64, at_cut: impl FnOnce() -> Cursor) -> EncodedSnapshot {
        let _one = self.snapshotting.lock().unwrap_or_else(|e| e.into_inner());
        let active = self.active.load_full();
        // The capture is taken away however this copy ends: left in place (after a panic
        // in here, say), every later decision would keep copying key states into it.
        let _uninstall = CaptureGuard(&self.capture);
        let (capture, cursor) = {
            let _excl = self.barrier.write().unwrap_or_else(|e| e.into_inner());
            let c = Arc::new(Capture {
                before: active
                    .stores
                    .iter()
                    .map(|_| DashMap::with_hasher_and_shard_amount(PreHashed, SHARDS))
                    .collect(),
                ids_after: DashMap::with_hasher_and_shard_amount(PreHashed, SHARDS),
            });
            self.capture.store(Some(c.clone()));
            (c, at_cut())
        };
        let mut groups = Vec::with_capacity(active.stores.len());
        let mut encoded = Vec::with_capacity(active.stores.len());
        for (gi, s) in active.stores.iter().enumerate() {
            // Keys first (16 bytes each, a shard's read lock held only for that), then each
            // state encoded under its own short lock, into memory allocated beforehand:
            // an allocation under the lock can take the allocator's slow path (a heap
            // collection: 130 ms measured) while a decision waits for that shard.
            let mut keys: Vec<StateKey> = Vec::with_capacity(s.map.len() + 1024);
            keys.extend(s.map.iter().map(|e| *e.key()));
            let before = &capture.before[gi];
            let cfg = bincode::config::standard();
            let mut out = EncodedKeys::default();
            for k in spread(&keys) {
                if out
                    .chunks
                    .last()
                    .is_none_or(|c| c.capacity() - c.len() < CHUNK_ROOM)
                {
                    out.chunks.push(Vec::with_capacity(CHUNK));
                }
                let buf = out.chunks.last_mut().expect("a chunk");
                // Holding the key's shard lock: a decision changing the key keeps its
                // state at the cut under the same lock, so this sees either the unchanged
                // state or the kept one.
                let Some(now) = s.map.get(&k) else { continue };
                let mark = buf.len();
                let written = match before.get(&k) {
                    Some(kept) => match kept.value() {
                        Some(st) => bincode::serde::encode_into_std_write((k, st), buf, cfg),
                        None => continue, // created after the cut
                    },
                    None => bincode::serde::encode_into_std_write((k, now.value()), buf, cfg),
                };
                match written {
                    Ok(_) => out.count += 1,
                    Err(_) => buf.truncate(mark), // never half an item in the file
                }
            }
            groups.push(GroupSnapshot {
                signature: s.signature.clone(),
                slots: s.slots.clone(),
                layout: s.layout.clone(),
                keys: Vec::new(),
            });
            encoded.push(out);
        }
        let ids: Vec<KeyHash> = self.dedupe.iter().map(|e| *e.key()).collect();
        let dedupe = spread(&ids)
            .filter_map(|id| {
                let e = self.dedupe.get(&id)?;
                if capture.ids_after.contains_key(&id) {
                    return None;
                }
                // Written by `to_json_vec` or checked at restore: always UTF-8.
                let json = String::from_utf8_lossy(&e.json).into_owned();
                Some(KeptDecision {
                    id,
                    at_ms: e.at_ms,
                    json,
                    fingerprint: e.fingerprint,
                })
            })
            .collect();
        drop(_uninstall);
        EncodedSnapshot {
            header: StateSnapshot {
                format: SNAPSHOT_FORMAT,
                key_fingerprint: key_fingerprint(&self.cfg),
                resolution_ms: self.res_ms,
                taken_at_ms,
                cursor,
                groups,
                dedupe,
            },
            keys: encoded,
        }
    }

    /// Loads a snapshot into this engine's state (decisions wait meanwhile). Groups and
    /// slots are matched by signature as in a rule reload: a snapshot taken under other
    /// rules still restores what both sets have in common.
    pub fn restore(&self, snap: StateSnapshot) -> Result<Restored, SnapshotError> {
        if snap.format != SNAPSHOT_FORMAT {
            return Err(SnapshotError::Format {
                found: snap.format,
                expected: SNAPSHOT_FORMAT,
            });
        }
        if snap.key_fingerprint != key_fingerprint(&self.cfg) {
            return Err(SnapshotError::Key);
        }
        if snap.resolution_ms != self.res_ms {
            return Err(SnapshotError::Resolution {
                found: snap.resolution_ms,
                expected: self.res_ms,
            });
        }
        let _no_snapshot = self.snapshotting.lock().unwrap_or_else(|e| e.into_inner());
        let _excl = self.barrier.write().unwrap_or_else(|e| e.into_inner());
        let active = self.active.load();
        let mut report = Restored {
            cursor: snap.cursor,
            ..Default::default()
        };
        for g in snap.groups {
            let Some(store) = active.stores.iter().find(|s| s.signature == g.signature) else {
                report.dropped_groups += 1;
                continue;
            };
            let mapping = (store.slots != g.slots).then(|| slot_mapping(&g.slots, &store.slots));
            for (k, st) in g.keys {
                let st = match &mapping {
                    None => st,
                    Some(m) => st.migrate(&g.layout, &store.layout, m),
                };
                store.map.insert(k, st);
                report.keys += 1;
            }
        }
        for k in snap.dedupe {
            // Only decisions that parse: a retry is answered by parsing them again.
            match serde_json::from_str::<Decision>(&k.json) {
                Ok(_) => {
                    self.dedupe.insert(
                        k.id,
                        DedupeEntry {
                            at_ms: k.at_ms,
                            fingerprint: k.fingerprint,
                            json: k.json.into_bytes().into_boxed_slice(),
                        },
                    );
                    report.ids += 1;
                }
                Err(_) => report.skipped_ids += 1,
            }
        }
        Ok(report)
    }

    /// Every window's value for every tracked key, read at event time `at_ms`, sorted: to
    /// compare two engines' state (recovery tests, `fraudgate` tooling). Values are the
    /// window's count, distinct count or exact sum as text.
    pub fn window_values(&self, at_ms: i64) -> Vec<(String, StateKey, String)> {
        let _shared = self.barrier.read().unwrap_or_else(|e| e.into_inner());
        let active = self.active.load();
        let bucket = at_ms.div_euclid(self.res_ms);
        let mut out = Vec::new();
        for w in &active.rules.windows {
            let store = &active.stores[w.group];
            for e in store.map.iter() {
                let st = e.value();
                let v = match w.read {
                    WindowRead::Count(s) => {
                        st.count(&store.layout, s, bucket, w.buckets).to_string()
                    }
                    WindowRead::Distinct(s) => st.distinct(s, bucket, w.buckets).to_string(),
                    WindowRead::Sum(s) => st.sum(&store.layout, s, bucket, w.buckets).to_string(),
                };
                out.push((w.name.clone(), *e.key(), v));
            }
        }
        out.sort();
        out
    }

    /// Runs `f` on the state map of the group keyed by `signature` (e.g. `card`), if the
    /// active rules have one. For snapshots and tests.
    pub fn with_group<R>(&self, signature: &str, f: impl FnOnce(&GroupStore) -> R) -> Option<R> {
        let active = self.active.load();
        active
            .stores
            .iter()
            .find(|s| s.signature == signature)
            .map(f)
    }
}

/// The items of `v` in an order that jumps between map shards. Keys listed by iterating a
/// map come shard by shard; reading them back in that order takes one shard's read lock
/// thousands of times in a row, and the map's lock lets readers in while a writer waits:
/// a decision needing that shard waited until the copy moved on (130 ms at 1M keys, each
/// unlock also waking the parked writer for nothing). With a stride coprime to the length,
/// consecutive reads land on different shards and a waiting writer gets in at once.
fn spread<T: Copy>(v: &[T]) -> impl Iterator<Item = T> + '_ {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let n = v.len();
    // About one shard's worth of keys per step, made coprime with n.
    let mut stride = (n / SHARDS).max(1) + 1;
    while n > 0 && gcd(stride, n) != 1 {
        stride += 1;
    }
    (0..n).map(move |j| v[(j * stride) % n])
}

fn group_windows(rs: &RuleSet) -> Vec<Vec<usize>> {
    let mut v = vec![Vec::new(); rs.groups.len()];
    for (i, w) in rs.windows.iter().enumerate() {
        v[w.group].push(i);
    }
    v
}

/// The transaction's value of each declared attribute, by declaration index (`None`:
/// absent, or of another type than declared). Both lists are sorted by name, so one merge
/// pass finds them all.
fn resolve_attrs<'t>(rs: &RuleSet, txn: &'t Transaction) -> SmallVec<[Option<&'t AttrValue>; 16]> {
    let mut sent = txn.attrs.iter().peekable();
    rs.attrs
        .iter()
        .map(|(name, ty)| {
            while let Some((k, v)) = sent.peek() {
                match k.as_str().cmp(name) {
                    std::cmp::Ordering::Less => {
                        sent.next();
                    }
                    std::cmp::Ordering::Equal => {
                        sent.next();
                        let typed = matches!(
                            (ty, v),
                            (crate::rules::AttrType::Str, AttrValue::Str(_))
                                | (crate::rules::AttrType::Num, AttrValue::Num(_))
                                | (crate::rules::AttrType::Bool, AttrValue::Bool(_))
                        );
                        return typed.then_some(v);
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            None
        })
        .collect()
}

fn local_time(cfg: &EngineConfig, ts_ms: i64) -> (i64, i64) {
    if cfg.timezone == chrono_tz::Tz::UTC {
        // No zone rules to look up: plain arithmetic (1970-01-01 was a Thursday).
        let days = ts_ms.div_euclid(86_400_000);
        let hour = ts_ms.rem_euclid(86_400_000) / 3_600_000;
        return (hour, (days + 3).rem_euclid(7) + 1);
    }
    match cfg.timezone.timestamp_millis_opt(ts_ms).single() {
        Some(t) => (t.hour() as i64, t.weekday().number_from_monday() as i64),
        None => (0, 0),
    }
}

/// Keyed hash of the entity key, or `None` when a key field is missing. A single string
/// field (card, device ...) comes from the per-decision cache, so it is hashed once even
/// when several groups, distinct counts and list lookups use it.
fn entity_key(by: &[KeyField], c: &Ctx<'_>) -> Option<KeyHash> {
    if let [KeyField::Field(
        f @ (Field::Id
        | Field::Card
        | Field::Currency
        | Field::Device
        | Field::Merchant
        | Field::Region),
    )] = by
    {
        return c.hashes.get(*f, c);
    }
    hash_fields(by, c)
}

fn hash_fields(by: &[KeyField], c: &Ctx<'_>) -> Option<KeyHash> {
    let mut h = c.key.hasher();
    for f in by {
        if !f.hash_into(c, &mut h) {
            return None;
        }
    }
    Some(h.finish())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod local_time_tests {
    use super::*;

    #[test]
    fn utc_fast_path_matches_chrono() {
        let cfg = EngineConfig::default();
        for ts in [
            0i64,
            1,
            86_399_999,
            86_400_000,
            1_795_687_200_123,
            1_795_730_000_000,
            951_782_400_000,
        ] {
            let t = chrono_tz::Tz::UTC
                .timestamp_millis_opt(ts)
                .single()
                .unwrap();
            assert_eq!(
                local_time(&cfg, ts),
                (t.hour() as i64, t.weekday().number_from_monday() as i64),
                "{ts}"
            );
        }
    }
}
