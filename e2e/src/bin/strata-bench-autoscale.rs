//! strata-bench-autoscale: the deterministic autoscaling benchmark. Prints
//! the Markdown table of docs/benchmarks.md.
//!
//! cargo run --release -p strata-e2e --bin strata-bench-autoscale

use clap::Parser;
use strata_e2e::bench::{World, table};

#[derive(Parser)]
struct Cli {
    /// Base arrival rate, requests per second.
    #[arg(long, default_value_t = 5.0)]
    base_rate: f64,
    /// Length of each trace, seconds.
    #[arg(long, default_value_t = 3600.0)]
    length: f64,
}

fn main() {
    let cli = Cli::parse();
    print!("{}", table(&World::default(), cli.base_rate, cli.length));
}
