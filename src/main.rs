// mimalloc instead of glibc malloc: every proxied request allocates and frees pingora's
// buffers (a 64 KiB body buffer among them), and glibc spent about 12 % of coldgate's CPU
// on that under load in the warm benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    coldgate::cli::main()
}
