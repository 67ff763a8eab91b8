//! What every benchmark binary does around its run: logs on stderr, the
//! report's Markdown on stdout, its JSON in a file when asked, and a stop
//! on SIGINT or SIGTERM that still shuts its processes down.

use std::path::Path;
use std::process::ExitCode;

/// Logs to stderr, filtered by `RUST_LOG` or else by `default` (e.g.
/// `"info"`).
pub fn init_logs(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .init();
}

/// The default filter of the benchmarks that talk to the API server (the
/// client builder's per-request lines off).
pub const CLUSTER_LOGS: &str = "info,kube_client::client::builder=off";

/// Prints `markdown` and, with `json`, writes `report` there as JSON;
/// failure when it cannot be written.
pub fn report<R: serde::Serialize>(markdown: &str, report: &R, json: Option<&Path>) -> ExitCode {
    print!("{markdown}");
    if let Some(path) = json {
        let written = serde_json::to_string_pretty(report)
            .map_err(|e| e.to_string())
            .and_then(|t| std::fs::write(path, t).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::error!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// Waits for SIGINT or SIGTERM and names it (never resolves when the
/// handlers cannot be installed).
pub async fn stopped() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Runs `run` unless the process is told to stop first ([`stopped`]): then
/// `run` is dropped (the processes it started are killed on drop) and the
/// answer is `None`. Without this, a benchmark stopped by hand or by
/// `timeout` died at once and left its world (etcd, kube-apiserver, the
/// operator, simulators) running.
pub async fn unless_stopped<F: std::future::Future>(run: F) -> Option<F::Output> {
    tokio::select! {
        r = run => Some(r),
        s = stopped() => {
            tracing::warn!("{s}: stopping the benchmark");
            None
        }
    }
}
