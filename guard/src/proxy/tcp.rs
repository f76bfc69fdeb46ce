//! TCP towards the server the agent asked for: the upstream connection (from the daemon's own,
//! unguarded cgroup, so it escapes the redirect) and byte-for-byte passthrough.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

/// How long an upstream connect may take before the agent's connection is reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn connect(dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if crate::net::canonical_addr(dst).ip().is_loopback() {
        loopback_congestion_control(&socket);
    }
    let s = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Loopback connections (every agent-side socket, and upstream ones to a local server) use
/// CUBIC whatever the host's default: BBR (a common default) paces every send with a timer,
/// which on loopback, where nothing queues, only slows a relay down (a bare splice relay moved
/// ~1.9 GiB/s with BBR and ~2.6 GiB/s with CUBIC here). Hosts without CUBIC keep their default.
pub fn loopback_congestion_control(socket: &impl std::os::fd::AsRawFd) {
    const CUBIC: &[u8] = b"cubic";
    // SAFETY: a valid socket fd and a buffer of the length given.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            CUBIC.as_ptr().cast(),
            CUBIC.len() as libc::socklen_t,
        )
    };
}

/// Splices both ways until both sides are done; returns (client->server, server->client) bytes.
/// The bytes move socket -> pipe -> socket inside the kernel (splice(2)): no user-space buffer
/// per connection, so idle connections cost no memory and bulk transfers no copies.
pub async fn passthrough(client: &mut TcpStream, server: &mut TcpStream) -> io::Result<(u64, u64)> {
    // The first error (a reset, say) ends both directions, as a socket error would.
    tokio::try_join!(
        splice_one_way(client, server),
        splice_one_way(server, client)
    )
}

/// Bytes a pipe holds at most per splice.
const SPLICE_CHUNK: usize = 256 * 1024;

struct Pipe(std::os::fd::OwnedFd, std::os::fd::OwnedFd);

fn pipe() -> io::Result<Pipe> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // Room for one chunk (allocated page by page as data arrives; refused sizes are harmless).
    // SAFETY: a valid pipe fd.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, SPLICE_CHUNK as libc::c_int) };
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    Ok(unsafe {
        Pipe(
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: plain fds, null offsets (sockets and pipes have none).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

async fn splice_one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let pipe = pipe()?;
    let (pr, pw) = (pipe.0.as_raw_fd(), pipe.1.as_raw_fd());
    let (src, dst) = (from.as_raw_fd(), to.as_raw_fd());
    let mut total = 0u64;
    loop {
        // Socket -> pipe (waits for the socket; the pipe is empty here, so it has room).
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || splice(src, pw, SPLICE_CHUNK)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // End of stream: pass the half-close on.
            // SAFETY: valid socket fd.
            unsafe { libc::shutdown(dst, libc::SHUT_WR) };
            return Ok(total);
        }
        // Pipe -> socket, until the pipe is empty again.
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(pr, dst, left)) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer closed")),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// Closes `stream` with a RST, so the agent sees its connection reset by the far end rather than
/// an orderly (and misleading) end of stream.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    fn congestion_control(fd: &impl AsRawFd) -> String {
        let mut buf = [0u8; 16];
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: a valid fd, buffer and length.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        String::from_utf8_lossy(&buf[..len as usize])
            .trim_end_matches('\0')
            .to_string()
    }

    fn cubic_available() -> bool {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
            .is_ok_and(|s| s.split_whitespace().any(|c| c == "cubic"))
    }

    #[test]
    fn cubic_replaces_whatever_the_socket_had() {
        if !cubic_available() {
            eprintln!("skipped: this kernel offers no cubic congestion control");
            return;
        }
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: a valid socket fd and a buffer of the length given.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                b"reno".as_ptr().cast(),
                4,
            )
        };
        assert_eq!(congestion_control(&s), "reno");
        super::loopback_congestion_control(&s);
        assert_eq!(congestion_control(&s), "cubic");
    }

    /// Meaningful on hosts whose default is not CUBIC (BBR here).
    #[tokio::test]
    async fn loopback_sockets_on_both_sides_use_cubic() {
        if !cubic_available() {
            eprintln!("skipped: this kernel offers no cubic congestion control");
            return;
        }
        let std_listener = crate::proxy::bind(0).unwrap().remove(0);
        std_listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let (upstream, accepted) =
            tokio::join!(super::connect(addr), async { listener.accept().await });
        let (accepted, _) = accepted.unwrap();
        // The upstream side (a loopback destination) and the agent side (accepted by the proxy
        // listener, which they inherit it from).
        assert_eq!(congestion_control(&upstream.unwrap()), "cubic");
        assert_eq!(congestion_control(&accepted), "cubic");
    }
}
