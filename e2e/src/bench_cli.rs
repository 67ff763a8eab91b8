//! What every benchmark binary does around its run: logs on stderr, the
//! report's Markdown on stdout, and its JSON in a file when asked.

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
