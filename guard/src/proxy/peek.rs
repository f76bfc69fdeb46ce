//! Reading what a client sent without consuming it: the classifier and the ClientHello reader
//! both wait here until their parser has enough bytes.

use std::{io, time::Duration};

use tokio::{net::TcpStream, time::Instant};

/// Why [`peek_until`] gave up.
#[derive(Debug)]
pub enum PeekError<E> {
    /// The client closed before the parser had enough.
    Closed,
    /// The deadline passed first.
    TimedOut,
    /// The buffer filled up and the parser still wanted more.
    Full,
    /// The parser refused the bytes.
    Invalid(E),
    Io(io::Error),
}

/// Peeks at the client's bytes until `parse` returns `Ok(Some(_))` (a result) or `Err` (the
/// bytes are invalid); `Ok(None)` means more bytes are needed. At most `max` bytes are looked
/// at; nothing is consumed. A client that sends a prefix and then waits is waited for, until
/// `deadline`.
pub async fn peek_until<T, E>(
    stream: &TcpStream,
    max: usize,
    deadline: Instant,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, E>,
) -> Result<T, PeekError<E>> {
    let mut buf = vec![0u8; max];
    let mut last = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) => return Err(PeekError::Closed),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(PeekError::Io(e)),
            Err(_) => return Err(PeekError::TimedOut),
        };
        match parse(&buf[..n]) {
            Ok(Some(t)) => return Ok(t),
            Err(e) => return Err(PeekError::Invalid(e)),
            Ok(None) if n == buf.len() => return Err(PeekError::Full),
            Ok(None) => {}
        }
        if n == last {
            // Only a prefix so far: wait for more without spinning on the same bytes.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        last = n;
        if Instant::now() >= deadline {
            return Err(PeekError::TimedOut);
        }
    }
}
