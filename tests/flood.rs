//! A flood of unique cards against the key cap: `fraudgate replay` (the engine with the
//! shipped rules, in its own process) takes 5M transactions, each from a card never seen
//! before, with `[engine] max_keys` set. The keys tracked per group stay at the cap, the
//! evictions are counted, and the process's peak resident memory stays bounded by the cap
//! instead of growing with the 5M cards.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

const CARDS: u64 = 5_000_000;
const CAP: u64 = 100_000;

#[test]
fn five_million_unique_cards_stay_within_the_key_cap() {
    let dir = common::Scratch::new("flood");
    let cfg = dir.0.join("fraudgate.toml");
    std::fs::write(
        &cfg,
        format!("[engine]\nmax_keys = {CAP}\ntimezone = \"UTC\"\n"),
    )
    .unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fraudgate"))
        .args(["replay", "--summary", "--quiet", "--rules"])
        .arg(format!("{root}/rules"))
        .arg("--config")
        .arg(&cfg)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = std::io::BufWriter::with_capacity(1 << 20, child.stdin.take().unwrap());
    // Noon UTC, one transaction per millisecond: 5M span 83 minutes of event time, so no
    // card is idle past its longest window (24h) and only the cap can evict it.
    let t0: i64 = 1_795_687_200_000 + 12 * 3_600_000;
    let writer = std::thread::spawn(move || {
        let mut line = String::with_capacity(160);
        for i in 0..CARDS {
            use std::fmt::Write as _;
            line.clear();
            let _ = writeln!(
                line,
                r#"{{"id":"f{i}","card":"5{i:015}","amount":"12.50","ts":{},"merchant":"mer-{}","device":"dev-{i}","region":"R{}","mcc":5411}}"#,
                t0 + i as i64,
                i % 500,
                i % 40
            );
            stdin.write_all(line.as_bytes()).unwrap();
        }
        stdin.flush().unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {stderr}"));
    eprintln!("{summary}");
    assert_eq!(summary["decided"], CARDS, "{summary}");
    let slack = 256 * 2; // checked every 256 inserts per deciding thread
    let mut capped_total = 0;
    for (group, keys) in summary["keys"].as_object().unwrap() {
        let keys = keys.as_u64().unwrap();
        assert!(keys <= CAP + slack, "{group}: {keys} keys, cap {CAP}");
        let capped = summary["capped"][group.as_str()].as_u64().unwrap_or(0);
        if group == "card" || group == "device" {
            // Every card and device is new: all but the ones tracked were evicted.
            assert_eq!(keys + capped, CARDS, "{group}: {summary}");
        }
        capped_total += capped;
    }
    assert!(capped_total >= 2 * (CARDS - CAP - slack), "{summary}");
    // Bounded by the cap: the card groups hold at most CAP keys each (a few hundred bytes
    // per key), plus the retry table (2 minutes of ids at 1,000/s of event time) and the
    // process itself. Without the cap, 5M cards need well over 1 GB (PERFORMANCE.md).
    let peak = summary["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        peak < 400 << 20,
        "peak resident memory {} MiB with a cap of {CAP} keys per group",
        peak >> 20
    );
}
