//! The frames between `guard wrap` and the daemon on the stdio socket. A frame is a 13-byte
//! header — its kind (1 byte), a sequence number (8 bytes) and the payload's length (4 bytes),
//! little-endian — then the payload. Messages travel as the bytes read, never re-encoded: what
//! the daemon decided is exactly what reaches the server or the agent.

use std::io;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The protocol's version, in [`Hello`]: a daemon and a `guard wrap` of other releases refuse
/// each other with a message instead of misreading frames.
pub const VERSION: u32 = 1;
pub const HEADER: usize = 13;
/// Largest frame either side accepts: a server's answer may be up to this (as over HTTP); an
/// agent's message is bounded by `proxy.max_body`, which [`Welcome`] tells.
pub const MAX_FRAME: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// wrap -> daemon, first: [`Hello`] (JSON).
    Hello = 1,
    /// daemon -> wrap, the answer to it: [`Welcome`] (JSON).
    Welcome = 2,
    /// wrap -> daemon: one line the agent wrote (without its newline).
    FromAgent = 3,
    /// wrap -> daemon: one line the server wrote.
    FromServer = 4,
    /// wrap -> daemon: a line wrap could not pass on ([`Problem`], JSON), to audit and answer.
    Problem = 5,
    /// daemon -> wrap: write the line `seq` to the server as it was read.
    Forward = 16,
    /// daemon -> wrap: write the line `seq` to the agent as it was read.
    Pass = 17,
    /// daemon -> wrap: instead of line `seq`, write the payload (one line) to the agent.
    ToAgent = 18,
    /// daemon -> wrap: instead of line `seq`, write the payload (one line) to the server.
    ToServer = 19,
    /// daemon -> wrap: line `seq` goes nowhere; the payload says why (for wrap's stderr).
    Drop = 20,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::FromAgent,
            4 => Kind::FromServer,
            5 => Kind::Problem,
            16 => Kind::Forward,
            17 => Kind::Pass,
            18 => Kind::ToAgent,
            19 => Kind::ToServer,
            20 => Kind::Drop,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// The frame's bytes.
pub fn encode(kind: Kind, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    encode_into(&mut out, kind, seq, payload);
    out
}

/// Appends the frame's bytes to `out` (several frames, one write).
pub fn encode_into(out: &mut Vec<u8>, kind: Kind, seq: u64, payload: &[u8]) {
    out.push(kind as u8);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Reads one frame; None at a clean end of the stream (between frames).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    read_frame_limited(r, |_| MAX_FRAME).await
}

/// [`read_frame`], refusing a frame of kind `k` longer than `limit(k)`. The payload's memory
/// grows with the bytes that arrive, not with the length the header claims.
pub async fn read_frame_limited<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: impl Fn(Kind) -> usize,
) -> io::Result<Option<Frame>> {
    let mut head = [0u8; HEADER];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..]).await?;
    let kind = Kind::from_u8(head[0]).ok_or_else(|| bad(format!("frame kind {}", head[0])))?;
    let seq = u64::from_le_bytes(head[1..9].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(head[9..13].try_into().unwrap_or_default()) as usize;
    let max = limit(kind).min(MAX_FRAME);
    if len > max {
        return Err(bad(format!(
            "a {kind:?} frame of {len} bytes (at most {max})"
        )));
    }
    let mut payload = Vec::with_capacity(len.min(64 << 10));
    (&mut *r).take(len as u64).read_to_end(&mut payload).await?;
    if payload.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(Frame { kind, seq, payload }))
}

fn bad(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("stdio protocol: {what}"),
    )
}

/// What `guard wrap` says first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub v: u32,
    /// `--server NAME`.
    #[serde(default)]
    pub server: Option<String>,
    /// The server's command line as wrap starts it. The daemon checks it against the wrapping
    /// process's own command line.
    pub command: Vec<String>,
}

/// The daemon's answer to [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Welcome {
    pub ok: bool,
    /// Why the session is refused (`ok` false): wrap prints it and does not start the server.
    #[serde(default)]
    pub error: Option<String>,
    /// The policy-named server; None: an unknown server, under `unknown_servers`.
    #[serde(default)]
    pub server: Option<String>,
    /// Whether to start the server: false when every message would be refused anyway (an
    /// unknown server under `unknown_servers = "deny"`); wrap then answers the agent alone,
    /// through the daemon.
    #[serde(default)]
    pub start: bool,
    /// `proxy.max_body`: the longest line an agent may send.
    #[serde(default)]
    pub max_body: usize,
}

/// A line wrap could not hand over whole.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    /// `agent` or `server`.
    pub from: String,
    /// `over_max` (longer than allowed: not read to its end) or `partial` (no newline before
    /// the stream ended).
    pub what: String,
    /// The line's length as far as it was read.
    pub bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_errors() {
        let mut bytes = encode(Kind::FromAgent, 7, b"{\"a\":1}");
        encode_into(&mut bytes, Kind::Pass, u64::MAX, b"");
        let mut r = &bytes[..];
        let f = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(
            (f.kind, f.seq, &f.payload[..]),
            (Kind::FromAgent, 7, &b"{\"a\":1}"[..])
        );
        let f = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((f.kind, f.seq, f.payload.len()), (Kind::Pass, u64::MAX, 0));
        assert!(read_frame(&mut r).await.unwrap().is_none());
        // A frame cut short, an unknown kind, an oversize length: errors, never a short read.
        let cut = encode(Kind::FromServer, 1, b"abcdef");
        assert!(read_frame(&mut &cut[..cut.len() - 1]).await.is_err());
        let mut unknown = encode(Kind::FromServer, 1, b"x");
        unknown[0] = 99;
        assert!(read_frame(&mut &unknown[..]).await.is_err());
        let mut huge = encode(Kind::FromServer, 1, b"");
        huge[9..13].copy_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
        assert!(read_frame(&mut &huge[..]).await.is_err());
    }
}
