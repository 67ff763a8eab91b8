//! strata-cluster: runs the local world (a real Kubernetes control plane with
//! simulated NVIDIA GPU nodes) until interrupted, or until its standard input
//! closes when started with --exit-on-stdin-eof (how tests own it: if the test
//! process dies, even by a panic or a kill, the pipe closes and the cluster
//! goes with it).
//!
//! When the cluster is ready it prints one line of JSON (ClusterInfo) on
//! stdout; logs go to stderr. While it runs, it restarts components that
//! exit (as a kubelet restarts static pods) and takes requests on its
//! control socket: `strata-cluster ctl --dir DIR pause kube-apiserver`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use strata_e2e::cluster::{Cluster, Options};
use strata_e2e::control::Request;
use strata_e2e::runner::{PodRunner, RunnerConfig};
use strata_e2e::topology::Topology;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    version,
    about = "Run Strata's local world: Kubernetes on loopback with simulated GPU nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run only the pod runner against an existing cluster (used by tests
    /// when STRATA_E2E_KUBECONFIG points at a cluster kept up by hand).
    Runner {
        /// Admin kubeconfig of the cluster.
        #[arg(long)]
        kubeconfig: PathBuf,
        /// Runner configuration: a YAML file, or `-` for one JSON line on stdin.
        #[arg(long)]
        runner_config: PathBuf,
        /// Directory for the pod processes' logs.
        #[arg(long)]
        log_dir: PathBuf,
        /// Exit (stopping every pod process) when standard input closes.
        #[arg(long)]
        exit_on_stdin_eof: bool,
    },
    /// Act on a component of a running world (`up`): `status`, or `stop`,
    /// `start`, `pause` (SIGSTOP), `resume` (SIGCONT), `kill` (SIGKILL; the
    /// world restarts it after a short backoff) or `restart` one of etcd,
    /// kube-apiserver, kube-controller-manager, kube-scheduler, kwok.
    Ctl {
        /// The world's directory (its `--dir`); default: the directory of
        /// $KUBECONFIG.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        /// `status`, or an action.
        action: String,
        /// The component (not for `status`).
        component: Option<String>,
    },
    /// Print the path of the fake libnvidia-ml.so.1 (for pod runner
    /// profiles that meter simulated GPUs, e.g. the demo's).
    FakeNvmlPath,
    /// Start the cluster and keep it up.
    Up {
        /// Working directory (PKI, etcd data, logs, kubeconfig). Default: a
        /// temporary directory, removed on exit unless --keep.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Topology file of the simulated nodes.
        #[arg(long)]
        topology: Option<PathBuf>,
        /// Pod runner configuration (profiles of local processes to start for
        /// pods labelled e2e.strata.ai/run): a YAML file, or `-` for one line
        /// of JSON on standard input (how the test harness passes it, leaving
        /// no file behind).
        #[arg(long)]
        runner_config: Option<PathBuf>,
        /// Seconds to wait for each component.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Exit (and clean up) when standard input reaches end of file.
        #[arg(long)]
        exit_on_stdin_eof: bool,
        /// Keep the working directory on exit.
        #[arg(long)]
        keep: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
        )
        .init();
    let (dir, topology, runner_config, timeout, exit_on_stdin_eof, keep) = match Cli::parse()
        .command
    {
        Command::Up {
            dir,
            topology,
            runner_config,
            timeout,
            exit_on_stdin_eof,
            keep,
        } => (
            dir,
            topology,
            runner_config,
            timeout,
            exit_on_stdin_eof,
            keep,
        ),
        Command::Ctl {
            dir,
            json,
            action,
            component,
        } => return ctl(dir, json, &action, component.as_deref()).await,
        Command::FakeNvmlPath => {
            println!("{}", strata_e2e::fake_nvml::LIB);
            return ExitCode::SUCCESS;
        }
        Command::Runner {
            kubeconfig,
            runner_config,
            log_dir,
            exit_on_stdin_eof,
        } => {
            return run_runner_only(kubeconfig, runner_config, log_dir, exit_on_stdin_eof).await;
        }
    };

    let bin_dir = match tokio::task::spawn_blocking(strata_e2e::tools::ensure_binaries).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let runner_config: Result<Option<RunnerConfig>, String> = match runner_config {
        Some(p) if p.as_os_str() == "-" => {
            let mut line = String::new();
            match stdin.read_line(&mut line).await {
                Ok(_) => serde_json::from_str(&line)
                    .map(Some)
                    .map_err(|e| format!("runner config on stdin: {e}")),
                Err(e) => Err(format!("reading stdin: {e}")),
            }
        }
        Some(p) => RunnerConfig::load(&p).map(Some).map_err(|e| e.to_string()),
        None => Ok(None),
    };
    let runner_config = match runner_config {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = Options {
        dir,
        topology: topology.unwrap_or_else(Topology::default_path),
        bin_dir,
        timeout: Duration::from_secs(timeout),
    };
    let cluster = match Cluster::start(opts).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cluster did not come up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runner = match runner_config {
        Some(config) => {
            match PodRunner::start(&cluster.info.kubeconfig, config, &cluster.info.log_dir).await {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!("pod runner did not start: {e}");
                    cluster.shutdown(keep).await;
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    match serde_json::to_string(&cluster.info) {
        Ok(line) => println!("{line}"),
        Err(e) => tracing::error!("{e}"),
    }

    let code = wait_for_exit(exit_on_stdin_eof, stdin).await;
    if let Some(r) = runner {
        r.stop().await;
    }
    cluster.shutdown(keep).await;
    code
}

/// Runs until asked to stop; meanwhile the supervisor restarts components
/// that exit and the control socket takes requests.
async fn wait_for_exit(
    exit_on_stdin_eof: bool,
    mut stdin: tokio::io::BufReader<tokio::io::Stdin>,
) -> ExitCode {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let stdin_closed = stdin_closed(&mut stdin, exit_on_stdin_eof);
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("interrupted: stopping"),
        _ = stdin_closed => tracing::info!("stdin closed: stopping"),
    }
    ExitCode::SUCCESS
}

async fn ctl(dir: Option<PathBuf>, json: bool, action: &str, component: Option<&str>) -> ExitCode {
    let dir = dir.or_else(|| {
        std::env::var_os("KUBECONFIG")
            .map(PathBuf::from)
            .and_then(|k| k.parent().map(std::path::Path::to_path_buf))
    });
    let Some(dir) = dir else {
        eprintln!(
            "error: say which world: --dir DIR (its `up --dir`), or set KUBECONFIG to its admin.kubeconfig"
        );
        return ExitCode::FAILURE;
    };
    let line = match component {
        Some(c) => format!("{action} {c}"),
        None => action.to_string(),
    };
    let request = match Request::parse(&line) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = strata_e2e::control::socket_in(&dir);
    match strata_e2e::control::send(&socket, request).await {
        Ok(reply) if json => match serde_json::to_string(&reply) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(reply) => {
            println!(
                "{:<24} {:<10} {:>8} {:>8}  LAST EXIT",
                "COMPONENT", "STATE", "PID", "RESTARTS"
            );
            for c in reply.components {
                let state = serde_json::to_value(c.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                println!(
                    "{:<24} {:<10} {:>8} {:>8}  {}",
                    c.component.name(),
                    state,
                    c.pid.map_or("-".into(), |p| p.to_string()),
                    c.restarts,
                    c.last_exit.as_deref().unwrap_or("-"),
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn read_runner_config(
    path: &std::path::Path,
    stdin: &mut tokio::io::BufReader<tokio::io::Stdin>,
) -> Result<RunnerConfig, String> {
    if path.as_os_str() == "-" {
        let mut line = String::new();
        stdin
            .read_line(&mut line)
            .await
            .map_err(|e| format!("reading stdin: {e}"))?;
        serde_json::from_str(&line).map_err(|e| format!("runner config on stdin: {e}"))
    } else {
        RunnerConfig::load(path).map_err(|e| e.to_string())
    }
}

async fn run_runner_only(
    kubeconfig: PathBuf,
    config: PathBuf,
    log_dir: PathBuf,
    exit_on_stdin_eof: bool,
) -> ExitCode {
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let config = match read_runner_config(&config, &mut stdin).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runner = match PodRunner::start(&kubeconfig, config, &log_dir).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("pod runner did not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{{\"runner\":\"ready\"}}");
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return ExitCode::FAILURE;
    };
    let stdin_closed = stdin_closed(&mut stdin, exit_on_stdin_eof);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = stdin_closed => {}
    }
    runner.stop().await;
    ExitCode::SUCCESS
}

/// Resolves when standard input reaches end of file (never, unless asked):
/// how an owning test process's exit, even by a kill, reaches us.
async fn stdin_closed(stdin: &mut tokio::io::BufReader<tokio::io::Stdin>, enabled: bool) {
    if !enabled {
        return std::future::pending::<()>().await;
    }
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
