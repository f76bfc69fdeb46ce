//! Lowercase hex, for hashes: written digit by digit (a `format!` per byte was a measurable
//! share of every call's cost).

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` in lowercase hex, appended to `out`.
pub fn push(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
}

/// `bytes` in lowercase hex.
pub fn lower(bytes: &[u8]) -> String {
    let mut s = Vec::with_capacity(bytes.len() * 2);
    push(&mut s, bytes);
    // Only ASCII digits and letters were pushed.
    String::from_utf8(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn as_format_writes_it() {
        let bytes: Vec<u8> = (0..=255).collect();
        let want: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(super::lower(&bytes), want);
        assert_eq!(super::lower(&[]), "");
    }
}
