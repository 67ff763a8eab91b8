//! strata-bench-placement: placement quality after churn (issue [16] item
//! 2, "P4"). One seeded trace of Models of 1, 2, 4 and 8 GPUs arriving and
//! leaving over 100 8-GPU nodes until ~85 % full, replayed through Strata's
//! placement (the pure function, as the Model controller calls it) and
//! through the real kube-scheduler of the local world (default scoring, and
//! a second scheduler scoring MostAllocated on `nvidia.com/gpu`). Prints the
//! Markdown table of docs/benchmarks.md.
//!
//! cargo build --release -p strata-e2e --bin strata-bench-placement
//! STRATA_BIN_DIR=~/.cache/strata/bin target/release/strata-bench-placement
//! target/release/strata-bench-placement --strata-only     # no world, a second

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use strata_e2e::bench_cli;
use strata_e2e::bench_placement::{Options, TraceOptions, run};

#[derive(Parser)]
#[command(
    about = "Placement quality after churn: Strata's placement vs kube-scheduler on one seeded trace"
)]
struct Cli {
    /// Simulated 8-GPU nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Share of the GPUs the trace asks for once filled.
    #[arg(long, default_value_t = 0.85)]
    fill: f64,
    /// While filling, the share of events that are departures.
    #[arg(long, default_value_t = 0.25)]
    fill_leave_share: f64,
    /// Events after the fill (arrivals and departures around the target).
    #[arg(long, default_value_t = 600)]
    churn_events: usize,
    /// Seed of the trace.
    #[arg(long, default_value_t = 16)]
    seed: u64,
    /// Only Strata's side: no world, no kube-scheduler.
    #[arg(long)]
    strata_only: bool,
    /// Skip the second (MostAllocated) kube-scheduler.
    #[arg(long)]
    skip_most_allocated: bool,
    /// Working directory of the world (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the world's directory (logs) at the end.
    #[arg(long)]
    keep: bool,
    /// Seconds each wait may take.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Also write the results (with the fragmentation after every event) as
    /// JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    bench_cli::init_logs(bench_cli::CLUSTER_LOGS);
    let cli = Cli::parse();
    let opts = Options {
        trace: TraceOptions {
            nodes: cli.nodes,
            fill: cli.fill,
            fill_leave_share: cli.fill_leave_share,
            churn_events: cli.churn_events,
            seed: cli.seed,
        },
        strata_only: cli.strata_only,
        skip_most_allocated: cli.skip_most_allocated,
        dir: cli.dir,
        keep: cli.keep,
        timeout: Duration::from_secs(cli.timeout),
    };
    let Some(result) = bench_cli::unless_stopped(run(&opts)).await else {
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
