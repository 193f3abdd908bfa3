//! Synthetic card traffic with injected, labelled fraud patterns. Deterministic for a seed.
//!
//! Normal traffic: a card population whose size matches the traffic's rate (10 transactions
//! per card per day on average, a few busy cards and many quiet ones), Zipf-like merchant
//! and region popularity, cards that mostly use their own device (shared by two cards),
//! log-normal amounts (median 40), merchants with a category (MCC) and an age of their own
//! (the popular few everyday shops, the long tail a weighted mix with a few risky categories
//! and 5 % onboarded within the year: [`merchant_traits`]), devices long known to their
//! cards ([`device_age_days`]), matching phone/address/IP country for almost everyone, and event times that
//! follow a time-of-day profile ([`timeline`]: quiet nights, busy middays and evenings).
//! Injected patterns (each transaction carries its [`Pattern`] label) are the ones the
//! shipped rules target: card testing, account takeover, one card at many merchants,
//! duplicate submissions, a merchant spike, and a high-risk region at night.
//!
//! The density matters: the velocity rules count per card, device and merchant, so traffic
//! that crowds a day's transactions of too few cards into minutes makes normal cards look
//! like fraud, and a spike on a merchant that is already busy is no spike.

use std::collections::VecDeque;

use rust_decimal::Decimal;

use crate::txn::{AttrValue, Transaction};

/// An injected fraud pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    CardTesting,
    AccountTakeover,
    ManyMerchants,
    Duplicate,
    MerchantSpike,
    HighRiskNight,
}

impl Pattern {
    /// The shipped rules aimed at this pattern (`rules/`): the report says how many
    /// instances one of them fired on, apart from instances held or rejected for any
    /// reason (fraud transactions carry the same background signals as normal ones).
    pub fn target_rules(self) -> &'static [&'static str] {
        match self {
            Pattern::CardTesting => &["card_testing"],
            Pattern::AccountTakeover => &["new_device_large_amount", "ip_country_mismatch"],
            Pattern::ManyMerchants => &["card_many_merchants"],
            Pattern::Duplicate => &["duplicate_txn"],
            Pattern::MerchantSpike => &["merchant_spike"],
            Pattern::HighRiskNight => &["high_risk_region", "night_large_amount"],
        }
    }

    pub const ALL: [Pattern; 6] = [
        Pattern::CardTesting,
        Pattern::AccountTakeover,
        Pattern::ManyMerchants,
        Pattern::Duplicate,
        Pattern::MerchantSpike,
        Pattern::HighRiskNight,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Pattern::CardTesting => "card_testing",
            Pattern::AccountTakeover => "account_takeover",
            Pattern::ManyMerchants => "many_merchants",
            Pattern::Duplicate => "duplicate",
            Pattern::MerchantSpike => "merchant_spike",
            Pattern::HighRiskNight => "high_risk_night",
        }
    }
}

/// A generated transaction and, when injected, the pattern it belongs to.
#[derive(Debug, Clone)]
pub struct Labeled {
    pub txn: Transaction,
    pub pattern: Option<Pattern>,
    /// Which injected instance of `pattern` this transaction belongs to (a card-testing
    /// burst is one instance of six transactions); 0 for normal traffic.
    pub instance: u64,
}

/// Shape of the traffic.
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub seed: u64,
    /// Cards in the population. With `txns_per_card_day` it sets the traffic's mean rate
    /// in event time ([`GenConfig::events_per_sec`]).
    pub cards: u64,
    /// Devices; card `c` mostly uses device `c % devices`.
    pub devices: u64,
    pub merchants: u64,
    pub regions: u64,
    /// Mean transactions per card per day (busy cards do several times more).
    pub txns_per_card_day: f64,
    /// Probability that a normal transaction also starts an injected pattern.
    pub fraud_rate: f64,
    /// Regions the high-risk-at-night pattern uses (the shipped rules' placeholders).
    pub high_risk_regions: Vec<String>,
    /// Part of every transaction id (`g<seed>-<tag>-<n>`; `g<seed>-<n>` when empty): two
    /// runs of one seed against one engine need different ids, or the second is answered
    /// from the engine's retry table (the originals' decisions, nothing counted).
    pub run_tag: String,
    /// The engine's time zone as its offset from UTC, in seconds (east positive): the
    /// day's profile and the high-risk night are the engine's local hours, which its
    /// `local_hour` reads. One offset for a run (a daylight-saving change inside it is
    /// not followed).
    pub utc_offset_s: i64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            seed: 1,
            cards: 100_000,
            devices: 50_000,
            merchants: 5_000,
            regions: 40,
            txns_per_card_day: 10.0,
            fraud_rate: 0.002,
            high_risk_regions: ["XA", "XB", "XC", "XD"].map(String::from).to_vec(),
            run_tag: String::new(),
            utc_offset_s: 0,
        }
    }
}

impl GenConfig {
    /// The population behind `rate` transactions per second in real time: as many cards
    /// as make that rate at the default density, each device shared by two cards. (Live
    /// traffic keeps event time at the wall clock, so the density comes from the population.)
    pub fn for_rate(rate: f64) -> GenConfig {
        let d = GenConfig::default();
        let cards = (rate.max(0.01) * 86_400.0 / d.txns_per_card_day)
            .round()
            .max(1_000.0) as u64;
        GenConfig {
            cards,
            devices: (cards / 2).max(1),
            ..d
        }
    }

    /// Mean transactions per second of event time (over a day; see [`day_weight`]).
    pub fn events_per_sec(&self) -> f64 {
        self.cards as f64 * self.txns_per_card_day / 86_400.0
    }

    /// Mean event time between two transactions, in ms.
    pub fn mean_gap_ms(&self) -> f64 {
        1_000.0 / self.events_per_sec().max(1e-9)
    }
}

/// Relative card traffic by local hour of the day, mean 1: quiet small hours, a midday
/// and an early-evening peak.
const HOURLY: [f64; 24] = [
    0.35, 0.22, 0.15, 0.12, 0.12, 0.18, 0.40, 0.75, 1.10, 1.35, 1.55, 1.66, 1.75, 1.65, 1.48, 1.42,
    1.48, 1.67, 1.72, 1.50, 1.25, 0.95, 0.70, 0.48,
];

/// The traffic rate at local time `local_ms` (event time plus the zone's offset)
/// relative to the day's mean.
pub fn day_weight(local_ms: i64) -> f64 {
    HOURLY[(local_ms.rem_euclid(86_400_000) / 3_600_000) as usize]
}

/// The offset from UTC (seconds, east positive) of time zone `tz` (an IANA name, as in
/// `[engine] timezone`) at `at_ms`; `None` for a name that is not a zone.
pub fn utc_offset_s(tz: &str, at_ms: i64) -> Option<i64> {
    use chrono::{Offset, TimeZone};
    let tz: chrono_tz::Tz = tz.parse().ok()?;
    let at = chrono::DateTime::from_timestamp_millis(at_ms)?.naive_utc();
    Some(i64::from(
        tz.offset_from_utc_datetime(&at).fix().local_minus_utc(),
    ))
}

/// Event times of `count` transactions of `cfg`'s traffic, the last at `end_ms`, oldest
/// first: random (Poisson) arrivals at the mean rate shaped by the time of day. Replaying
/// them as fast as a benchmark can send keeps each card's, device's and merchant's real
/// spacing, which is what the windows see. Deterministic for the config's seed.
pub fn timeline(cfg: &GenConfig, end_ms: i64, count: usize) -> Vec<i64> {
    let mut rng = Rng::new(cfg.seed ^ 0x5449_4d45);
    let mean = cfg.mean_gap_ms();
    let offset_ms = cfg.utc_offset_s * 1_000;
    let mut t = end_ms as f64;
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        times.push(t as i64);
        // Going back: the gap before an event follows the rate at its hour.
        t -= -(1.0 - rng.unit()).ln() * mean / day_weight(t as i64 + offset_ms);
    }
    times.reverse();
    times
}

/// Deterministic xorshift generator seeded through splitmix64.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Skewed pick in 0..n: small indexes are much more popular (approximately Zipf).
    /// `(n + 1)^u - 1` spans `[0, n)`, so every index can come up (with `n^u - 1` the
    /// last one never did: 39 regions of 40).
    pub fn skewed(&mut self, n: u64) -> u64 {
        ((n as f64 + 1.0).powf(self.unit()) - 1.0) as u64 % n.max(1)
    }
    /// Approximately standard normal (sum of four uniforms).
    pub fn normal(&mut self) -> f64 {
        ((0..4).map(|_| self.unit()).sum::<f64>() - 2.0) * 3f64.sqrt()
    }
    fn weighted(&mut self, items: &[(i64, u64)]) -> i64 {
        let total: u64 = items.iter().map(|x| x.1).sum();
        let mut k = self.below(total);
        for &(v, w) in items {
            if k < w {
                return v;
            }
            k -= w;
        }
        items[0].0
    }
    /// Days since an established onboarding: 1-8 years.
    fn established_days(&mut self) -> u64 {
        365 + self.below(2_555)
    }
    /// Days since onboarding: 95% established (1-8 years), 5% within the last year.
    fn age_days(&mut self) -> u64 {
        if self.below(100) < 95 {
            self.established_days()
        } else {
            self.below(365)
        }
    }
}

/// The merchant categories of the long tail of merchants, weighted.
const MCCS: [(i64, u64); 9] = [
    (5411, 30),
    (5812, 20),
    (5541, 15),
    (5999, 15),
    (5732, 8),
    (4722, 5),
    (5944, 3),
    (7995, 2),
    (6051, 2),
];

/// The categories of the most popular merchants (supermarkets, restaurants, fuel, general
/// retail): the few merchants that take a quarter of all traffic are not casinos.
const EVERYDAY_MCCS: [(i64, u64); 4] = [(5411, 40), (5812, 25), (5541, 20), (5999, 15)];

/// Merchants counted as the popular head (by popularity rank; the first ten take about a
/// quarter of the traffic of 5,000 merchants).
const HEAD_MERCHANTS: u64 = 10;

/// What a merchant is, the same in every transaction of a run: its category (MCC) and
/// the days since it was onboarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MerchantTraits {
    pub mcc: i64,
    pub age_days: u64,
}

/// The traits of merchant `m` (`mer-<m>`) in traffic of `seed`: drawn from a generator
/// seeded by both, so they do not depend on the order transactions are made in. The
/// popular head is everyday categories and established; the tail follows [`MCCS`], 5 %
/// of it onboarded within the last year.
pub fn merchant_traits(seed: u64, m: u64) -> MerchantTraits {
    let mut r = Rng::new(seed ^ 0x4d45_5243_4841_4e54 ^ m.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    if m < HEAD_MERCHANTS {
        MerchantTraits {
            mcc: r.weighted(&EVERYDAY_MCCS),
            age_days: r.established_days(),
        }
    } else {
        MerchantTraits {
            mcc: r.weighted(&MCCS),
            age_days: r.age_days(),
        }
    }
}

/// Days since `device` was first seen with `card` (the `device_age_days` attribute), the
/// same in every transaction of the pair: a card's own device and the odd other one it
/// uses are mostly long known.
pub fn device_age_days(seed: u64, card: u64, device: u64) -> u64 {
    Rng::new(
        seed ^ 0x4445_5649_4345
            ^ card.wrapping_mul(0xbf58_476d_1ce4_e5b9)
            ^ device.wrapping_mul(0x94d0_49bb_1331_11eb),
    )
    .age_days()
}

/// The traffic generator.
pub struct Generator {
    cfg: GenConfig,
    rng: Rng,
    seq: u64,
    /// Injected pattern instances so far (numbered from 1).
    instances: u64,
    /// Injected transactions not yet due: (due event time, transaction).
    pending: VecDeque<(i64, Labeled)>,
}

impl Generator {
    pub fn new(cfg: GenConfig) -> Generator {
        Generator {
            rng: Rng::new(cfg.seed),
            cfg,
            seq: 0,
            instances: 0,
            pending: VecDeque::new(),
        }
    }

    fn card_number(&self, card: u64) -> String {
        format!("4{:015}", card.wrapping_mul(7_919) % 1_000_000_000_000_000)
    }

    fn id(&mut self) -> String {
        self.seq += 1;
        match self.cfg.run_tag.as_str() {
            "" => format!("g{}-{}", self.cfg.seed, self.seq),
            tag => format!("g{}-{tag}-{}", self.cfg.seed, self.seq),
        }
    }

    /// A card of the population. Activity is skewed: the busiest card makes about
    /// `cards^(1/6)` times the mean (70 a day among 100k cards), most cards less than the mean.
    fn card(&mut self) -> u64 {
        let n = self.cfg.cards.max(1);
        ((n as f64 * self.rng.unit().powf(1.2)) as u64).min(n - 1)
    }

    /// Another region than `region` (an IP abroad).
    fn other_region(&mut self, region: &str) -> String {
        let n = self.cfg.regions.max(2);
        let own = region
            .strip_prefix('R')
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0);
        format!("R{}", (own + 1 + self.rng.below(n - 1)) % n)
    }

    /// The merchants a spike is injected at: ones whose normal traffic is about 90 an hour
    /// at this config's rate (a spike of 45 within two minutes stands out there; at the
    /// busiest merchants it would be noise).
    fn spike_merchants(&self) -> (u64, u64) {
        let m = self.cfg.merchants.max(2);
        let per_hour = self.cfg.events_per_sec() * 3_600.0;
        let k = (per_hour / (90.0 * (m as f64).ln())).clamp(2.0, (m - 1) as f64) as u64;
        ((k / 2).max(1), (k + k / 2).min(m - 1))
    }

    /// A normal transaction of `card` at event time `ts`.
    fn normal_for(&mut self, card: u64, ts: i64) -> Transaction {
        let r = &mut self.rng;
        let cents = (4_000.0 * r.normal().exp()).clamp(1.0, 1_500_000.0) as i64;
        let device = if card >= self.cfg.cards {
            // Fraud cards (outside the population) come with devices of their own.
            card
        } else if r.below(100) < 98 {
            card % self.cfg.devices.max(1)
        } else {
            r.below(self.cfg.devices)
        };
        let merchant = r.skewed(self.cfg.merchants);
        let region = format!("R{}", r.skewed(self.cfg.regions));
        let ip_country = if r.below(100) < 97 {
            region.clone()
        } else {
            format!("R{}", r.skewed(self.cfg.regions))
        };
        let address_match = r.below(100) != 0;
        let channel = if r.below(2) == 0 { "ecom" } else { "pos" };
        let phone_match = r.below(100) != 0;
        let device_age = device_age_days(self.cfg.seed, card, device);
        let mut t = Transaction::new(self.id(), self.card_number(card), Decimal::new(cents, 2));
        t.ts_ms = Some(ts);
        t.currency = Some("EUR".into());
        t.device = Some(format!("dev-{device}"));
        t.region = Some(region);
        t.attrs = vec![
            ("address_match".into(), AttrValue::Bool(address_match)),
            ("channel".into(), AttrValue::Str(channel.into())),
            (
                "device_age_days".into(),
                AttrValue::Num(Decimal::from(device_age)),
            ),
            ("ip_country".into(), AttrValue::Str(ip_country)),
            ("phone_match".into(), AttrValue::Bool(phone_match)),
        ];
        self.set_merchant(&mut t, merchant);
        t
    }

    /// Makes `t` a payment at merchant `m`, with the merchant's category and age.
    fn set_merchant(&self, t: &mut Transaction, m: u64) {
        let traits = merchant_traits(self.cfg.seed, m);
        t.merchant = Some(format!("mer-{m}"));
        t.mcc = Some(traits.mcc);
        t.set_attr(
            "merchant_age_days",
            AttrValue::Num(Decimal::from(traits.age_days)),
        );
    }

    /// The next transaction at event time `now_ms`: an injected one that is due, or a
    /// normal one (which may start a new pattern).
    pub fn next_at(&mut self, now_ms: i64) -> Labeled {
        if self.pending.front().is_some_and(|(due, _)| *due <= now_ms) {
            if let Some((_, mut l)) = self.pending.pop_front() {
                // Event time is the (later) send time; night events keep their own ts.
                if l.pattern != Some(Pattern::HighRiskNight) {
                    l.txn.ts_ms = Some(now_ms);
                }
                return l;
            }
        }
        if self.rng.unit() < self.cfg.fraud_rate {
            let p = Pattern::ALL[self.rng.below(Pattern::ALL.len() as u64) as usize];
            self.inject(p, now_ms);
        }
        let card = self.card();
        Labeled {
            txn: self.normal_for(card, now_ms),
            pattern: None,
            instance: 0,
        }
    }

    /// Schedules one instance of `p`, starting at `now_ms`.
    pub fn inject(&mut self, p: Pattern, now_ms: i64) {
        // Fraud uses cards outside the normal population, so labels are unambiguous.
        let card = self.cfg.cards + 1 + self.rng.below(1_000_000_000);
        let mut plan: Vec<(i64, Transaction)> = Vec::new();
        match p {
            Pattern::CardTesting => {
                let mut at = now_ms;
                for _ in 0..6 {
                    let mut t = self.normal_for(card, at);
                    t.amount = Decimal::new(50 + self.rng.below(149) as i64, 2);
                    plan.push((at, t));
                    at += 2_000 + self.rng.below(10_000) as i64;
                }
            }
            Pattern::AccountTakeover => {
                let device = format!("dev-new-{}", self.rng.below(1 << 40));
                // Most takeovers come from the fraudster's own network, abroad.
                let abroad = self.rng.below(10) < 7;
                let mut at = now_ms;
                for _ in 0..3 {
                    let mut t = self.normal_for(card, at);
                    if abroad {
                        let ip = self.other_region(t.region.as_deref().unwrap_or(""));
                        t.set_attr("ip_country", AttrValue::Str(ip));
                    }
                    t.device = Some(device.clone());
                    t.set_attr("device_age_days", AttrValue::Num(Decimal::ZERO));
                    t.amount = Decimal::new(120_000 + self.rng.below(300_000) as i64, 2);
                    plan.push((at, t));
                    at += 20_000 + self.rng.below(60_000) as i64;
                }
            }
            Pattern::ManyMerchants => {
                let mut at = now_ms;
                for _ in 0..6 {
                    // Any merchant, not the popular ones a card would use anyway.
                    let mut t = self.normal_for(card, at);
                    let m = self.rng.below(self.cfg.merchants);
                    self.set_merchant(&mut t, m);
                    plan.push((at, t));
                    at += 5_000 + self.rng.below(40_000) as i64;
                }
            }
            Pattern::Duplicate => {
                let t = self.normal_for(card, now_ms);
                let mut again = t.clone();
                again.id = self.id();
                let later = now_ms + 10_000 + self.rng.below(60_000) as i64;
                plan.push((now_ms, t));
                plan.push((later, again));
            }
            Pattern::MerchantSpike => {
                // An established merchant of moderate traffic suddenly gets a burst.
                let (lo, hi) = self.spike_merchants();
                let merchant = lo + self.rng.below(hi - lo + 1);
                let mut at = now_ms;
                for i in 0..45u64 {
                    let mut t = self.normal_for(card + i, at);
                    self.set_merchant(&mut t, merchant);
                    plan.push((at, t));
                    at += 1_000 + self.rng.below(3_000) as i64;
                }
            }
            Pattern::HighRiskNight => {
                // 02:00-03:59 local time, from a high-risk region: the last such night
                // time, never a time still to come.
                let offset_ms = self.cfg.utc_offset_s * 1_000;
                let day = (now_ms + offset_ms).div_euclid(86_400_000) * 86_400_000 - offset_ms;
                let mut ts = day + 7_200_000 + self.rng.below(7_200_000) as i64;
                if ts > now_ms {
                    ts = if now_ms - day >= 7_200_000 {
                        now_ms
                    } else {
                        ts - 86_400_000
                    };
                }
                let mut t = self.normal_for(card, ts);
                let n = self.cfg.high_risk_regions.len().max(1) as u64;
                if let Some(r) = self.cfg.high_risk_regions.get(self.rng.below(n) as usize) {
                    t.region = Some(r.clone());
                    t.set_attr("ip_country", AttrValue::Str(r.clone()));
                }
                t.amount = Decimal::new(150_000 + self.rng.below(500_000) as i64, 2);
                plan.push((now_ms, t));
            }
        }
        self.instances += 1;
        let instance = self.instances;
        for (due, txn) in plan {
            let pos = self.pending.partition_point(|(d, _)| *d <= due);
            self.pending.insert(
                pos,
                (
                    due,
                    Labeled {
                        txn,
                        pattern: Some(p),
                        instance,
                    },
                ),
            );
        }
    }

    /// Injected transactions still waiting for their time.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Injected instances with transactions still to come: a run that stops now has sent
    /// only part of them (a card-testing burst cut after two of its six), which no rule
    /// could be expected to catch.
    pub fn pending_instances(&self) -> Vec<(Pattern, u64)> {
        let mut v: Vec<(Pattern, u64)> = self
            .pending
            .iter()
            .filter_map(|(_, l)| l.pattern.map(|p| (p, l.instance)))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Writes `count` transactions of `cfg`'s traffic, the last at `end_ms`, to `traffic` as
/// JSONL, and the ids of the injected ones to `fraud_ids` (one per line, its pattern in
/// a comment): recorded traffic with known fraud for `fraudgate replay --fraud-ids`.
/// Returns how many were fraud.
pub fn write_traffic(
    cfg: &GenConfig,
    end_ms: i64,
    count: usize,
    traffic: &mut impl std::io::Write,
    fraud_ids: &mut impl std::io::Write,
) -> std::io::Result<usize> {
    let mut g = Generator::new(cfg.clone());
    let mut fraud = 0;
    for ts in timeline(cfg, end_ms, count) {
        let l = g.next_at(ts);
        traffic.write_all(l.txn.to_json().as_bytes())?;
        traffic.write_all(b"\n")?;
        if let Some(p) = l.pattern {
            fraud += 1;
            writeln!(fraud_ids, "{}  # {}", l.txn.id, p.name())?;
        }
    }
    traffic.flush()?;
    fraud_ids.flush()?;
    Ok(fraud)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every index of a skewed pick comes up (the last one did not: 39 regions of 40),
    /// the first most often.
    #[test]
    fn skewed_picks_reach_every_index_and_favour_the_first() {
        let mut r = Rng::new(7);
        let mut seen = [0u32; 5];
        for _ in 0..100_000 {
            seen[r.skewed(5) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0] > w[1]), "{seen:?}");
        assert_eq!(Rng::new(7).skewed(1), 0);
    }

    #[test]
    fn ids_carry_the_run_tag() {
        let mut plain = Generator::new(GenConfig::default());
        assert_eq!(plain.next_at(1_795_687_200_000).txn.id, "g1-1");
        let mut tagged = Generator::new(GenConfig {
            run_tag: "r7".into(),
            ..Default::default()
        });
        let t = tagged.next_at(1_795_687_200_000).txn;
        assert_eq!(t.id, "g1-r7-1");
        // Only the id differs: the same seed is the same traffic.
        let mut again = Generator::new(GenConfig::default())
            .next_at(1_795_687_200_000)
            .txn;
        again.id = t.id.clone();
        assert_eq!(again.to_json(), t.to_json());
    }

    #[test]
    fn deterministic_and_labelled() {
        let cfg = GenConfig {
            fraud_rate: 0.05,
            ..Default::default()
        };
        let run = |cfg: &GenConfig| {
            let mut g = Generator::new(cfg.clone());
            (0..2_000)
                .map(|i| {
                    let l = g.next_at(1_795_687_200_000 + i * 100);
                    (l.txn.to_json(), l.pattern)
                })
                .collect::<Vec<_>>()
        };
        let a = run(&cfg);
        assert_eq!(a, run(&cfg));
        let labelled = a.iter().filter(|x| x.1.is_some()).count();
        assert!(labelled > 50, "{labelled}");
        for p in Pattern::ALL {
            assert!(a.iter().any(|x| x.1 == Some(p)), "{p:?} never injected");
        }
        // Every transaction is valid wire JSON.
        for (json, _) in &a {
            Transaction::from_json(json.as_bytes()).unwrap();
        }
    }

    #[test]
    fn the_day_profile_averages_one_and_nights_are_quiet() {
        let mean = HOURLY.iter().sum::<f64>() / 24.0;
        assert!((mean - 1.0).abs() < 1e-9, "{mean}");
        let hour = |h: i64| day_weight(1_795_651_200_000 + h * 3_600_000); // a midnight, UTC
        assert!(hour(3) < 0.2 && hour(12) > 1.5, "{} {}", hour(3), hour(12));
    }

    #[test]
    fn a_timeline_ends_where_asked_at_the_configured_density() {
        let cfg = GenConfig::default();
        let end = 1_795_687_200_000; // 10:00 UTC
        let t = timeline(&cfg, end, 1_000_000);
        assert_eq!(t.len(), 1_000_000);
        assert_eq!(*t.last().unwrap(), end);
        assert!(t.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(t, timeline(&cfg, end, 1_000_000), "deterministic");
        // 100k cards at 10 a day: 1M transactions a day, so 1M span about a day.
        let span_h = (end - t[0]) as f64 / 3_600_000.0;
        assert!((20.0..28.0).contains(&span_h), "{span_h} h");
        // The profile shows: more events in yesterday's midday hour than in today's 03:00.
        let midnight = end - 10 * 3_600_000;
        let in_hour = |from: i64| {
            t.iter()
                .filter(|&&x| x >= from && x < from + 3_600_000)
                .count()
        };
        let (noon, night) = (
            in_hour(midnight - 12 * 3_600_000),
            in_hour(midnight + 3 * 3_600_000),
        );
        assert!(noon > 8 * night, "{noon} {night}");
    }

    #[test]
    fn the_population_follows_the_rate() {
        let cfg = GenConfig::for_rate(1_000.0);
        assert_eq!(cfg.cards, 8_640_000);
        assert_eq!(cfg.devices, 4_320_000);
        assert!((cfg.events_per_sec() - 1_000.0).abs() < 1e-6);
        assert!((GenConfig::default().mean_gap_ms() - 86.4).abs() < 1e-9);
    }

    #[test]
    fn busy_cards_are_busy_but_human() {
        let mut g = Generator::new(GenConfig::default());
        let mut counts = std::collections::HashMap::<u64, u32>::new();
        for _ in 0..1_000_000 {
            *counts.entry(g.card()).or_default() += 1;
        }
        // 1M transactions over 100k cards: 10 each on average.
        let busiest = *counts.values().max().unwrap();
        assert!((30..150).contains(&busiest), "{busiest}");
        assert!(counts.len() > 60_000, "{}", counts.len());
    }

    /// A merchant has one category and one age in all of its transactions, injected ones
    /// included (many merchants, a spike), and a card keeps its device's age; the popular
    /// head is everyday categories, and the tail brings the risky ones and new merchants.
    #[test]
    fn merchants_and_devices_keep_their_traits() {
        let mut g = Generator::new(GenConfig {
            fraud_rate: 0.05,
            ..GenConfig::default()
        });
        let num = |t: &Transaction, name: &str| match t.attrs.iter().find(|(k, _)| k == name) {
            Some((_, AttrValue::Num(n))) => *n,
            other => panic!("{name}: {other:?}"),
        };
        let mut merchants = std::collections::HashMap::new();
        let mut pairs = std::collections::HashMap::new();
        let (mut injected, mut head, mut risky, mut young) = (0, 0, 0, 0);
        for i in 0..200_000 {
            let l = g.next_at(1_795_687_200_000 + i * 100);
            let t = &l.txn;
            injected += usize::from(l.pattern.is_some());
            let m = t.merchant.clone().unwrap();
            let traits = (t.mcc.unwrap(), num(t, "merchant_age_days"));
            assert_eq!(*merchants.entry(m.clone()).or_insert(traits), traits, "{m}");
            let index: u64 = m.strip_prefix("mer-").unwrap().parse().unwrap();
            if index < HEAD_MERCHANTS {
                head += 1;
                assert!(
                    EVERYDAY_MCCS.iter().any(|x| x.0 == traits.0),
                    "{m}: {traits:?}"
                );
                assert!(traits.1 >= Decimal::from(365), "{m}: {traits:?}");
            }
            risky += usize::from([7995, 6051].contains(&traits.0));
            young += usize::from(traits.1 < Decimal::from(365));
            let device_age = num(t, "device_age_days");
            if l.pattern != Some(Pattern::AccountTakeover) {
                let key = (t.card.clone(), t.device.clone().unwrap());
                assert_eq!(*pairs.entry(key).or_insert(device_age), device_age);
            }
        }
        assert!(injected > 5_000, "{injected}");
        // The head takes about a quarter of the traffic; risky categories and young
        // merchants are a few percent of it (each ~4-5 % of the tail's merchants).
        assert!((40_000..70_000).contains(&head), "{head}");
        assert!((1_000..10_000).contains(&risky), "{risky}");
        assert!((1_000..15_000).contains(&young), "{young}");
        let distinct_mccs: std::collections::HashSet<i64> =
            merchants.values().map(|x| x.0).collect();
        assert_eq!(distinct_mccs.len(), MCCS.len(), "{distinct_mccs:?}");
    }

    #[test]
    fn a_spike_hits_a_merchant_of_moderate_traffic() {
        let slow = Generator::new(GenConfig::default()).spike_merchants();
        assert!(slow.0 >= 20 && slow.1 <= 100, "{slow:?}");
        let fast = Generator::new(GenConfig::for_rate(1_000.0)).spike_merchants();
        assert!(fast.0 > 1_000 && fast.1 < 5_000, "{fast:?}");
    }

    /// At 02:00-03:59 in the engine's time zone (UTC, five hours east, seven west), and
    /// never dated in the future.
    #[test]
    fn night_fraud_is_at_local_night_and_never_dated_in_the_future() {
        for offset_h in [0i64, 5, -7] {
            let off = offset_h * 3_600_000;
            let day = 1_795_651_200_000 - off; // a local midnight
            for (i, now) in [day + 3_600_000, day + 3 * 3_600_000, day + 12 * 3_600_000]
                .into_iter()
                .enumerate()
            {
                let mut g = Generator::new(GenConfig {
                    seed: i as u64,
                    utc_offset_s: offset_h * 3_600,
                    ..GenConfig::default()
                });
                for _ in 0..50 {
                    g.inject(Pattern::HighRiskNight, now);
                }
                while let Some((_, l)) = g.pending.pop_front() {
                    let ts = l.txn.ts_ms.unwrap();
                    assert!(ts <= now, "{ts} > {now}");
                    let hour = (ts + off).rem_euclid(86_400_000) / 3_600_000;
                    assert!(
                        (2..4).contains(&hour) || ts == now,
                        "{offset_h}: hour {hour}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_zones_offset_is_read_at_the_time_asked() {
        let winter = 1_795_651_200_000; // 2026-11-27
        let summer = winter - 150 * 86_400_000;
        assert_eq!(utc_offset_s("UTC", winter), Some(0));
        assert_eq!(utc_offset_s("Europe/Berlin", winter), Some(3_600));
        assert_eq!(utc_offset_s("Europe/Berlin", summer), Some(7_200));
        assert_eq!(utc_offset_s("America/New_York", winter), Some(-5 * 3_600));
        assert_eq!(utc_offset_s("Mars/Olympus", winter), None);
    }

    /// The day's profile follows the engine's local hours: with the zone ten hours east,
    /// fewer events in the UTC hour that is 03:00 there than in the one that is noon.
    #[test]
    fn the_days_profile_is_in_local_hours() {
        let cfg = GenConfig {
            utc_offset_s: 10 * 3_600,
            ..GenConfig::default()
        };
        let midnight = 1_795_651_200_000; // UTC
                                          // About a day of events, ending at the next UTC midnight.
        let times = timeline(&cfg, midnight + 86_400_000, 1_000_000);
        let in_hour = |from: i64| {
            times
                .iter()
                .filter(|&&t| (from..from + 3_600_000).contains(&t))
                .count()
        };
        // 03:00 local = 17:00 UTC; noon local = 02:00 UTC.
        let (night, noon) = (
            in_hour(midnight + 17 * 3_600_000),
            in_hour(midnight + 2 * 3_600_000),
        );
        assert!(night * 4 < noon, "{night} {noon}");
    }
}
