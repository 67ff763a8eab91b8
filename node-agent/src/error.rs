//! The agent's errors, one enum; [`Error::source_label`] is the `source`
//! label of `strata_node_agent_errors_total`.

use std::net::SocketAddr;
use std::time::Duration;

use nvml_wrapper::error::NvmlError;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The NVML library could not be loaded or initialised (no driver, no
    /// library in the container, driver not loaded yet).
    #[error("initialising NVML from {lib}: {source}")]
    NvmlInit {
        /// The library asked for.
        lib: String,
        /// Why.
        #[source]
        source: NvmlError,
    },
    /// An NVML call that the whole sample needs failed.
    #[error("NVML {what}: {source}")]
    Nvml {
        /// The call.
        what: &'static str,
        /// Why.
        #[source]
        source: NvmlError,
    },
    /// NVML did not answer in time (the sample is still running).
    #[error("NVML did not answer within {0:?}")]
    NvmlTimeout(Duration),
    /// The previous sample is still running (a stuck driver call).
    #[error("NVML is still busy with the previous sample")]
    NvmlBusy,
    /// The NVML thread ended.
    #[error("the NVML thread is gone")]
    NvmlThreadGone,
    /// The NVML thread could not be started.
    #[error("starting the NVML thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The kubelet's PodResources API did not answer.
    #[error(transparent)]
    PodResources(#[from] strata_podresources::Error),
    /// The metrics page could not be built.
    #[error("rendering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The HTTP port could not be opened.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No API server client for power caps (in-cluster configuration).
    #[error("connecting to the API server for power caps: {0}")]
    Kube(#[source] kube::Error),
    /// Serving HTTP failed.
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
}

impl Error {
    /// Where the error came from: `nvml`, `podresources` or `agent`.
    pub fn source_label(&self) -> &'static str {
        match self {
            Self::NvmlInit { .. }
            | Self::Nvml { .. }
            | Self::NvmlTimeout(_)
            | Self::NvmlBusy
            | Self::NvmlThreadGone => crate::metrics::SOURCE_NVML,
            Self::PodResources(_) => crate::metrics::SOURCE_PODRESOURCES,
            Self::Thread(_)
            | Self::Metrics(_)
            | Self::Listen { .. }
            | Self::Serve(_)
            | Self::Kube(_) => "agent",
        }
    }
}
