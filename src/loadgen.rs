//! Synthetic card traffic with injected, labelled fraud patterns. Deterministic for a seed.
//!
//! Normal traffic: Zipf-like merchant and region popularity, cards that mostly use their own
//! device (shared by two cards), log-normal amounts (median 40), a weighted MCC mix, mostly
//! established merchants and devices, matching phone/address/IP country for almost everyone.
//! Injected patterns (each transaction carries its [`Pattern`] label) are the ones the
//! shipped rules target: card testing, account takeover, one card at many merchants,
//! duplicate submissions, a merchant spike, and a high-risk region at night.

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
}

/// Shape of the traffic.
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub seed: u64,
    pub cards: u64,
    pub devices: u64,
    pub merchants: u64,
    pub regions: u64,
    /// Probability that a normal transaction also starts an injected pattern.
    pub fraud_rate: f64,
    /// Regions the high-risk-at-night pattern uses (the shipped rules' placeholders).
    pub high_risk_regions: Vec<String>,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            seed: 1,
            cards: 100_000,
            devices: 50_000,
            merchants: 5_000,
            regions: 40,
            fraud_rate: 0.002,
            high_risk_regions: ["XA", "XB", "XC", "XD"].map(String::from).to_vec(),
        }
    }
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
    pub fn skewed(&mut self, n: u64) -> u64 {
        ((n as f64).powf(self.unit()) - 1.0) as u64 % n.max(1)
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
    /// Days since onboarding: 95% established (1-8 years), 5% within the last year.
    fn age_days(&mut self) -> u64 {
        if self.below(100) < 95 {
            365 + self.below(2_555)
        } else {
            self.below(365)
        }
    }
}

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

/// The traffic generator.
pub struct Generator {
    cfg: GenConfig,
    rng: Rng,
    seq: u64,
    /// Injected transactions not yet due: (due event time, transaction).
    pending: VecDeque<(i64, Labeled)>,
}

impl Generator {
    pub fn new(cfg: GenConfig) -> Generator {
        Generator {
            rng: Rng::new(cfg.seed),
            cfg,
            seq: 0,
            pending: VecDeque::new(),
        }
    }

    fn card_number(&self, card: u64) -> String {
        format!("4{:015}", card.wrapping_mul(7_919) % 1_000_000_000_000_000)
    }

    fn id(&mut self) -> String {
        self.seq += 1;
        format!("g{}-{}", self.cfg.seed, self.seq)
    }

    /// A normal transaction of `card` at event time `ts`.
    fn normal_for(&mut self, card: u64, ts: i64) -> Transaction {
        let r = &mut self.rng;
        let cents = (4_000.0 * r.normal().exp()).clamp(1.0, 1_500_000.0) as i64;
        let device = if r.below(100) < 98 {
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
        let mcc = r.weighted(&MCCS);
        let address_match = r.below(100) != 0;
        let channel = if r.below(2) == 0 { "ecom" } else { "pos" };
        let device_age = r.age_days();
        let merchant_age = r.age_days();
        let phone_match = r.below(100) != 0;
        let mut t = Transaction::new(self.id(), self.card_number(card), Decimal::new(cents, 2));
        t.ts_ms = Some(ts);
        t.currency = Some("EUR".into());
        t.device = Some(format!("dev-{device}"));
        t.merchant = Some(format!("mer-{merchant}"));
        t.region = Some(region);
        t.mcc = Some(mcc);
        t.attrs = vec![
            ("address_match".into(), AttrValue::Bool(address_match)),
            ("channel".into(), AttrValue::Str(channel.into())),
            (
                "device_age_days".into(),
                AttrValue::Num(Decimal::from(device_age)),
            ),
            ("ip_country".into(), AttrValue::Str(ip_country)),
            (
                "merchant_age_days".into(),
                AttrValue::Num(Decimal::from(merchant_age)),
            ),
            ("phone_match".into(), AttrValue::Bool(phone_match)),
        ];
        t
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
        let card = self.rng.below(self.cfg.cards);
        Labeled {
            txn: self.normal_for(card, now_ms),
            pattern: None,
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
                let mut at = now_ms;
                for _ in 0..3 {
                    let mut t = self.normal_for(card, at);
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
                    let t = self.normal_for(card, at);
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
                // An established, moderately popular merchant suddenly gets a burst.
                let merchant = format!("mer-{}", 20 + self.rng.below(40));
                let mut at = now_ms;
                for i in 0..45u64 {
                    let mut t = self.normal_for(card + i, at);
                    t.merchant = Some(merchant.clone());
                    plan.push((at, t));
                    at += 1_000 + self.rng.below(3_000) as i64;
                }
            }
            Pattern::HighRiskNight => {
                // 02:00-03:59 UTC of the current day, from a high-risk region.
                let day = now_ms.div_euclid(86_400_000) * 86_400_000;
                let ts = day + 7_200_000 + self.rng.below(7_200_000) as i64;
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
        for (due, txn) in plan {
            let pos = self.pending.partition_point(|(d, _)| *d <= due);
            self.pending.insert(
                pos,
                (
                    due,
                    Labeled {
                        txn,
                        pattern: Some(p),
                    },
                ),
            );
        }
    }

    /// Injected transactions still waiting for their time.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
