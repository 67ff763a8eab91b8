//! The pinned upstream binaries (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubectl, KWOK, Helm), built by e2e/tools/build.sh from
//! their Go modules and cached outside the checkout, keyed by version; and
//! the Gateway API Inference Extension's InferencePool CRD, taken from its
//! Go module by the same script and cached beside them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Names of the binaries the local world runs.
pub const BINARIES: [&str; 7] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
];

/// The build script.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/build.sh")
}

/// Where the binaries are: `$STRATA_BIN_DIR` if set (and complete), otherwise
/// the output of `e2e/tools/build.sh`, which builds what is missing (minutes
/// on a cold machine) and reuses the cache otherwise.
pub fn ensure_binaries() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("STRATA_BIN_DIR") {
        let dir = PathBuf::from(dir);
        if complete(&dir) {
            return Ok(dir);
        }
    }
    let script = build_script();
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::Tools(format!("running {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(Error::Tools(format!(
            "{} failed ({})",
            script.display(),
            out.status
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| Error::Tools("build.sh printed no directory".into()))?;
    if complete(&dir) {
        Ok(dir)
    } else {
        Err(Error::Tools(format!(
            "{} lacks some of {BINARIES:?}",
            dir.display()
        )))
    }
}

fn complete(dir: &Path) -> bool {
    BINARIES.iter().all(|b| dir.join(b).is_file())
}

/// The file of the Gateway API Inference Extension's InferencePool CRD, as
/// its module names it (`config/crd/bases/`).
pub const INFERENCE_POOL_CRD: &str = "inference.networking.k8s.io_inferencepools.yaml";

/// The InferencePool CRD's file, at the version `e2e/tools/versions.env`
/// pins: in `$STRATA_BIN_DIR` if it is there, otherwise fetched (from the
/// Go module proxy, checked against `e2e/tools/gie/go.sum`) and cached by
/// `e2e/tools/build.sh gie`.
pub fn ensure_inference_pool_crd() -> Result<PathBuf> {
    ensure_component("gie", INFERENCE_POOL_CRD)
}

/// The Gateway API Inference Extension's endpoint picker (`epp`), at the
/// version `e2e/tools/versions.env` pins: in `$STRATA_BIN_DIR` if it is
/// there, otherwise built from its Go module (`e2e/tools/epp/go.sum`) and
/// cached by `e2e/tools/build.sh epp`.
pub fn ensure_endpoint_picker() -> Result<PathBuf> {
    ensure_component("epp", "epp")
}

/// `file` of build.sh's `component`: from `$STRATA_BIN_DIR` when there,
/// else made by `e2e/tools/build.sh <component>`.
fn ensure_component(component: &str, file: &str) -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("STRATA_BIN_DIR") {
        let path = PathBuf::from(dir).join(file);
        if path.is_file() {
            return Ok(path);
        }
    }
    let script = build_script();
    let out = Command::new("bash")
        .arg(&script)
        .arg(component)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::Tools(format!("running {} {component}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(Error::Tools(format!(
            "{} {component} failed ({})",
            script.display(),
            out.status
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()).join(file))
        .ok_or_else(|| Error::Tools("build.sh printed no directory".into()))?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Tools(format!("{} is missing", path.display())))
    }
}
