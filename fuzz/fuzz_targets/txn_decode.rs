//! Arbitrary bytes into the transaction decoder; what decodes is decided by the engine
//! with the shipped rules. Neither may panic.
#![no_main]

use std::sync::OnceLock;

use fraudgate::{Engine, EngineConfig, Transaction};
use libfuzzer_sys::fuzz_target;

#[path = "../card_masked.rs"]
mod card_masked;

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let cfg = EngineConfig::default();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
        let rules = fraudgate::load_dir(&dir, &cfg).expect("shipped rules compile");
        Engine::new(rules, cfg)
    })
}

fuzz_target!(|data: &[u8]| {
    use std::sync::atomic::{AtomicI64, Ordering};
    // The clock advances a second per input and idle state is swept, as in the service,
    // so a long run stays within the fuzzer's memory limit.
    static RUNS: AtomicI64 = AtomicI64::new(0);
    if let Ok(t) = Transaction::from_json(data) {
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let now = 1_795_687_200_000 + run * 1_000;
        if run % 4_096 == 0 {
            engine().evict_idle(now);
        }
        let out = engine().decide(&t, now);
        // The decision must serialize and parse, and carry the card only masked.
        let json = out.decision.to_json();
        if out.duplicate || out.id_reused {
            // An id seen before (a retry, or refused as another transaction under it):
            // the first transaction's decision, its card.
            serde_json::from_str::<serde_json::Value>(&json).unwrap();
            return;
        }
        card_masked::assert_card_only_masked(&t, &json, "fuzz input");
    }
});
