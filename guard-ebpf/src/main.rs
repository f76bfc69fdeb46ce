//! guard's kernel side: cgroup programs that redirect guarded TCP connects to the local proxy,
//! per-cgroup LSM programs that contain guarded processes (`contain`), and the exec hooks that
//! mark agents' processes before their first instruction (`enrol`).
//!
//! These programs run for every socket operation of every process below the attach cgroup, so the
//! path for an unguarded process is kept to a config read and the guarded-set lookups, and it
//! always returns "allow". Only guarded processes are ever refused or rewritten.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod contain;
#[cfg(target_arch = "bpf")]
mod enrol;
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The programs only exist for the BPF target; guard's build.rs builds them.
}
