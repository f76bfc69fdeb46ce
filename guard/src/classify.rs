//! What a redirected connection speaks, from its first bytes (peeked, not consumed).

use std::{io, time::Duration};

use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TLS handshake record.
    Tls,
    /// An HTTP/1.x request line.
    Http,
    /// HTTP/2 with prior knowledge (cleartext, the `PRI * HTTP/2.0` preface).
    H2c,
    /// Anything else, including protocols where the server speaks first.
    Other,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tls => "tls",
            Kind::Http => "http",
            Kind::H2c => "h2c",
            Kind::Other => "tcp",
        }
    }
}

const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies `b`; `None` while `b` is still a prefix of something recognisable.
pub fn classify(b: &[u8]) -> Option<Kind> {
    if b.is_empty() {
        return None;
    }
    if b[0] == 0x16 {
        // ContentType handshake, then the record's major version 3.
        return match b.get(1) {
            None => None,
            Some(3) => Some(Kind::Tls),
            Some(_) => Some(Kind::Other),
        };
    }
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    if b.len() >= PREFACE.len() && &b[..PREFACE.len()] == PREFACE {
        return Some(Kind::H2c);
    }
    let mut prefix = PREFACE.starts_with(b);
    for m in METHODS {
        if b.len() >= m.len() {
            if &b[..m.len()] == *m {
                return Some(Kind::Http);
            }
        } else if m.starts_with(b) {
            prefix = true;
        }
    }
    if prefix {
        None
    } else {
        Some(Kind::Other)
    }
}

/// How long a client may take to send enough bytes to be classified, once it sent some.
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// Peeks at the client's first bytes until they classify. Returns `Other` when the client sends
/// nothing classifiable within the timeout, and an error when it closes first.
pub async fn peek(client: &TcpStream) -> io::Result<Kind> {
    {
        let mut buf = [0u8; 16];
        let deadline = tokio::time::Instant::now() + CLASSIFY_TIMEOUT;
        loop {
            let n = match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => return Ok(Kind::Other),
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed",
                ));
            }
            if let Some(k) = classify(&buf[..n]) {
                return Ok(k);
            }
            if n == buf.len() {
                return Ok(Kind::Other);
            }
            // Only a prefix so far: wait for more without spinning on the same bytes.
            tokio::time::sleep(Duration::from_millis(2)).await;
            if tokio::time::Instant::now() >= deadline {
                return Ok(Kind::Other);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Kind::Tls));
        assert_eq!(classify(b"\x16"), None);
        assert_eq!(classify(b"\x16\x01"), Some(Kind::Other));
        assert_eq!(classify(b"POST /mcp HTTP/1.1\r\n"), Some(Kind::Http));
        assert_eq!(classify(b"GET / HTTP/1.1"), Some(Kind::Http));
        assert_eq!(classify(b"DELETE /mcp"), Some(Kind::Http));
        assert_eq!(classify(b"PO"), None);
        assert_eq!(classify(b"GETX"), Some(Kind::Other));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Kind::Other));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Kind::H2c));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b""), None);
    }
}
