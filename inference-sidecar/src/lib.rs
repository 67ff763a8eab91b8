//! strata-sidecar library.
