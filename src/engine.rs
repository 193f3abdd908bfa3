//! The decision core: windows + rules + idempotency. Pure: the clock is passed in, no IO.
//!
//! [`Engine::decide`] may be called from many threads at once. Window state lives in one
//! sharded map per key group; a decision holds at most one shard lock of one map at a time
//! (plus the dedupe-table shard of its transaction id), so there is no global lock and no
//! lock-order cycle.

use std::sync::Arc;
use std::time::Instant;

use chrono::{Datelike, TimeZone, Timelike};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use rust_decimal::Decimal;
use smallvec::SmallVec;

use crate::config::EngineConfig;
use crate::decision::{combine, Decision, FiredRule};
use crate::keyhash::{KeyHash, PreHashed};
use crate::rules::expr::FieldHashes;
use crate::rules::{Ctx, Field, KeyField, RuleSet, Tri, WindowRead};
use crate::txn::{AttrValue, Transaction};
use crate::window::{Added, Contribution, KeyState, Layout};

/// The window state of one key group.
pub struct GroupStore {
    pub signature: String,
    pub layout: Layout,
    pub map: DashMap<KeyHash, KeyState, PreHashed>,
}

impl GroupStore {
    fn new(signature: String, layout: Layout) -> Self {
        GroupStore {
            signature,
            layout,
            map: DashMap::with_hasher_and_shard_amount(PreHashed, SHARDS),
        }
    }
}

/// Shards per map: many more than cores, so two deciding threads rarely meet.
const SHARDS: usize = 64;

struct DedupeEntry {
    at_ms: i64,
    decision: Arc<Decision>,
}

/// Result of [`Engine::decide`].
#[derive(Debug, Clone)]
pub struct Outcome {
    pub decision: Arc<Decision>,
    /// The id was seen within the dedupe horizon: this is the original decision, and
    /// nothing was counted again.
    pub duplicate: bool,
    /// The event was older than every window of some key and added nothing there.
    pub too_late: bool,
}

/// Sizes of the engine's state, for metrics and memory measurements.
#[derive(Debug, Clone, Default)]
pub struct StateStats {
    /// Per key group: (signature, keys, approximate bytes).
    pub groups: Vec<(String, usize, usize)>,
    pub dedupe_entries: usize,
}

/// Counts from [`Engine::evict_idle`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evicted {
    pub keys: usize,
    pub dedupe: usize,
}

pub struct Engine {
    cfg: EngineConfig,
    rules: Arc<RuleSet>,
    stores: Vec<Arc<GroupStore>>,
    /// Per group: indexes of its windows in `rules.windows`.
    group_windows: Vec<Vec<usize>>,
    /// Declared attrs: name and type, sorted by name.
    dedupe: DashMap<KeyHash, DedupeEntry, PreHashed>,
    res_ms: i64,
    /// `rules.version`, shared by every decision.
    version: Arc<str>,
}

impl Engine {
    pub fn new(rules: RuleSet, cfg: EngineConfig) -> Self {
        let rules = Arc::new(rules);
        let stores = rules
            .groups
            .iter()
            .map(|g| Arc::new(GroupStore::new(g.signature.clone(), g.layout.clone())))
            .collect();
        let group_windows = group_windows(&rules);
        Engine {
            version: rules.version.as_str().into(),
            res_ms: cfg.resolution.as_millis().max(1) as i64,
            cfg,
            rules,
            stores,
            group_windows,
            dedupe: DashMap::with_hasher_and_shard_amount(PreHashed, SHARDS),
        }
    }

    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Decides one transaction. `now_ms` is the receive time (epoch ms): the event time
    /// when the transaction has no `ts`, and the clock of the dedupe horizon.
    pub fn decide(&self, txn: &Transaction, now_ms: i64) -> Outcome {
        let start = Instant::now();
        let id_hash = self.cfg.hash_key.hash_str(&txn.id);
        let horizon = self.cfg.dedupe_horizon.as_millis() as i64;
        // The dedupe shard stays locked while this id is decided, so a concurrent retry of
        // the same id waits and then gets this decision instead of being counted twice.
        match self.dedupe.entry(id_hash) {
            Entry::Occupied(o) if now_ms.saturating_sub(o.get().at_ms) <= horizon => Outcome {
                decision: o.get().decision.clone(),
                duplicate: true,
                too_late: false,
            },
            entry => {
                let (mut decision, too_late) = self.decide_fresh(txn, now_ms);
                decision.engine_us = start.elapsed().as_micros() as u64;
                let decision = Arc::new(decision);
                let value = DedupeEntry {
                    at_ms: now_ms,
                    decision: decision.clone(),
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
                    duplicate: false,
                    too_late,
                }
            }
        }
    }

    fn decide_fresh(&self, txn: &Transaction, now_ms: i64) -> (Decision, bool) {
        let rs = &*self.rules;
        let ts_ms = txn.ts_ms.unwrap_or(now_ms);
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
        let mut ints: SmallVec<[Option<i64>; 32]> = SmallVec::from_elem(None, rs.int_features);
        let mut decs: SmallVec<[Option<Decimal>; 16]> = SmallVec::from_elem(None, rs.dec_features);
        let base = Ctx {
            txn,
            ts_ms,
            currency,
            attrs: &attrs,
            ints: &[],
            decs: &[],
            local_hour,
            local_weekday,
            key: &self.cfg.hash_key,
            hashes: &field_hashes,
        };
        let bucket = ts_ms.div_euclid(self.res_ms);
        let mut too_late = false;
        let keys: SmallVec<[Option<KeyHash>; 8]> =
            rs.groups.iter().map(|g| entity_key(&g.by, &base)).collect();
        // Warm-up pass: look every key up first, in a tight loop, so the cache misses of
        // the different maps overlap instead of being paid one after another below.
        for (gi, key) in keys.iter().enumerate() {
            if let Some(key) = key {
                if let Some(state) = self.stores[gi].map.get(key) {
                    state.touch();
                }
            }
        }
        for (gi, g) in rs.groups.iter().enumerate() {
            let Some(key) = keys[gi] else {
                continue; // a key field is missing: the group's windows stay unknown
            };
            let pass =
                |f: &Option<crate::rules::BoolFn>| f.as_ref().is_none_or(|f| f(&base) == Tri::True);
            let counts: SmallVec<[bool; 8]> = g.counts.iter().map(|(_, f)| pass(f)).collect();
            let sums: SmallVec<[Option<Decimal>; 4]> = g
                .sums
                .iter()
                .map(|(_, of, f)| if pass(f) { of.value(&base) } else { None })
                .collect();
            let distincts: SmallVec<[Option<u64>; 4]> = g
                .distincts
                .iter()
                .map(|(_, of, f)| {
                    if pass(f) {
                        entity_key(std::slice::from_ref(of), &base).map(|h| h as u64)
                    } else {
                        None
                    }
                })
                .collect();
            let store = &self.stores[gi];
            let mut state = store
                .map
                .entry(key)
                .or_insert_with(|| KeyState::new(&store.layout));
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
            for &wi in &self.group_windows[gi] {
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
            ..base
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
                rules_version: self.version.clone(),
                engine_us: 0,
            },
            too_late,
        )
    }

    /// Drops keys idle longer than their group's longest window (plus the lateness
    /// allowance) and dedupe entries older than the horizon, relative to `now_ms`.
    pub fn evict_idle(&self, now_ms: i64) -> Evicted {
        let mut ev = Evicted::default();
        let now_b = now_ms.div_euclid(self.res_ms);
        for s in &self.stores {
            let keep_after = now_b - s.layout.max_window - s.layout.lateness;
            let before = s.map.len();
            s.map.retain(|_, st| {
                let keep = st.newest_bucket().is_some_and(|n| n > keep_after);
                if keep && st.has_expired(&s.layout) {
                    st.evict(&s.layout, true);
                }
                keep
            });
            ev.keys += before.saturating_sub(s.map.len());
        }
        let horizon = self.cfg.dedupe_horizon.as_millis() as i64;
        let before = self.dedupe.len();
        self.dedupe
            .retain(|_, e| now_ms.saturating_sub(e.at_ms) <= horizon);
        ev.dedupe = before.saturating_sub(self.dedupe.len());
        ev
    }

    /// Key counts and approximate memory per group: the hash tables' allocated slots (not
    /// just the used ones) plus each key's heap blocks.
    pub fn stats(&self) -> StateStats {
        let per_slot = std::mem::size_of::<(KeyHash, KeyState)>() + 1;
        StateStats {
            groups: self
                .stores
                .iter()
                .map(|s| {
                    let keys = s.map.len();
                    let heap: usize = s.map.iter().map(|e| e.value().heap_bytes()).sum();
                    (
                        s.signature.clone(),
                        keys,
                        heap + s.map.capacity() * per_slot,
                    )
                })
                .collect(),
            dedupe_entries: self.dedupe.len(),
        }
    }

    /// The group stores, for snapshots and tests.
    pub fn stores(&self) -> &[Arc<GroupStore>] {
        &self.stores
    }
}

fn group_windows(rs: &RuleSet) -> Vec<Vec<usize>> {
    let mut v = vec![Vec::new(); rs.groups.len()];
    for (i, w) in rs.windows.iter().enumerate() {
        v[w.group].push(i);
    }
    v
}

/// Declared attributes of the transaction, by declaration index. An attribute of another
/// type than declared counts as absent.
fn resolve_attrs<'t>(rs: &RuleSet, txn: &'t Transaction) -> SmallVec<[Option<&'t AttrValue>; 16]> {
    rs.attrs
        .iter()
        .map(|(name, ty)| {
            txn.attr(name).filter(|v| {
                matches!(
                    (ty, v),
                    (crate::rules::AttrType::Str, AttrValue::Str(_))
                        | (crate::rules::AttrType::Num, AttrValue::Num(_))
                        | (crate::rules::AttrType::Bool, AttrValue::Bool(_))
                )
            })
        })
        .collect()
}

fn local_time(cfg: &EngineConfig, ts_ms: i64) -> (i64, i64) {
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
