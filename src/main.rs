//! The `fraudgate` command line. `anyhow` lives here only; the library's errors are typed.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use fraudgate::config::EngineSection;
use fraudgate::{Engine, EngineConfig, Transaction};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "fraudgate", version, about = "Real-time fraud-decision engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a rule directory: exit 0 with a summary, or 1 with every error.
    Check {
        /// The rule directory (every *.toml in it).
        rules: PathBuf,
        /// Config file with an [engine] table (time zone, resolution ...).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Decide transactions from a JSONL file (or stdin) offline and print one decision per
    /// line: a backtest of a rule directory on recorded traffic. Transactions without `ts`
    /// use the current time.
    Replay {
        /// The rule directory.
        #[arg(long)]
        rules: PathBuf,
        /// JSONL file of transactions; `-` or nothing for stdin.
        input: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// The config file. Later sections (transport, metrics) join this struct.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    engine: EngineSection,
}

fn engine_config(path: Option<&Path>) -> anyhow::Result<EngineConfig> {
    let Some(path) = path else {
        return Ok(EngineConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let file: ConfigFile =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    file.engine
        .resolve(|k| std::env::var(k).ok())
        .with_context(|| format!("invalid [engine] in {}", path.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Check { rules, config } => {
            let cfg = engine_config(config.as_deref())?;
            match fraudgate::load_dir(&rules, &cfg) {
                Ok(rs) => {
                    println!("ok: {}", rs.summary());
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
        } => {
            let cfg = engine_config(config.as_deref())?;
            let rs = fraudgate::load_dir(&rules, &cfg).map_err(|e| {
                eprint!("{}", e.render());
                anyhow::anyhow!("rules in {} do not compile", rules.display())
            })?;
            let engine = Engine::new(rs, cfg);
            let reader: Box<dyn BufRead> = match input.as_deref() {
                None => Box::new(std::io::stdin().lock()),
                Some(p) if p == Path::new("-") => Box::new(std::io::stdin().lock()),
                Some(p) => Box::new(std::io::BufReader::new(
                    std::fs::File::open(p)
                        .with_context(|| format!("cannot open {}", p.display()))?,
                )),
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut bad = 0usize;
            const SWEEP_EVERY_MS: i64 = 60_000;
            let mut last_sweep = i64::MIN / 2;
            for (n, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                match Transaction::from_json(line.as_bytes()) {
                    Ok(t) => {
                        // Recorded traffic: the event time is also the receive time, so the
                        // dedupe horizon applies as it did live.
                        let now = t
                            .ts_ms
                            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
                        let o = engine.decide(&t, now);
                        writeln!(out, "{}", o.decision.to_json())?;
                        // Sweep idle keys and old ids as the service does, so a long
                        // backtest runs in bounded memory.
                        if now >= last_sweep + SWEEP_EVERY_MS {
                            engine.evict_idle(now);
                            last_sweep = now;
                        }
                    }
                    Err(e) => {
                        bad += 1;
                        eprintln!("line {}: {} ({})", n + 1, e, e.code.as_str());
                    }
                }
            }
            out.flush()?;
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
