//! strata-sidecar. The proxy, NVML sampler and adapter API arrive with issue
//! [4]; until then this binary only reports that it is not implemented.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "strata-sidecar {}: not implemented yet (issue [4])",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::FAILURE
}
