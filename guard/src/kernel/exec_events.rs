//! The kernel's process events (the proc connector, `NETLINK_CONNECTOR` / `CN_IDX_PROC`):
//! every exec on the host, told after the fact. Enrolment uses them where it cannot mark at
//! exec: the daemon learns of an agent's exec microseconds to milliseconds after it, so a
//! connect in between is not redirected (README "Enrolment").

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{bail, Result};

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const NLMSG_DONE: u16 = 3;
const PROC_EVENT_EXEC: u32 = 2;
/// `struct nlmsghdr`, then `struct cn_msg` (id, seq, ack, len, flags).
const NLMSG_HDR: usize = 16;
const CN_MSG_HDR: usize = 20;

/// A subscription to the host's process events.
pub struct ExecEvents {
    fd: OwnedFd,
}

impl ExecEvents {
    /// Subscribes (root, or CAP_NET_ADMIN). The socket is non-blocking.
    pub fn subscribe() -> Result<ExecEvents> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            bail!("netlink connector socket: {}", io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor this process just opened.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a zeroed sockaddr_nl with its family and group set, of its own size.
        let bound = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            sa.nl_groups = CN_IDX_PROC;
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound < 0 {
            bail!("binding the proc connector: {}", io::Error::last_os_error());
        }
        let mut msg = Vec::with_capacity(NLMSG_HDR + CN_MSG_HDR + 4);
        let len = (NLMSG_HDR + CN_MSG_HDR + 4) as u32;
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: sending a buffer of the given length on our socket.
        let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            bail!(
                "subscribing to process events: {}",
                io::Error::last_os_error()
            );
        }
        Ok(ExecEvents { fd })
    }

    /// The tgids of the execs received so far (empty when none is waiting; the socket does not
    /// block). Err: the socket failed (an overrun, ENOBUFS, is not one: events were lost, and
    /// the daemon's scans find what they were).
    pub fn drain(&self) -> io::Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: receiving into a buffer of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(out),
                    Some(libc::ENOBUFS) | Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            out.extend(parse(&buf[..n as usize]));
        }
    }
}

impl std::os::fd::AsRawFd for ExecEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// The exec events' tgids in one datagram (netlink messages, each a `cn_msg` holding a
/// `proc_event`: what, cpu, timestamp, then for an exec the pid and tgid).
pub fn parse(mut b: &[u8]) -> Vec<u32> {
    let u32_at = |b: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
    };
    let mut out = Vec::new();
    while let Some(len) = u32_at(b, 0) {
        let len = len as usize;
        if len < NLMSG_HDR || len > b.len() {
            break;
        }
        let ev = NLMSG_HDR + CN_MSG_HDR;
        if u32_at(b, ev) == Some(PROC_EVENT_EXEC) {
            if let Some(tgid) = u32_at(b, ev + 20) {
                out.push(tgid);
            }
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        b = b.get(next..).unwrap_or(&[]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(what: u32, pid: u32, tgid: u32) -> Vec<u8> {
        let mut m = Vec::new();
        let len = (NLMSG_HDR + CN_MSG_HDR + 24) as u32;
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&[0u8; 12]);
        m.extend_from_slice(&[0u8; CN_MSG_HDR]);
        m.extend_from_slice(&what.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u64.to_ne_bytes());
        m.extend_from_slice(&pid.to_ne_bytes());
        m.extend_from_slice(&tgid.to_ne_bytes());
        m
    }

    #[test]
    fn exec_events_are_read_others_skipped() {
        let mut d = message(PROC_EVENT_EXEC, 41, 40);
        d.extend(message(1, 7, 7));
        d.extend(message(PROC_EVENT_EXEC, 9, 9));
        assert_eq!(parse(&d), vec![40, 9]);
        assert!(parse(&d[..10]).is_empty());
        assert!(parse(&[]).is_empty());
    }

    #[test]
    fn an_exec_is_heard() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: subscribing to process events needs root");
            return;
        }
        let events = ExecEvents::subscribe().unwrap();
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        let _ = child.wait();
        let t = std::time::Instant::now();
        let mut seen = Vec::new();
        while !seen.contains(&pid) && t.elapsed() < std::time::Duration::from_secs(5) {
            seen.extend(events.drain().unwrap());
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(seen.contains(&pid), "{pid} not in {seen:?}");
    }
}
