//! strata-bench-scale: the control plane at scale (issue [11] item 2):
//! 1,000 Models on 200 KWOK nodes with the release-built operator, then the
//! Deployment controller with 1,000 equivalent Deployments in the same
//! world. Prints the Markdown table of docs/benchmarks.md.
//!
//! cargo build --release -p strata-operator
//! cargo build -p strata-e2e --bin strata-bench-scale
//! target/debug/strata-bench-scale                                  # 200 nodes, 1,000 Models, 10 idle minutes
//! target/debug/strata-bench-scale --nodes 20 --models 100 --idle-minutes 1

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use strata_e2e::bench_cli;
use strata_e2e::bench_scale::{Bench, Options};

#[derive(Parser)]
#[command(about = "1,000 Models on 200 simulated GPU nodes, side by side with 1,000 Deployments")]
struct Cli {
    /// Simulated 8-GPU nodes (60 % H100, 40 % A100).
    #[arg(long, default_value_t = 200)]
    nodes: usize,
    /// Models (and as many Deployments).
    #[arg(long, default_value_t = 1000)]
    models: usize,
    /// Namespaces they are spread over.
    #[arg(long, default_value_t = 50)]
    namespaces: usize,
    /// Seed of the mix of GPUs, replicas and pools.
    #[arg(long, default_value_t = 11)]
    seed: u64,
    /// Minutes at rest after Strata's churn.
    #[arg(long, default_value_t = 10.0)]
    idle_minutes: f64,
    /// Minutes at rest after the Deployments' churn.
    #[arg(long, default_value_t = 2.0)]
    deployment_idle_minutes: f64,
    /// Applies in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Share of the objects the churn gives new engine args, %.
    #[arg(long, default_value_t = 10)]
    churn_percent: usize,
    /// Nodes the churn deletes.
    #[arg(long, default_value_t = 5)]
    churn_nodes: usize,
    /// The operator's --node-lost-grace-seconds.
    #[arg(long, default_value_t = 30)]
    node_lost_grace_seconds: u64,
    /// The operator's --resync-seconds (production's default).
    #[arg(long, default_value_t = 60)]
    resync_seconds: u64,
    /// A flag for the operator after the benchmark's own (repeatable; e.g.
    /// `--operator-arg=--kube-api-qps=200`).
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_args: Vec<String>,
    /// The operator binary (default: target/release/strata-operator).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Skip the Deployment controller's phases.
    #[arg(long)]
    skip_deployments: bool,
    /// Working directory of the world (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the world's directory (logs) at the end.
    #[arg(long)]
    keep: bool,
    /// Seconds each wait may take.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// What became of KubeAI (its Go module through the Go proxy), for the
    /// report.
    #[arg(
        long,
        default_value = "not run: the Go module proxy answers 403 (\"not available\") for github.com/kubeai-project/kubeai and github.com/substratusai/kubeai, so its operator cannot be built here"
    )]
    kubeai: String,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    bench_cli::init_logs(bench_cli::CLUSTER_LOGS);
    let cli = Cli::parse();
    let minutes = |m: f64| Duration::from_secs_f64((m * 60.0).max(0.0));
    let opts = Options {
        nodes: cli.nodes,
        models: cli.models,
        namespaces: cli.namespaces,
        seed: cli.seed,
        idle: minutes(cli.idle_minutes),
        deployment_idle: minutes(cli.deployment_idle_minutes),
        concurrency: cli.concurrency,
        churn_percent: cli.churn_percent,
        churn_nodes: cli.churn_nodes,
        node_lost_grace_seconds: cli.node_lost_grace_seconds,
        resync_seconds: cli.resync_seconds,
        operator_args: cli.operator_args,
        operator: cli.operator,
        skip_deployments: cli.skip_deployments,
        dir: cli.dir,
        keep: cli.keep,
        timeout: Duration::from_secs(cli.timeout),
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
    let result = bench_cli::unless_stopped(bench.run(cli.kubeai)).await;
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
