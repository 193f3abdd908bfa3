//! The check the `txn_decode` fuzz target and `tests/fuzz_seeds.rs` both make of a decision:
//! the card appears only masked. Included by path from both (the fuzz crate is built apart
//! from the engine's tests, by `cargo fuzz` on nightly).

/// Panics unless the decision JSON carries the card of `t` only in its masked form: the
/// `card` field and any rule value named `card` are `mask_card(card)`, whose middle is all
/// '*'. The id, merchant and other fields are echoed as sent, whatever they contain.
pub fn assert_card_only_masked(t: &fraudgate::Transaction, decision_json: &str, what: &str) {
    let v: serde_json::Value = serde_json::from_str(decision_json).unwrap();
    let masked = fraudgate::txn::mask_card(&t.card);
    assert_eq!(v["card"], masked.as_str(), "{what}");
    for r in v["rules"].as_array().unwrap() {
        if !r["values"]["card"].is_null() {
            assert_eq!(
                r["values"]["card"],
                masked.as_str(),
                "card in a rule value: {what}"
            );
        }
    }
    let chars: Vec<char> = masked.chars().collect();
    if chars.len() >= 13 {
        assert!(
            chars[6..chars.len() - 4].iter().all(|&c| c == '*'),
            "{masked}: {what}"
        );
    }
}
