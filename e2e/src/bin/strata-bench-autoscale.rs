//! strata-bench-autoscale: the deterministic autoscaling benchmark. Prints
//! the Markdown tables of docs/benchmarks.md: the built-in traces, then the
//! trace files given with `--trace` (format: `strata_e2e::bench::trace`).
//!
//! cargo run --release -p strata-e2e --bin strata-bench-autoscale
//! cargo run --release -p strata-e2e --bin strata-bench-autoscale -- --trace e2e/traces/*.csv

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser};
use strata_e2e::bench::trace::FileTrace;
use strata_e2e::bench::{World, file_table, table};

#[derive(Parser)]
#[command(
    about = "Autoscaling policies side by side, in simulated time",
    after_help = "Trace files: CSV with the header `time_s,rate_rps,prompt_tokens,output_tokens` \
                  (any order), the first row at time 0, times never decreasing; values \
                  interpolated linearly between rows, two rows at one time make a jump; \
                  `#` starts a comment line. See docs/benchmarks.md."
)]
struct Cli {
    /// Base arrival rate of the built-in traces, requests per second.
    #[arg(long, default_value_t = 5.0)]
    base_rate: f64,
    /// Length of each built-in trace, seconds (a trace file lasts until its last row).
    #[arg(long, default_value_t = 3600.0)]
    length: f64,
    /// A trace file (CSV) to run as well, in a second table; repeatable, and
    /// takes several files at once (`--trace e2e/traces/*.csv`).
    #[arg(long = "trace", value_name = "FILE", num_args = 1.., action = ArgAction::Append)]
    traces: Vec<PathBuf>,
    /// Run only the trace files, not the four built-in traces.
    #[arg(long, requires = "traces")]
    no_builtin: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every file first: a bad one is reported before any simulation runs.
    let mut traces = Vec::new();
    for path in &cli.traces {
        match FileTrace::read(path) {
            Ok(t) => traces.push(t),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let world = World::default();
    if !cli.no_builtin {
        print!("{}", table(&world, cli.base_rate, cli.length));
    }
    if !traces.is_empty() {
        if !cli.no_builtin {
            println!();
        }
        print!("{}", file_table(&world, &traces));
    }
    ExitCode::SUCCESS
}
