//! strata-bench-memory: the operator's resident memory with other
//! workloads' pods in the world (issue [8] item 6). Prints the Markdown
//! tables of docs/benchmarks.md.
//!
//! cargo build --release --workspace --bins
//! target/release/strata-bench-memory                 # 0, 1,000, 5,000 foreign pods
//! target/release/strata-bench-memory --smoke         # 0 and 200, a short window

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use strata_e2e::bench_cli;
use strata_e2e::bench_memory::{Bench, Options, ProbeMode, probe};

#[derive(Parser)]
#[command(about = "The operator's memory with 0, 1,000 and 5,000 pods of other workloads")]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Foreign pod counts, ascending, multiples of 50.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,5000")]
    levels: Vec<usize>,
    /// A quick run: levels 0 and 200, a 5 s window, one fresh operator per
    /// level, no probes.
    #[arg(long)]
    smoke: bool,
    /// Seconds RSS is sampled once the world has settled.
    #[arg(long, default_value_t = 20)]
    window_seconds: u64,
    /// The operator's --resync-seconds.
    #[arg(long, default_value_t = 15)]
    resync_seconds: u64,
    /// Pod writes in flight at once (the API server shares the machine).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Fresh operators started one after another at each level.
    #[arg(long, default_value_t = 3)]
    fresh_runs: usize,
    /// Skip the bare-reflector probes.
    #[arg(long)]
    no_probes: bool,
    /// Topology of the simulated nodes.
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Working directory of the world (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the world's directory (logs) at the end.
    #[arg(long)]
    keep: bool,
    /// Seconds each wait may take.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Extra environment of the operator process, KEY=VALUE (repeatable;
    /// e.g. MALLOC_ARENA_MAX=2).
    #[arg(long = "operator-env", value_parser = parse_env)]
    operator_env: Vec<(String, String)>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

#[derive(Subcommand)]
enum Sub {
    /// (internal) A bare reflector of every pod; prints its size once synced
    /// and holds it until stdin closes.
    Probe {
        /// Admin kubeconfig.
        #[arg(long)]
        kubeconfig: PathBuf,
        /// What it holds.
        #[arg(long, value_enum)]
        mode: ProbeMode,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    bench_cli::init_logs(bench_cli::CLUSTER_LOGS);
    let cli = Cli::parse();
    if let Some(Sub::Probe { kubeconfig, mode }) = cli.command {
        return match probe(&kubeconfig, mode).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("probe: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = Options {
        levels: if cli.smoke { vec![0, 200] } else { cli.levels },
        window: Duration::from_secs(if cli.smoke { 5 } else { cli.window_seconds }),
        concurrency: cli.concurrency,
        topology: cli.topology.unwrap_or_else(Options::default_topology),
        dir: cli.dir,
        keep: cli.keep,
        probes: !cli.no_probes && !cli.smoke,
        timeout: Duration::from_secs(cli.timeout),
        resync_seconds: cli.resync_seconds,
        operator_env: cli.operator_env,
        fresh_runs: if cli.smoke { 1 } else { cli.fresh_runs },
    };
    let Some(started) = bench_cli::unless_stopped(Bench::start(opts)).await else {
        return ExitCode::FAILURE;
    };
    let mut bench = match started {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("the benchmark's world did not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = bench_cli::unless_stopped(bench.run()).await;
    bench.shutdown().await;
    let Some(result) = result else {
        return ExitCode::FAILURE;
    };
    match result {
        Ok(report) => bench_cli::report(&report.markdown(), &report, cli.json.as_deref()),
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
