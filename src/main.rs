//! The `fraudgate` command line. `anyhow` lives here only; the library's errors are typed.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use fraudgate::config::{parse_duration, FileConfig};
use fraudgate::service::{RunOptions, Running};
use fraudgate::{Engine, EngineConfig, Transaction};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Bounds of `loadgen`: far past what one machine sends, and short of a run whose
/// transactions (made before it starts, a few hundred bytes each) would take all memory.
const MAX_LOAD_RATE: f64 = 1_000_000.0;
const MAX_IN_FLIGHT: u64 = 1_000_000;
const MAX_LOAD_COUNT: usize = 20_000_000;

#[derive(Parser)]
#[command(name = "fraudgate", version, about = "Real-time fraud-decision engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the engine as a NATS service (request-reply on fraud.check, stream on fraud.txn).
    Run {
        /// NATS server URL(s), comma-separated. Overrides [nats] url.
        #[arg(long)]
        nats_url: Option<String>,
        /// The rule directory, watched for changes (SIGHUP also reloads).
        #[arg(long)]
        rules: PathBuf,
        /// Serve Prometheus metrics on host:port (`/metrics`). Overrides [metrics] addr.
        #[arg(long)]
        metrics_addr: Option<String>,
        /// Config file (TOML): [engine], [nats], [subjects], [limits], [service],
        /// [metrics], [snapshot], [jetstream], [log].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Send one transaction to a running engine and print the decision.
    Ask {
        /// The transaction JSON; `-` or nothing reads stdin.
        transaction: Option<String>,
        #[arg(long)]
        nats_url: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// How long to wait for the decision, e.g. `2s`.
        #[arg(long, default_value = "2s")]
        timeout: String,
    },
    /// A private nats-server, the engine with the shipped rules, and generated traffic with
    /// injected fraud; prints a one-line summary per second. Ctrl-C stops everything.
    Demo {
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
        /// Transactions per second.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        rate: u32,
        /// Stop after this long (e.g. `30s`) instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<String>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Drive generated traffic (with injected, labelled fraud) at a running engine and
    /// report throughput, latency, errors and detection quality.
    Loadgen {
        #[arg(long)]
        nats_url: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// `check` (request-reply) or `stream` (fraud.txn -> fraud.decision.*).
        #[arg(long, default_value = "check")]
        path: String,
        /// Open loop: transactions per second on schedule (latency from the scheduled
        /// time). Without it the load is closed-loop with --concurrency in flight.
        #[arg(long, conflicts_with = "concurrency")]
        rate: Option<f64>,
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
        concurrency: u64,
        /// How many transactions; default: 10 s worth at --rate, else 100,000.
        #[arg(long)]
        count: Option<usize>,
        /// Seed of the generated traffic: the same seed (with --events-end and --run-tag)
        /// sends the same transactions. Default: a new one per run, printed at the start.
        /// The same seed twice against one engine within a few minutes repeats the same
        /// cards, merchants and amounts, which the duplicate rule then rejects.
        #[arg(long)]
        seed: Option<u64>,
        /// Share of normal transactions that start an injected fraud pattern.
        #[arg(long, default_value_t = 0.005)]
        fraud_rate: f64,
        /// A decision later than this counts as lost.
        #[arg(long, default_value = "5s")]
        timeout: String,
        /// Part of every transaction id. Default: made from the clock, so a second run
        /// against the same engine is not answered from its retry table. Give the same tag
        /// (and --events-end) to send exactly the same transactions again.
        #[arg(long)]
        run_tag: Option<String>,
        /// Event time of the last transaction (RFC 3339, e.g. `2026-11-27T18:00:00Z`); the
        /// others go back from it at the traffic's density. Default: now.
        #[arg(long)]
        events_end: Option<String>,
        /// Send nothing: write the transactions to FILE as JSONL, and the ids of the
        /// injected fraud to FILE.fraud-ids (for `replay --fraud-ids`).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["nats_url", "path", "rate", "concurrency", "timeout"])]
        write: Option<PathBuf>,
    },
    /// Check a rule directory: exit 0 with a summary, or 1 with every error.
    Check {
        /// The rule directory (every *.toml in it).
        rules: PathBuf,
        /// Config file with an [engine] table (time zone, resolution ...).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Decide transactions from a JSONL file (or stdin) offline and print one decision per
    /// line: a backtest of a rule directory on recorded traffic.
    Replay {
        /// The rule directory.
        #[arg(long)]
        rules: PathBuf,
        /// JSONL file of transactions; `-` or nothing for stdin.
        input: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// At the end, print a JSON summary to stderr: transactions decided and invalid,
        /// keys tracked and evicted at the cap per key group, peak resident memory.
        #[arg(long)]
        summary: bool,
        /// Do not print the decisions (with --summary: size a key cap on recorded traffic).
        #[arg(long)]
        quiet: bool,
        /// File of the ids of transactions known to be fraud (chargebacks, confirmed
        /// cases), one per line, or outcome messages as sent on fraud.outcome (JSON lines;
        /// chargeback and fraud count): at the end, print to stderr how much fraud and how
        /// much legitimate traffic the rules held or rejected, and each rule's precision
        /// (shadow rules included).
        #[arg(long, value_name = "FILE")]
        fraud_ids: Option<PathBuf>,
    },
}

fn read_config(path: Option<&Path>) -> anyhow::Result<FileConfig> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    FileConfig::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
}

fn engine_config(file: &FileConfig) -> anyhow::Result<EngineConfig> {
    file.engine
        .resolve(|k| std::env::var(k).ok())
        .context("invalid [engine] table")
}

/// The `[engine]` table for `check` and `replay`, which work offline: they compare only
/// hashes made in the same run, so any entity hash key gives the same answers (up to the
/// estimate of a distinct count past 128 values). A production config whose key variable
/// is not set here (an analyst's machine), or whose key is too short for `run`, still
/// works: the key is a throwaway one then.
fn offline_engine_config(file: &FileConfig) -> anyhow::Result<EngineConfig> {
    const THROWAWAY: &str = "fraudgate-offline-throwaway";
    let var = file.engine.hash_key_env.as_deref();
    // The key changes no answer offline (but distinct counts past 128 values): a key too
    // short for `run` is replaced, with a note, rather than stop a check or a backtest.
    let short = |v: &str| v.len() < fraudgate::config::MIN_KEY_BYTES;
    let mut section = file.engine.clone();
    if section.hash_key_env.is_none() && section.hash_key.as_deref().is_some_and(short) {
        eprintln!(
            "note: [engine] hash_key is too short for `run`; this command uses a throwaway key"
        );
        section.hash_key = Some(THROWAWAY.into());
    }
    section
        .resolve(|k| {
            let value = std::env::var(k).ok().filter(|v| !v.is_empty());
            if value.as_deref().is_some_and(short) {
                eprintln!("note: {k} is too short for `run`; this command uses a throwaway key");
                return Some(THROWAWAY.into());
            }
            value.or_else(|| (Some(k) == var).then(|| THROWAWAY.into()))
        })
        .context("invalid [engine] table")
}

fn init_logging(format: &str, level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let (text, source) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => (v, "RUST_LOG"),
        _ => (level.to_string(), "[log] level"),
    };
    // A bare word that is not a level is taken by the filter syntax as a target name
    // (everything from a module called `warning`, at any level): nothing of fraudgate's
    // would be logged, not even its errors or a panic. Refused instead.
    let bare = !text.contains(['=', ',', '[', ':']);
    if bare
        && text
            .trim()
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_err()
    {
        anyhow::bail!(
            "{source} `{text}` is not a level: use error, warn, info, debug, trace or off, \
             or a filter such as `fraudgate=debug`"
        );
    }
    let filter = EnvFilter::try_new(&text).with_context(|| format!("invalid {source}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "json" => builder.json().init(),
        "human" => builder.init(),
        other => anyhow::bail!("[log] format must be `human` or `json`, not `{other}`"),
    }
    Ok(())
}

fn main() -> ExitCode {
    // Test builds only (feature `failpoints`): fail points from FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    mask_panics();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A panic's location and its message with card numbers masked (the default hook prints
/// the message as it is, and a message may hold an input value).
fn panic_text(info: &std::panic::PanicHookInfo) -> (String, String) {
    let message = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_default();
    let location = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    (location, fraudgate::txn::redact_pans(&message))
}

/// Every command: a panic is printed to stderr with its card numbers masked.
fn mask_panics() {
    std::panic::set_hook(Box::new(|info| {
        let (location, message) = panic_text(info);
        let thread = std::thread::current();
        eprint_panic(thread.name().unwrap_or("?"), &location, &message);
    }));
}

fn eprint_panic(thread: &str, location: &str, message: &str) {
    eprintln!("panic in thread {thread} at {location}: {message}");
}

/// `run`: panics go to the log as one structured line, masked the same way.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let (location, message) = panic_text(info);
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("?");
        // A log filter that leaves errors of this crate out (`[log] level = "off"`, a
        // RUST_LOG naming other modules) must not hide a panic.
        if tracing::enabled!(tracing::Level::ERROR) {
            tracing::error!(location, thread, "panic: {message}");
        } else {
            eprint_panic(thread, &location, &message);
        }
    }));
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// SIGTERM and SIGINT, registered before anything starts (so a signal during startup is
/// not lost to the default action).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    /// SIGHUP reloads the rules (the service's reload task listens), but only once that
    /// task runs: registered here, a SIGHUP during startup (a snapshot restore, a JetStream
    /// replay) no longer ends the process by the default action.
    #[cfg(unix)]
    _hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
                _hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run {
            nats_url,
            rules,
            metrics_addr,
            config,
        } => {
            let mut file = read_config(config.as_deref())?;
            if metrics_addr.is_some() {
                file.metrics.addr = metrics_addr;
            }
            init_logging(&file.log.format, &file.log.level)?;
            log_panics();
            let engine = engine_config(&file)?;
            let nats_url = nats_url.unwrap_or_else(|| file.nats.url.clone());
            let rt = runtime()?;
            let code = rt.block_on(async {
                let mut signals = Signals::new()?;
                let start = Running::start(RunOptions {
                    rules_dir: rules,
                    nats_url,
                    engine,
                    file,
                });
                // A signal during the start (a JetStream replay can take minutes): the
                // start finishes, and the shutdown follows at once, draining what was taken
                // in meanwhile (without a request capture, requests are subscribed to before
                // the replay; with one, after it, and caught up from it). Stopping the
                // start half-way would drop those. A second signal exits at once.
                tokio::pin!(start);
                let mut signalled = false;
                let mut running = loop {
                    tokio::select! {
                        r = &mut start => break r?,
                        _ = signals.recv() => {
                            if signalled {
                                eprintln!("second signal: exiting without finishing the start");
                                std::process::exit(130);
                            }
                            signalled = true;
                            tracing::warn!(
                                "signal during the start: stopping as soon as it is done (a second signal exits at once)"
                            );
                        }
                    }
                };
                // Until a signal, or until a task the engine needs has ended (it would
                // stay up without doing its job): shut down, and exit 1 so that a
                // supervisor restarts it.
                let mut failed = false;
                if !signalled {
                    tokio::select! {
                        _ = signals.recv() => {}
                        task = running.failed() => {
                            tracing::error!(task, "stopping: a task the engine needs has ended");
                            failed = true;
                        }
                    }
                }
                // A second signal while draining means "now".
                tokio::spawn(async move {
                    signals.recv().await;
                    eprintln!("second signal: exiting without finishing the shutdown");
                    std::process::exit(130);
                });
                // A shutdown that left a step unfinished (the log says which) exits 1, so
                // that a supervisor sees it.
                Ok(match running.shutdown().await.clean && !failed {
                    true => ExitCode::SUCCESS,
                    false => ExitCode::from(1),
                })
            });
            // A blocking task still running (a final snapshot past its deadline, stuck in
            // fsync) must not hold the exit: dropping the runtime would wait for it. The
            // shutdown has logged what did not finish.
            rt.shutdown_timeout(Duration::from_secs(1));
            code
        }
        Cmd::Ask {
            transaction,
            nats_url,
            config,
            timeout,
        } => {
            let file = read_config(config.as_deref())?;
            let timeout = parse_duration(&timeout).map_err(anyhow::Error::msg)?;
            let body = match transaction.as_deref() {
                None | Some("-") => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s)?;
                    s
                }
                Some(s) => s.to_string(),
            };
            let url = nats_url.unwrap_or_else(|| file.nats.url.clone());
            runtime()?.block_on(ask(&file, &url, body, timeout))
        }
        Cmd::Demo {
            rules,
            rate,
            duration,
            seed,
        } => {
            init_logging("human", "warn")?;
            let duration = duration
                .map(|d| parse_duration(&d).map_err(anyhow::Error::msg))
                .transpose()?;
            let decided =
                runtime()?.block_on(fraudgate::demo::run(fraudgate::demo::DemoOptions {
                    rules_dir: rules,
                    rate,
                    duration,
                    seed,
                    engine: EngineConfig::default(),
                }))?;
            Ok(if decided > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Loadgen {
            nats_url,
            config,
            path,
            rate,
            concurrency,
            count,
            seed,
            fraud_rate,
            timeout,
            run_tag,
            events_end,
            write,
        } => {
            use fraudgate::loadrun::{LoadMode, LoadOptions, LoadPath};
            let events_end_ms = match events_end {
                None => None,
                Some(t) => Some(
                    chrono::DateTime::parse_from_rfc3339(&t)
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "--events-end `{t}`: {e} (use RFC 3339, e.g. 2026-11-27T18:00:00Z)"
                            )
                        })?
                        .timestamp_millis(),
                ),
            };
            let now = fraudgate::service::now_ms();
            let seed = seed.unwrap_or((now as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40);
            let run_tag = run_tag.unwrap_or_else(|| format!("{now:x}"));
            if !run_tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                anyhow::bail!("--run-tag may hold letters, digits and `_` only");
            }
            let file = read_config(config.as_deref())?;
            // The traffic's day and night are the engine's local hours (`[engine]
            // timezone` of --config), which its rules' `local_hour` reads.
            let utc_offset_s = match &file.engine.timezone {
                Some(tz) => fraudgate::loadgen::utc_offset_s(tz, events_end_ms.unwrap_or(now))
                    .ok_or_else(|| {
                        anyhow::anyhow!("[engine] timezone `{tz}` is not a time zone")
                    })?,
                None => 0,
            };
            let path = match path.as_str() {
                "check" => LoadPath::Check,
                "stream" => LoadPath::Stream,
                other => anyhow::bail!("--path must be `check` or `stream`, not `{other}`"),
            };
            let mode = match rate {
                Some(r) if r > 0.0 && r <= MAX_LOAD_RATE => LoadMode::Open(r),
                Some(_) => anyhow::bail!("--rate must be more than 0 and at most {MAX_LOAD_RATE}"),
                None if (1..=MAX_IN_FLIGHT).contains(&concurrency) => {
                    LoadMode::Closed(concurrency as usize)
                }
                None => anyhow::bail!("--concurrency must be from 1 to {MAX_IN_FLIGHT}"),
            };
            let count = count.unwrap_or(match rate {
                Some(r) => ((r * 10.0) as usize).max(1),
                None => 100_000,
            });
            if !(1..=MAX_LOAD_COUNT).contains(&count) {
                // Every transaction is made before the run starts (a few hundred bytes
                // each): more would take tens of GB.
                anyhow::bail!("--count must be from 1 to {MAX_LOAD_COUNT}");
            }
            if !(0.0..=1.0).contains(&fraud_rate) {
                anyhow::bail!("--fraud-rate is a share of transactions, from 0 to 1");
            }
            let gen = fraudgate::loadgen::GenConfig {
                seed,
                fraud_rate,
                run_tag,
                utc_offset_s,
                ..Default::default()
            };
            if let Some(path) = write {
                let mut ids_path = path.clone().into_os_string();
                ids_path.push(".fraud-ids");
                let ids_path = PathBuf::from(ids_path);
                let create = |p: &Path| {
                    std::fs::File::create(p)
                        .map(std::io::BufWriter::new)
                        .with_context(|| format!("cannot write {}", p.display()))
                };
                let (mut traffic, mut ids) = (create(&path)?, create(&ids_path)?);
                let end = events_end_ms.unwrap_or(now);
                let fraud =
                    fraudgate::loadgen::write_traffic(&gen, end, count, &mut traffic, &mut ids)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!(
                    "loadgen: {count} transactions (seed {seed}, run tag {}) written to {}, the ids of the {fraud} injected fraud to {}",
                    gen.run_tag,
                    path.display(),
                    ids_path.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let timeout = parse_duration(&timeout).map_err(anyhow::Error::msg)?;
            if timeout.is_zero() || timeout > fraudgate::loadrun::MAX_TIMEOUT {
                // The latency histogram ends there: a longer timeout's losses would
                // silently drop out of the percentiles.
                anyhow::bail!(
                    "--timeout must be more than 0s and at most {}s",
                    fraudgate::loadrun::MAX_TIMEOUT.as_secs()
                );
            }
            let url = nats_url.unwrap_or_else(|| file.nats.url.clone());
            runtime()?.block_on(async {
                let counters = std::sync::Arc::new(fraudgate::telemetry::Counters::default());
                let client =
                    fraudgate::transport::connect(&file.nats, &url, "loadgen", counters).await?;
                eprintln!(
                    "loadgen: {count} transactions, {mode:?} on {path:?}, seed {seed}, run tag {}",
                    gen.run_tag
                );
                let report = fraudgate::loadrun::run(
                    client,
                    LoadOptions {
                        path,
                        mode,
                        count,
                        gen,
                        timeout,
                        subjects: file.subjects.clone(),
                        progress: true,
                        events_end_ms,
                    },
                )
                .await?;
                print!("{}", report.render());
                Ok(if report.errors + report.timeouts == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            })
        }
        Cmd::Check { rules, config } => {
            let file = read_config(config.as_deref())?;
            // What `run` would refuse of the file, said here too.
            file.validate()
                .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
            let cfg = offline_engine_config(&file)?;
            match fraudgate::load_dir(&rules, &cfg) {
                Ok(rs) => {
                    println!("ok: {}", rs.summary());
                    for w in &rs.warnings {
                        println!("{w}");
                    }
                    for line in list_end_lines(&rs, fraudgate::service::now_ms()) {
                        println!("{line}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprint!("{}", e.render());
                    eprintln!(
                        "{} error(s) in {}; nothing would be loaded",
                        e.diagnostics.len(),
                        rules.display()
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
        Cmd::Replay {
            rules,
            input,
            config,
            summary,
            quiet,
            fraud_ids,
        } => {
            let cfg = offline_engine_config(&read_config(config.as_deref())?)?;
            let fraud_ids = match fraud_ids {
                None => None,
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read {}", p.display()))?;
                    let ids = fraudgate::backtest::parse_fraud_ids(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                    Some(ids)
                }
            };
            replay(&rules, input.as_deref(), cfg, (summary, quiet), fraud_ids)
        }
    }
}

/// For `check`: per list with entries that end, how many, the next end, and how many
/// have ended already (harmless, but worth removing from the file).
fn list_end_lines(rs: &fraudgate::RuleSet, now_ms: i64) -> Vec<String> {
    let time = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| ms.to_string())
    };
    rs.list_ends
        .iter()
        .map(|(name, ends)| {
            let ended = ends.iter().filter(|&&e| e <= now_ms).count();
            let next = ends
                .iter()
                .find(|&&e| e > now_ms)
                .map_or(String::new(), |&e| format!(", the next at {}", time(e)));
            format!(
                "list {name}: {} of {} entries end{next}; {ended} ended already{}",
                ends.len(),
                rs.lists.get(name).copied().unwrap_or(0),
                if ended > 0 {
                    " (they no longer apply; remove them from the file)"
                } else {
                    ""
                }
            )
        })
        .collect()
}

async fn ask(
    file: &FileConfig,
    url: &str,
    body: String,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let counters = std::sync::Arc::new(fraudgate::telemetry::Counters::default());
    let client = fraudgate::transport::connect(&file.nats, url, "ask", counters).await?;
    let subject = file.subjects.check.clone();
    // The request carries a timeout past ours (ours ends it): the client's default (10 s)
    // would cut a longer --timeout short and report a failure instead.
    let request = async_nats::Request::new()
        .payload(body.trim().to_string().into())
        .timeout(Some(timeout + Duration::from_secs(1)));
    let reply = tokio::time::timeout(timeout, client.send_request(subject.clone(), request))
        .await
        .with_context(|| format!("no decision within {timeout:?} (is `fraudgate run` up?)"))?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => anyhow::anyhow!(
                "no decision: no engine is subscribed to {subject} (is `fraudgate run` up?)"
            ),
            _ => anyhow::anyhow!("request failed: {e}"),
        })?;
    let text = String::from_utf8_lossy(&reply.payload);
    println!("{text}");
    let is_error = serde_json::from_str::<serde_json::Value>(&text)
        .map(|v| v.get("error").is_some())
        .unwrap_or(true);
    Ok(if is_error {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `(summary, quiet)`: the flags of the same names. `fraud_ids`: score the decisions
/// against them (a backtest's report at the end).
fn replay(
    rules: &Path,
    input: Option<&Path>,
    cfg: EngineConfig,
    (summary, quiet): (bool, bool),
    fraud_ids: Option<Vec<String>>,
) -> anyhow::Result<ExitCode> {
    // Rules that do not compile exit 1, as with `check` (2 is for usage, the config and
    // files that cannot be read).
    let rs = match fraudgate::load_dir(rules, &cfg) {
        Ok(rs) => rs,
        Err(e) => {
            eprint!("{}", e.render());
            eprintln!("error: rules in {} do not compile", rules.display());
            return Ok(ExitCode::from(1));
        }
    };
    let engine = Engine::new(rs, cfg);
    let mut backtest =
        fraud_ids.map(|ids| fraudgate::backtest::Backtest::new(ids, &engine.rules()));
    let reader: Box<dyn BufRead> = match input {
        None => Box::new(std::io::stdin().lock()),
        Some(p) if p == Path::new("-") => Box::new(std::io::stdin().lock()),
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        )),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut bad = 0usize;
    let mut decided = 0u64;
    const SWEEP_EVERY_MS: i64 = 60_000;
    let mut last_sweep = i64::MIN / 2;
    // The replay's receive clock: the latest event time so far. A line without `ts` is
    // taken as received then (the wall clock was years away from recorded traffic: its
    // sweep dropped every key and id, and stopped later sweeps).
    let mut clock: Option<i64> = None;
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match Transaction::from_json(line.as_bytes()) {
            Ok(t) => {
                // Recorded traffic: the event time is also the receive time, so the
                // dedupe horizon applies as it did live. Except a time more than a day
                // ahead of the wall clock, which no recorded transaction can have: it
                // does not move the clock (year 9999 made the next sweep drop every key
                // and id, so the rest of the file was decided without history), and the
                // engine treats it as live intake does a time too far ahead.
                // (A day's margin, not `max_future_skew`: the analyst's clock is not the
                // recording machine's.)
                let wall = chrono::Utc::now().timestamp_millis();
                let ts = t.ts_ms.filter(|&ts| ts <= wall.saturating_add(86_400_000));
                let now = ts.or(clock).unwrap_or(wall);
                // Only recorded times move the clock (a line without `ts` before any with
                // one must not set it to today, which would stop every later sweep).
                if let Some(ts) = ts {
                    clock = Some(clock.map_or(ts, |c| c.max(ts)));
                }
                let o = engine.decide(&t, now);
                if o.id_reused {
                    // Refused live too: not decided, so no decision line.
                    bad += 1;
                    let why = fraudgate::transport::Refusal::id_reused(&t.id);
                    eprintln!("line {}: {} ({})", n + 1, why.message, why.code);
                    continue;
                }
                decided += 1;
                if let Some(bt) = backtest.as_mut().filter(|_| !o.duplicate) {
                    let currency = t.currency.as_deref();
                    let currency = currency.unwrap_or(&engine.config().default_currency);
                    bt.add(&o.decision, t.amount, currency);
                }
                if !quiet {
                    out.write_all(&o.json)?;
                    out.write_all(b"\n")?;
                }
                // Sweep idle keys and old ids as the service does, so a long backtest runs
                // in bounded memory.
                if let Some(latest) = clock.filter(|&c| c >= last_sweep + SWEEP_EVERY_MS) {
                    engine.evict_idle(latest);
                    last_sweep = latest;
                }
            }
            Err(e) => {
                bad += 1;
                eprintln!("line {}: {} ({})", n + 1, e, e.code.as_str());
            }
        }
    }
    out.flush()?;
    if let Some(bt) = &backtest {
        eprint!("{}", bt.report());
    }
    if summary {
        let stats = engine.stats();
        let s = serde_json::json!({
            "decided": decided,
            "invalid": bad,
            "keys": stats.groups.iter().map(|g| (g.0.clone(), g.1)).collect::<std::collections::BTreeMap<_, _>>(),
            "capped": stats.capped.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "max_keys": engine.config().max_keys,
            "dedupe_entries": stats.dedupe_entries,
            "peak_rss_bytes": peak_rss_bytes(),
        });
        eprintln!("{s}");
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
