// Small, short-lived allocations on every request (headers, JSON values, audit lines): mimalloc
// serves them from per-thread pages, where glibc malloc spent ~7 % of the daemon's CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(guard::cli::main());
}
