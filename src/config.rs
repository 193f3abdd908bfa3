//! Engine settings that shape decisions (not transport). Read from the `[engine]` table of
//! the config file; every field has a default.

use std::path::PathBuf;
use std::time::Duration;

use chrono_tz::Tz;
use serde::Deserialize;

use crate::keyhash::HashKey;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Time zone of the `local_hour` / `local_weekday` helpers.
    pub timezone: Tz,
    /// Currency assumed when a transaction has none.
    pub default_currency: String,
    /// Window bucket size. Window lengths must be multiples of it.
    pub resolution: Duration,
    /// Events up to this far behind their key's newest event still see exact window values.
    pub max_lateness: Duration,
    /// An event time further than this ahead of the receive time is replaced by the
    /// receive time: one transaction dated in the future must not move its keys' windows
    /// ahead and make every real event "late".
    pub max_future_skew: Duration,
    /// How long a transaction id is remembered for idempotent retries. Every decision in
    /// the horizon is kept (a few hundred bytes each): at 5,000 transactions/s the default
    /// 2 minutes holds 600k decisions, roughly 300 MB. Size it to the switch's retry window.
    pub dedupe_horizon: Duration,
    /// Key for hashing entity keys and list entries.
    pub hash_key: HashKey,
    /// Most keys tracked per key group (entity kind: card, device, card+merchant ...).
    /// Past it the least recently used keys (oldest newest event) are evicted and counted,
    /// so a flood of new cards cannot exhaust memory. `None`: unbounded.
    pub max_keys: Option<usize>,
    /// Slots allocated up front per key group (at most `max_keys`). A table that grows
    /// doubles one shard at a time and holds that shard's lock while it moves every entry:
    /// milliseconds at millions of keys, for every decision waiting on that shard.
    /// 0: grow on demand.
    pub reserve_keys: usize,
    /// Slots allocated up front in the retry table: peak transactions/s x
    /// `dedupe_horizon`. 0: grow on demand.
    pub reserve_ids: usize,
}

/// Default [`EngineConfig::max_keys`]: at roughly 300 bytes per key, about 1.5 GB per
/// key group at most.
pub const DEFAULT_MAX_KEYS: usize = 5_000_000;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            timezone: Tz::UTC,
            default_currency: "EUR".into(),
            resolution: Duration::from_secs(1),
            max_lateness: Duration::from_secs(60),
            max_future_skew: Duration::from_secs(60),
            dedupe_horizon: Duration::from_secs(120),
            hash_key: HashKey::default(),
            max_keys: Some(DEFAULT_MAX_KEYS),
            reserve_keys: 0,
            reserve_ids: 0,
        }
    }
}

/// The `[engine]` table as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    pub timezone: Option<String>,
    pub default_currency: Option<String>,
    pub resolution: Option<String>,
    pub max_lateness: Option<String>,
    pub max_future_skew: Option<String>,
    pub dedupe_horizon: Option<String>,
    /// Secret for entity hashing. Prefer `hash_key_env`, naming an environment variable.
    pub hash_key: Option<String>,
    pub hash_key_env: Option<String>,
    /// Most keys per key group; 0 = unbounded.
    pub max_keys: Option<u64>,
    pub reserve_keys: Option<u64>,
    pub reserve_ids: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("unknown time zone `{0}` (use an IANA name such as `Europe/Berlin`)")]
    TimeZone(String),
    #[error("{field}: {message}")]
    Duration {
        field: &'static str,
        message: String,
    },
    #[error("default_currency must be a 3-letter ISO 4217 code, got `{0}`")]
    Currency(String),
    #[error("hash_key_env names `{0}`, which is not set")]
    MissingEnv(String),
    #[error("set either hash_key or hash_key_env, not both")]
    BothKeys,
    #[error("the entity hash key is empty: a key nobody has to guess is no secret")]
    EmptyKey,
    #[error("the entity hash key is {0} bytes; use at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 16`): with a snapshot file, a guessable key gives the card numbers back")]
    ShortKey(usize),
}

/// Shortest entity hash key accepted. The key is used as it is (one fast hash, no key
/// stretching), and the snapshot file holds its fingerprint: a short key could be found
/// by trying, offline, from a stolen snapshot.
pub const MIN_KEY_BYTES: usize = 16;

fn check_key(secret: &str) -> Result<(), ConfigError> {
    match secret.len() {
        0 => Err(ConfigError::EmptyKey),
        n if n < MIN_KEY_BYTES => Err(ConfigError::ShortKey(n)),
        _ => Ok(()),
    }
}

impl EngineSection {
    /// Resolves the section into a config; `env` looks up environment variables.
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<EngineConfig, ConfigError> {
        let mut c = EngineConfig::default();
        if let Some(tz) = &self.timezone {
            c.timezone = tz.parse().map_err(|_| ConfigError::TimeZone(tz.clone()))?;
        }
        if let Some(cur) = &self.default_currency {
            if cur.len() != 3 || !cur.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(ConfigError::Currency(cur.clone()));
            }
            c.default_currency = cur.clone();
        }
        let dur = |field: &'static str, v: &Option<String>, d: Duration| match v {
            None => Ok(d),
            Some(s) => {
                parse_duration(s).map_err(|message| ConfigError::Duration { field, message })
            }
        };
        c.resolution = dur("resolution", &self.resolution, c.resolution)?;
        if c.resolution.is_zero() {
            return Err(ConfigError::Duration {
                field: "resolution",
                message: "must be positive".into(),
            });
        }
        c.max_lateness = dur("max_lateness", &self.max_lateness, c.max_lateness)?;
        c.max_future_skew = dur("max_future_skew", &self.max_future_skew, c.max_future_skew)?;
        c.dedupe_horizon = dur("dedupe_horizon", &self.dedupe_horizon, c.dedupe_horizon)?;
        if let Some(n) = self.max_keys {
            c.max_keys = (n > 0).then_some(n as usize);
        }
        c.reserve_keys = self.reserve_keys.unwrap_or(0) as usize;
        if let Some(cap) = c.max_keys {
            c.reserve_keys = c.reserve_keys.min(cap);
        }
        c.reserve_ids = self.reserve_ids.unwrap_or(0) as usize;
        if self.hash_key.is_some() && self.hash_key_env.is_some() {
            return Err(ConfigError::BothKeys);
        }
        if let Some(var) = &self.hash_key_env {
            let secret = env(var).ok_or_else(|| ConfigError::MissingEnv(var.clone()))?;
            check_key(&secret)?;
            c.hash_key = HashKey::from_secret(&secret);
        } else if let Some(secret) = &self.hash_key {
            check_key(secret)?;
            c.hash_key = HashKey::from_secret(secret);
        }
        Ok(c)
    }
}

/// Parses a duration such as `500ms`, `90s`, `10m`, `1h30m`, `24h` or `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration (write e.g. `10m`, `24h`, `7d`)".into());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "bad duration `{s}`: expected a number followed by ms, s, m, h or d (e.g. `10m`)"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration `{s}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        let ms = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "bad duration `{s}`: missing unit after {n} (use ms, s, m, h or d)"
                ))
            }
            other => {
                return Err(format!(
                    "bad duration `{s}`: unknown unit `{other}` (use ms, s, m, h or d)"
                ))
            }
        };
        total = n
            .checked_mul(ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("bad duration `{s}`: too large"))?;
        rest = &rest[unit_len..];
    }
    // Far beyond any setting or window (windows stop at 400d), and far inside i64
    // milliseconds, which every user of a duration computes in: nothing can wrap.
    if total > MAX_DURATION_MS {
        return Err(format!("bad duration `{s}`: longer than 3650d"));
    }
    Ok(Duration::from_millis(total))
}

/// The longest duration [`parse_duration`] accepts: ten years.
const MAX_DURATION_MS: u64 = 3650 * 86_400_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "10", "m", "10x", "1.5h", "-1m", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        // Past ten years: refused, so no setting can wrap when read as i64 milliseconds
        // (a dedupe_horizon of u64::MAX - 999 ms was -1000 ms).
        assert_eq!(
            parse_duration("3650d"),
            Ok(Duration::from_secs(3650 * 86400))
        );
        for bad in ["3651d", "18446744073709550616ms"] {
            assert!(parse_duration(bad).unwrap_err().contains("3650d"), "{bad}");
        }
    }

    #[test]
    fn an_empty_hash_key_is_refused() {
        let s: EngineSection = toml::from_str(r#"hash_key = """#).unwrap();
        assert!(matches!(s.resolve(|_| None), Err(ConfigError::EmptyKey)));
        let s: EngineSection = toml::from_str(r#"hash_key_env = "FG_KEY""#).unwrap();
        assert!(matches!(
            s.resolve(|_| Some(String::new())),
            Err(ConfigError::EmptyKey)
        ));
        assert!(matches!(
            s.resolve(|_| Some("s3cret".into())),
            Err(ConfigError::ShortKey(6))
        ));
        assert!(s.resolve(|_| Some("0123456789abcdef".into())).is_ok());
    }

    #[test]
    fn resolves_section() {
        let s: EngineSection = toml::from_str(
            r#"timezone = "Europe/Berlin"
               resolution = "5s"
               hash_key_env = "FG_KEY""#,
        )
        .unwrap();
        let c = s
            .resolve(|k| (k == "FG_KEY").then(|| "s3cret-of-16-bytes".into()))
            .unwrap();
        assert_eq!(c.timezone, chrono_tz::Europe::Berlin);
        assert_eq!(c.resolution, Duration::from_secs(5));
        assert_eq!(c.hash_key, HashKey::from_secret("s3cret-of-16-bytes"));
        assert_eq!(
            s.resolve(|_| None).unwrap_err(),
            ConfigError::MissingEnv("FG_KEY".into())
        );
        assert_eq!((c.reserve_keys, c.reserve_ids), (0, 0));
        let r: EngineSection =
            toml::from_str("max_keys = 1000\nreserve_keys = 5000\nreserve_ids = 600000").unwrap();
        let c = r.resolve(|_| None).unwrap();
        // Never more slots than keys allowed.
        assert_eq!((c.reserve_keys, c.reserve_ids), (1000, 600_000));
        let bad: EngineSection = toml::from_str(r#"timezone = "Mars/Olympus""#).unwrap();
        assert!(matches!(
            bad.resolve(|_| None),
            Err(ConfigError::TimeZone(_))
        ));
        let both: EngineSection =
            toml::from_str("hash_key = \"0123456789abcdef\"\nhash_key_env = \"FG_KEY\"").unwrap();
        assert_eq!(
            both.resolve(|_| Some("s3cret-of-16-bytes".into()))
                .unwrap_err(),
            ConfigError::BothKeys
        );
    }

    /// What `run` refuses of the file before it starts anything, with the setting named.
    #[test]
    fn settings_that_cannot_work_are_refused() {
        let check = |text: &str| FileConfig::parse(text).unwrap().validate();
        assert_eq!(check(""), Ok(()));
        for (text, says) in [
            (
                "[subjects]\ntxn = \"fraud.*\"",
                "takes in what the engine publishes on `fraud.invalid`",
            ),
            ("[subjects]\ntxn = \"fraud.>\"", "[subjects] txn"),
            (
                "[subjects]\ntxn = \"fraud.decision.*\"",
                "fraud.decision.approve",
            ),
            ("[subjects]\ncheck = \"fraud..check\"", "[subjects] check"),
            ("[subjects]\ncheck = \"fraud.>.x\"", "[subjects] check"),
            ("[subjects]\ncheck = \"fraud.ch*\"", "[subjects] check"),
            ("[subjects]\ninvalid = \"\"", "[subjects] invalid"),
            ("[subjects]\ninvalid = \"fraud.bad.*\"", "without wildcards"),
            ("[subjects]\ntxn = \"fraud.check\"", "overlap"),
            (
                "[subjects]\ntxn = \"fraud.txn.>\"\ncheck = \"fraud.txn.check\"",
                "overlap",
            ),
            (
                "[subjects]\ninvalid = \"fraud.decision.hold\"",
                "among the decision subjects",
            ),
            (
                "[subjects]\noutcome = \"fraud.*\"",
                "[subjects] outcome = \"fraud.*\" takes in what the engine publishes",
            ),
            (
                "[subjects]\noutcome = \"fraud.txn\"",
                "txn = \"fraud.txn\" and outcome = \"fraud.txn\" overlap",
            ),
            (
                "[subjects]\noutcome = \"fraud outcome\"",
                "[subjects] outcome",
            ),
            ("[subjects]\nqueue_group = \"\"", "queue_group"),
            ("[service]\nqueue_depth = 0", "queue_depth"),
            ("[service]\nsweep_interval = \"0s\"", "sweep_interval"),
            ("[service]\nsweep_interval = \"10m\"", "sweep_interval"),
            ("[service]\nstall_after = \"100ms\"", "stall_after"),
            ("[service]\nreload_debounce = \"soon\"", "reload_debounce"),
            ("[snapshot]\ninterval = \"0s\"", "[snapshot] interval"),
            ("[nats]\nsubscription_capacity = 0", "subscription_capacity"),
            ("[nats]\nconnect_timeout = \"5\"", "connect_timeout"),
            ("[nats]\nping_interval = \"100ms\"", "ping_interval"),
            ("[nats]\nping_interval = \"5m\"", "ping_interval"),
            ("[limits]\nmax_payload = 0", "max_payload"),
            ("[jetstream]\nenabled = true\nack_wait = \"x\"", "ack_wait"),
        ] {
            let e = check(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        // Wildcards in what the engine takes in, apart from what it publishes, are fine.
        assert_eq!(check("[subjects]\ntxn = \"fraud.txn.>\""), Ok(()));
        assert_eq!(check("[subjects]\ncheck = \"fraud.check.*\""), Ok(()));
        assert_eq!(check("[subjects]\noutcome = \"fraud.outcome.>\""), Ok(()));
        assert_eq!(
            check("[subjects]\noutcome = \"\""),
            Ok(()),
            "no outcomes taken in"
        );
        // Other plain names are fine.
        assert_eq!(
            check("[subjects]\ncheck = \"pay.risk.check\"\ntxn = \"pay.risk.txn\"\ndecision_prefix = \"pay.risk.out\"\ninvalid = \"pay.risk.bad\""),
            Ok(())
        );
    }
}

/// The whole config file of `fraudgate run` (TOML). Every table and key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub engine: EngineSection,
    #[serde(default)]
    pub nats: NatsSection,
    #[serde(default)]
    pub subjects: SubjectsSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub service: ServiceSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub snapshot: SnapshotSection,
    #[serde(default)]
    pub jetstream: JetStreamSection,
}

/// JetStream intake and recovery. With it, `fraud.txn` is read from a stream through a
/// durable consumer (acknowledged only after the decision is published) and requests on
/// `fraud.check` are captured by a second stream (no-ack) so a restart can rebuild the
/// windows from the snapshot plus what the streams hold after it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamSection {
    pub enabled: bool,
    /// Stream holding `[subjects] txn`.
    pub stream: String,
    /// Durable pull consumer of that stream, one engine per consumer (several engines on
    /// one consumer would split a card's transactions; partition by card instead).
    pub consumer: String,
    /// Stream capturing `[subjects] check` with no_ack set; empty = no request capture.
    pub capture_stream: String,
    /// Create the streams and the consumer when they do not exist (with the settings
    /// below); false = expect them, set up by the operator, and fail the start otherwise.
    pub create: bool,
    /// Retention of the streams the engine creates: how far back a rebuild can reach.
    pub max_age: String,
    /// `Nats-Msg-Id` duplicate window of the transaction stream it creates.
    pub duplicate_window: String,
    /// A delivered message not acknowledged within this is delivered again.
    pub ack_wait: String,
    /// Messages delivered and not yet acknowledged, at most.
    pub max_ack_pending: i64,
    /// Replicas of the streams it creates (1 on a single server, 3 in a cluster).
    pub replicas: usize,
}

impl Default for JetStreamSection {
    fn default() -> Self {
        JetStreamSection {
            enabled: false,
            stream: "FRAUD_TXN".into(),
            consumer: "fraudgate".into(),
            capture_stream: "FRAUD_CHECK".into(),
            create: true,
            max_age: "24h".into(),
            duplicate_window: "2m".into(),
            ack_wait: "30s".into(),
            max_ack_pending: 20_000,
            replicas: 1,
        }
    }
}

/// What to do at start when the snapshot file exists but cannot be used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBadSnapshot {
    /// Refuse to start: an operator decides (the safe default: starting empty forgets
    /// every card's recent history).
    #[default]
    Fail,
    /// Move the file aside (`<path>.bad-<unix ms>`) and start with empty windows.
    StartEmpty,
    /// JetStream only: move the file aside and rebuild the windows from everything the
    /// streams still hold (their retention, `[jetstream] max_age`).
    Rebuild,
}

/// Window state saved to disk, so a restart does not forget recent history.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotSection {
    /// Snapshot file, e.g. `/var/lib/fraudgate/state.snap`; unset = no snapshots.
    pub path: Option<PathBuf>,
    /// How often to write it while running (also written at shutdown), e.g. `60s`.
    pub interval: String,
    /// `fail` (default) or `start-empty` when the file is corrupt or of another format.
    pub on_bad: OnBadSnapshot,
}

impl Default for SnapshotSection {
    fn default() -> Self {
        SnapshotSection {
            path: None,
            interval: "60s".into(),
            on_bad: OnBadSnapshot::Fail,
        }
    }
}

/// Prometheus exporter.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// `host:port` to serve `/metrics` on, e.g. `0.0.0.0:9464`; unset = no exporter.
    pub addr: Option<String>,
}

impl FileConfig {
    /// Parses a config file's text.
    pub fn parse(text: &str) -> Result<FileConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// Every check of the settings outside `[engine]` that needs no server: `run` makes
    /// them before anything else (a typo found after a restore of minutes, in a crash
    /// loop, cost that every time), and `check --config` makes them too.
    pub fn validate(&self) -> Result<(), String> {
        let dur = |field: &str, v: &str| parse_duration(v).map_err(|e| format!("{field}: {e}"));
        let svc = &self.service;
        let sweep = dur("[service] sweep_interval", &svc.sweep_interval)?;
        // The sweep also refreshes the gauges, which the exporter drops after 10 minutes
        // without an update.
        if sweep.is_zero() || sweep > Duration::from_secs(300) {
            return Err("[service] sweep_interval must be more than 0s and at most 5m".into());
        }
        let stall = dur("[service] stall_after", &svc.stall_after)?;
        // At least five heartbeats: the runtime's heartbeat ticks every 100 ms, and a tick
        // comes a little late as a rule.
        if !(Duration::from_millis(500)..=Duration::from_secs(60)).contains(&stall) {
            return Err("[service] stall_after must be between 500ms and 60s".into());
        }
        dur("[service] reload_debounce", &svc.reload_debounce)?;
        if svc.queue_depth == 0 {
            return Err("[service] queue_depth must be at least 1".into());
        }
        if dur("[snapshot] interval", &self.snapshot.interval)?.is_zero() {
            return Err("[snapshot] interval must be more than 0s".into());
        }
        if self.jetstream.enabled {
            dur("[jetstream] max_age", &self.jetstream.max_age)?;
            dur(
                "[jetstream] duplicate_window",
                &self.jetstream.duplicate_window,
            )?;
            dur("[jetstream] ack_wait", &self.jetstream.ack_wait)?;
        }
        dur("[nats] connect_timeout", &self.nats.connect_timeout)?;
        let ping = dur("[nats] ping_interval", &self.nats.ping_interval)?;
        if !(Duration::from_millis(500)..=Duration::from_secs(60)).contains(&ping) {
            return Err("[nats] ping_interval must be between 500ms and 60s".into());
        }
        if self.nats.subscription_capacity == 0 {
            return Err("[nats] subscription_capacity must be at least 1".into());
        }
        if self.limits.max_payload == 0 {
            return Err("[limits] max_payload must be at least 1 (every transaction would be refused as oversized)".into());
        }
        self.subjects.validate()
    }
}

impl SubjectsSection {
    /// Subjects the engine subscribes to (`check`, `txn`, `outcome`) may hold wildcards;
    /// those it publishes on (`invalid`, the decisions) may not. No subject it takes in may
    /// match one it publishes on, or another one it takes in: `txn = "fraud.*"` also took
    /// the engine's own `fraud.invalid` back in, and `fraud.>` its decisions, in an endless
    /// loop. `outcome` may be empty (no outcomes taken in).
    pub fn validate(&self) -> Result<(), String> {
        let named = [
            ("check", &self.check, true),
            ("txn", &self.txn, true),
            ("decision_prefix", &self.decision_prefix, false),
            ("invalid", &self.invalid, false),
            ("outcome", &self.outcome, true),
        ];
        for (field, subject, wild) in named {
            if field == "outcome" && subject.is_empty() {
                continue;
            }
            let tokens: Vec<&str> = subject.split('.').collect();
            let last = tokens.len() - 1;
            let bad = tokens.iter().enumerate().any(|(i, t)| {
                let wildcard = *t == "*" || (*t == ">" && i == last);
                t.is_empty()
                    || t.contains(char::is_whitespace)
                    || (t.contains(['*', '>']) && !(wild && wildcard))
            });
            if bad {
                return Err(format!(
                    "[subjects] {field} = \"{subject}\": a subject is dot-separated names without spaces{}",
                    match wild {
                        true => " (`*` for one name, `>` for the rest at the end)",
                        false => ", and without wildcards: the engine publishes on it",
                    }
                ));
            }
        }
        if self.queue_group.is_empty() || self.queue_group.contains(char::is_whitespace) {
            return Err("[subjects] queue_group must be a name without spaces".into());
        }
        let prefix = &self.decision_prefix;
        if self.invalid == *prefix || self.invalid.starts_with(&format!("{prefix}.")) {
            return Err(format!(
                "[subjects] invalid = \"{}\" is among the decision subjects (`{prefix}.<action>`)",
                self.invalid
            ));
        }
        // What the engine publishes, against what it takes in.
        let published = [
            ("invalid", self.invalid.clone()),
            ("decision_prefix", format!("{prefix}.approve")),
            ("decision_prefix", format!("{prefix}.hold")),
            ("decision_prefix", format!("{prefix}.reject")),
        ];
        let mut taken = vec![("check", &self.check), ("txn", &self.txn)];
        if !self.outcome.is_empty() {
            taken.push(("outcome", &self.outcome));
        }
        for &(a, pattern) in &taken {
            for (b, subject) in &published {
                if subject_matches(pattern, subject) {
                    return Err(format!(
                        "[subjects] {a} = \"{pattern}\" takes in what the engine publishes on `{subject}` ({b})"
                    ));
                }
            }
        }
        // A wildcard taken as a name: one message on both would be decided twice (or a
        // transaction read as an outcome).
        let as_name = |p: &str| p.replace(['*', '>'], "x");
        for (i, &(a, pa)) in taken.iter().enumerate() {
            for &(b, pb) in &taken[i + 1..] {
                if subject_matches(pa, &as_name(pb)) || subject_matches(pb, &as_name(pa)) {
                    return Err(format!(
                        "[subjects] {a} = \"{pa}\" and {b} = \"{pb}\" overlap: a message on both would be taken in twice"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether the NATS subject `pattern` (`*` one name, `>` the rest) matches `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut s = subject.split('.');
    for p in pattern.split('.') {
        match (p, s.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    s.next().is_none()
}

/// How to reach NATS. Secrets can come from the environment (`*_env` keys name the
/// variable) so they stay out of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    /// One URL or several, comma-separated (`nats://a:4222,nats://b:4222`).
    pub url: String,
    /// Client name shown in the server's monitoring.
    pub name: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub password_env: Option<String>,
    pub token: Option<String>,
    pub token_env: Option<String>,
    /// A `.creds` file (JWT + NKey seed).
    pub credentials_file: Option<String>,
    /// CA certificate(s) to trust (PEM), for servers with a private CA.
    pub tls_ca: Option<String>,
    /// Client certificate and key (PEM), for mutual TLS.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// Refuse to talk to a server without TLS.
    pub tls_required: bool,
    /// Messages buffered per subscription before the client drops them (slow consumer).
    pub subscription_capacity: usize,
    /// Timeout of the first connection attempt, e.g. `5s`.
    pub connect_timeout: String,
    /// How often the client pings the server; after two pings without an answer it
    /// takes the connection for dead and reconnects. A half-open connection (a network
    /// partition, a server host gone without a reset) is noticed after about three
    /// intervals. The client's own default of 60 s left such an engine receiving nothing
    /// and reporting itself connected for about 3 minutes, past the retry horizon.
    pub ping_interval: String,
}

impl Default for NatsSection {
    fn default() -> Self {
        NatsSection {
            url: "nats://127.0.0.1:4222".into(),
            name: "fraudgate".into(),
            user: None,
            password: None,
            password_env: None,
            token: None,
            token_env: None,
            credentials_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            subscription_capacity: 65_536,
            connect_timeout: "5s".into(),
            ping_interval: "5s".into(),
        }
    }
}

/// Subjects and queue group of the wire contract.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SubjectsSection {
    /// Request-reply decisions.
    pub check: String,
    /// Asynchronous intake.
    pub txn: String,
    /// Decisions of the asynchronous path go to `<decision_prefix>.<action>`.
    pub decision_prefix: String,
    /// Invalid asynchronous input, with the reason in headers.
    pub invalid: String,
    /// Outcomes reported after a decision (chargebacks, refunds, confirmed fraud or
    /// genuine): counted by action and rule. Empty: not taken in.
    pub outcome: String,
    pub queue_group: String,
}

impl Default for SubjectsSection {
    fn default() -> Self {
        SubjectsSection {
            check: "fraud.check".into(),
            txn: "fraud.txn".into(),
            decision_prefix: "fraud.decision".into(),
            invalid: "fraud.invalid".into(),
            outcome: "fraud.outcome".into(),
            queue_group: "fraudgate".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest accepted transaction payload in bytes.
    pub max_payload: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_payload: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `human` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `fraudgate=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: "human".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSection {
    /// Decision workers (transactions are sharded over them by card); 0 = one per core (measured best: more workers mean more thread wake-ups).
    pub workers: usize,
    /// Transactions queued per worker and path before intake waits.
    pub queue_depth: usize,
    /// Quiet time after a change in the rule directory before reloading, e.g. `300ms`.
    pub reload_debounce: String,
    /// How often idle keys and old transaction ids are swept, e.g. `10s`.
    pub sweep_interval: String,
    /// A decision worker holding one transaction this long, or the async runtime not
    /// running its timers this long, is reported as stalled (log, metrics, alert).
    pub stall_after: String,
}

impl Default for ServiceSection {
    fn default() -> Self {
        ServiceSection {
            workers: 0,
            queue_depth: 4096,
            reload_debounce: "300ms".into(),
            sweep_interval: "10s".into(),
            stall_after: "1s".into(),
        }
    }
}
