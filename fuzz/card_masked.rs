//! The check the `txn_decode` fuzz target and `tests/fuzz_seeds.rs` both make of a decision:
//! the card appears only masked. Included by path from both (the fuzz crate is built apart
//! from the engine's tests, by `cargo fuzz` on nightly).

/// Panics unless the decision JSON carries the card of `t` only in its masked form: the
/// `card` field and any rule value named `card` are `mask_card(card)`, whose middle is all
/// '*', and the card's digits appear nowhere else (an id holding them is refused, a rule
/// value holding them is masked). Checked for cards of 16 digits or more: shorter ones can
/// equal an amount or a timestamp, which decisions show as they are.
pub fn assert_card_only_masked(t: &fraudgate::Transaction, decision_json: &str, what: &str) {
    let v: serde_json::Value = serde_json::from_str(decision_json).unwrap();
    let digits: String = t.card.chars().filter(char::is_ascii_digit).collect();
    if digits.len() >= 16 && t.card.chars().all(|c| c.is_ascii_digit()) {
        assert!(
            !decision_json.contains(&digits),
            "the card's digits in the decision: {what}"
        );
    }
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
