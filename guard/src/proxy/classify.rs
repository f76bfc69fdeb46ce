//! What a redirected connection speaks, from its first bytes (peeked, not consumed).

use std::{io, time::Duration};

use tokio::net::TcpStream;

use super::peek::{peek_until, PeekError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TLS handshake record.
    Tls,
    /// An HTTP/1.x request line.
    Http,
    /// HTTP/2 with prior knowledge (cleartext, the `PRI * HTTP/2.0` preface).
    H2c,
    /// A request line that is not HTTP/1.x as guard serves it, but that a lenient server may
    /// read as a request: another version (`HTTP/2.0`, `HTTP/0.9`, `RTSP/1.0`), or runs of
    /// blanks between its parts. Never served; refused wherever a request would be decided.
    HttpLike,
    /// Anything else, including protocols where the server speaks first.
    Other,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tls => "tls",
            Kind::Http => "http",
            Kind::H2c => "h2c",
            Kind::HttpLike => "http-like",
            Kind::Other => "tcp",
        }
    }
}

/// How many bytes of a request line guard waits for. A stream still undecided when they are all
/// there is HTTP-shaped (empty lines, a method token, a target): it is served as HTTP, whose
/// parser refuses what it cannot read, and never passed through unread because it is long.
const MAX_REQUEST_LINE: usize = 8192;

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Classifies `b`; `None` while `b` could still become something recognisable.
///
/// HTTP is recognised by the request-line grammar (`token SP target SP HTTP/1.x`), for every
/// method of any length and after any number of the empty lines servers are told to skip
/// (RFC 9112 §2.2), so no request line a server would accept is passed through unread.
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
    if PREFACE.starts_with(b) {
        return None;
    }
    // Leading CRLFs, as many as there are.
    let start = b.iter().position(|c| *c != b'\r' && *c != b'\n')?;
    let line = &b[start..];
    // method
    let m = line.iter().position(|c| !is_tchar(*c))?;
    if m == 0 || !is_blank(line[m]) {
        return Some(Kind::Other);
    }
    let (gap1, rest) = skip_blanks(&line[m..])?;
    // target
    let t = rest
        .iter()
        .position(|c| c.is_ascii_whitespace() || *c < 0x21 || *c == 0x7f)?;
    if !is_blank(rest[t]) {
        // A line end right after the target (HTTP/0.9, no body), or a control byte.
        return Some(Kind::Other);
    }
    let (gap2, v) = skip_blanks(&rest[t..])?;
    const HTTP1: &[u8] = b"HTTP/1.";
    let exact = gap1 == b" " && gap2 == b" ";
    if exact && v.starts_with(HTTP1) {
        return Some(Kind::Http);
    }
    if exact && HTTP1.starts_with(v) {
        return None;
    }
    // Not the exact HTTP/1.x line: a request line all the same when its version reads like
    // one (`HTTP/2.0`, `RTSP/1.0`, `http/1.1`, or HTTP/1.1 after runs of blanks) — lenient
    // servers take those.
    const MAX_VERSION: usize = 32;
    let end = v
        .iter()
        .take(MAX_VERSION + 1)
        .position(|c| c.is_ascii_whitespace() || c.is_ascii_control());
    let Some(end) = end else {
        return (v.len() > MAX_VERSION).then_some(Kind::Other);
    };
    if is_version(&v[..end]) {
        Some(Kind::HttpLike)
    } else {
        Some(Kind::Other)
    }
}

/// What lenient servers take for the space between a request line's parts (Netty: VT, FF).
fn is_blank(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | 0x0b | 0x0c)
}

/// The blanks at the start of `b` (there is at least one), and what follows. `None` while
/// nothing but blanks has come.
fn skip_blanks(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = b.iter().position(|c| !is_blank(*c))?;
    Some(b.split_at(n))
}

/// `NAME/major[.minor]`: a protocol version as request lines spell it. Any name: Node's parser
/// takes RTSP and ICE lines for HTTP, Netty any `NAME/d.d`.
fn is_version(v: &[u8]) -> bool {
    let Some(slash) = v.iter().position(|c| *c == b'/') else {
        return false;
    };
    let (name, num) = (&v[..slash], &v[slash + 1..]);
    let digits = |d: &[u8]| !d.is_empty() && d.iter().all(u8::is_ascii_digit);
    let num_ok = match num.iter().position(|c| *c == b'.') {
        Some(dot) => digits(&num[..dot]) && digits(&num[dot + 1..]),
        None => digits(num),
    };
    !name.is_empty() && name.len() <= 16 && name.iter().all(|c| is_tchar(*c)) && num_ok
}

/// Classifies what the client has sent so far, without waiting: `None` when that is not enough
/// (or nothing yet).
pub fn peek_now(client: &TcpStream) -> Option<Kind> {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 512];
    // SAFETY: a valid buffer of the length given; MSG_PEEK leaves the bytes in the socket.
    let n = unsafe {
        libc::recv(
            client.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n <= 0 {
        return None;
    }
    classify(&buf[..n as usize])
}

/// Peeks at the client's first bytes until they classify (nothing is consumed). There is no
/// classification by time: a client that waits is waited for (until `idle`, then the
/// connection is closed), so waiting cannot turn HTTP into an unread passthrough. An error when
/// the client closes or stays silent.
pub async fn peek(client: &TcpStream, idle: Duration) -> io::Result<Kind> {
    let deadline = tokio::time::Instant::now() + idle;
    let parse = |b: &[u8]| Ok::<_, std::convert::Infallible>(classify(b));
    match peek_until(client, MAX_REQUEST_LINE + 128, deadline, parse).await {
        Ok(k) => Ok(k),
        // Still undecided after a whole request line's worth: HTTP-shaped, and served as HTTP
        // (hyper refuses a line it cannot read), never passed through unread.
        Err(PeekError::Full) => Ok(Kind::Http),
        Err(PeekError::Closed) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "client closed",
        )),
        Err(PeekError::TimedOut) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client sent nothing classifiable",
        )),
        Err(PeekError::Io(e)) => Err(e),
        Err(PeekError::Invalid(never)) => match never {},
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
        assert_eq!(
            classify(b"DELETE /mcp"),
            None,
            "the request line is not complete yet"
        );
        assert_eq!(classify(b"PO"), None);
        assert_eq!(
            classify(&[b'A'; 40]),
            None,
            "a method of any length may still be followed by a target"
        );
        assert_eq!(
            classify(b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA /mcp HTTP/1.1\r\n"),
            Some(Kind::Http)
        );
        assert_eq!(
            classify(&[b"\r\n".repeat(100).as_slice(), b"POST /mcp HTTP/1.1\r\n"].concat()),
            Some(Kind::Http),
            "any number of empty lines"
        );
        let long = [b"POST /".as_slice(), &[b'a'; 20_000]].concat();
        assert_eq!(classify(&long), None, "a long target is still HTTP-shaped");
        assert_eq!(classify(b"GETX"), None, "could still be a method token");
        assert_eq!(classify(b"GETX / HTTP/1.1\r\n"), Some(Kind::Http));
        assert_eq!(classify(b"PROPFIND /x HTTP/1.1\r\n"), Some(Kind::Http));
        assert_eq!(
            classify(b"\r\n\r\nPOST /mcp HTTP/1.1\r\n"),
            Some(Kind::Http)
        );
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(
            classify(b"SET k v\r\n"),
            Some(Kind::Other),
            "a Redis inline command"
        );
        assert_eq!(classify(b"POST /mcp HTTP/1."), Some(Kind::Http));
        assert_eq!(classify(b"POST /mcp HT"), None);
        assert_eq!(
            classify(b"POST /mcp XYZ"),
            None,
            "the version is not complete yet"
        );
        assert_eq!(classify(b"POST /mcp XYZ\r\n"), Some(Kind::Other));
        for like in [
            &b"POST /mcp HTTP/2.0\r\n"[..],
            b"POST /mcp HTTP/0.9\r\n",
            b"POST /mcp HTTP/3.7 \r\n",
            b"POST /mcp http/1.1\r\n",
            b"POST /mcp RTSP/1.0\r\n",
            b"POST /mcp ICE/1\n",
            b"POST  /mcp HTTP/1.1\r\n",
            b"POST /mcp  HTTP/1.1\r\n",
            b"POST\t/mcp\tHTTP/1.1\r\n",
        ] {
            assert_eq!(
                classify(like),
                Some(Kind::HttpLike),
                "{}",
                String::from_utf8_lossy(like)
            );
        }
        assert_eq!(classify(b"POST /mcp HTTP/2.0"), None);
        assert_eq!(
            classify(b"INVITE sip:x SIP/2.0\r\n"),
            Some(Kind::HttpLike),
            "Netty reads it"
        );
        assert_eq!(
            classify(b"POST\x0b/mcp\x0bHTTP/1.1\r\n"),
            Some(Kind::HttpLike)
        );
        assert_eq!(classify(b"POST /mcp FOO/1.1\r\n"), Some(Kind::HttpLike));
        assert_eq!(classify(b"POST  /mcp"), None);
        assert_eq!(
            classify(&[b"POST /mcp ".as_slice(), &[b'v'; 40]].concat()),
            Some(Kind::Other)
        );
        assert_eq!(
            classify(b"GET /\r\n"),
            Some(Kind::Other),
            "HTTP/0.9 is not spoken"
        );
        assert_eq!(classify(b"\x00\x01 hi"), Some(Kind::Other));
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2p1\r\n"), Some(Kind::Other));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Kind::H2c));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b""), None);
    }
}
