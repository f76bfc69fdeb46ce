//! guard's root integration tests live in `tests/`: the real daemon, real eBPF and real MCP
//! peers, each test in its own cgroup subtree, pins and ports (`guard_testkit::root`).

pub mod enrol;
