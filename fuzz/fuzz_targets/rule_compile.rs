//! Arbitrary text as a rule file through the compiler; what compiles decides a few fixed
//! transactions. Neither may panic; errors must render.
#![no_main]

use fraudgate::rules::{compile, SourceFile};
use fraudgate::{Engine, EngineConfig, Transaction};
use libfuzzer_sys::fuzz_target;

const TXNS: &[&str] = &[
    r#"{"id":"a","card":"4111111111111111","amount":"12.50","merchant":"m1","device":"d1","region":"DE","mcc":5411,"attrs":{"merchant_age_days":3,"phone_match":false}}"#,
    r#"{"id":"b","card":"4111111111111111","amount":"0.01","ts":1795687200000}"#,
    r#"{"id":"c","card":"5500000000000004","amount":"999999999999.99999999","currency":"USD","attrs":{"ip_country":"RU"}}"#,
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = EngineConfig::default();
    let files = vec![SourceFile {
        name: "fuzz.toml".into(),
        text: text.into(),
    }];
    let read = |_: &str| Err(std::io::Error::other("no list files when fuzzing"));
    match compile(files, &read, &cfg) {
        Err(e) => {
            let _ = e.render();
        }
        Ok(rules) => {
            let engine = Engine::new(rules, cfg);
            for (i, t) in TXNS.iter().enumerate() {
                let t = Transaction::from_json(t.as_bytes()).expect("fixed transaction");
                engine.decide(&t, 1_795_687_200_000 + i as i64 * 1_000);
            }
        }
    }
});
