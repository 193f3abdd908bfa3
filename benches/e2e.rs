//! End-to-end benchmark: fraudgate against the bare-NATS ceiling, in one run, on one
//! private nats-server. Run: `cargo bench --bench e2e` (needs nats-server; scripts/bench
//! installs it). Sizes can be changed with E2E_STREAM, E2E_RR, E2E_RATE, E2E_LATENCY_SECS,
//! E2E_CARDS.
//!
//! For each target (the ceiling responder `fraudgate-ceiling`, then `fraudgate run` with
//! the shipped rules and metrics on), measured by the same load client:
//! 1. stream throughput: decisions/s from fraud.txn to fraud.decision.*, 10,000 in flight,
//!    nothing may be dropped;
//! 2. request-reply throughput with 64 requests in flight;
//! 3. request-reply latency p50/p99/p99.9 at a fixed 5,000/s (open loop, measured from the
//!    scheduled send time).
//!
//! The traffic is the load generator's (100k cards at 10 transactions a day; 0.2 % of
//! normal transactions start an injected fraud pattern). The phases (a 20k warm-up, then 1, 2 and 3) are
//! one timeline of event times ending when the bench starts, about 14 hours of a day at
//! the default sizes, so rules see the traffic at its real density; every target and
//! round gets the same transactions.
//!
//! Then fraudgate's resident memory with 1M distinct cards tracked.
//!
//! Next to each throughput figure, the CPU time each process spent per decision in that
//! phase (target, nats-server, this load client; from /proc; the phase's transactions are
//! made before it, outside this count): the three share the machine's cores, so their sum
//! per decision is what the throughput is made of, and on this shared machine it varies
//! far less between runs than the throughput itself.
//!
//! E2E_ROUNDS=n measures the targets n times, alternating, and reports medians (this
//! machine is shared: single runs of one binary differ by up to 30 %). Each round starts
//! with the next target, so no target always has the same place in the sequence.
//! E2E_BASELINE=/path/to/another/fraudgate adds a third target in every round, measured
//! the same way (before/after comparisons of a change); E2E_BASELINE_RULES=<rule directory>
//! and E2E_BASELINE_CONFIG=<file of [engine] / [service] ... tables> make that target this
//! build with other rules or settings (what a rule set costs). Paths are relative to the
//! repository root.
//!
//! For fraudgate rows, its own time from receipt to publish in the latency phase (p99 and
//! p99.9 of its `fraudgate_end_to_end_duration_seconds` histogram, read from `/metrics`
//! before and after, as the bound of the bucket holding it): how much of the latency the
//! engine itself adds, which the client's figure cannot separate from the machine's noise.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use fraudgate::config::SubjectsSection;
use fraudgate::demo::{free_port, NatsServer};
use fraudgate::loadgen::GenConfig;
use fraudgate::loadrun::{self, LoadMode, LoadOptions, LoadPath, LoadReport};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used so far, in seconds; 0 if it is gone.
/// From /proc/<pid>/stat, which counts in USER_HZ ticks (100 per second on Linux).
fn cpu_secs(pid: Option<u32>) -> f64 {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (in parentheses, which may hold spaces): state is
    // field 3, utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

/// Processes whose CPU time is counted per decision: the target, nats-server, and this
/// load client (`None`).
const PROCS: usize = 3;

/// CPU microseconds per decision of each of [`PROCS`], over what `f` runs.
async fn cpu_per_decision<F: std::future::Future<Output = LoadReport>>(
    pids: [Option<u32>; PROCS],
    f: F,
) -> (LoadReport, [f64; PROCS]) {
    let before = pids.map(cpu_secs);
    let report = f.await;
    let after = pids.map(cpu_secs);
    let n = report.answered.max(1) as f64;
    let mut us = [0.0; PROCS];
    for i in 0..PROCS {
        us[i] = (after[i] - before[i]) * 1e6 / n;
    }
    (report, us)
}

/// The engine's `/metrics` page (HTTP response, headers included); empty when it cannot
/// be read within 5 s.
async fn scrape(metrics: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(metrics).await.ok()?;
        let mut body = String::new();
        let req = format!("GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    match tokio::time::timeout(Duration::from_secs(5), get).await {
        Ok(Some(body)) => body,
        _ => String::new(),
    }
}

/// Cumulative bucket counts of fraudgate's own time from receipt to publish on the
/// request path (`fraudgate_end_to_end_duration_seconds{path="check"}`), read from its
/// `/metrics`: `(upper bound in seconds, count)`, in the exporter's order (ascending).
async fn own_buckets(metrics: &str) -> Vec<(f64, u64)> {
    let body = scrape(metrics).await;
    let prefix = format!(
        "{}_bucket{{path=\"check\",le=\"",
        fraudgate::telemetry::names::END_TO_END_SECONDS
    );
    body.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The upper bound (µs) of the bucket holding quantile `q` of what was added to the
/// histogram between two reads of [`own_buckets`]; `None` without data.
fn own_quantile_us(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    // Without the first read, everything since the engine started would be counted.
    before.last().filter(|b| b.0 == f64::INFINITY)?;
    let base = |le: f64| before.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
    let total = after.last()?.1.checked_sub(base(f64::INFINITY))?;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    after
        .iter()
        .find(|(le, n)| n - base(*le).min(*n) >= want)
        .map(|(le, _)| le * 1e6)
}

#[derive(Clone, Copy)]
struct Row {
    stream: f64,
    stream_lost: u64,
    rr: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    /// fraudgate's own time from receipt to publish in the latency phase, p99 and p99.9
    /// (µs, the upper bound of the histogram bucket holding it); NaN for the ceiling,
    /// which keeps no such histogram.
    own_p99: f64,
    own_p999: f64,
    /// CPU µs per decision in the stream and request-reply phases, per process.
    stream_cpu: [f64; PROCS],
    rr_cpu: [f64; PROCS],
}

fn gen(seed: u64) -> GenConfig {
    GenConfig {
        seed,
        fraud_rate: 0.002,
        ..GenConfig::default()
    }
}

/// One phase's options and transactions, made before it runs (and before its CPU time is
/// read).
fn plan(
    path: LoadPath,
    mode: LoadMode,
    (count, seed, end): (usize, u64, i64),
) -> (LoadOptions, loadrun::Prepared) {
    let opts = LoadOptions {
        path,
        mode,
        count,
        gen: gen(seed),
        timeout: Duration::from_secs(30),
        subjects: SubjectsSection::default(),
        progress: false,
        events_end_ms: Some(end),
    };
    let prepared = loadrun::prepare(&opts);
    (opts, prepared)
}

async fn run(
    client: &async_nats::Client,
    (opts, prepared): (LoadOptions, loadrun::Prepared),
) -> LoadReport {
    loadrun::run_prepared(client.clone(), opts, prepared)
        .await
        .expect("load run")
}

/// The phases of a measurement as (count, seed, end of its event times): one timeline
/// that ends at `end` (when the bench started: the same traffic for every target and
/// round), each phase after the one before, so the windows see one stretch of traffic at
/// its real density (about 14 h of a day at the default sizes), not four stretches laid
/// over the same minutes.
fn phases(counts: [usize; 4], mut end: i64) -> [(usize, u64, i64); 4] {
    let seeds = [7, 11, 13, 17];
    let mut out = [(0, 0, 0); 4];
    for i in (0..4).rev() {
        out[i] = (counts[i], seeds[i], end);
        let t = fraudgate::loadgen::timeline(&gen(seeds[i]), end, counts[i]);
        end = t.first().map_or(end, |first| first - 1);
    }
    out
}

/// Each figure's median over the rounds (the upper one of an even count).
fn median(rows: &[Row]) -> Row {
    // A figure a round could not read (NaN) is left out, not sorted last.
    let med = |v: Vec<f64>| {
        let mut v: Vec<f64> = v.into_iter().filter(|x| !x.is_nan()).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let m = |f: fn(&Row) -> f64| med(rows.iter().map(f).collect());
    let cpu = |f: fn(&Row) -> [f64; PROCS]| {
        std::array::from_fn(|i| med(rows.iter().map(|r| f(r)[i]).collect()))
    };
    Row {
        stream: m(|r| r.stream),
        stream_lost: rows.iter().map(|r| r.stream_lost).sum(),
        rr: m(|r| r.rr),
        p50: m(|r| r.p50),
        p99: m(|r| r.p99),
        p999: m(|r| r.p999),
        own_p99: m(|r| r.own_p99),
        own_p999: m(|r| r.own_p999),
        stream_cpu: cpu(|r| r.stream_cpu),
        rr_cpu: cpu(|r| r.rr_cpu),
    }
}

async fn wait_ready(client: &async_nats::Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe = r#"{"id":"ready","card":"4111111111111111","amount":"1"}"#;
    while Instant::now() < deadline {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(500),
            client.request("fraud.check", Bytes::from_static(probe.as_bytes())),
        )
        .await
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("target never answered");
}

async fn measure(
    name: &'static str,
    client: &async_nats::Client,
    pids: [Option<u32>; PROCS],
    metrics: Option<&str>,
    sizes: (usize, usize, f64, usize),
    events_end: i64,
) -> Row {
    let (stream_n, rr_n, rate, lat_secs) = sizes;
    let [warm, stream_p, rr_p, lat_p] = phases(
        [20_000, stream_n, rr_n, (rate as usize) * lat_secs],
        events_end,
    );
    // Warm-up: fill windows and caches, settle the connection.
    run(client, plan(LoadPath::Check, LoadMode::Closed(64), warm)).await;
    let stream_plan = plan(LoadPath::Stream, LoadMode::Closed(10_000), stream_p);
    let (stream, stream_cpu) = cpu_per_decision(pids, run(client, stream_plan)).await;
    let rr_plan = plan(LoadPath::Check, LoadMode::Closed(64), rr_p);
    let (rr, rr_cpu) = cpu_per_decision(pids, run(client, rr_plan)).await;
    let lat_plan = plan(LoadPath::Check, LoadMode::Open(rate), lat_p);
    let before = match metrics {
        Some(m) => own_buckets(m).await,
        None => Vec::new(),
    };
    let lat = run(client, lat_plan).await;
    let (own_p99, own_p999) = match metrics {
        Some(m) => {
            let after = own_buckets(m).await;
            let q = |q| own_quantile_us(&before, &after, q).unwrap_or(f64::NAN);
            (q(0.99), q(0.999))
        }
        None => (f64::NAN, f64::NAN),
    };
    println!(
        "  {name:<10} stream {:>9.0}/s ({} of {} decided)  request-reply {:>8.0}/s  at {rate:.0}/s: p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  (errors {}, timeouts {}; request-reply held or rejected {:.1} %)",
        stream.throughput(),
        stream.answered,
        stream.sent,
        rr.throughput(),
        lat.quantile_ms(0.5),
        lat.quantile_ms(0.99),
        lat.quantile_ms(0.999),
        stream.errors + rr.errors + lat.errors,
        stream.timeouts + rr.timeouts + lat.timeouts,
        100.0 * (rr.actions[1] + rr.actions[2]) as f64 / rr.actions.iter().sum::<u64>().max(1) as f64,
    );
    println!(
        "  {:<10} CPU per decision (target / nats-server / load client): stream {:.2} / {:.2} / {:.2} us, request-reply {:.2} / {:.2} / {:.2} us",
        "",
        stream_cpu[0], stream_cpu[1], stream_cpu[2], rr_cpu[0], rr_cpu[1], rr_cpu[2],
    );
    if metrics.is_some() {
        println!(
            "  {:<10} own time from receipt to publish at {rate:.0}/s (its histogram): p99 <= {own_p99:.0} us, p99.9 <= {own_p999:.0} us",
            ""
        );
    }
    Row {
        stream: stream.throughput(),
        // Against what the phase was to send: a sender that stopped early (its decision
        // subscription ended) dropped the rest.
        stream_lost: (stream_p.0 as u64).saturating_sub(stream.answered),
        rr: rr.throughput(),
        p50: lat.quantile_ms(0.5),
        p99: lat.quantile_ms(0.99),
        p999: lat.quantile_ms(0.999),
        own_p99,
        own_p999,
        stream_cpu,
        rr_cpu,
    }
}

fn main() {
    let stream_n = env_or("E2E_STREAM", 300_000);
    let rr_n = env_or("E2E_RR", 200_000);
    let rate = env_or("E2E_RATE", 5_000) as f64;
    let lat_secs = env_or("E2E_LATENCY_SECS", 10);
    let cards = env_or("E2E_CARDS", 1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let nats = NatsServer::start(false).await.expect("nats-server (scripts/bench installs it)");
        let url = nats.url();
        let root = env!("CARGO_MANIFEST_DIR");
        println!(
            "e2e: nats-server {url}; stream {stream_n} msgs, request-reply {rr_n}, latency {lat_secs} s at {rate}/s"
        );
        let rounds = env_or("E2E_ROUNDS", 1).max(1);
        // The baseline row: another build (`E2E_BASELINE`), and/or this build with another
        // rule directory (`E2E_BASELINE_RULES`) or more config (`E2E_BASELINE_CONFIG`, a file
        // of tables besides [log], [metrics] and [subjects], appended to the bench's own): what a rule
        // set or a setting costs, measured in the same rounds.
        let baseline = std::env::var("E2E_BASELINE").ok();
        let baseline_rules = std::env::var("E2E_BASELINE_RULES").ok();
        let baseline_extra = std::env::var("E2E_BASELINE_CONFIG").ok().map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("E2E_BASELINE_CONFIG {p}: {e}"));
            // The engine's stderr is not shown: a file it would refuse must fail here.
            let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("E2E_BASELINE_CONFIG {p}: {e}"));
            for own in ["log", "metrics", "subjects"] {
                assert!(
                    !table.contains_key(own),
                    "E2E_BASELINE_CONFIG {p}: has [{own}]; [log], [metrics] and [subjects] are set by the bench (it reads the engine's metrics and uses the default subjects)"
                );
            }
            text
        });
        let with_baseline = baseline.is_some() || baseline_rules.is_some() || baseline_extra.is_some();
        let client = async_nats::connect(&url).await.unwrap();
        let dir = std::env::temp_dir().join(format!("fraudgate-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("fraudgate.toml");
        let metrics_addr = format!("127.0.0.1:{}", free_port().unwrap());
        let base_cfg = format!("[log]\nlevel = \"warn\"\n[metrics]\naddr = \"{metrics_addr}\"\n");
        std::fs::write(&cfg, &base_cfg).unwrap();
        let baseline_cfg = dir.join("baseline.toml");
        std::fs::write(&baseline_cfg, format!("{base_cfg}{}", baseline_extra.as_deref().unwrap_or(""))).unwrap();
        let shipped_rules = format!("{root}/rules");
        // Every target dies with the bench, also when it is killed by a signal.
        let spawn_with = |bin: &str, rules: &str, cfg: &std::path::Path| {
            let mut cmd = tokio::process::Command::new(bin);
            fraudgate::demo::die_with_parent(&mut cmd);
            cmd.args(["run", "--nats-url", &url, "--rules", rules])
                .arg("--config")
                .arg(cfg)
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        };
        let spawn_engine = |cfg: &std::path::Path| spawn_with(env!("CARGO_BIN_EXE_fraudgate"), &shipped_rules, cfg);
        let sizes = (stream_n, rr_n, rate, lat_secs);
        let events_end = fraudgate::service::now_ms();
        let (mut ceiling_rows, mut engine_rows, mut baseline_rows) = (Vec::new(), Vec::new(), Vec::new());
        // Rounds alternate the targets, so a slow minute of this shared machine does not
        // land on one of them only; the table shows each figure's median.
        // The targets take turns going first: measured in a fixed order, the same build
        // in the second and third place differed by 12 % (stream), which a comparison
        // would have taken for a change.
        let mut order = vec!["ceiling", "fraudgate"];
        if with_baseline {
            order.push("baseline");
        }
        for round in 1..=rounds {
            if rounds > 1 {
                println!("round {round} of {rounds}");
            }
            for &target in &order {
                let mut child = match target {
                    // The ceiling: a bare responder.
                    "ceiling" => {
                        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fraudgate-ceiling"));
                        fraudgate::demo::die_with_parent(&mut cmd);
                        cmd.args(["--nats-url", &url])
                            .stderr(std::process::Stdio::null())
                            .kill_on_drop(true)
                            .spawn()
                            .unwrap()
                    }
                    // fraudgate with the shipped rules and its metrics exporter on.
                    "fraudgate" => spawn_engine(&cfg),
                    // Optionally another fraudgate build (say, the previous commit's),
                    // measured in the same run: the only before/after comparison this
                    // machine allows.
                    _ => spawn_with(
                        baseline.as_deref().unwrap_or(env!("CARGO_BIN_EXE_fraudgate")),
                        baseline_rules.as_deref().unwrap_or(&shipped_rules),
                        &baseline_cfg,
                    ),
                };
                wait_ready(&client).await;
                let pids = [child.id(), nats.pid(), None];
                let metrics = (target != "ceiling").then_some(metrics_addr.as_str());
                let row = measure(target, &client, pids, metrics, sizes, events_end).await;
                let _ = child.kill().await;
                match target {
                    "ceiling" => ceiling_rows.push(row),
                    "fraudgate" => engine_rows.push(row),
                    _ => baseline_rows.push(row),
                }
            }
            order.rotate_left(1);
        }
        let (c, f) = (median(&ceiling_rows), median(&engine_rows));
        println!();
        if rounds > 1 {
            println!("Medians of {rounds} rounds.");
            println!();
        }
        println!("| figure | ceiling | fraudgate | fraudgate / ceiling | target |");
        println!("|---|---|---|---|---|");
        println!(
            "| stream throughput (decisions/s) | {:.0} | {:.0} | {:.2} | >= 0.70 |",
            c.stream,
            f.stream,
            f.stream / c.stream
        );
        println!(
            "| request-reply throughput, 64 in flight (/s) | {:.0} | {:.0} | {:.2} | >= 0.80 |",
            c.rr,
            f.rr,
            f.rr / c.rr
        );
        println!("| p50 at {rate:.0}/s (ms) | {:.3} | {:.3} | {:.2} | |", c.p50, f.p50, f.p50 / c.p50);
        println!(
            "| p99 at {rate:.0}/s (ms) | {:.3} | {:.3} | {:.2} ({:+.0} us) | <= +100 us |",
            c.p99,
            f.p99,
            f.p99 / c.p99,
            (f.p99 - c.p99) * 1000.0
        );
        println!("| p99.9 at {rate:.0}/s (ms) | {:.3} | {:.3} | {:.2} | |", c.p999, f.p999, f.p999 / c.p999);
        println!(
            "| fraudgate's own time, receipt to publish, p99 / p99.9 at {rate:.0}/s (its histogram, bucket bound) | | <= {:.0} / <= {:.0} us | | |",
            f.own_p99, f.own_p999
        );
        println!();
        println!("| CPU per decision (us) | ceiling | fraudgate | fraudgate - ceiling |");
        println!("|---|---|---|---|");
        let procs = ["target", "nats-server", "load client"];
        for (phase, cc, fc) in [("stream", c.stream_cpu, f.stream_cpu), ("request-reply", c.rr_cpu, f.rr_cpu)] {
            for i in 0..PROCS {
                println!("| {phase}: {} | {:.2} | {:.2} | {:+.2} |", procs[i], cc[i], fc[i], fc[i] - cc[i]);
            }
            let (ct, ft) = (cc.iter().sum::<f64>(), fc.iter().sum::<f64>());
            println!("| {phase}: all three | {ct:.2} | {ft:.2} | {:+.2} (ceiling / fraudgate {:.2}) |", ft - ct, ct / ft);
        }
        // "Nothing dropped" is part of the stream figure: a run that lost decisions is not
        // a valid measurement, and the bench fails after printing everything.
        let dropped: u64 = [&ceiling_rows, &engine_rows, &baseline_rows]
            .iter()
            .flat_map(|rows| rows.iter())
            .map(|r| r.stream_lost)
            .sum();
        if dropped > 0 {
            println!(
                "DROPPED: {dropped} stream transactions not decided (no decision in time, an error decision or a failed publish; ceiling {} / fraudgate {} / baseline {}): the stream figures are not valid",
                c.stream_lost,
                f.stream_lost,
                baseline_rows.iter().map(|r| r.stream_lost).sum::<u64>()
            );
        }
        if !baseline_rows.is_empty() {
            let b = median(&baseline_rows);
            println!(
                "\nbaseline ({}, rules {}{}) / ceiling (medians): stream {:.2}, request-reply {:.2}, p99 {:+.0} us (own p99 <= {:.0} us)",
                baseline.as_deref().unwrap_or("this build"),
                baseline_rules.as_deref().unwrap_or("shipped"),
                if baseline_extra.is_some() { ", with E2E_BASELINE_CONFIG" } else { "" },
                b.stream / c.stream,
                b.rr / c.rr,
                (b.p99 - c.p99) * 1000.0,
                b.own_p99
            );
            println!(
                "fraudgate / baseline (medians): stream {:.2}, request-reply {:.2}, p50 {:+.0} us, p99 {:+.0} us",
                f.stream / b.stream,
                f.rr / b.rr,
                (f.p50 - b.p50) * 1000.0,
                (f.p99 - b.p99) * 1000.0
            );
            println!(
                "fraudgate - baseline, CPU per decision of the target (medians): stream {:+.2} us ({:.2} against {:.2}), request-reply {:+.2} us ({:.2} against {:.2})",
                f.stream_cpu[0] - b.stream_cpu[0],
                f.stream_cpu[0],
                b.stream_cpu[0],
                f.rr_cpu[0] - b.rr_cpu[0],
                f.rr_cpu[0],
                b.rr_cpu[0]
            );
        }

        // 3. Memory with `cards` distinct cards tracked. Retried ids are kept only 5 s
        // and swept every second, so the figure is window state, not the dedupe table.
        std::fs::write(
            &cfg,
            format!(
                "[log]\nlevel = \"warn\"\n[metrics]\naddr = \"{metrics_addr}\"\n[engine]\ndedupe_horizon = \"5s\"\n[service]\nsweep_interval = \"1s\"\n"
            ),
        )
        .unwrap();
        let mut engine = spawn_engine(&cfg);
        wait_ready(&client).await;
        let pid = engine.id().unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = rss_kib(pid);
        let mut decisions = client.subscribe("fraud.decision.>").await.unwrap();
        client.flush().await.unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = done.clone();
        let counter = tokio::spawn(async move {
            let mut n = 0usize;
            while n < cards {
                match tokio::time::timeout(Duration::from_secs(30), decisions.next()).await {
                    Ok(Some(_)) => {
                        n += 1;
                        seen.store(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
            n
        });
        let now = fraudgate::service::now_ms();
        for i in 0..cards {
            let body = format!(
                r#"{{"id":"mem-{i}","ts":{},"card":"5{i:015}","amount":"{}.{:02}","device":"dev-{}","merchant":"mer-{}","region":"R{}","mcc":5411}}"#,
                now - (cards - i) as i64 / 10,
                10 + i % 500,
                i % 100,
                i % 50_000,
                i % 5_000,
                i % 40
            );
            client.publish("fraud.txn", Bytes::from(body)).await.unwrap();
            if i % 5_000 == 0 {
                client.flush().await.unwrap();
                // Keep at most 20k undecided (core NATS has no flow control: a flood
                // would overflow the engine's subscription buffer).
                while i.saturating_sub(done.load(std::sync::atomic::Ordering::Relaxed)) > 20_000 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        client.flush().await.unwrap();
        let decided = counter.await.unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await; // dedupe horizon + sweeps
        // Steady state: the resident size once it stops moving (the allocator returns
        // what the retry table and the decisions churned through over a few seconds).
        let mut after = rss_kib(pid);
        let mut settled = false;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = rss_kib(pid);
            settled = now.abs_diff(after) * 200 < after.max(1);
            after = now;
            if settled || now == 0 {
                break;
            }
        }
        assert!(after > 0, "the engine exited during the memory measurement");
        // The engine's own count of card keys (its gauge, refreshed by every sweep).
        let card_keys = scrape(&metrics_addr).await.lines().find_map(|l| {
            l.strip_prefix(&format!("{}{{group=\"card\"}} ", fraudgate::telemetry::names::STATE_KEYS))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let _ = engine.kill().await;
        println!();
        println!(
            "memory: {decided} of {cards} distinct cards decided; RSS {:.1} MiB -> {:.1} MiB: {:.0} bytes per tracked card (all window groups of the shipped rules; target <= 256 for the card key)",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            (after.saturating_sub(before) * 1024) as f64 / decided.max(1) as f64
        );
        if decided < cards {
            println!("  (only {decided} of {cards} cards were decided: the figure is per decided card)");
        }
        if !settled {
            println!("  (the resident size was still moving 10 s after the sweeps: the last sample is shown)");
        }
        match card_keys {
            Some(k) => println!("  card keys tracked by the engine (fraudgate_state_keys): {k:.0}"),
            None => println!("  (the engine's card key count could not be read from its metrics)"),
        }
        if cards < 100_000 {
            // A few MiB of the process's own growth (buffers, allocator pages) over a
            // thousand cards reads as kilobytes per card.
            println!(
                "  ({cards} cards are too few for a per-card figure; the default E2E_CARDS (1M) or `cargo bench --bench memory` measure it)"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        nats.stop().await;
        if dropped > 0 {
            eprintln!("e2e: {dropped} stream transactions were dropped; see DROPPED above");
            std::process::exit(1);
        }
    });
}
