//! The tokio runtime of Strata's processes, with a bounded number of
//! worker threads.
//!
//! `#[tokio::main]` starts one worker thread per CPU the process may use,
//! and a container without a CPU limit (the chart sets none, as is common)
//! may use every CPU of its node: on a GPU node that is 100 to 200 worker
//! threads in every sidecar and in the node agent. Each worker that
//! allocates gets a glibc malloc arena of its own, which keeps what it
//! freed: the sidecar at 512 clients peaked at 84 MiB with 16 workers and
//! 101 MiB with 64, against 40 MiB with 2 (`docs/benchmarks.md`, P2). A
//! sidecar's or node agent's work fits in two threads, so each binary has a
//! `--worker-threads` flag: without it, a small default per binary, never
//! more than one thread per CPU available; with it, the number asked for,
//! `0` meaning one per CPU available (which the standard library reads
//! from the cgroup's CPU limit, when there is one).

use std::num::NonZeroUsize;

/// Worker threads: `requested` as asked (0: one per CPU); without a
/// request, the binary's `default` but never more than one per CPU
/// (`default` 0: one per CPU). Never none.
pub fn worker_threads(requested: Option<usize>, default: usize, available: usize) -> usize {
    let available = available.max(1);
    match requested {
        Some(0) => available,
        Some(n) => n,
        None if default == 0 => available,
        None => default.min(available),
    }
}

/// The CPUs this process may use (its affinity and cgroup CPU limit), 1 if
/// that cannot be read.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// A multi-threaded runtime with [`worker_threads`]`(requested, default,
/// available_cpus())` workers, I/O and timers enabled.
pub fn build(requested: Option<usize>, default: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads(requested, default, available_cpus()))
        .enable_all()
        .build()
}

/// Runs a binary's `main` future on [`build`]`(requested, default)`: its
/// exit code, or a failure when the runtime cannot start.
pub fn block_on(
    requested: Option<usize>,
    default: usize,
    main: impl std::future::Future<Output = std::process::ExitCode>,
) -> std::process::ExitCode {
    match build(requested, default) {
        Ok(rt) => rt.block_on(main),
        Err(e) => {
            eprintln!("starting the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_one_per_cpu() {
        assert_eq!(worker_threads(Some(0), 2, 192), 192);
        assert_eq!(worker_threads(None, 0, 192), 192);
        assert_eq!(worker_threads(Some(0), 4, 0), 1);
    }

    #[test]
    fn the_default_never_exceeds_the_cpus_and_a_request_is_taken_as_it_is() {
        assert_eq!(worker_threads(None, 2, 192), 2);
        assert_eq!(worker_threads(None, 4, 2), 2);
        assert_eq!(worker_threads(None, 4, 0), 1);
        assert_eq!(worker_threads(Some(16), 2, 2), 16);
    }

    #[test]
    fn the_runtime_runs_with_the_bounded_workers() {
        let rt = build(Some(1), 4).expect("runtime");
        assert_eq!(rt.metrics().num_workers(), 1);
        assert_eq!(rt.block_on(async { 40 + 2 }), 42);
    }
}
