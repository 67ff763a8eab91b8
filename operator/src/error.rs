//! The reconcilers' error type: one variant per failing call, naming what
//! was being done and to which object ("creating a replica of Model m on
//! node n: pods "x" is forbidden: exceeded quota ..."), so that the
//! Warning Event and the `ReconcileError` condition tell a person what
//! went wrong without the operator's logs. An API server refusal is shown
//! in the API server's own words. Its category is the metrics label and
//! the Event reason.

use strata_core::template::TemplateError;

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks a name, namespace or UID (never from a real API server).
    #[error("the object has no {0}")]
    MissingKey(&'static str),

    /// Reading an object the reconcile depends on (a Secret, the Model of an
    /// Adapter, a Service).
    #[error("reading {kind} {name}: {}", api_words(.source))]
    Get {
        /// Its kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// Listing a Model's pods.
    #[error("listing the pods of Model {model}: {}", api_words(.source))]
    ListPods {
        /// The Model.
        model: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// Creating a replica pod.
    #[error("creating a replica of Model {model} on node {node}: {}", api_words(.source))]
    CreatePod {
        /// The Model.
        model: String,
        /// The node it was placed on.
        node: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// Deleting a replica pod.
    #[error("deleting pod {pod}: {}", api_words(.source))]
    DeletePod {
        /// The pod.
        pod: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// Labelling a replica pod (the adapters it carries).
    #[error("labelling pod {pod}: {}", api_words(.source))]
    LabelPod {
        /// The pod.
        pod: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// Creating or updating an object Strata owns (a Secret, a Service).
    #[error("writing {kind} {name}: {}", api_words(.source))]
    Write {
        /// Its kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// Writing an object's status.
    #[error("writing the status of {kind} {name}: {}", api_words(.source))]
    WriteStatus {
        /// Its kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// Adding or removing a finalizer.
    #[error("{action} the finalizer of {kind} {name}: {}", api_words(.source))]
    Finalizer {
        /// "adding" or "removing".
        action: &'static str,
        /// Its kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// A pod could not be built from the Model.
    #[error("building the replica pod of Model {model} for pool {pool}: {source}")]
    Template {
        /// The Model.
        model: String,
        /// The pool.
        pool: String,
        /// Why.
        source: TemplateError,
    },
    /// No randomness for a token.
    #[error("reading random bytes for the adapter token: {0}")]
    Random(#[source] std::io::Error),
    /// A sidecar certificate could not be built.
    #[error("issuing the sidecars' certificate {name}: {source}")]
    Pki {
        /// The server name.
        name: String,
        /// Why.
        source: crate::pki::PkiError,
    },
    /// A Model's background writes stopped without an answer (a panic: a
    /// bug); what they would have done is taken back.
    #[error("the writes of Model {model} stopped unexpectedly; they are taken back and retried")]
    WritesAborted {
        /// The Model.
        model: String,
    },
}

/// What the API server said, without the client's wrapping: its message
/// for a refusal (quota, Pod Security, a webhook, validation), else the
/// client's error.
pub fn api_words(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => s.message.clone(),
        other => other.to_string(),
    }
}

impl Error {
    /// The API server's answer, where the error is one.
    pub fn api(&self) -> Option<&kube::Error> {
        match self {
            Self::Get { source, .. }
            | Self::ListPods { source, .. }
            | Self::CreatePod { source, .. }
            | Self::DeletePod { source, .. }
            | Self::LabelPod { source, .. }
            | Self::Write { source, .. }
            | Self::WriteStatus { source, .. }
            | Self::Finalizer { source, .. } => Some(source),
            Self::MissingKey(_)
            | Self::Template { .. }
            | Self::Random(_)
            | Self::Pki { .. }
            | Self::WritesAborted { .. } => None,
        }
    }

    /// Low-cardinality category: the `category` label of
    /// `strata_reconcile_errors_total` and the reason of Warning events.
    pub fn metric_label(&self) -> &'static str {
        match (self, self.api()) {
            (_, Some(kube::Error::Api(e))) if e.code == 409 => "conflict",
            (_, Some(kube::Error::Api(e))) if e.code == 403 => "forbidden",
            (_, Some(kube::Error::Api(e))) if e.code == 404 => "not_found",
            (_, Some(kube::Error::Api(e))) if e.code == 422 => "invalid",
            (_, Some(_)) => "api",
            (Self::Template { .. }, _) => "template",
            (Self::Pki { .. }, _) => "certificate",
            _ => "internal",
        }
    }
}

/// Result with the operator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, "Forbidden")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn errors_name_the_call_and_quote_the_api_server() {
        let e = Error::CreatePod {
            model: "llama".into(),
            node: "gpu-a-0".into(),
            source: refused(403, "pods \"llama-x\" is forbidden: exceeded quota: gpus"),
        };
        assert_eq!(
            e.to_string(),
            "creating a replica of Model llama on node gpu-a-0: pods \"llama-x\" is forbidden: exceeded quota: gpus"
        );
        assert_eq!(e.metric_label(), "forbidden");
        let e = Error::WriteStatus {
            kind: "Model",
            name: "m".into(),
            source: refused(409, "the object has been modified"),
        };
        assert_eq!(e.metric_label(), "conflict");
        assert!(e.to_string().starts_with("writing the status of Model m: "));
        assert_eq!(Error::MissingKey("uid").metric_label(), "internal");
    }
}
