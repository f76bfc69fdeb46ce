//! Finding a value in the policy text by its field path, for `file:line:col` error messages.
//!
//! serde tells us *which* field is wrong (through `serde_path_to_error`) and the semantic checks
//! know the path of what they reject; this small JSON scanner maps such a path (keys and array
//! indexes) to the byte offset of the value (or of its key) in the original text. It is lenient:
//! on text it cannot follow it returns the deepest position it reached.

use std::fmt::Write as _;

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

impl From<&str> for Seg {
    fn from(s: &str) -> Seg {
        Seg::Key(s.to_owned())
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Seg {
        Seg::Index(i)
    }
}

/// `tools.x.when[0].value`.
/// `tools.x.action: what`, or just `what` for the whole file.
pub(super) fn message_at(path: &[Seg], what: String) -> String {
    if path.is_empty() {
        what
    } else {
        format!("{}: {what}", display_path(path))
    }
}

pub(super) fn display_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

/// The byte offset of the value at `path` (of its key instead, with `want_key`, when the last
/// step is a key), and whether the whole path was found. Of duplicate keys the last one counts
/// (as it does for serde maps).
pub(super) fn locate(text: &str, path: &[Seg], want_key: bool) -> (usize, bool) {
    let mut sc = Scanner {
        b: text.as_bytes(),
        i: 0,
    };
    for (depth, seg) in path.iter().enumerate() {
        sc.ws();
        let here = sc.i;
        let last = depth + 1 == path.len();
        match seg {
            Seg::Key(key) => {
                let Some((key_at, value_at)) = sc.find_key(key) else {
                    return (here, false);
                };
                if last && want_key {
                    return (key_at, true);
                }
                sc.i = value_at;
            }
            Seg::Index(n) => {
                let Some(value_at) = sc.find_index(*n) else {
                    return (here, false);
                };
                sc.i = value_at;
            }
        }
    }
    sc.ws();
    (sc.i, true)
}

/// 1-based line and column (columns count characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |p| p + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Byte offset of a 1-based line and a 1-based *byte* column (serde_json's positions).
pub(super) fn offset_of(text: &str, line: usize, byte_col: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match text[start..].find('\n') {
            Some(p) => start += p + 1,
            None => return text.len(),
        }
    }
    let line_len = text[start..].find('\n').unwrap_or(text.len() - start);
    start + byte_col.saturating_sub(1).min(line_len)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        if self.peek()? == c {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    /// Key and value offsets of the last member named `key` of the object at the cursor.
    fn find_key(&mut self, key: &str) -> Option<(usize, usize)> {
        self.eat(b'{')?;
        let mut found = None;
        self.ws();
        if self.peek() == Some(b'}') {
            return None;
        }
        loop {
            self.ws();
            let key_at = self.i;
            let Some(k) = self.string() else {
                return found;
            };
            if self.eat(b':').is_none() {
                return found;
            }
            self.ws();
            if k == key {
                found = Some((key_at, self.i));
            }
            if self.skip_value().is_none() {
                return found;
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                _ => return found,
            }
        }
    }

    /// Offset of element `n` of the array at the cursor.
    fn find_index(&mut self, n: usize) -> Option<usize> {
        self.eat(b'[')?;
        self.ws();
        if self.peek() == Some(b']') {
            return None;
        }
        let mut idx = 0;
        loop {
            self.ws();
            if idx == n {
                return Some(self.i);
            }
            self.skip_value()?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                _ => return None,
            }
            idx += 1;
        }
    }

    /// A JSON string at the cursor, unescaped.
    fn string(&mut self) -> Option<String> {
        if self.peek()? != b'"' {
            return None;
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let c = self.peek()?;
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.peek()?;
                    self.i += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xD800..0xDC00).contains(&cp)
                                && self.b.get(self.i..self.i + 2) == Some(b"\\u")
                            {
                                let save = self.i;
                                self.i += 2;
                                let lo = self.hex4()?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                                } else {
                                    self.i = save;
                                }
                            }
                            let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return None,
                    }
                }
                _ => out.push(c),
            }
        }
        String::from_utf8(out).ok()
    }

    fn hex4(&mut self) -> Option<u32> {
        let s = std::str::from_utf8(self.b.get(self.i..self.i + 4)?).ok()?;
        let v = u32::from_str_radix(s, 16).ok()?;
        self.i += 4;
        Some(v)
    }

    fn skip_value(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'{' => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.ws();
                    self.string()?;
                    self.eat(b':')?;
                    self.skip_value()?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.skip_value()?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b'"' => self.string().map(drop),
            _ => {
                let start = self.i;
                while self.i < self.b.len()
                    && !matches!(
                        self.b[self.i],
                        b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r'
                    )
                {
                    self.i += 1;
                }
                (self.i > start).then_some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(segs: &[Seg]) -> Vec<Seg> {
        segs.to_vec()
    }

    #[test]
    fn finds_nested_values_keys_and_indexes() {
        let text =
            "{\n  \"a\": {\"b\": [1, {\"c\": \"x\"}]},\n  \"é\": \"\\u00e9\\\"\", \"d\": 2\n}";
        let at = |path: &[Seg], key| {
            let (off, ok) = locate(text, path, key);
            assert!(ok, "{path:?}");
            line_col(text, off)
        };
        assert_eq!(at(&[], false), (1, 1));
        assert_eq!(at(&p(&["a".into()]), false), (2, 8));
        assert_eq!(at(&p(&["a".into()]), true), (2, 3));
        assert_eq!(
            at(&p(&["a".into(), "b".into(), 1.into(), "c".into()]), false),
            (2, 24)
        );
        assert_eq!(at(&p(&["d".into()]), false), (3, 25));
        assert_eq!(at(&p(&["é".into()]), false), (3, 8));
    }

    #[test]
    fn missing_path_returns_deepest_position() {
        let text = "{\"a\": {\"b\": 1}}";
        let (off, ok) = locate(text, &["a".into(), "zz".into()], false);
        assert!(!ok);
        assert_eq!(off, 6);
    }

    #[test]
    fn duplicate_keys_last_wins() {
        let text = "{\"a\": 1, \"a\": 2}";
        assert_eq!(locate(text, &["a".into()], false), (14, true));
    }

    #[test]
    fn paths_display() {
        assert_eq!(
            display_path(&["grants".into(), 0.into(), "tools".into(), "x".into()]),
            "grants[0].tools.x"
        );
    }

    #[test]
    fn serde_positions_to_offsets() {
        let text = "ab\ncdé\nf";
        assert_eq!(offset_of(text, 2, 3), 5);
        assert_eq!(offset_of(text, 9, 3), text.len());
        assert_eq!(line_col(text, 5), (2, 3));
    }
}
