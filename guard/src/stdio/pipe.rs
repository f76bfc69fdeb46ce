//! The agent's ends (wrap's stdin and stdout) read and written by the runtime itself where
//! they are pipes or sockets: non-blocking, polled with epoll like the server's pipes.
//! `tokio::io::stdin()`/`stdout()` hand every read and write to a blocking thread and back,
//! two thread switches per line each way, which is most of what a relay hop costs.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{unix::AsyncFd, AsyncRead, AsyncWrite, ReadBuf};

/// A non-blocking duplicate of one of wrap's standard descriptors. The file status flags it
/// changes (O_NONBLOCK) are the open file description's: they are put back when it is dropped.
pub struct Pipe {
    fd: AsyncFd<OwnedFd>,
    flags: libc::c_int,
}

/// `fd` (0 or 1) as a [`Pipe`], when it is a pipe or a socket that no other descriptor of
/// this process shares: a terminal or a file stays with tokio's blocking reads, and stdout
/// shared with stderr (`2>&1`) too, since CMD inherits stderr and must not find it
/// non-blocking.
pub fn open(fd: RawFd) -> Option<Pipe> {
    // SAFETY: fstat into a zeroed struct; fd is one of this process's standard descriptors.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st) == 0).then_some(st)?
    };
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFIFO && kind != libc::S_IFSOCK {
        return None;
    }
    if fd == 1 && same_file(1, 2) {
        return None;
    }
    // SAFETY: a valid descriptor of this process, only borrowed to duplicate it.
    let dup = unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .ok()?;
    // SAFETY: fcntl on a descriptor this process owns.
    let flags = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        || unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return None;
    }
    // SAFETY: the AsyncFd owns the duplicate: it stays open, and the same, for its whole life.
    match unsafe { AsyncFd::register(dup) } {
        Ok(fd) => Some(Pipe { fd, flags }),
        Err(_) => None,
    }
}

/// Whether descriptors `a` and `b` are the same file (device and inode).
fn same_file(a: RawFd, b: RawFd) -> bool {
    // SAFETY: fstat into zeroed structs.
    unsafe {
        let (mut x, mut y): (libc::stat, libc::stat) = (std::mem::zeroed(), std::mem::zeroed());
        libc::fstat(a, &mut x) == 0
            && libc::fstat(b, &mut y) == 0
            && x.st_dev == y.st_dev
            && x.st_ino == y.st_ino
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: fcntl on the descriptor this Pipe owns.
        unsafe { libc::fcntl(self.fd.get_ref().as_raw_fd(), libc::F_SETFL, self.flags) };
    }
}

impl AsyncRead for Pipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let got = ready.try_io(|fd| {
                // SAFETY: reading into initialised memory of the given length.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match got {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut ready = ready!(self.fd.poll_write_ready(cx))?;
            let put = ready.try_io(|fd| {
                // SAFETY: writing from a slice of the given length.
                let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match put {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn a_pipe_is_read_and_written_without_blocking_threads() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let mk = |fd: OwnedFd| {
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
            Pipe {
                // SAFETY: the AsyncFd owns the descriptor.
                fd: unsafe { AsyncFd::register(fd) }.unwrap(),
                flags,
            }
        };
        rt.block_on(async {
            let (mut r, mut w) = (mk(r), mk(w));
            // More than a pipe holds: the writer must wait for the reader.
            let big = vec![7u8; 1 << 20];
            let writer = tokio::spawn(async move {
                w.write_all(&big).await.unwrap();
            });
            let mut got = vec![0u8; 1 << 20];
            r.read_exact(&mut got).await.unwrap();
            writer.await.unwrap();
            assert!(got.iter().all(|b| *b == 7));
        });
    }
}
