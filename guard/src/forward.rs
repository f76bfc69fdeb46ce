//! Forwarding to the server the agent asked for: the upstream connection (from the daemon's own,
//! unguarded cgroup, so it escapes the redirect) and byte-for-byte passthrough.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// How long an upstream connect may take before the agent's connection is reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Passthrough buffer, each way.
const PASS_BUF: usize = 64 * 1024;

pub async fn connect(dst: SocketAddr) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Copies both ways until both sides are done; returns (client->server, server->client) bytes.
pub async fn passthrough<A, B>(client: &mut A, server: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // Larger buffers than the 8 KiB default: fewer syscalls per byte on bulk transfers.
    tokio::io::copy_bidirectional_with_sizes(client, server, PASS_BUF, PASS_BUF).await
}

/// Closes `stream` with a RST, so the agent sees its connection reset by the far end rather than
/// an orderly (and misleading) end of stream.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
