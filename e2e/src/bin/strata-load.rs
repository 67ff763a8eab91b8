//! strata-load: the demo's load generator. Closed-loop streams of chat
//! completions to a Model's ready replicas on their pod IPs (loopback only),
//! rising until the client's TTFT p95 crosses the target, then held until
//! SIGINT or SIGTERM; writes a summary. See `strata_e2e::load`. Test and
//! demo only; never in a product image.
//!
//! `KUBECONFIG=... strata-load --model llama-3-1-8b --ttft-target 500ms --summary load.env`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use strata_e2e::load::{self, LoadConfig};

#[derive(Parser)]
#[command(
    about = "Load generator for Strata's demo: rising chat streams until TTFT crosses its target"
)]
struct Cli {
    /// The Model's namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The Model (its replicas are the pods labelled strata.ai/model=<model>).
    #[arg(long)]
    model: String,
    /// An Adapter of the Model: every --adapter-every-th request asks for it,
    /// sent to a replica that carries it.
    #[arg(long)]
    adapter: Option<String>,
    /// Every how many requests one goes to the adapter.
    #[arg(long, default_value_t = 4)]
    adapter_every: u64,
    /// The TTFT target (e.g. 500ms).
    #[arg(long)]
    ttft_target: String,
    /// Streams at the start.
    #[arg(long, default_value_t = 2)]
    start: usize,
    /// Streams added per step while the TTFT p95 is within the target.
    #[arg(long, default_value_t = 2)]
    step: usize,
    /// Seconds between steps.
    #[arg(long, default_value_t = 2.0)]
    step_every: f64,
    /// Most streams.
    #[arg(long, default_value_t = 32)]
    max: usize,
    /// Seconds of first tokens the ramp's p95 is taken over.
    #[arg(long, default_value_t = 5.0)]
    window: f64,
    /// Characters of each prompt.
    #[arg(long, default_value_t = 400)]
    prompt_chars: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Stop after this many seconds if not stopped before.
    #[arg(long, default_value_t = 300.0)]
    duration: f64,
    /// Append progress lines to this file (default: stderr).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Write the summary (KEY=VALUE lines) to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
}

async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                eprintln!("cannot watch SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(target) = strata_core::duration::parse(&cli.ttft_target) else {
        eprintln!(
            "--ttft-target: not a duration: {:?} (e.g. 500ms)",
            cli.ttft_target
        );
        return ExitCode::from(2);
    };
    if !(cli.step_every > 0.0 && cli.window > 0.0 && cli.duration > 0.0) {
        eprintln!("--step-every, --window and --duration must be positive");
        return ExitCode::from(2);
    }
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("a Kubernetes client (KUBECONFIG): {e}");
            return ExitCode::from(2);
        }
    };
    let config = LoadConfig {
        namespace: cli.namespace,
        model: cli.model,
        adapter: cli.adapter,
        adapter_every: cli.adapter_every,
        ttft_target: target.as_secs_f64(),
        start: cli.start,
        step: cli.step,
        step_every: cli.step_every,
        max: cli.max,
        window: cli.window,
        prompt_chars: cli.prompt_chars,
        max_tokens: cli.max_tokens.max(1),
        duration: cli.duration,
        log: cli.log,
        summary: cli.summary,
    };
    match load::run(client, config, stop_signal()).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata-load: {e}");
            ExitCode::FAILURE
        }
    }
}
