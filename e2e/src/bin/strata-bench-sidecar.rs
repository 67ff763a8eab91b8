//! strata-bench-sidecar: the sidecar against the limit (issue [12] item 1,
//! "P2"). The engine simulator direct, through `strata-sidecar` and through
//! Debian's nginx as a plain reverse proxy, the same load (wrk; our own
//! streaming client for per-chunk times) against each, in one run. Installs
//! wrk and nginx-light with apt-get when missing. Prints the Markdown
//! tables of docs/benchmarks.md. Every address is loopback.
//!
//! cargo build --release -p strata-sidecar -p strata-e2e --bin strata-sidecar --bin strata-engine-sim --bin strata-bench-sidecar
//! target/release/strata-bench-sidecar                      # 1, 64, 512 clients, 8 s runs, 3 rounds (~11 min)
//! target/release/strata-bench-sidecar --clients 1,64 --seconds 3 --rounds 1

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use strata_e2e::bench_cli;
use strata_e2e::bench_sidecar::{Options, run};

#[derive(Parser)]
#[command(
    about = "The engine simulator direct, through strata-sidecar and through nginx: added latency, throughput, CPU and memory"
)]
struct Cli {
    /// Concurrent clients (connections) of each cell.
    #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
    clients: Vec<usize>,
    /// Measured seconds of each load run.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Seconds of unmeasured load before each measured run.
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Rounds of the per-request table (targets' order rotated each round;
    /// medians reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Tokens of each answer in the per-request runs.
    #[arg(long, default_value_t = 4)]
    tokens: u32,
    /// Tokens of each answer in the per-chunk runs.
    #[arg(long, default_value_t = 8)]
    chunk_tokens: u32,
    /// The simulator's time per token in the per-chunk runs, ms.
    #[arg(long, default_value_t = 20.0)]
    chunk_itl_ms: f64,
    /// Skip the per-chunk runs.
    #[arg(long)]
    skip_chunks: bool,
    /// A flag for the sidecar after the benchmark's own (repeatable; e.g.
    /// `--sidecar-arg=--worker-threads=16`).
    #[arg(long = "sidecar-arg", allow_hyphen_values = true)]
    sidecar_args: Vec<String>,
    /// KEY=VALUE for the sidecar's environment, replacing its image's
    /// (repeatable; `MALLOC_ARENA_MAX=` removes the image's variable).
    #[arg(long = "sidecar-env", value_parser = parse_env)]
    sidecar_env: Vec<(String, String)>,
    /// The sidecar binary (default: target/release/strata-sidecar).
    #[arg(long)]
    sidecar: Option<PathBuf>,
    /// The simulator binary (default: target/release/strata-engine-sim).
    #[arg(long)]
    engine_sim: Option<PathBuf>,
    /// Working directory (configs, logs; default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `KEY=VALUE` (the value may be empty).
fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s}: not KEY=VALUE")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    bench_cli::init_logs("info");
    let cli = Cli::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let release = root.join("target/release");
    let tmp = match &cli.dir {
        Some(_) => None,
        None => match tempfile::Builder::new()
            .prefix("strata-bench-sidecar-")
            .tempdir()
        {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("a temporary directory: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let dir = match (&cli.dir, &tmp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => return ExitCode::FAILURE,
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("{}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    // nginx's workers (user nobody when run as root) must reach its files.
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
    }
    let opts = Options {
        sidecar: cli
            .sidecar
            .unwrap_or_else(|| release.join("strata-sidecar")),
        engine_sim: cli
            .engine_sim
            .unwrap_or_else(|| release.join("strata-engine-sim")),
        clients: cli.clients,
        duration: Duration::from_secs(cli.seconds),
        warmup: Duration::from_secs(cli.warmup_seconds),
        rounds: cli.rounds,
        tokens: cli.tokens,
        chunk_tokens: cli.chunk_tokens,
        chunk_itl_ms: cli.chunk_itl_ms,
        dir,
        skip_chunks: cli.skip_chunks,
        sidecar_args: cli.sidecar_args,
        sidecar_env: cli.sidecar_env,
    };
    let Some(result) = bench_cli::unless_stopped(run(&opts)).await else {
        return ExitCode::FAILURE;
    };
    match result {
        Ok(report) => bench_cli::report(
            &format!("{}\n", report.markdown()),
            &report,
            cli.json.as_deref(),
        ),
        Err(e) => {
            eprintln!("strata-bench-sidecar: {e}");
            if let Some(t) = tmp {
                eprintln!("logs kept in {}", t.keep().display());
            }
            ExitCode::FAILURE
        }
    }
}
