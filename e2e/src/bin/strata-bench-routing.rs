//! strata-bench-routing: routing policies side by side (issue [13] item 4).
//! N engine simulators with prefix caching behind the gateway's real
//! router, the replica picked by Strata's policy, at random (what a
//! Service does) or round-robin; open-loop Poisson load of streamed chat
//! completions with shared prefixes and without, at rising rates. Prints
//! the Markdown tables of docs/benchmarks.md. Every address is loopback.
//!
//! cargo build --release -p strata-e2e --bin strata-engine-sim --bin strata-bench-routing
//! target/release/strata-bench-routing            # the full run (~11 min)
//! target/release/strata-bench-routing --quick    # a smoke (~1.5 min)

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use strata_core::routing::Policy;
use strata_e2e::bench_cli;
use strata_e2e::bench_routing::{Engine, Options, Shape, Workload, run};

#[derive(Parser)]
#[command(
    about = "Routing policies side by side: Strata's gateway vs random (a Service) vs round-robin, over engine simulators with prefix caching"
)]
struct Cli {
    /// Replicas of the simulator.
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Policies compared.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "strata,random,round-robin"
    )]
    policies: Vec<Policy>,
    /// Workloads.
    #[arg(long, value_delimiter = ',', default_value = "shared-prefix,unique")]
    workloads: Vec<Workload>,
    /// Offered request rates, per second.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,24,40")]
    rates: Vec<f64>,
    /// The rate at which the replicas each policy needs are searched.
    #[arg(long, default_value_t = 16.0)]
    replicas_rate: f64,
    /// Skip the replicas search.
    #[arg(long)]
    no_replicas_search: bool,
    /// Measured seconds per cell.
    #[arg(long, default_value_t = 12)]
    seconds: u64,
    /// Unmeasured seconds of load before each window (after the caches
    /// are primed with each system prompt once).
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// Seconds requests may take to finish after the window.
    #[arg(long, default_value_t = 10)]
    drain_seconds: u64,
    /// The SLA: TTFT p95 at most this many ms (and no errors).
    #[arg(long, default_value_t = 500.0)]
    sla_ttft_p95_ms: f64,
    /// Distinct system prompts of the shared-prefix workload.
    #[arg(long, default_value_t = 16)]
    system_prompts: usize,
    /// Characters of a system prompt (4 per simulated token).
    #[arg(long, default_value_t = 8000)]
    system_chars: usize,
    /// Characters of a user's question.
    #[arg(long, default_value_t = 200)]
    user_chars: usize,
    /// Output tokens per answer.
    #[arg(long, default_value_t = 32)]
    output_tokens: u32,
    /// The simulators' --max-batch.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// The simulators' --prefill-ms-per-token.
    #[arg(long, default_value_t = 0.1)]
    prefill_ms_per_token: f64,
    /// The simulators' --prefill-concurrency (1: prefills take turns).
    #[arg(long, default_value_t = 1)]
    prefill_concurrency: usize,
    /// The simulators' --itl-ms.
    #[arg(long, default_value_t = 15.0)]
    itl_ms: f64,
    /// The simulators' --itl-batch-factor.
    #[arg(long, default_value_t = 0.02)]
    itl_batch_factor: f64,
    /// The simulators' --block-size.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// The simulators' prefix cache, in blocks (--num-gpu-blocks-override).
    #[arg(long, default_value_t = 1024)]
    cache_blocks: usize,
    /// The gateway's --load-factor.
    #[arg(long, default_value_t = 1.25)]
    load_factor: f64,
    /// The gateway's --spill-floor.
    #[arg(long, default_value_t = 8)]
    spill_floor: u32,
    /// The gateway's --prefix-chars.
    #[arg(long, default_value_t = 256)]
    prefix_chars: usize,
    /// Requests each way in the overhead measurement (0: skipped).
    #[arg(long, default_value_t = 2000)]
    overhead_requests: usize,
    /// The workloads' seed.
    #[arg(long, default_value_t = 13)]
    seed: u64,
    /// A smoke: rates 8,24, 3 s measured after 2 s, no replicas search,
    /// 200 overhead requests.
    #[arg(long)]
    quick: bool,
    /// The simulator binary (default: target/release/strata-engine-sim).
    #[arg(long)]
    engine_sim: Option<PathBuf>,
    /// Working directory (logs; default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    bench_cli::init_logs("info");
    let mut cli = Cli::parse();
    if cli.quick {
        cli.rates = vec![8.0, 24.0];
        cli.seconds = 3;
        cli.warmup_seconds = 2;
        cli.no_replicas_search = true;
        cli.overhead_requests = 200;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = match &cli.dir {
        Some(_) => None,
        None => match tempfile::Builder::new()
            .prefix("strata-bench-routing-")
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
    let opts = Options {
        engine_sim: cli
            .engine_sim
            .unwrap_or_else(|| root.join("target/release/strata-engine-sim")),
        dir,
        replicas: cli.replicas,
        policies: cli.policies,
        workloads: cli.workloads,
        rates: cli.rates,
        replicas_rate: (!cli.no_replicas_search).then_some(cli.replicas_rate),
        warmup: Duration::from_secs(cli.warmup_seconds),
        duration: Duration::from_secs(cli.seconds),
        drain: Duration::from_secs(cli.drain_seconds),
        sla_ttft_p95_ms: cli.sla_ttft_p95_ms,
        shape: Shape {
            system_prompts: cli.system_prompts,
            system_chars: cli.system_chars,
            user_chars: cli.user_chars,
            output_tokens: cli.output_tokens,
        },
        engine: Engine {
            max_batch: cli.max_batch,
            prefill_ms_per_token: cli.prefill_ms_per_token,
            prefill_concurrency: cli.prefill_concurrency,
            itl_ms: cli.itl_ms,
            itl_batch_factor: cli.itl_batch_factor,
            block_size: cli.block_size,
            cache_blocks: cli.cache_blocks,
        },
        load_factor: cli.load_factor,
        spill_floor: cli.spill_floor,
        prefix_chars: cli.prefix_chars,
        overhead_requests: cli.overhead_requests,
        seed: cli.seed,
    };
    let Some(result) = bench_cli::unless_stopped(run(&opts)).await else {
        return ExitCode::FAILURE;
    };
    match result {
        Ok(report) => bench_cli::report(&report.markdown(), &report, cli.json.as_deref()),
        Err(e) => {
            eprintln!("strata-bench-routing: {e}");
            if let Some(t) = tmp {
                eprintln!("logs kept in {}", t.keep().display());
            }
            ExitCode::FAILURE
        }
    }
}
