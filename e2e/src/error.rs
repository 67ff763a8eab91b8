//! The harness's error type.

use std::path::PathBuf;

/// Everything that can go wrong while bringing up or driving the local world.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pinned upstream binaries could not be built or found.
    #[error("upstream binaries: {0}")]
    Tools(String),
    /// Certificates could not be generated.
    #[error("generating certificates: {0}")]
    Pki(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("starting {name}: {source}")]
    Spawn {
        /// The component.
        name: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A component exited while it should be running.
    #[error("{name} exited ({status}); last lines of {log}:\n{tail}")]
    Exited {
        /// The component.
        name: String,
        /// Its exit status.
        status: String,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// A condition was not met in time.
    #[error("timed out after {seconds}s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        seconds: u64,
    },
    /// The topology file is invalid.
    #[error("topology {path}: {reason}")]
    Topology {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The kubeconfig could not be loaded.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// The world's control channel refused or failed a request.
    #[error("world control: {0}")]
    Control(String),
    /// Serialization failed.
    #[error("serializing {what}: {reason}")]
    Serialize {
        /// What.
        what: String,
        /// Cause.
        reason: String,
    },
}

/// Result with the harness's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
