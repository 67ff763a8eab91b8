//! Types and validation rules shared by the Strata kinds.

use kube::KubeSchema;
use kube::core::{Reason, Rule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Strata kind.
pub const GROUP: &str = "strata.ai";
/// The API version served and stored.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every Strata object.
pub const API_VERSION: &str = "strata.ai/v1alpha1";

/// Go-style duration accepted by every duration field: one or more
/// `<number><unit>` terms with units ms, s, m or h (`500ms`, `30s`, `1m30s`).
pub const DURATION_PATTERN: &str = "^([0-9]+([.][0-9]+)?(ms|s|m|h))+$";

/// URI schemes a model or adapter can be loaded from.
pub const SOURCE_SCHEMES: [&str; 5] = ["hf://", "s3://", "gs://", "pvc://", "oci://"];

/// The CEL rule for a duration field: its format.
pub(crate) fn duration_format(example: &str) -> Rule {
    Rule::new(format!("self.matches('{DURATION_PATTERN}')"))
        .message(
            format!(
                "must be a duration such as {example}: a number and a unit (ms, s, m or h), e.g. 500ms, 30s, 5m, 1h30m"
            )
            .as_str(),
        )
        .reason(Reason::FieldValueInvalid)
}

/// The CEL rule for a duration field: its range (only evaluated once the
/// format is right, so a bad format yields one clear message).
pub(crate) fn duration_range(min: &str, max: &str) -> Rule {
    Rule::new(format!(
        "!self.matches('{DURATION_PATTERN}') || (duration(self) >= duration('{min}') && duration(self) <= duration('{max}'))"
    ))
    .message(format!("must be between {min} and {max}").as_str())
    .reason(Reason::FieldValueInvalid)
}

/// A reference to a Secret in the object's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret, in the same namespace as the object that refers to it.
    /// Every key of the Secret is given to the process that downloads the
    /// weights as an environment variable of the same name, for example
    /// `HF_TOKEN` for hf://, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`
    /// for s3://, `GOOGLE_APPLICATION_CREDENTIALS_JSON` for gs://. Its values
    /// are never logged or copied into status.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("must be a valid Secret name: lowercase letters, digits, '-' and '.'"))]
    pub name: String,
}

/// Where weights come from.
///
/// `uri` forms:
/// - `hf://<organization>/<repository>[@<revision>]`: the Hugging Face Hub.
/// - `s3://<bucket>/<path>`: an S3 or S3-compatible bucket.
/// - `gs://<bucket>/<path>`: a Google Cloud Storage bucket.
/// - `pvc://<claim>/<path>`: a PersistentVolumeClaim in the same namespace, mounted read-only.
/// - `oci://<registry>/<repository>[:<tag>|@<digest>]`: an OCI artifact (model car).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.credentialsSecretRef) || !self.uri.startsWith('pvc://')").message("credentialsSecretRef is not used with pvc:// sources (the claim is mounted directly); remove it").reason(Reason::FieldValueForbidden))]
pub struct Source {
    /// Location of the weights: hf://, s3://, gs://, pvc:// or oci://.
    #[schemars(length(min = 6, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('hf://') || self.startsWith('s3://') || self.startsWith('gs://') || self.startsWith('pvc://') || self.startsWith('oci://')").message("must start with hf://, s3://, gs://, pvc:// or oci://"))]
    #[x_kube(validation = Rule::new("!self.startsWith('hf://') || self.matches('^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$')").message("hf:// sources look like hf://<organization>/<repository>[@<revision>]"))]
    #[x_kube(validation = Rule::new("!(self.startsWith('s3://') || self.startsWith('gs://')) || self.matches('^(s3|gs)://[a-z0-9][a-z0-9._-]{1,61}[a-z0-9](/.*)?$')").message("s3:// and gs:// sources look like s3://<bucket>/<path>, with a lowercase bucket name of 3 to 63 characters"))]
    #[x_kube(validation = Rule::new("!self.startsWith('pvc://') || self.matches('^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?$')").message("pvc:// sources look like pvc://<claim-name>/<path>, with the name of a PersistentVolumeClaim in the same namespace"))]
    #[x_kube(validation = Rule::new("!self.startsWith('oci://') || self.matches('^oci://[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._/-]+(:[A-Za-z0-9._-]+|@sha256:[a-f0-9]{64})?$')").message("oci:// sources look like oci://<registry>/<repository>[:<tag>|@sha256:<digest>]"))]
    pub uri: String,

    /// Secret holding the credentials needed to download the weights. Not
    /// needed for public hf:// repositories; not allowed for pvc://.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
}

/// The placement policy of a pool.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PlacementPolicy {
    /// Fill the fullest node that still fits a replica, keeping whole nodes
    /// free for large models (the default).
    #[default]
    BinPack,
    /// Put each replica on the emptiest node, so that one node failure takes
    /// the fewest replicas with it.
    Spread,
}

/// Name and namespace of an object, used in status to point at other objects.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
}

/// What GPUs cost, from the pools' `costPerGpuHour` (in the currency the
/// pools' prices are in).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CostStatus {
    /// The GPUs held now, priced per hour.
    pub per_hour: f64,
    /// That cost per million generated tokens at the last interval's token
    /// rate; absent while nothing is generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_million_tokens: Option<f64>,
    /// GPUs priced (those without a price on their pool are left out).
    pub gpus: i32,
}
