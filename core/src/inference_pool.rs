//! The Gateway API Inference Extension's `InferencePool`
//! (`inference.networking.k8s.io/v1`) a Model asks for with
//! `spec.routing.inferencePool`: named like the Model, selecting its pods
//! with the labels its Service selects them by, on the sidecar's port
//! (the port clients use), with the endpoint picker the Model names. Pure:
//! the object as JSON, and whether a cached one already is it.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use strata_crds::Model;
use strata_crds::model::{FailureMode, InferencePoolRouting};

use crate::labels;
use crate::template::{self, SIDECAR_HTTP_PORT};

/// The extension's API group.
pub const GROUP: &str = "inference.networking.k8s.io";
/// The version Strata writes.
pub const VERSION: &str = "v1";
/// `group/version`.
pub const API_VERSION: &str = "inference.networking.k8s.io/v1";
/// The kind.
pub const KIND: &str = "InferencePool";
/// The resource (plural).
pub const PLURAL: &str = "inferencepools";
/// The endpoint picker's port when the Model does not say: the extension's
/// gRPC ext-proc port (its Helm chart's `extProcPort` default).
pub const DEFAULT_EPP_PORT: i32 = 9002;

/// What the Model asks for, if it asks for an InferencePool.
pub fn wanted(model: &Model) -> Option<&InferencePoolRouting> {
    model
        .spec
        .routing
        .as_ref()
        .and_then(|r| r.inference_pool.as_ref())
}

/// The endpoint picker Service's name for the Model `name`: the one the
/// Model gives, else `<name>-epp` (what the extension's `inferencepool`
/// chart names the picker of a pool installed under the Model's name).
pub fn endpoint_picker_name(name: &str, routing: &InferencePoolRouting) -> String {
    routing
        .endpoint_picker
        .as_ref()
        .and_then(|e| e.name.clone())
        .unwrap_or_else(|| format!("{name}-epp"))
}

/// The InferencePool of the Model `name` (UID `uid`) in `namespace`, as
/// the JSON Strata applies. Pure.
pub fn build(namespace: &str, name: &str, uid: &str, routing: &InferencePoolRouting) -> Value {
    let picker = routing.endpoint_picker.as_ref();
    let mut epp = json!({
        "group": "",
        "kind": "Service",
        "name": endpoint_picker_name(name, routing),
        "port": {"number": picker.and_then(|e| e.port).unwrap_or(DEFAULT_EPP_PORT)},
    });
    if let Some(mode) = picker.and_then(|e| e.failure_mode) {
        epp["failureMode"] = json!(failure_mode(mode));
    }
    let mut pool_labels: BTreeMap<String, String> = template::model_selector(name);
    pool_labels.insert(labels::MANAGED_BY.into(), labels::MANAGER.into());
    pool_labels.insert(labels::APP_NAME.into(), "strata-model".into());
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": pool_labels,
            "ownerReferences": [template::controller_ref("Model", name, uid)],
        },
        "spec": {
            "selector": {"matchLabels": template::model_selector(name)},
            "targetPorts": [{"number": SIDECAR_HTTP_PORT}],
            "appProtocol": "http",
            "endpointPickerRef": epp,
        },
    })
}

fn failure_mode(mode: FailureMode) -> &'static str {
    match mode {
        FailureMode::FailOpen => "FailOpen",
        FailureMode::FailClose => "FailClose",
    }
}

/// Whether the object `have` (as the API server returns it) is owned by
/// the Model with UID `uid`.
pub fn owned_by(have: &Value, uid: &str) -> bool {
    have["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
}

/// Whether `have` (a cached InferencePool) already is what `desired`
/// ([`build`]) asks: owned by `uid`, the desired labels among its labels,
/// and the same spec, with the API server's defaults (`appProtocol: http`,
/// the picker's group `""`, kind `Service` and `failureMode: FailClose`)
/// counted as written. Pure.
pub fn matches(have: &Value, desired: &Value, uid: &str) -> bool {
    let labels_in = desired["metadata"]["labels"]
        .as_object()
        .is_some_and(|want| {
            want.iter()
                .all(|(k, v)| have["metadata"]["labels"].get(k) == Some(v))
        });
    owned_by(have, uid) && labels_in && normalized(&have["spec"]) == normalized(&desired["spec"])
}

/// A spec with the CRD's defaults filled in.
fn normalized(spec: &Value) -> Value {
    let mut s = spec.clone();
    if let Some(obj) = s.as_object_mut() {
        obj.entry("appProtocol").or_insert_with(|| json!("http"));
        if let Some(epp) = obj
            .get_mut("endpointPickerRef")
            .and_then(Value::as_object_mut)
        {
            epp.entry("group").or_insert_with(|| json!(""));
            epp.entry("kind").or_insert_with(|| json!("Service"));
            epp.entry("failureMode")
                .or_insert_with(|| json!("FailClose"));
        }
    }
    s
}

/// Why a Model that asks for an InferencePool does not have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The API server does not serve `inference.networking.k8s.io/v1`
    /// InferencePools: the extension's CRDs are not installed.
    NotInstalled,
    /// An InferencePool of the Model's name exists that the Model does not
    /// own; Strata leaves it alone.
    Conflict,
}

impl Problem {
    /// The Degraded condition's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotInstalled => "InferencePoolUnavailable",
            Self::Conflict => "InferencePoolConflict",
        }
    }

    /// The condition's message for the Model `name`.
    pub fn message(&self, name: &str) -> String {
        match self {
            Self::NotInstalled => format!(
                "spec.routing.inferencePool asks for an InferencePool, but the API server does not serve {API_VERSION} {PLURAL}: install the Gateway API Inference Extension's CRDs (the Model is served through its Service meanwhile)"
            ),
            Self::Conflict => format!(
                "an InferencePool named {name} exists and is not owned by this Model; Strata leaves it alone"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_crds::model::EndpointPicker;

    fn model(routing: Value) -> Model {
        serde_json::from_value(json!({
            "apiVersion": "strata.ai/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "llama", "namespace": "team", "uid": "u1"},
            "spec": {
                "source": {"uri": "hf://m/x"},
                "engine": {"type": "vLLM"},
                "pools": [{"name": "h100"}],
                "maxReplicas": 2,
                "routing": routing,
            },
        }))
        .expect("model")
    }

    #[test]
    fn only_a_model_that_asks_gets_one() {
        assert!(wanted(&model(Value::Null)).is_none());
        assert!(wanted(&model(json!({}))).is_none());
        assert!(wanted(&model(json!({"inferencePool": null}))).is_none());
        assert!(wanted(&model(json!({"inferencePool": {}}))).is_some());
    }

    #[test]
    fn the_pool_selects_the_models_pods_on_the_sidecars_port_with_the_default_picker() {
        let m = model(json!({"inferencePool": {}}));
        let pool = build("team", "llama", "u1", wanted(&m).expect("asked"));
        assert_eq!(pool["apiVersion"], "inference.networking.k8s.io/v1");
        assert_eq!(pool["kind"], "InferencePool");
        assert_eq!(pool["metadata"]["name"], "llama");
        assert_eq!(pool["metadata"]["namespace"], "team");
        // The Service's selector: every replica pod, whatever its pool or template.
        assert_eq!(
            pool["spec"]["selector"]["matchLabels"],
            json!({"strata.ai/model": "llama", "app.kubernetes.io/instance": "llama"})
        );
        assert_eq!(
            serde_json::to_value(template::model_selector("llama")).expect("json"),
            pool["spec"]["selector"]["matchLabels"]
        );
        assert_eq!(pool["spec"]["targetPorts"], json!([{"number": 8080}]));
        assert_eq!(
            pool["spec"]["endpointPickerRef"],
            json!({"group": "", "kind": "Service", "name": "llama-epp", "port": {"number": 9002}})
        );
        let owner = &pool["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Model");
        assert_eq!(owner["uid"], "u1");
        assert_eq!(owner["controller"], true);
        assert_eq!(
            pool["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            labels::MANAGER
        );
    }

    #[test]
    fn the_model_names_its_picker() {
        let m = model(json!({"inferencePool": {"endpointPicker": {
            "name": "shared-epp", "port": 9100, "failureMode": "FailOpen"}}}));
        let routing = wanted(&m).expect("asked");
        assert_eq!(
            routing.endpoint_picker,
            Some(EndpointPicker {
                name: Some("shared-epp".into()),
                port: Some(9100),
                failure_mode: Some(FailureMode::FailOpen),
            })
        );
        let pool = build("team", "llama", "u1", routing);
        assert_eq!(
            pool["spec"]["endpointPickerRef"],
            json!({"group": "", "kind": "Service", "name": "shared-epp", "port": {"number": 9100}, "failureMode": "FailOpen"})
        );
    }

    #[test]
    fn a_cached_pool_matches_with_the_api_servers_defaults_and_not_after_a_change() {
        let m = model(json!({"inferencePool": {}}));
        let desired = build("team", "llama", "u1", wanted(&m).expect("asked"));
        assert!(matches(&desired, &desired, "u1"));
        // As the API server returns it: defaults filled in, more metadata.
        let mut have = desired.clone();
        have["spec"]["endpointPickerRef"]["failureMode"] = json!("FailClose");
        have["metadata"]["labels"]["extra"] = json!("x");
        have["metadata"]["resourceVersion"] = json!("7");
        have["status"] = json!({"parents": []});
        assert!(matches(&have, &desired, "u1"));
        // Another owner, a changed spec, a label removed: not a match.
        assert!(!matches(&have, &desired, "u2"));
        let mut changed = have.clone();
        changed["spec"]["targetPorts"] = json!([{"number": 8000}]);
        assert!(!matches(&changed, &desired, "u1"));
        let mut changed = have.clone();
        changed["spec"]["endpointPickerRef"]["name"] = json!("other");
        assert!(!matches(&changed, &desired, "u1"));
        let mut changed = have.clone();
        changed["spec"]["endpointPickerRef"]["failureMode"] = json!("FailOpen");
        assert!(!matches(&changed, &desired, "u1"));
        let mut changed = have;
        changed["metadata"]["labels"]
            .as_object_mut()
            .expect("labels")
            .remove(labels::MODEL);
        assert!(!matches(&changed, &desired, "u1"));
        // A picker that changes in the Model changes the desired pool.
        let m2 = model(json!({"inferencePool": {"endpointPicker": {"name": "b"}}}));
        let desired2 = build("team", "llama", "u1", wanted(&m2).expect("asked"));
        assert!(!matches(&desired, &desired2, "u1"));
    }

    #[test]
    fn problems_explain_themselves() {
        assert_eq!(Problem::NotInstalled.reason(), "InferencePoolUnavailable");
        assert!(
            Problem::NotInstalled
                .message("llama")
                .contains("inference.networking.k8s.io/v1 inferencepools")
        );
        assert_eq!(Problem::Conflict.reason(), "InferencePoolConflict");
        assert!(Problem::Conflict.message("llama").contains("named llama"));
    }
}
