//! Keys as case-insensitive decoders read them. Both the wire rule (two keys one decoder reads
//! as one are refused) and policy conditions (a key the server reads as the one a condition
//! names) need the same folding.

/// A key as a case-insensitive decoder reads it: every letter replaced by one member of its
/// case orbit (Go's encoding/json matches keys to fields with Unicode simple case folding, so
/// `K`, `k` and U+212A KELVIN SIGN are one letter, as are `s`, `S` and U+017F LONG S, and `µ`,
/// `μ` and `Μ`). It may fold more than simple folding does (`ı` with `i`): that only refuses
/// more, never reads two keys as different that a decoder reads as one.
pub fn fold_key(k: &str) -> std::borrow::Cow<'_, str> {
    if k.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()) {
        return std::borrow::Cow::Borrowed(k);
    }
    std::borrow::Cow::Owned(k.chars().map(fold_char).collect())
}

/// One letter's representative: the lower case of its upper case, where both are one letter.
fn fold_char(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    // The three pairs simple folding joins whose upper cases are several letters (Unicode
    // CaseFolding.txt, status S).
    match c {
        '\u{1FD3}' => return '\u{390}',
        '\u{1FE3}' => return '\u{3B0}',
        '\u{FB06}' => return '\u{FB05}',
        _ => {}
    }
    fn single(mut it: impl Iterator<Item = char>) -> Option<char> {
        let first = it.next()?;
        it.next().is_none().then_some(first)
    }
    match single(c.to_uppercase()) {
        Some(u) => single(u.to_lowercase()).unwrap_or(u),
        None => single(c.to_lowercase()).unwrap_or(c),
    }
}
