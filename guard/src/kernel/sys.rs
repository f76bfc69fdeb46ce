//! The raw `bpf(2)` calls aya does not offer for what guard needs (pinned-link updates, the
//! cgroup a link is attached to, program queries), and the netns cookie socket option: the one
//! place where guard builds `union bpf_attr` by hand.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

/// `union bpf_attr` for `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
#[repr(C)]
pub struct ObjAttr {
    /// A pointer to a NUL-terminated path in bpffs.
    pub pathname: u64,
    pub bpf_fd: u32,
    pub file_flags: u32,
}

/// The `bpf(2)` syscall with `attr` (its size given to the kernel); returns what the call
/// returns (a new fd for the commands that make one).
///
/// # Safety
/// `attr` must be the `union bpf_attr` member `cmd` reads, and every pointer in it valid for the
/// call.
pub unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: the caller's promise; the kernel reads (and for some commands writes back) at
    // most size_of::<T>() bytes of attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The descriptor of the bpf object pinned at `pin` (`BPF_OBJ_GET`).
pub(super) fn obj_get(pin: &Path) -> Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    let mut get = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: ObjAttr is BPF_OBJ_GET's bpf_attr, pointing at a NUL-terminated path.
    let fd = unsafe { sys_bpf(BPF_OBJ_GET, &mut get) }.context("BPF_OBJ_GET")?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The id of the cgroup the pinned cgroup link at `pin` is attached to; 0 when it is detached
/// (aya's `LinkInfo` does not expose it).
pub(super) fn link_cgroup_id(pin: &Path) -> Result<u64> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let link = obj_get(pin)?;
    // struct bpf_link_info: type, id, prog_id, then (8-aligned, at 16) the union whose cgroup
    // member starts with cgroup_id.
    let mut info = [0u64; 8];
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: InfoByFd is BPF_OBJ_GET_INFO_BY_FD's bpf_attr; info outlives the call and has
    // the length given.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(info[2])
}

/// `BPF_LINK_UPDATE`: the pinned link at `pin` runs `prog` from now on (aya keeps this call to
/// itself for cgroup links).
pub fn link_update(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let link = obj_get(pin)?;
    // union bpf_attr, BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut upd = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: LinkUpdate is BPF_LINK_UPDATE's bpf_attr.
    unsafe { sys_bpf(BPF_LINK_UPDATE, &mut upd) }.context("BPF_LINK_UPDATE")?;
    Ok(())
}

pub(super) fn prog_query(fd: i32, attach_type: u32) -> std::io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    let mut ids = [0u32; 64];
    let mut flags = [0u32; 64];
    // union bpf_attr, query member: target_fd, attach_type, query_flags, attach_flags,
    // prog_ids (u64 pointer), prog_cnt, 4 bytes of padding, prog_attach_flags (u64 pointer;
    // required for BPF_LSM_CGROUP, whose programs each have their own). The rest must be zero.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    attr[32..40].copy_from_slice(&(flags.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: attr is a valid bpf_attr for BPF_PROG_QUERY; ids and flags outlive the call. The kernel
    // writes prog_cnt back into attr.
    unsafe { sys_bpf(BPF_PROG_QUERY, &mut attr) }?;
    let cnt = u32::from_ne_bytes(attr[24..28].try_into().unwrap()) as usize;
    Ok(ids[..cnt.min(ids.len())].to_vec())
}

/// The netns cookie of the calling process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn own_netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd, out pointer and length.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading SO_NETNS_COOKIE (Linux 5.14+)");
    }
    Ok(cookie)
}
