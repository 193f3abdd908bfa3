//! `fraudgate check`: exit codes and snapshot tests of the error output.
//!
//! Each `tests/check/<case>/rules/` is checked; stderr must equal `expected.txt`.
//! `UPDATE_EXPECT=1 cargo test --test check` rewrites the snapshots; review the diff.

mod common;

use std::path::Path;
use std::process::Command;

fn fraudgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fraudgate"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

#[test]
fn shipped_rules_check_clean() {
    let out = fraudgate().args(["check", "rules"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("ok: 5 rule files + 5 list files"),
        "{stdout}"
    );
    assert!(stdout.contains("version 2026-11-26.1+"), "{stdout}");
    // Every shipped list and window is read by a rule.
    assert!(!stdout.contains("warning"), "{stdout}");
}

/// The README's configuration example is a file `run` accepts (every key known, every
/// value valid): `check --config` says so.
#[test]
fn the_readme_config_example_is_valid() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("```toml\n")
        .expect("a toml block in the README")
        + 8;
    let end = start + readme[start..].find("```").unwrap();
    let dir = common::Scratch::new("readme-config");
    let config = dir.0.join("fraudgate.toml");
    std::fs::write(&config, &readme[start..end]).unwrap();
    let out = fraudgate()
        .args(["check", "rules", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `check --config` refuses what `run` would refuse of the file (a wildcard intake
/// subject, which would take in the engine's own output), naming the setting.
#[test]
fn check_refuses_a_config_that_run_would_refuse() {
    let dir = common::Scratch::new("check-config");
    let config = dir.0.join("fraudgate.toml");
    std::fs::write(&config, "[subjects]\ntxn = \"fraud.>\"\n").unwrap();
    let out = fraudgate()
        .args(["check", "rules", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("[subjects] txn"), "{err}");
}

/// What `replay` (shipped rules) does with `traffic`: its exit code, stderr, and the
/// decisions it prints.
fn replay(name: &str, traffic: &str) -> (Option<i32>, String, Vec<serde_json::Value>) {
    let dir = common::Scratch::new(name);
    let file = dir.0.join("traffic.jsonl");
    std::fs::write(&file, traffic).unwrap();
    let out = fraudgate()
        .args(["replay", "--rules", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), err, lines)
}

/// The decisions `replay` (shipped rules) prints for `traffic`, which it must take without
/// an error.
fn replay_decisions(name: &str, traffic: &str) -> Vec<serde_json::Value> {
    let (code, err, lines) = replay(name, traffic);
    assert_eq!(code, Some(0), "{err}");
    lines
}

/// `replay --fraud-ids` scores the backtest on stderr: its figures agree with the decisions
/// it prints, every rule is in its table (a shadow rule as such), and a fraud id the
/// traffic does not hold is counted. A fraud-ids file with two ids on a line is refused
/// (exit 2), naming the line.
#[test]
fn replay_scores_a_backtest_against_fraud_ids() {
    let dir = common::Scratch::new("replay-backtest");
    let ids = dir.0.join("fraud.txt");
    std::fs::write(
        &ids,
        "# confirmed fraud\nstl-2\ncm-1   # chargeback, reason 10.4\nnot-in-traffic\n",
    )
    .unwrap();
    let out = fraudgate()
        .args(["replay", "--rules", "rules", "--fraud-ids"])
        .arg(&ids)
        .arg("docs/sample-traffic.jsonl")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let decisions: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Each id once (a retry prints its original's decision again).
    let mut first = std::collections::BTreeMap::new();
    for d in &decisions {
        first
            .entry(d["id"].as_str().unwrap().to_string())
            .or_insert(d["action"].as_str().unwrap().to_string());
    }
    let flagged = |ids: &mut dyn Iterator<Item = (&String, &String)>| {
        ids.filter(|(_, a)| *a != "approve").count()
    };
    let fraud = ["stl-2", "cm-1"];
    let caught = flagged(&mut first.iter().filter(|(id, _)| fraud.contains(&id.as_str())));
    let legit_flagged = flagged(&mut first.iter().filter(|(id, _)| !fraud.contains(&id.as_str())));
    assert_eq!((&*first["stl-2"], &*first["cm-1"]), ("reject", "approve"));
    for line in [
        format!(
            "backtest: {} transactions scored, 2 of them fraud (3 fraud ids, 1 not scored: not in the traffic, or on an invalid line)",
            first.len()
        ),
        format!(
            "  fraud caught:    {caught} of 2 ({:.1} %)",
            caught as f64 * 50.0
        ),
        format!(
            "  legit flagged:   {legit_flagged} of {} (",
            first.len() - 2
        ),
    ] {
        assert!(
            err.lines().any(|l| l.starts_with(&line)),
            "{line:?} not in\n{err}"
        );
    }
    let row = |rule: &str| -> Vec<String> {
        let l = err
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{rule} ")));
        let l = l.unwrap_or_else(|| panic!("no row for {rule}:\n{err}"));
        l.split_whitespace().map(String::from).collect()
    };
    let fired = (decisions.iter())
        .filter(|d| {
            d["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["id"] == "single_txn_limit")
        })
        .count()
        .to_string();
    assert_eq!(
        row("single_txn_limit")[..5],
        ["single_txn_limit", "active", "reject", &fired, "1"]
    );
    assert_eq!(row("card_high_velocity")[1], "shadow");
    assert_eq!(row("merchant_spike")[1], "active");

    // A recording of fraud.outcome is read as it is, with the same report: chargebacks
    // and confirmed fraud are the fraud; refunds and genuine verdicts are not.
    let report = |path: &std::path::Path| {
        let out = fraudgate()
            .args(["replay", "--quiet", "--rules", "rules", "--fraud-ids"])
            .arg(path)
            .arg("docs/sample-traffic.jsonl")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let outcomes = dir.0.join("outcomes.jsonl");
    std::fs::write(
        &outcomes,
        concat!(
            r#"{"id":"stl-2","outcome":"fraud","decision":{"id":"stl-2","action":"reject","rules":[{"id":"single_txn_limit","mode":"active"}]}}"#,
            "\n",
            r#"{"id":"cm-1","outcome":"chargeback"}"#,
            "\n",
            r#"{"id":"stl-1","outcome":"genuine"}"#,
            "\n",
            r#"{"id":"cm-2","outcome":"refund"}"#,
            "\n",
            r#"{"id":"not-in-traffic","outcome":"chargeback"}"#,
            "\n",
        ),
    )
    .unwrap();
    let from_outcomes = report(&outcomes);
    assert!(
        from_outcomes.contains("2 of them fraud (3 fraud ids"),
        "{from_outcomes}"
    );
    assert_eq!(from_outcomes, report(&ids));

    std::fs::write(&ids, "stl-1\nstl-1 cm-1\n").unwrap();
    let out = fraudgate()
        .args(["replay", "--quiet", "--rules", "rules", "--fraud-ids"])
        .arg(&ids)
        .arg("docs/sample-traffic.jsonl")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("line 2: one transaction id per line"), "{err}");
}

/// `loadgen --write` writes labelled traffic without any engine (the same bytes again for
/// the same seed, tag and end), and `replay --fraud-ids` scores the shipped rules on it:
/// every injected transaction is a fraud id, the report counts them all, and the rules
/// catch part of the fraud while holding little of the rest.
#[test]
fn generated_traffic_is_backtested_against_its_own_fraud_ids() {
    let dir = common::Scratch::new("loadgen-write");
    let file = dir.0.join("t.jsonl");
    let ids = dir.0.join("t.jsonl.fraud-ids");
    let write = || {
        let out = fraudgate()
            .args([
                "loadgen",
                "--seed",
                "7",
                "--run-tag",
                "bt",
                "--count",
                "20000",
            ])
            .args(["--events-end", "2026-11-27T18:00:00Z", "--write"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{err}");
        (std::fs::read(&file).unwrap(), std::fs::read(&ids).unwrap())
    };
    let first = write();
    assert_eq!(write(), first, "not deterministic");
    let traffic = String::from_utf8(first.0).unwrap();
    let fraud = String::from_utf8(first.1).unwrap();
    assert_eq!(traffic.lines().count(), 20_000);
    let n_fraud = fraud.lines().count();
    assert!(n_fraud > 50, "{n_fraud} injected");
    for l in fraud.lines() {
        let (id, pattern) = l.split_once("  # ").unwrap();
        assert!(traffic.contains(&format!("\"id\":\"{id}\"")), "{id}");
        assert!(!pattern.is_empty());
    }
    let out = fraudgate()
        .args(["replay", "--quiet", "--rules", "rules", "--fraud-ids"])
        .arg(&ids)
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let head = format!(
        "backtest: 20000 transactions scored, {n_fraud} of them fraud ({n_fraud} fraud ids, 0 not scored: not in the traffic, or on an invalid line)"
    );
    assert!(err.lines().any(|l| l == head), "{head:?} not in\n{err}");
    // "  fraud caught:    C of N (P %): ..." and "  legit flagged:   C of N (P %): ..."
    let share = |prefix: &str| -> f64 {
        let l = err.lines().find(|l| l.starts_with(prefix)).unwrap();
        let p = l.split('(').nth(1).unwrap().split(' ').next().unwrap();
        p.parse().unwrap()
    };
    let (caught, flagged) = (share("  fraud caught:"), share("  legit flagged:"));
    // Per transaction, not per instance: the lead-ins of a pattern (the first tiny
    // amounts of a card test, a duplicate's original) cannot be caught.
    assert!(caught > 10.0, "fraud caught {caught} %:\n{err}");
    assert!(flagged < 5.0, "legit flagged {flagged} %:\n{err}");
}

/// `replay` takes a line without `ts` as received at the latest event time so far, not at
/// the wall clock, which is years away from recorded traffic: its sweep dropped the
/// windows, and the daily limit below was missed.
#[test]
fn replay_takes_a_line_without_ts_at_the_recorded_time() {
    let lines = replay_decisions(
        "replay-no-ts",
        concat!(
            r#"{"id":"r1","ts":"2025-01-01T10:00:00Z","card":"4111111111110001","amount":"10000.50"}"#,
            "\n",
            r#"{"id":"r2","card":"4111111111110002","amount":"5"}"#,
            "\n",
            r#"{"id":"r3","ts":"2025-01-01T10:05:00Z","card":"4111111111110001","amount":"10000"}"#,
            "\n",
        ),
    );
    assert_eq!(lines.len(), 3);
    // Placed at the time of the line before it.
    assert_eq!(lines[1]["ts"], lines[0]["ts"], "{}", lines[1]);
    assert_eq!(
        lines[2]["decided_by"], "reject:daily_card_limit",
        "{}",
        lines[2]
    );
}

/// `replay` refuses a line under an id decided a moment before with other content, as the
/// engine does live (`id_reused`): no decision line, nothing counted, exit 1. The same
/// transaction again is a retry (no error, its original decision again).
#[test]
fn replay_refuses_a_reused_id_as_the_engine_does() {
    let (code, err, lines) = replay(
        "replay-reused",
        concat!(
            r#"{"id":"r1","ts":"2025-01-01T10:00:00Z","card":"4111111111110001","amount":"10000.50"}"#,
            "\n",
            r#"{"id":"r1","ts":"2025-01-01T10:00:00Z","card":"4111111111110001","amount":"10000.5"}"#,
            "\n",
            r#"{"id":"r1","ts":"2025-01-01T10:00:30Z","card":"4111111111110001","amount":"9000"}"#,
            "\n",
            r#"{"id":"r2","ts":"2025-01-01T10:01:00Z","card":"4111111111110001","amount":"9999"}"#,
            "\n",
        ),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("line 3: ") && err.contains("(id_reused)"),
        "{err}"
    );
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0], lines[1]);
    // 10000.50 + 9999 stays under the daily limit of 20000: the 9000 was not counted.
    assert_eq!(lines[2]["action"], "approve", "{}", lines[2]);
}

/// An analyst checks rules against the production config on a machine without the
/// production secret: the hash key cannot change what `check` says, so a missing key
/// variable is no reason to refuse.
#[test]
fn check_works_with_a_production_config_whose_key_variable_is_not_set() {
    let dir = common::Scratch::new("check-offline-key");
    let cfg = dir.0.join("fraudgate.toml");
    std::fs::write(
        &cfg,
        "[engine]\nhash_key_env = \"FRAUDGATE_TEST_KEY_NOT_SET_ANYWHERE\"\n",
    )
    .unwrap();
    let out = fraudgate()
        .args(["check", "rules", "--config"])
        .arg(&cfg)
        .env_remove("FRAUDGATE_TEST_KEY_NOT_SET_ANYWHERE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A key too short for `run` does not stop `check` either: a note, and a throwaway.
    let out = fraudgate()
        .args(["check", "rules", "--config"])
        .arg(&cfg)
        .env("FRAUDGATE_TEST_KEY_NOT_SET_ANYWHERE", "short")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("too short for `run`"), "{stderr}");
    assert!(!stderr.contains("short\n"), "the key echoed: {stderr}");
}

#[test]
fn error_snapshots() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let rules = format!("tests/check/{name}/rules");
        let out = fraudgate().args(["check", &rules]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}: check must fail");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let expected_path = case.join("expected.txt");
        if std::env::var_os("UPDATE_EXPECT").is_some() {
            std::fs::write(&expected_path, &stderr).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if want != stderr {
            failures.push(format!("--- {name}: expected\n{want}\n--- got\n{stderr}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn missing_directory_is_a_clear_error() {
    let out = fraudgate().args(["check", "no/such/dir"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read rule directory no/such/dir"),
        "{stderr}"
    );
}

/// Block-list entries with an end: `check` says how many, when the next ends, and which
/// have ended already (they no longer apply, but still sit in the file).
#[test]
fn list_entries_that_end_are_reported() {
    let dir = common::Scratch::new("check-ends");
    let rules = dir.0.join("rules");
    common::copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"), &rules);
    let list = rules.join("lists/blocked_cards.txt");
    let mut text = std::fs::read_to_string(&list).unwrap();
    text.push_str("4000000000000010 until 2020-01-01  # ended\n");
    text.push_str("4000000000000011 until 2999-12-31  # chargeback case 1234\n");
    std::fs::write(&list, text).unwrap();
    let out = fraudgate().arg("check").arg(&rules).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "list blocked_cards: 2 of 3 entries end, the next at 3000-01-01T00:00:00Z; \
             1 ended already (they no longer apply; remove them from the file)"
        ),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().count(),
        2,
        "one line per list with ends: {stdout}"
    );
}

/// A line with an event time far in the future (a typo, a broken exporter) does not move
/// the replay's clock: it made the next sweep drop every key, and the daily limit below
/// was no longer reached.
#[test]
fn replay_ignores_an_event_time_in_the_future_for_its_clock() {
    let lines = replay_decisions(
        "replay-future",
        concat!(
            r#"{"id":"f1","ts":"2025-01-01T10:00:00Z","card":"4111111111110011","amount":"10000.50"}"#,
            "\n",
            r#"{"id":"f2","ts":"9999-01-01T00:00:00Z","card":"4111111111110012","amount":"5"}"#,
            "\n",
            r#"{"id":"f3","ts":"2025-01-01T10:05:00Z","card":"4111111111110011","amount":"10000"}"#,
            "\n",
        ),
    );
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[2]["decided_by"], "reject:daily_card_limit",
        "{}",
        lines[2]
    );
}

/// A panic outside `run` (here `replay`, deciding a transaction whose id is a card number,
/// with a fail point that panics with the id in its message) is printed with the card
/// number masked: the default hook printed the message as it was.
#[cfg(feature = "failpoints")]
#[test]
fn a_panic_in_replay_is_printed_masked() {
    let dir = common::Scratch::new("replay-panic");
    let file = dir.0.join("traffic.jsonl");
    std::fs::write(
        &file,
        r#"{"id":"failpoint-4111111111111111","card":"4111111111110003","amount":"5"}"#,
    )
    .unwrap();
    let out = fraudgate()
        .args(["replay", "--rules", "rules"])
        .arg(&file)
        // `return` runs the fail point's own panic, which names the id.
        .env("FAILPOINTS", "decide=return")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("failpoint: decide failpoint-411111"), "{err}");
    assert!(!err.contains("4111111111111111"), "{err}");
}
