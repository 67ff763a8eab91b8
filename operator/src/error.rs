//! The operator's error type. Its category is the metrics label and the
//! Event reason.

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A pod could not be built from the Model.
    #[error("building the replica pod: {0}")]
    Template(#[from] crate::template::TemplateError),
    /// The object lacks a name or namespace.
    #[error("object has no {0}")]
    MissingKey(&'static str),
    /// Serializing a patch failed.
    #[error("serializing: {0}")]
    Serialize(#[from] serde_json::Error),
    /// No randomness for a token.
    #[error("reading random bytes for a token: {0}")]
    Random(#[from] std::io::Error),
    /// A sidecar certificate could not be built.
    #[error("issuing the sidecar certificate: {0}")]
    Pki(#[from] crate::pki::PkiError),
}

impl Error {
    /// Low-cardinality category: the `category` label of
    /// `strata_reconcile_errors_total` and the reason of Warning events.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Self::Kube(kube::Error::Api(e)) if e.code == 403 => "forbidden",
            Self::Kube(kube::Error::Api(e)) if e.code == 404 => "not_found",
            Self::Kube(kube::Error::Api(e)) if e.code == 422 => "invalid",
            Self::Kube(_) => "api",
            Self::Template(_) => "template",
            Self::MissingKey(_) | Self::Serialize(_) | Self::Random(_) => "internal",
            Self::Pki(_) => "certificate",
        }
    }
}

/// Result with the operator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
