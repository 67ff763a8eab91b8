//! Client-side validation of Strata manifests against the rules embedded in
//! the generated CRDs: the typed shape (serde) and every CEL rule, with the
//! schema defaults applied first, as the API server does. The API server
//! additionally enforces the OpenAPI bounds (enums, lengths, required
//! fields); the e2e suite checks those against a real kube-apiserver.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::{RootContext, Validator};
use serde_json::Value;

use crate::{API_VERSION, Adapter, GPUPool, Model};

/// Why a manifest is not a valid Strata object.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// The manifest is not of a Strata kind.
    #[error(
        "not a Strata object: apiVersion {api_version:?}, kind {kind:?} (expected {API_VERSION} GPUPool, Model or Adapter)"
    )]
    UnknownKind {
        /// apiVersion found.
        api_version: String,
        /// kind found.
        kind: String,
    },
    /// The manifest does not have the shape of the kind.
    #[error("{kind} does not match the schema: {source}")]
    Shape {
        /// The kind.
        kind: String,
        /// The deserialization error.
        source: serde_json::Error,
    },
    /// One or more CEL rules failed.
    #[error("{kind} {name:?} is invalid: {}", .messages.join("; "))]
    Rules {
        /// The kind.
        kind: String,
        /// metadata.name.
        name: String,
        /// `field: message` per failed rule.
        messages: Vec<String>,
    },
    /// The CRD itself could not be turned into a schema (a bug).
    #[error("CRD schema of {0} is missing or unreadable")]
    Schema(String),
}

impl ValidationError {
    /// The messages of failed rules (empty for other errors).
    pub fn messages(&self) -> Vec<String> {
        match self {
            Self::Rules { messages, .. } => messages.clone(),
            other => vec![other.to_string()],
        }
    }
}

fn crd_for(kind: &str) -> Option<CustomResourceDefinition> {
    use kube::CustomResourceExt;
    match kind {
        "GPUPool" => Some(GPUPool::crd()),
        "Model" => Some(Model::crd()),
        "Adapter" => Some(Adapter::crd()),
        _ => None,
    }
}

fn shape_check(kind: &str, obj: &Value) -> Result<(), ValidationError> {
    let res = match kind {
        "GPUPool" => serde_json::from_value::<GPUPool>(obj.clone()).map(|_| ()),
        "Model" => serde_json::from_value::<Model>(obj.clone()).map(|_| ()),
        "Adapter" => serde_json::from_value::<Adapter>(obj.clone()).map(|_| ()),
        _ => Ok(()),
    };
    res.map_err(|source| ValidationError::Shape {
        kind: kind.to_string(),
        source,
    })
}

/// Validates a manifest on creation (`old` = None) or as an update of `old`.
pub fn validate(obj: &Value, old: Option<&Value>) -> Result<(), ValidationError> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    let crd = match crd_for(&kind) {
        Some(crd) if api_version == API_VERSION => crd,
        _ => return Err(ValidationError::UnknownKind { api_version, kind }),
    };
    shape_check(&kind, obj)?;
    let schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .ok_or_else(|| ValidationError::Schema(kind.clone()))
        .and_then(|s| serde_json::to_value(s).map_err(|_| ValidationError::Schema(kind.clone())))?;
    let root = RootContext {
        api_version: API_VERSION.to_string(),
        api_group: crate::GROUP.to_string(),
        kind: kind.clone(),
    };
    match Validator::new().validate_with_context(&schema, obj, old, Some(&root)) {
        Ok(()) => Ok(()),
        Err(errors) => Err(ValidationError::Rules {
            name: obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            kind,
            messages: errors.iter().map(|e| e.to_string()).collect(),
        }),
    }
}

/// Parses YAML text into JSON (for tests and tools that read manifests).
pub fn yaml_to_json(text: &str) -> Result<Value, serde_yaml_ng::Error> {
    serde_yaml_ng::from_str(text)
}

/// Applies a JSON merge patch (RFC 7386) to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch_map) => {
            if !target.is_object() {
                *target = Value::Object(serde_json::Map::new());
            }
            if let Value::Object(target_map) = target {
                for (key, value) in patch_map {
                    if value.is_null() {
                        target_map.remove(key);
                    } else {
                        merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}
