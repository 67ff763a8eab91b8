//! strata-operator. The controllers arrive with issue [3]; until then this
//! binary only reports that it is not implemented, so nothing mistakes it for
//! a working operator.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "strata-operator {}: the controllers are not implemented yet (issue [3]); API group {}",
        env!("CARGO_PKG_VERSION"),
        strata_crds::API_VERSION
    );
    ExitCode::FAILURE
}
