//! The fuzz seed corpus (`fuzz/seeds/`), including every input a fuzzer once crashed on,
//! through the same code as the fuzz targets, on stable and in every test run: the decoder
//! and the compiler return errors, never panic, and what they accept can be decided.

use std::path::Path;

use fraudgate::rules::{compile, SourceFile};
use fraudgate::{Engine, EngineConfig, Transaction};

#[path = "../fuzz/card_masked.rs"]
mod card_masked;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(v.len() >= 10, "seed corpus of {target} is missing");
    v
}

#[test]
fn transaction_seeds_decode_or_fail_cleanly() {
    let cfg = EngineConfig::default();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let engine = Engine::new(fraudgate::load_dir(&rules, &cfg).unwrap(), cfg);
    let (mut ok, mut bad) = (0, 0);
    for (name, data) in seeds("txn_decode") {
        match Transaction::from_json(&data) {
            Ok(t) => {
                ok += 1;
                let d = engine.decide(&t, t.ts_ms.unwrap_or(1_795_687_200_000));
                // The card only masked (the same check as the fuzz target).
                card_masked::assert_card_only_masked(&t, &d.decision.to_json(), &name);
            }
            Err(e) => {
                bad += 1;
                assert!(!e.message.is_empty(), "{name}");
            }
        }
    }
    assert!(ok > 0 && bad > 0, "{ok} decoded, {bad} refused");
}

#[test]
fn rule_seeds_compile_or_fail_cleanly() {
    let cfg = EngineConfig::default();
    let read = |_: &str| Err(std::io::Error::other("no list files"));
    for (name, data) in seeds("rule_compile") {
        let Ok(text) = String::from_utf8(data) else {
            continue;
        };
        let files = vec![SourceFile {
            name: "seed.toml".into(),
            text,
        }];
        match compile(files, &read, &cfg) {
            Err(e) => assert!(!e.render().is_empty(), "{name}"),
            Ok(rs) => {
                let e = Engine::new(rs, cfg.clone());
                let t = Transaction::from_json(
                    br#"{"id":"a","card":"4111111111111111","amount":"12.50","merchant":"m","device":"d","region":"DE","mcc":5411}"#,
                )
                .unwrap();
                e.decide(&t, 1_795_687_200_000);
            }
        }
    }
}
