//! `fraudgate check`: exit codes and snapshot tests of the error output.
//!
//! Each `tests/check/<case>/rules/` is checked; stderr must equal `expected.txt`.
//! `UPDATE_EXPECT=1 cargo test --test check` rewrites the snapshots; review the diff.

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
