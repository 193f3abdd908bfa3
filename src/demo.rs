//! `fraudgate demo`: a private nats-server, the engine with the shipped rules, and
//! generated traffic with injected fraud, with a live one-line summary every second.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

use crate::config::{EngineConfig, FileConfig};
use crate::loadgen::{GenConfig, Generator, Pattern};
use crate::service::{now_ms, RunOptions, Running, ServiceError};

/// How long the demo waits for a decision; an answer later than this counts as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "nats-server is not installed or not on PATH.\n  On Debian/Ubuntu: sudo apt-get install nats-server\n  Or download it from the NATS project and put it on PATH."
    )]
    NoNatsServer,
    #[error("cannot start nats-server: {0}")]
    Spawn(std::io::Error),
    #[error("nats-server did not accept connections on port {0} within 10 s")]
    NotReady(u16),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("NATS client: {0}")]
    Client(String),
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub rules_dir: PathBuf,
    /// Transactions per second sent by the generator.
    pub rate: u32,
    /// Stop after this long (None: until Ctrl-C).
    pub duration: Option<Duration>,
    pub seed: u64,
    pub engine: EngineConfig,
}

/// Finds an executable on PATH, or in the sbin directories where Debian puts servers
/// (they are not on an ordinary user's PATH).
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A nats-server child process on a free loopback port; killed on drop.
pub struct NatsServer {
    pub port: u16,
    child: Child,
    _dir: Option<tempdir::TempDir>,
}

mod tempdir {
    /// A directory removed on drop (no extra dependency for one temp dir).
    pub struct TempDir(pub std::path::PathBuf);
    impl TempDir {
        pub fn new(prefix: &str) -> std::io::Result<TempDir> {
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "{prefix}-{}-{}-{}",
                std::process::id(),
                super::now_ms(),
                SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p)?;
            Ok(TempDir(p))
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Makes a child started with `cmd` be killed with this process. `kill_on_drop` covers
/// every exit but a signal (a demo stopped with SIGTERM, a test run or benchmark
/// interrupted), which left servers and engines running. The signal comes when the thread
/// that spawned the child ends: call this from the thread that runs the demo, test or
/// benchmark (or a runtime worker, which lives as long as the runtime), never from a
/// short-lived one. Linux only; elsewhere it does nothing.
pub fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: between fork and exec only `prctl`, `getppid` and `_exit` run, which
        // are async-signal-safe and touch no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the request took effect: no signal will come.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

impl NatsServer {
    /// Starts `nats-server` on a free port of 127.0.0.1 (with JetStream in a temp dir when
    /// `jetstream`), and waits until it accepts connections.
    pub async fn start(jetstream: bool) -> Result<NatsServer, DemoError> {
        let port = free_port().map_err(DemoError::Spawn)?;
        Self::start_on(port, jetstream).await
    }

    /// Starts `nats-server` with JetStream storing in `store` (kept: a server restarted on
    /// the same port and store finds its streams again).
    pub async fn start_on_store(
        port: u16,
        store: &std::path::Path,
    ) -> Result<NatsServer, DemoError> {
        Self::launch(port, Some(store.to_path_buf()), None).await
    }

    /// Starts `nats-server` on a given loopback port (e.g. to restart it where it was).
    pub async fn start_on(port: u16, jetstream: bool) -> Result<NatsServer, DemoError> {
        let dir = if jetstream {
            Some(tempdir::TempDir::new("fraudgate-js").map_err(DemoError::Spawn)?)
        } else {
            None
        };
        let store = dir.as_ref().map(|d| d.0.clone());
        Self::launch(port, store, dir).await
    }

    async fn launch(
        port: u16,
        store: Option<std::path::PathBuf>,
        dir: Option<tempdir::TempDir>,
    ) -> Result<NatsServer, DemoError> {
        let bin = find_on_path("nats-server").ok_or(DemoError::NoNatsServer)?;
        let mut cmd = Command::new(bin);
        // Its own process group: Ctrl-C in the terminal must reach the demo (which then
        // stops everything in order), not kill the server under a running engine.
        #[cfg(unix)]
        cmd.process_group(0);
        die_with_parent(&mut cmd);
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(store) = &store {
            cmd.arg("-js").arg("-sd").arg(store);
        }
        let child = cmd.spawn().map_err(DemoError::Spawn)?;
        let mut server = NatsServer {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Our child must be the one listening (not another process on a reused port).
            if !matches!(server.child.try_wait(), Ok(None)) {
                return Err(DemoError::NotReady(port));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(DemoError::NotReady(port))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id (`None` once it has exited).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

#[derive(Default)]
struct Tally {
    sent: u64,
    answered: u64,
    errors: u64,
    timeouts: u64,
    actions: [u64; 3],
    rules: HashMap<String, u64>,
    /// Per pattern: (injected transactions, held or rejected).
    patterns: HashMap<Pattern, (u64, u64)>,
    latency_us: Option<hdrhistogram::Histogram<u64>>,
}

impl Tally {
    fn hist(&mut self) -> &mut hdrhistogram::Histogram<u64> {
        self.latency_us.get_or_insert_with(|| {
            hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
        })
    }
}

/// Runs the demo until Ctrl-C (or `duration`). Returns the number of decisions received.
pub async fn run(opts: DemoOptions) -> Result<u64, DemoError> {
    println!("fraudgate demo: starting a private nats-server ...");
    let nats = NatsServer::start(false).await?;
    println!("  nats-server on {}", nats.url());
    let mut file = FileConfig::default();
    file.metrics.addr = Some(format!(
        "127.0.0.1:{}",
        free_port().map_err(DemoError::Spawn)?
    ));
    let running = Running::start(RunOptions {
        rules_dir: opts.rules_dir.clone(),
        nats_url: nats.url(),
        engine: opts.engine.clone(),
        file,
    })
    .await?;
    let rules = running.engine().rules();
    println!(
        "  engine: rules {} ({} rules), request-reply on fraud.check",
        rules.version,
        rules.rules.len()
    );
    println!(
        "  traffic: {} transactions/s with injected fraud (card testing, account takeover, many merchants, duplicates, merchant spikes, high-risk regions at night)",
        opts.rate
    );
    println!("  outcomes: a stand-in back office reports chargebacks, confirmed fraud, refunds and false positives on fraud.outcome at once (the Outcomes dashboard)");
    if let Some(addr) = running.metrics_addr() {
        println!("  metrics: http://{addr}/metrics");
    }
    println!("  try it yourself: cargo run --release -- ask --nats-url {} '{{\"id\":\"t1\",\"card\":\"4111111111111111\",\"amount\":\"12000\"}}'", nats.url());
    println!("  Ctrl-C stops everything\n");

    let client = async_nats::connect(nats.url())
        .await
        .map_err(|e| DemoError::Client(e.to_string()))?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let gen_task = tokio::spawn(generate(
        client.clone(),
        opts.clone(),
        tally.clone(),
        stop_rx,
    ));

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut last_answered, mut last_at) = (0, Instant::now());
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let done = opts.duration.is_some_and(|d| started.elapsed() >= d);
        if done {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {
                let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                // Per second of the real interval: a tick that came late covers more.
                let rate = ((t.answered - last_answered) as f64
                    / last_at.elapsed().as_secs_f64().max(1e-3))
                .round() as u64;
                (last_answered, last_at) = (t.answered, Instant::now());
                // A second without an answer (a stalled engine) shows as "-", not 0 ms.
                let (p50, p99) = {
                    let h = t.hist();
                    let ms = |q: f64| match h.is_empty() {
                        true => "-".to_string(),
                        false => format!("{:.2}", h.value_at_quantile(q) as f64 / 1000.0),
                    };
                    (ms(0.5), ms(0.99))
                };
                let total: u64 = t.actions.iter().sum::<u64>().max(1);
                let pct = |i: usize| 100.0 * t.actions[i] as f64 / total as f64;
                let mut top: Vec<(&String, &u64)> = t.rules.iter().collect();
                top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                let top: Vec<String> = top.iter().take(3).map(|(k, v)| format!("{k} {v}")).collect();
                println!(
                    "t={:>3}s {:>6} tx/s  approve {:>5.1}%  hold {:>4.1}%  reject {:>4.1}%  p50 {} ms  p99 {} ms  top rules: {}",
                    started.elapsed().as_secs(),
                    rate,
                    pct(0),
                    pct(1),
                    pct(2),
                    p50,
                    p99,
                    top.join(", ")
                );
                if let Some(h) = t.latency_us.as_mut() {
                    h.reset();
                }
            }
            _ = &mut ctrl_c => break,
        }
    }
    println!("\nstopping ...");
    let _ = stop.send(true);
    let _ = gen_task.await;
    let snapshot = running.shutdown().await.counts;
    nats.stop().await;
    let t = tally.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "sent {}, decided {} (engine: {}), errors {}, timeouts {}",
        t.sent,
        t.answered,
        snapshot.decided(),
        t.errors,
        t.timeouts
    );
    let by_kind: Vec<String> = crate::feedback::Kind::ALL
        .iter()
        .zip(&snapshot.outcomes)
        .map(|(k, n)| format!("{} {}", k.as_str(), n.iter().sum::<u64>()))
        .collect();
    println!(
        "outcomes from the demo's back office, as the engine counted them: {}",
        by_kind.join(", ")
    );
    let mut pats: Vec<_> = t.patterns.iter().collect();
    pats.sort();
    for (p, (n, caught)) in pats {
        println!(
            "  {:<18} {:>5} injected transactions, {:>5} held or rejected",
            p.name(),
            n,
            caught
        );
    }
    Ok(t.answered)
}

/// What the demo's back office reports of a decided transaction (`action`: 0 approve, 1
/// hold, 2 reject): injected fraud that was approved comes back as a chargeback, and held
/// fraud is confirmed by the reviewer; a legitimate transaction held or rejected is
/// confirmed genuine (a false positive), and some approved ones are refunded. In
/// production these come days to weeks later; the demo sends them at once, so the
/// Outcomes dashboard has something to show.
fn back_office(fraud: bool, action: usize, refund: bool) -> Option<&'static str> {
    match (fraud, action) {
        (true, 0) => Some("chargeback"),
        (true, 1) => Some("fraud"),
        (true, _) => None,
        (false, 0) => refund.then_some("refund"),
        (false, _) => Some("genuine"),
    }
}

/// An outcome message for `fraud.outcome`: the id, the outcome and the decision as received.
fn outcome_json(id: &str, kind: &str, decision: &[u8]) -> Bytes {
    let id = serde_json::to_string(id).unwrap_or_else(|_| "\"\"".into());
    let mut o = format!(r#"{{"id":{id},"outcome":"{kind}","decision":"#).into_bytes();
    o.extend_from_slice(decision);
    o.push(b'}');
    Bytes::from(o)
}

async fn generate(
    client: async_nats::Client,
    opts: DemoOptions,
    tally: Arc<Mutex<Tally>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Live traffic: event time is the wall clock, so the population is sized to the rate
    // (a thousand transactions a second come from millions of cards, not 100k).
    let mut g = Generator::new(GenConfig {
        seed: opts.seed,
        fraud_rate: 0.01,
        ..GenConfig::for_rate(f64::from(opts.rate))
    });
    let in_flight = Arc::new(Semaphore::new(64));
    let per_tick = (opts.rate as f64 / 100.0).max(0.01);
    let mut owed = 0.0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        if *stop.borrow() {
            break;
        }
        // When this tick was due: missed ticks keep their place on the schedule (Burst).
        let due = tokio::select! {
            at = tick.tick() => at,
            _ = stop.changed() => break,
        };
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let labeled = g.next_at(now_ms());
            // Latency from when the transaction's tick was due (not from when this loop
            // got to it: after a wait for one of the 64 slots, or a burst of missed ticks,
            // that is later), so a stall of the engine shows in the figures instead of
            // only slowing the sender (no coordinated omission). The timeout runs from
            // then too, as a switch's would: a request that waited its whole timeout for
            // a slot is counted a timeout (of those sent) and never reaches the engine.
            let started = due.into_std();
            let deadline = due + REQUEST_TIMEOUT;
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let (client, tally) = (client.clone(), tally.clone());
            tally.lock().unwrap_or_else(|e| e.into_inner()).sent += 1;
            tokio::spawn(async move {
                let body = Bytes::from(labeled.txn.to_json());
                let res = if tokio::time::Instant::now() < deadline {
                    tokio::time::timeout_at(deadline, client.request("fraud.check", body)).await
                } else {
                    tokio::time::timeout_at(deadline, std::future::pending()).await
                };
                let mut report = None;
                {
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    match res {
                        Ok(Ok(msg)) => {
                            let us = started.elapsed().as_micros() as u64;
                            let _ = t.hist().record(us.max(1));
                            let v: serde_json::Value =
                                serde_json::from_slice(&msg.payload).unwrap_or_default();
                            let action = v["action"].as_str().unwrap_or("");
                            let idx = match action {
                                "approve" => Some(0),
                                "hold" => Some(1),
                                "reject" => Some(2),
                                _ => None,
                            };
                            match idx {
                                Some(i) => {
                                    t.answered += 1;
                                    t.actions[i] += 1;
                                    for r in v["rules"].as_array().into_iter().flatten() {
                                        if let Some(id) = r["id"].as_str() {
                                            *t.rules.entry(id.to_string()).or_insert(0) += 1;
                                        }
                                    }
                                    if let Some(p) = labeled.pattern {
                                        let e = t.patterns.entry(p).or_insert((0, 0));
                                        e.0 += 1;
                                        if i > 0 {
                                            e.1 += 1;
                                        }
                                    }
                                    let refund = t.answered.is_multiple_of(100);
                                    report = back_office(labeled.pattern.is_some(), i, refund).map(
                                        |kind| outcome_json(&labeled.txn.id, kind, &msg.payload),
                                    );
                                }
                                None => t.errors += 1,
                            }
                        }
                        Ok(Err(_)) => t.errors += 1,
                        Err(_) => {
                            // At least the timeout: in the second's p99, not left out of it.
                            t.timeouts += 1;
                            let _ = t.hist().record(REQUEST_TIMEOUT.as_micros() as u64);
                        }
                    }
                }
                if let Some(body) = report {
                    let _ = client.publish("fraud.outcome", body).await;
                }
                drop(permit);
            });
        }
    }
    // Let the requests in flight finish.
    let _ = in_flight.acquire_many(64).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feedback::{Feedback, Kind};

    #[test]
    fn the_back_office_reports_what_became_of_each_decision() {
        assert_eq!(back_office(true, 0, false), Some("chargeback"));
        assert_eq!(back_office(true, 1, false), Some("fraud"));
        assert_eq!(
            back_office(true, 2, true),
            None,
            "a rejected fraud never happened"
        );
        assert_eq!(back_office(false, 0, false), None);
        assert_eq!(back_office(false, 0, true), Some("refund"));
        assert_eq!(back_office(false, 1, false), Some("genuine"));
        assert_eq!(back_office(false, 2, false), Some("genuine"));
        // What it sends is an outcome the engine reads, with the decision's action and
        // rules.
        let decision = br#"{"id":"g\"1","action":"hold","rules":[{"id":"r1","mode":"shadow"}]}"#;
        let f = Feedback::from_json(&outcome_json("g\"1", "genuine", decision)).unwrap();
        assert_eq!(f.id, "g\"1");
        assert_eq!(f.kind, Kind::Genuine);
        assert_eq!(f.action, Some(crate::Action::Hold));
        assert_eq!(f.rules[0].id, "r1");
    }
}
