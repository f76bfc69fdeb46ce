//! The key canonicaliser and the strict JSON reader: folding is idempotent and never reaches
//! ASCII from other letters than the three that do (Kelvin, long s, dotless i); JSON read once reads back the same.
#![no_main]
use guard::mcp::wire::{fold_key, read_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let once = fold_key(s).into_owned();
        assert_eq!(fold_key(&once), once, "idempotent");
        let ascii_in = s
            .chars()
            .filter(|c| c.is_ascii() || matches!(c, '\u{212A}' | '\u{17F}' | '\u{131}'))
            .count();
        assert_eq!(once.chars().filter(char::is_ascii).count(), ascii_in);
    }
    if let Ok(v) = read_json(data) {
        let again = read_json(&serde_json::to_vec(&v).unwrap()).expect("guard's own output reads");
        assert_eq!(v, again);
    }
});
