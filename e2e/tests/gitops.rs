//! GitOps and dashboards (docs/gitops.md), tested against the real thing.
//!
//! - The Argo CD health checks (`charts/strata/argocd/health-*.lua`) run in
//!   Lua 5.1 (mlua with a vendored Lua 5.1: Argo CD runs them in gopher-lua,
//!   a Lua 5.1) with only the libraries Argo CD opens for them (base, table,
//!   package: no string, no math), `obj` converted from the object's JSON as
//!   Argo CD converts an unstructured object. A table of objects whose
//!   conditions come from the operator's own condition builders covers every
//!   outcome; the ready-to-paste argocd-cm snippets match the scripts.
//! - In the local world the scripts judge real objects: a Model through
//!   every version Argo CD could see, from its creation to Healthy, through
//!   an autoscaler scale-up and a rollout (Progressing) and back; a Model
//!   that fits no node (Degraded); an Adapter loaded (Healthy) and one the
//!   engine refuses (Degraded); a GPUPool with nodes (Healthy) and one
//!   without (Degraded).
//! - The Grafana dashboard, installed by the chart as a ConfigMap: every
//!   panel's PromQL and every variable's query, evaluated by a real
//!   Prometheus (`STRATA_PROMETHEUS_BIN`, from `e2e/tools/prometheus.sh`)
//!   scraping the model pods' sidecars (found through the API server with a
//!   ServiceAccount of its own and labelled as a PodMonitor labels them) and
//!   the operator while the Model serves load, returns data.
//!
//! What runs where: the operator is installed with its chart (Helm) and runs
//! in-cluster, the Deployment's two replicas from the `strata-operator`
//! image (pod runner in image mode, leader election through the Lease);
//! Prometheus scrapes the leader's pod at its IP (loopback) on the chart's
//! metrics port. The Models' replicas run from the engine simulator's and
//! the sidecar's images, with what a GPU node adds (the runner profile's
//! injections): the simulator's knobs and load file, the fake NVML library
//! in the sidecar. Prometheus, the Argo CD checks (Lua in this process) and
//! the load run in the test binary.
//!
//! Needs the images: `scripts/images --profile dev strata-operator
//! strata-sidecar strata-engine-sim` (scripts/test builds them first).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use mlua::{Lua, LuaOptions, StdLib, Value as LuaValue};
use serde_json::{Value, json};
use strata_core::adapters::{self, Round};
use strata_core::conditions::{self, Set};
use strata_core::status::{Facts, model_conditions, reconcile_error};
use strata_core::view::pod_ready;
use strata_crds::adapter::AdapterStatus;
use strata_crds::model::ModelStatus;
use strata_crds::{Adapter, GPUPool, Model};
use strata_e2e::harness::{
    Leader, World, chart_world, engine_sim_image, free_port, model_image_profile, prometheus_bin,
    repo_path, repo_yaml, service_account_kubeconfig, sidecar_fast_injection,
    sim_engine_gpu_injection, test_namespace, wait_for, world,
};
use strata_e2e::process::Component;

// ---------------------------------------------------------------------------
// The health checks, as Argo CD runs them
// ---------------------------------------------------------------------------

/// The health checks: (kind, file under charts/strata/argocd), by kind.
const SCRIPTS: [(&str, &str); 3] = [
    ("Adapter", "health-adapter.lua"),
    ("GPUPool", "health-gpupool.lua"),
    ("Model", "health-model.lua"),
];

/// The statuses Argo CD accepts from a script (anything else: Unknown).
const ARGO_STATUSES: [&str; 6] = [
    "Healthy",
    "Progressing",
    "Degraded",
    "Suspended",
    "Missing",
    "Unknown",
];

fn script(kind: &str) -> String {
    let file = SCRIPTS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, f)| *f)
        .expect("a health check for the kind");
    let path = repo_path("charts/strata/argocd").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What Argo CD makes of a script's answer.
#[derive(Debug, Clone, PartialEq)]
struct Health {
    status: String,
    message: String,
}

/// `value` as Argo CD hands an unstructured object to a health script
/// (`decodeValue` in its util/lua): objects and arrays become tables
/// (arrays from index 1), every number a Lua number (a float, as in
/// gopher-lua), null nothing.
fn to_lua(lua: &Lua, value: &Value) -> mlua::Result<LuaValue> {
    Ok(match value {
        Value::Null => LuaValue::Nil,
        Value::Bool(b) => LuaValue::Boolean(*b),
        Value::Number(n) => LuaValue::Number(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => LuaValue::String(lua.create_string(s)?),
        Value::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item)?)?;
            }
            LuaValue::Table(t)
        }
        Value::Object(fields) => {
            let t = lua.create_table_with_capacity(0, fields.len())?;
            for (k, item) in fields {
                t.raw_set(k.as_str(), to_lua(lua, item)?)?;
            }
            LuaValue::Table(t)
        }
    })
}

/// Runs a health script on `obj` as Argo CD does: a fresh Lua state with
/// only the base, table and package libraries (Argo CD adds a reduced `os`,
/// which Strata's scripts do not use), `obj` global, the chunk's return
/// value the answer; a status Argo CD does not know reads as Unknown.
fn argo_health(script: &str, obj: &Value) -> Result<Health, String> {
    let run = || -> mlua::Result<Result<Health, String>> {
        let lua = Lua::new_with(StdLib::TABLE | StdLib::PACKAGE, LuaOptions::default())?;
        lua.globals().set("obj", to_lua(&lua, obj)?)?;
        let answer: LuaValue = lua.load(script).set_name("health.lua").eval()?;
        let LuaValue::Table(t) = answer else {
            return Ok(Err(format!(
                "expect table output from Lua script, not {}",
                answer.type_name()
            )));
        };
        let text = |v: LuaValue| match v {
            LuaValue::String(s) => Ok(Some(s.to_string_lossy())),
            LuaValue::Nil => Ok(None),
            other => Err(format!(
                "a {} where a string was expected",
                other.type_name()
            )),
        };
        let status = match text(t.get("status")?) {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => return Ok(Err(format!("status: {e}"))),
        };
        let message = match text(t.get("message")?) {
            Ok(m) => m.unwrap_or_default(),
            Err(e) => return Ok(Err(format!("message: {e}"))),
        };
        if !ARGO_STATUSES.contains(&status.as_str()) {
            return Ok(Ok(Health {
                status: "Unknown".into(),
                message: "Lua returned an invalid health status".into(),
            }));
        }
        Ok(Ok(Health { status, message }))
    };
    run().map_err(|e| e.to_string())?
}

/// Judges `obj` with the script of its kind; panics on a script error.
fn judge(obj: &Value) -> Health {
    let kind = obj["kind"].as_str().expect("kind");
    argo_health(&script(kind), obj).unwrap_or_else(|e| panic!("the {kind} script failed: {e}"))
}

// ---------------------------------------------------------------------------
// Objects for the table, their conditions from the operator's own builders
// ---------------------------------------------------------------------------

fn now() -> Time {
    Time(Timestamp::now())
}

/// An object of `kind` at `generation` with `status` (None: none yet).
fn object(kind: &str, generation: i64, status: Option<Value>) -> Value {
    let mut o = json!({
        "apiVersion": "strata.ai/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ns", "generation": generation, "uid": "u"},
        "spec": {},
    });
    if let Some(s) = status {
        o["status"] = s;
    }
    o
}

fn facts(desired: i32, replicas: i32, ready: i32, updated: i32) -> Facts {
    Facts {
        name: "x".into(),
        desired,
        replicas,
        ready,
        updated,
        progress_deadline: "15m".into(),
        ..Facts::default()
    }
}

/// A Model's status as the controller writes it for `f` (observed at
/// generation 2), with the error reporter's condition when given.
fn model_status(f: &Facts, error: Option<Option<(&str, &str)>>) -> Value {
    let mut sets: Vec<Set> = model_conditions(f).to_vec();
    if let Some(e) = error {
        sets.push(reconcile_error(e));
    }
    let status = ModelStatus {
        observed_generation: Some(2),
        conditions: conditions::merge(&[], &sets, Some(2), &now()),
        replicas: f.replicas,
        ready_replicas: f.ready,
        updated_replicas: f.updated,
        desired_replicas: Some(f.desired),
        ..ModelStatus::default()
    };
    serde_json::to_value(status).expect("status")
}

/// An Adapter's status as the controller writes it after `round`.
fn adapter_status(round: &Round, error: Option<(&str, &str)>) -> Value {
    let (phase, reason, message) = adapters::phase(round);
    let mut sets: Vec<Set> = adapters::conditions(&phase, reason, &message).to_vec();
    if let Some(e) = error {
        sets.push(reconcile_error(Some(e)));
    }
    let status = AdapterStatus {
        observed_generation: Some(2),
        phase,
        conditions: conditions::merge(&[], &sets, Some(2), &now()),
        desired_replicas: round.desired,
        loaded_replicas: round.loaded,
        ..AdapterStatus::default()
    };
    serde_json::to_value(status).expect("status")
}

/// A GPUPool's status with its Ready condition (the pool controller's
/// reasons) and, if given, a ReconcileError.
fn pool_status(ready: Option<(bool, &str, &str)>, error: Option<(&str, &str)>) -> Value {
    let mut sets = Vec::new();
    if let Some((ok, reason, message)) = ready {
        sets.push(Set::new("Ready", ok, reason, message));
    }
    if let Some(e) = error {
        sets.push(reconcile_error(Some(e)));
    }
    json!({
        "observedGeneration": 2,
        "conditions": conditions::merge(&[], &sets, Some(2), &now()),
        "nodeCount": 2,
    })
}

/// (situation, object, expected status, a part of the expected message).
type Case = (&'static str, Value, &'static str, &'static str);

fn model_cases() -> Vec<Case> {
    let unplaced = Facts {
        unplaced: Some("1 replica(s) cannot be placed: pool h100: no node has 16 free GPUs".into()),
        ..facts(2, 1, 1, 1)
    };
    let all = facts(2, 2, 2, 2);
    vec![
        (
            "created, no status yet",
            object("Model", 1, None),
            "Progressing",
            "Waiting for the Strata operator to report status",
        ),
        (
            "a new spec the operator has not seen (its old status Degraded)",
            object("Model", 3, Some(model_status(&unplaced, None))),
            "Progressing",
            "observe generation 3",
        ),
        (
            "all replicas ready on the current template",
            object("Model", 2, Some(model_status(&all, Some(None)))),
            "Healthy",
            "AllReplicasReady: 2 of 2 replicas ready",
        ),
        (
            "scaled to zero by request",
            object("Model", 2, Some(model_status(&facts(0, 0, 0, 0), None))),
            "Healthy",
            "ScaledToZero",
        ),
        (
            "nothing ready yet",
            object("Model", 2, Some(model_status(&facts(1, 1, 0, 1), None))),
            "Progressing",
            "NoReplicaReady: 0 of 1 replicas ready",
        ),
        (
            "scaling up, one of two ready",
            object("Model", 2, Some(model_status(&facts(2, 2, 1, 2), None))),
            "Progressing",
            "PartiallyReady: 1 of 2 replicas ready",
        ),
        (
            "rolling out a new template, all ready meanwhile",
            object(
                "Model",
                2,
                Some(model_status(
                    &Facts {
                        rolling: true,
                        ..facts(2, 3, 2, 1)
                    },
                    None,
                )),
            ),
            "Progressing",
            "RollingOut: 1 of 2 replicas on the current template",
        ),
        (
            "a new replica missed the progress deadline",
            object(
                "Model",
                2,
                Some(model_status(
                    &Facts {
                        stalled: true,
                        ..facts(2, 2, 1, 2)
                    },
                    None,
                )),
            ),
            "Degraded",
            "ProgressDeadlineExceeded: a replica on the current template has not become ready within 15m",
        ),
        (
            "no room on any pool",
            object("Model", 2, Some(model_status(&unplaced, None))),
            "Degraded",
            "Unplaceable: 1 replica(s) cannot be placed",
        ),
        (
            "the credentials Secret is missing",
            object(
                "Model",
                2,
                Some(model_status(
                    &Facts {
                        missing_secret: Some(
                            "the Secret hf-token (spec.source.credentialsSecretRef)".into(),
                        ),
                        ..facts(1, 0, 0, 0)
                    },
                    None,
                )),
            ),
            "Degraded",
            "SecretNotFound: the Secret hf-token",
        ),
        (
            "a Service of another owner has the Model's name",
            object(
                "Model",
                2,
                Some(model_status(
                    &Facts {
                        service_conflict: true,
                        ..facts(1, 1, 1, 1)
                    },
                    None,
                )),
            ),
            "Degraded",
            "ServiceConflict",
        ),
        (
            "a failed replica was replaced",
            object(
                "Model",
                2,
                Some(model_status(
                    &Facts {
                        failures: 1,
                        deleted: 1,
                        ..facts(2, 2, 1, 2)
                    },
                    None,
                )),
            ),
            "Degraded",
            "ReplicaFailures: 1 replica(s) failed",
        ),
        (
            "the last reconcile failed (a quota), the replicas are fine",
            object(
                "Model",
                2,
                Some(model_status(
                    &all,
                    Some(Some((
                        "Forbidden",
                        "creating a replica: exceeded quota: gpus",
                    ))),
                )),
            ),
            "Degraded",
            "Forbidden: creating a replica: exceeded quota",
        ),
        (
            "conditions without Ready",
            object(
                "Model",
                2,
                Some(
                    json!({"observedGeneration": 2, "conditions": conditions::merge(
                        &[],
                        &[Set::new("Degraded", false, "AsExpected", "no problems")],
                        Some(2),
                        &now(),
                    )}),
                ),
            ),
            "Progressing",
            "Waiting for the Ready condition",
        ),
    ]
}

fn adapter_cases() -> Vec<Case> {
    let round = |desired, loaded| Round {
        desired,
        loaded,
        model: "chat".into(),
        max_per_replica: 4,
        ..Round::default()
    };
    let loaded = adapter_status(&round(2, 2), None);
    let mut deleting = object("Adapter", 2, Some(loaded.clone()));
    deleting["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    let mut failed_no_degraded = adapter_status(
        &Round {
            failures: 1,
            last_error: "the engine refused".into(),
            ..round(2, 0)
        },
        None,
    );
    failed_no_degraded["conditions"] = json!(conditions::merge(
        &[],
        &[Set::new("Ready", false, "LoadFailed", "the engine refused")],
        Some(2),
        &now(),
    ));
    vec![
        (
            "created, no status yet",
            object("Adapter", 1, None),
            "Progressing",
            "Waiting for the Strata operator to report status",
        ),
        (
            "a new spec the operator has not seen",
            object("Adapter", 3, Some(loaded.clone())),
            "Progressing",
            "observe generation 3",
        ),
        (
            "loaded on every replica that should carry it",
            object("Adapter", 2, Some(loaded)),
            "Healthy",
            "Loaded: loaded on 2 of 2 replica(s)",
        ),
        (
            "the Model has no ready replica",
            object("Adapter", 2, Some(adapter_status(&round(0, 0), None))),
            "Progressing",
            "NoReadyReplicas: Model chat has no ready replica yet",
        ),
        (
            "loading",
            object("Adapter", 2, Some(adapter_status(&round(2, 1), None))),
            "Progressing",
            "Loading: loaded on 1 of 2 replica(s)",
        ),
        (
            "loaded on some replicas, failing on another",
            object(
                "Adapter",
                2,
                Some(adapter_status(
                    &Round {
                        failures: 1,
                        last_error: "maximum number of LoRAs reached".into(),
                        ..round(2, 1)
                    },
                    None,
                )),
            ),
            "Degraded",
            "LoadFailed: maximum number of LoRAs reached",
        ),
        (
            "loaded nowhere",
            object(
                "Adapter",
                2,
                Some(adapter_status(
                    &Round {
                        failures: 2,
                        last_error: "the engine refused".into(),
                        ..round(2, 0)
                    },
                    None,
                )),
            ),
            "Degraded",
            "LoadFailed: the engine refused",
        ),
        (
            "no room on the replicas",
            object(
                "Adapter",
                2,
                Some(adapter_status(
                    &Round {
                        short: 1,
                        ..round(3, 2)
                    },
                    None,
                )),
            ),
            "Degraded",
            "NoRoom: 1 replica(s) short",
        ),
        (
            "phase Failed without a Degraded condition",
            object("Adapter", 2, Some(failed_no_degraded)),
            "Degraded",
            "LoadFailed: the engine refused",
        ),
        (
            "the last reconcile failed",
            object(
                "Adapter",
                2,
                Some(adapter_status(
                    &round(2, 2),
                    Some(("Api", "patching the pod: the server is unavailable")),
                )),
            ),
            "Degraded",
            "Api: patching the pod",
        ),
        (
            "being deleted: unloading first",
            deleting,
            "Progressing",
            "Unloading",
        ),
    ]
}

fn pool_cases() -> Vec<Case> {
    vec![
        (
            "created, no status yet",
            object("GPUPool", 1, None),
            "Progressing",
            "Waiting for the Strata operator to report status",
        ),
        (
            "a new spec the operator has not seen",
            object(
                "GPUPool",
                3,
                Some(pool_status(
                    Some((true, "NodesAvailable", "2 schedulable node(s)")),
                    None,
                )),
            ),
            "Progressing",
            "observe generation 3",
        ),
        (
            "schedulable nodes",
            object(
                "GPUPool",
                2,
                Some(pool_status(
                    Some((
                        true,
                        "NodesAvailable",
                        "2 schedulable node(s), 12 of 16 GPUs free",
                    )),
                    None,
                )),
            ),
            "Healthy",
            "NodesAvailable: 2 schedulable node(s), 12 of 16 GPUs free",
        ),
        (
            "no node matches",
            object(
                "GPUPool",
                2,
                Some(pool_status(
                    Some((false, "NoNodes", "no node matches the nodeSelector")),
                    None,
                )),
            ),
            "Degraded",
            "NoNodes: no node matches the nodeSelector",
        ),
        (
            "nodes, none schedulable",
            object(
                "GPUPool",
                2,
                Some(pool_status(
                    Some((
                        false,
                        "NoSchedulableNodes",
                        "2 node(s) match, none can take replicas",
                    )),
                    None,
                )),
            ),
            "Degraded",
            "NoSchedulableNodes",
        ),
        (
            "conditions without Ready",
            object("GPUPool", 2, Some(pool_status(None, Some(("Api", "x"))))),
            "Degraded",
            "Api: x",
        ),
        (
            "no Ready condition yet",
            object(
                "GPUPool",
                2,
                Some(json!({"observedGeneration": 2, "conditions": []})),
            ),
            "Progressing",
            "Waiting for the Ready condition",
        ),
    ]
}

#[test]
fn the_health_checks_map_every_condition_the_operator_sets() {
    let mut failures = Vec::new();
    let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (kind, cases) in [
        ("Model", model_cases()),
        ("Adapter", adapter_cases()),
        ("GPUPool", pool_cases()),
    ] {
        let text = script(kind);
        for (situation, obj, status, message) in cases {
            match argo_health(&text, &obj) {
                Ok(h) if h.status == status && h.message.contains(message) => {
                    seen.entry(kind).or_default().push(status);
                }
                other => failures.push(format!(
                    "{kind}, {situation}: expected {status} with {message:?}, got {other:?}"
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for kind in ["Model", "Adapter", "GPUPool"] {
        for status in ["Healthy", "Progressing", "Degraded"] {
            assert!(
                seen.get(kind).is_some_and(|s| s.contains(&status)),
                "{kind}: no case ends {status}"
            );
        }
    }
}

#[test]
fn the_sandbox_is_argo_cds() {
    // What the scripts may not use is missing here too, as in Argo CD.
    for lib in ["string.len('x')", "math.floor(1.5)", "io.write('x')"] {
        let err = argo_health(&format!("local x = {lib}\nreturn {{}}"), &json!({}))
            .expect_err("no such library");
        assert!(err.contains("nil"), "{lib}: {err}");
    }
    // Lua 5.1: no goto, no integer division (Lua 5.2+ syntax is an error).
    for later in ["goto done\n::done::\nreturn {}", "return {status = 7 // 2}"] {
        assert!(argo_health(later, &json!({})).is_err(), "{later}");
    }
    // Numbers are floats, arrays 1-based, null absent; an unknown status
    // reads as Unknown.
    let h = argo_health(
        "local c = obj.status.conditions[1]\n\
         if obj.metadata.generation == 2 and c.type == 'Ready' and obj.status.gone == nil then\n\
           return {status = 'Healthy', message = 'generation ' .. tostring(obj.metadata.generation)}\n\
         end\n\
         return {status = 'Degraded'}",
        &json!({"metadata": {"generation": 2}, "status": {"gone": null, "conditions": [{"type": "Ready"}]}}),
    );
    assert_eq!(
        h,
        Ok(Health {
            status: "Healthy".into(),
            message: "generation 2".into()
        })
    );
    let h = argo_health("return {status = 'Fine'}", &json!({})).expect("runs");
    assert_eq!(h.status, "Unknown");
    assert!(argo_health("return 'Healthy'", &json!({})).is_err());
}

// ---------------------------------------------------------------------------
// The ready-to-paste snippets
// ---------------------------------------------------------------------------

/// Set to rewrite the snippets from the scripts instead of checking them.
const WRITE_ENV: &str = "STRATA_WRITE_GITOPS";

/// The scripts as YAML map entries (`resource.customizations.health.<group>_<Kind>`),
/// each a literal block, indented by `indent`.
fn entries(indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut out = String::new();
    for (kind, _) in SCRIPTS {
        out.push_str(&format!(
            "{pad}resource.customizations.health.strata.ai_{kind}: |\n"
        ));
        for line in script(kind).lines() {
            if line.is_empty() {
                out.push('\n');
            } else {
                out.push_str(&format!("{pad}  {line}\n"));
            }
        }
    }
    out
}

const GENERATED: &str = "# Generated from health-*.lua beside this file by e2e/tests/gitops.rs; do not\n\
# edit. After changing a script:\n\
#   STRATA_WRITE_GITOPS=1 cargo test -p strata-e2e --test gitops snippets\n";

/// (file under charts/strata/argocd, its text, where the scripts are in it).
fn snippets() -> Vec<(&'static str, String, &'static [&'static str])> {
    vec![
        (
            "argocd-cm.yaml",
            format!(
                "# Argo CD health checks for Strata's Adapter, GPUPool and Model (docs/gitops.md),\n\
                 # to merge into Argo CD's argocd-cm ConfigMap:\n\
                 #   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file argocd-cm.yaml\n\
                 {GENERATED}data:\n{}",
                entries(2)
            ),
            &["data"],
        ),
        (
            "argo-cd-values.yaml",
            format!(
                "# Argo CD health checks for Strata's Adapter, GPUPool and Model (docs/gitops.md),\n\
                 # as values of Argo CD's own Helm chart (argo-cd):\n\
                 #   helm upgrade argocd argo/argo-cd --namespace argocd --reuse-values -f argo-cd-values.yaml\n\
                 {GENERATED}configs:\n  cm:\n{}",
                entries(4)
            ),
            &["configs", "cm"],
        ),
    ]
}

#[test]
fn the_snippets_match_the_scripts() {
    let dir = repo_path("charts/strata/argocd");
    let write = std::env::var_os(WRITE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    for (file, text, path) in snippets() {
        let target = dir.join(file);
        if write {
            std::fs::write(&target, &text).expect("write the snippet");
        }
        let committed = std::fs::read_to_string(&target).unwrap_or_default();
        assert!(
            committed == text,
            "{} is not what the scripts give; run: {WRITE_ENV}=1 cargo test -p strata-e2e --test gitops snippets",
            target.display()
        );
        // What a YAML parser reads from it is each script, byte for byte.
        let parsed = strata_crds::validation::yaml_to_json(&committed).expect("YAML");
        let mut map = &parsed;
        for key in path {
            map = &map[*key];
        }
        for (kind, _) in SCRIPTS {
            let key = format!("resource.customizations.health.strata.ai_{kind}");
            assert_eq!(
                map[&key].as_str(),
                Some(script(kind).as_str()),
                "{file}: {key}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The dashboard's queries
// ---------------------------------------------------------------------------

/// One query of the dashboard: where it is and its PromQL.
#[derive(Debug, Clone)]
struct PanelQuery {
    panel: String,
    ref_id: String,
    expr: String,
}

/// Every target of every panel (rows' nested panels too). Panels other
/// than rows without a query are an error.
fn panel_queries(dashboard: &Value) -> Vec<PanelQuery> {
    fn walk(panels: &Value, out: &mut Vec<PanelQuery>) {
        for p in panels.as_array().into_iter().flatten() {
            walk(&p["panels"], out);
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().unwrap_or_default().to_string();
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "panel {title:?} has no query");
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {title:?} uses the datasource variable"
            );
            for t in targets {
                out.push(PanelQuery {
                    panel: title.clone(),
                    ref_id: t["refId"].as_str().unwrap_or_default().to_string(),
                    expr: t["expr"]
                        .as_str()
                        .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"))
                        .to_string(),
                });
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The `label_values(<selector>, <label>)` queries of the query variables:
/// (variable, selector, label).
fn variable_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let q = v["query"]["query"]
                .as_str()
                .or_else(|| v["query"].as_str())
                .unwrap_or_default();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {name}: {q} is not label_values(...)"));
            let (selector, label) = inner
                .rsplit_once(',')
                .expect("label_values(selector, label)");
            (name, selector.trim().to_string(), label.trim().to_string())
        })
        .collect()
}

/// The dashboard's variables for one evaluation: the selected value of
/// each, as Grafana interpolates it into a regex matcher.
#[derive(Debug, Clone)]
struct Selection {
    namespace: String,
    model: String,
    pool: String,
}

impl Selection {
    /// "All" selected everywhere (the variables' allValue).
    fn all() -> Self {
        Self {
            namespace: ".*".into(),
            model: ".*".into(),
            pool: ".*".into(),
        }
    }

    /// `expr` with Grafana's variables replaced: the selection, and the
    /// built-in intervals as Grafana would compute them for the last
    /// `range` with a 1 s scrape interval.
    fn interpolate(&self, expr: &str) -> String {
        expr.replace("${model:regex}", &self.model)
            .replace("$namespace", &self.namespace)
            .replace("$model", &self.model)
            .replace("$pool", &self.pool)
            .replace("$__rate_interval", "20s")
            .replace("$__range", "10m")
            .replace("$__interval", "5s")
    }
}

/// A URL's query component, percent-encoded.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// GET `path_and_query` from Prometheus; the JSON answer's `data`.
async fn prometheus_api(base: &str, path_and_query: &str) -> Result<Value, String> {
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = http::Request::get(format!("{base}{path_and_query}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), http.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(format!("{}: {}", v["errorType"], v["error"]));
    }
    Ok(v["data"].clone())
}

/// An instant query's finite values (empty: no data).
async fn instant(base: &str, promql: &str) -> Result<Vec<(Value, f64)>, String> {
    let data = prometheus_api(base, &format!("/api/v1/query?query={}", encode(promql))).await?;
    let samples = match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s["metric"].clone(), s["value"][1].clone()))
            .collect(),
        Some("scalar") => vec![(json!({}), data["result"][1].clone())],
        other => return Err(format!("a {other:?} result")),
    };
    Ok(samples
        .into_iter()
        .filter_map(|(m, v)| {
            v.as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|f| f.is_finite())
                .map(|f| (m, f))
        })
        .collect())
}

/// The values of `label` on the series `selector` selects.
async fn label_values(base: &str, selector: &str, label: &str) -> Result<Vec<String>, String> {
    let data = prometheus_api(
        base,
        &format!("/api/v1/series?match{}={}", encode("[]"), encode(selector)),
    )
    .await?;
    let mut values: Vec<String> = data
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s[label].as_str().map(str::to_string))
        .collect();
    values.sort();
    values.dedup();
    Ok(values)
}

// ---------------------------------------------------------------------------
// The local world
// ---------------------------------------------------------------------------

/// The runner profile of the operator's pods (the chart's `podLabels`).
const OPERATOR: &str = "gitops-operator";
/// The runner profile of the model pods (the chart's `modelPodLabels`).
const PROFILE: &str = "gitops-replica";

/// The operator's pods from their image; replicas from the engine
/// simulator's image (one sequence at a time, one LoRA slot: a second
/// adapter is refused; the node's injection, after the operator's
/// arguments, wins; it publishes its load on the GPU the device plugin gave
/// it) and the sidecar's, at short intervals; the chart's node agents on
/// the GPU nodes (the toolkit stand-in gives them the fake NVML library)
/// meter the GPUs.
fn the_world() -> &'static World {
    world(env!("CARGO_BIN_EXE_strata-cluster"), || {
        chart_world(
            OPERATOR,
            [(
                PROFILE.to_string(),
                model_image_profile(
                    sim_engine_gpu_injection(&[
                        "--max-batch",
                        "1",
                        "--itl-ms",
                        "10",
                        "--max-tokens-default",
                        "16",
                        "--max-loras",
                        "1",
                    ]),
                    sidecar_fast_injection(),
                ),
            )],
            &[],
        )
    })
}

/// Prometheus' ServiceAccount, allowed to list pods (as a Prometheus that
/// discovers them in a cluster is), and the namespace the dashboard goes to.
const MONITORING: &str = "apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: prometheus, namespace: monitoring}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: e2e-prometheus}
rules:
  - apiGroups: [\"\"]
    resources: [pods]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: e2e-prometheus}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: e2e-prometheus}
subjects:
  - {kind: ServiceAccount, name: prometheus, namespace: monitoring}
";

/// The scrape configuration: the operator leader's metrics endpoint (its
/// pod's IP and the chart's metrics port) labelled with its pod, its own
/// namespace and model labels kept (the chart's ServiceMonitor sets
/// honorLabels), the model pods' admin ports from `targets` (file
/// discovery, fed by [`discover_model_pods`]), and the node agents'
/// metrics ports with their own labels kept (honor_labels: a GPU's
/// `namespace` and `pod` are those of the pod that holds it, as with
/// dcgm-exporter).
fn prometheus_config(operator: &Leader, targets: &std::path::Path) -> String {
    format!(
        "global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: strata-operator
    honor_labels: true
    static_configs:
      - targets: [\"{}\"]
        labels: {{namespace: strata-system, pod: {}}}
  - job_name: strata-model-pods
    scheme: https
    tls_config: {{insecure_skip_verify: true}}
    file_sd_configs:
      - files: [{}]
        refresh_interval: 1s
  - job_name: strata-node-agents
    honor_labels: true
    file_sd_configs:
      - files: [{}]
        refresh_interval: 1s
",
        operator.metrics_addr(),
        operator.pod,
        targets.display(),
        targets.with_file_name(AGENT_TARGETS).display()
    )
}

/// The node agents' targets, next to the model pods'.
const AGENT_TARGETS: &str = "node-agents.json";

/// What `kubernetes_sd_configs` (role pod) with the relabeling of
/// docs/gitops.md gives Prometheus, done here because Debian's Prometheus
/// is built without Kubernetes discovery: every pod labelled
/// `app.kubernetes.io/managed-by=strata-operator` that has an IP, its
/// container port named `admin`, labelled with its namespace and pod, as
/// seen with Prometheus' own ServiceAccount (it may list pods, no more).
/// Rewrites `file` (atomically) whenever the set changes, until aborted.
async fn discover_model_pods(client: kube::Client, file: PathBuf) {
    let pods: Api<Pod> = Api::all(client);
    let mut last = String::new();
    let agents_file = file.with_file_name(AGENT_TARGETS);
    let mut last_agents = String::new();
    loop {
        let agents = pods
            .list(&ListParams::default().labels("app.kubernetes.io/name=strata-node-agent"))
            .await;
        if let Ok(list) = agents {
            let targets: Vec<String> = list
                .items
                .iter()
                .filter_map(|p| {
                    let ip = p.status.as_ref()?.pod_ip.clone()?;
                    let port = p.spec.iter().flat_map(|s| &s.containers).find_map(|c| {
                        c.ports
                            .iter()
                            .flatten()
                            .find(|port| port.name.as_deref() == Some("metrics"))
                            .map(|port| port.container_port)
                    })?;
                    Some(format!("{ip}:{port}"))
                })
                .collect();
            let text = json!([{ "targets": targets }]).to_string();
            if text != last_agents {
                let tmp = agents_file.with_extension("tmp");
                if std::fs::write(&tmp, &text).is_ok()
                    && std::fs::rename(&tmp, &agents_file).is_ok()
                {
                    last_agents = text;
                }
            }
        }
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=strata-operator"))
            .await;
        if let Ok(list) = list {
            let mut groups = Vec::new();
            for p in &list.items {
                let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
                let port = p.spec.iter().flat_map(|s| &s.containers).find_map(|c| {
                    c.ports
                        .iter()
                        .flatten()
                        .find(|port| port.name.as_deref() == Some("admin"))
                        .map(|port| port.container_port)
                });
                if let (Some(ip), Some(port)) = (ip, port) {
                    groups.push(json!({
                        "targets": [format!("{ip}:{port}")],
                        "labels": {"namespace": p.namespace(), "pod": p.name_any()},
                    }));
                }
            }
            let text = Value::Array(groups).to_string();
            if text != last {
                let tmp = file.with_extension("tmp");
                if std::fs::write(&tmp, &text).is_ok() && std::fs::rename(&tmp, &file).is_ok() {
                    last = text;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A Model for the local world from the Llama sample: public weights (no
/// Secret), the simulator's engine image, the H100 pool.
fn model(name: &str, spec: Value) -> Model {
    let mut m = repo_yaml("samples/model-llama.yaml").expect("sample");
    m["metadata"] = json!({ "name": name });
    let s = m["spec"].as_object_mut().expect("spec");
    s.insert(
        "source".into(),
        json!({"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}),
    );
    s.insert(
        "engine".into(),
        json!({"type": "vLLM", "image": engine_sim_image()}),
    );
    s.insert("pools".into(), json!([{"name": "h100"}]));
    for (k, v) in spec.as_object().expect("spec").clone() {
        s.insert(k, v);
    }
    serde_json::from_value(m).expect("model")
}

fn adapter(name: &str) -> Adapter {
    serde_json::from_value(json!({
        "apiVersion": "strata.ai/v1alpha1",
        "kind": "Adapter",
        "metadata": {"name": name},
        "spec": {"model": "chat", "source": {"uri": format!("hf://strata-test/{name}-lora")}},
    }))
    .expect("adapter")
}

/// Polls `name` until its health check answers `want`; the object and
/// the answer. Panics with the last answer after `timeout`.
async fn wait_health(
    api: &Api<DynamicObject>,
    name: &str,
    want: &str,
    timeout: Duration,
) -> (Value, Health) {
    let deadline = Instant::now() + timeout;
    loop {
        let obj = serde_json::to_value(api.get(name).await.expect("get")).expect("json");
        let h = judge(&obj);
        if h.status == want {
            return (obj, h);
        }
        assert!(
            Instant::now() < deadline,
            "{name} not {want} within {timeout:?}: {h:?}\n{}",
            serde_json::to_string_pretty(&obj["status"]).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Streams chat requests, alternately for the base model and the adapter
/// `poet`, at the Model's ready replicas until `stop`.
fn start_load(pods: Api<Pod>, stop: Arc<AtomicBool>) {
    for w in 0..6usize {
        let (pods, stop) = (pods.clone(), stop.clone());
        tokio::spawn(async move {
            let http: Client<HttpConnector, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build(HttpConnector::new());
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let targets: Vec<String> = pods
                    .list(&ListParams::default().labels("strata.ai/model=chat"))
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default()
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
                    .filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
                    .filter(|ip| strata_e2e::http::is_loopback_str(ip))
                    .collect();
                let Some(ip) = targets.get(i % targets.len().max(1)).cloned() else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                i += 1;
                let model = ["chat", "poet"][i % 2];
                let body = json!({"model": model, "stream": true, "max_tokens": 16,
                    "messages": [{"role": "user", "content": "x".repeat(200)}]});
                let req = http::Request::post(format!("http://{ip}:8080/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("request");
                if let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(20), http.request(req)).await
                {
                    let mut s = resp.into_body().into_data_stream();
                    while s.next().await.is_some() {}
                }
            }
        });
    }
}

/// Evaluates every panel query and variable of `dashboard` under each
/// selection until all return data (each variable offering `expected`'s
/// value among its own), or `timeout`; what has none then.
async fn dashboard_without_data(
    base: &str,
    dashboard: &Value,
    selections: &[Selection],
    expected: &Selection,
    timeout: Duration,
) -> Vec<String> {
    let queries = panel_queries(dashboard);
    let variables = variable_queries(dashboard);
    let deadline = Instant::now() + timeout;
    loop {
        let mut missing = Vec::new();
        for sel in selections {
            for q in &queries {
                let expr = sel.interpolate(&q.expr);
                match instant(base, &expr).await {
                    Ok(v) if !v.is_empty() => {}
                    other => missing.push(format!(
                        "panel {:?} {} with {sel:?}: {expr}\n  -> {other:?}",
                        q.panel, q.ref_id
                    )),
                }
            }
            for (name, selector, label) in &variables {
                let selector = sel.interpolate(selector);
                let want = match name.as_str() {
                    "namespace" => &expected.namespace,
                    "model" => &expected.model,
                    "pool" => &expected.pool,
                    other => panic!("a variable this test does not know: {other}"),
                };
                match label_values(base, &selector, label).await {
                    Ok(v) if v.contains(want) => {}
                    other => missing.push(format!(
                        "variable {name} with {sel:?}: label_values({selector}, {label}) -> {other:?}, want {want}"
                    )),
                }
            }
        }
        if missing.is_empty() || Instant::now() >= deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Adapters of `chat` (one ready replica): one loaded (Healthy), one the
/// engine has no room for (Degraded), which is then deleted.
async fn adapters_loaded_and_refused(client: &kube::Client, ns: &str) {
    let ar_adapter = ApiResource::erase::<Adapter>(&());
    let adapters: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar_adapter);
    let typed_adapters: Api<Adapter> = Api::namespaced(client.clone(), ns);
    typed_adapters
        .create(&Default::default(), &adapter("poet"))
        .await
        .expect("poet");
    let (_, h) = wait_health(&adapters, "poet", "Healthy", Duration::from_secs(60)).await;
    assert_eq!(h.message, "Loaded: loaded on 1 of 1 replica(s)");
    typed_adapters
        .create(&Default::default(), &adapter("third"))
        .await
        .expect("third");
    let (_, h) = wait_health(&adapters, "third", "Degraded", Duration::from_secs(60)).await;
    assert!(h.message.starts_with("LoadFailed: "), "{h:?}");
    typed_adapters
        .delete("third", &DeleteParams::default())
        .await
        .expect("delete third");
    wait_for(
        typed_adapters.clone(),
        "third",
        Duration::from_secs(60),
        |a: Option<&Adapter>| a.is_none(),
    )
    .await
    .expect("third goes");
}

/// Every version of `chat` the test saw: Progressing at first, never
/// Degraded, Healthy in the end, Healthy to Progressing at least twice (the
/// scale-up and the rollout).
fn check_history(history: &[Value]) {
    let verdicts: Vec<Health> = history.iter().map(judge).collect();
    let trail: Vec<&str> = verdicts.iter().map(|h| h.status.as_str()).collect();
    eprintln!(
        "chat, {} versions: {}",
        verdicts.len(),
        verdicts
            .iter()
            .map(|h| format!("{} ({})", h.status, h.message))
            .collect::<Vec<_>>()
            .join(" -> ")
    );
    assert_eq!(trail.first(), Some(&"Progressing"), "{trail:?}");
    assert!(
        trail
            .iter()
            .all(|s| matches!(*s, "Progressing" | "Healthy")),
        "{trail:?}"
    );
    let healthy_then_progressing = trail
        .windows(2)
        .filter(|w| w[0] == "Healthy" && w[1] == "Progressing")
        .count();
    assert!(
        healthy_then_progressing >= 2,
        "Healthy to Progressing at the scale-up and at the rollout: {trail:?}"
    );
    assert_eq!(trail.last(), Some(&"Healthy"), "{trail:?}");
}

/// Prometheus' ServiceAccount, then the chart with its dashboard ConfigMap
/// in `monitoring`, as a cluster with Grafana's dashboard sidecar would
/// install it, and the operator in-cluster (its energy read every 2 s);
/// the dashboard as the ConfigMap carries it (checked to be the file's,
/// with the sidecar's label) and the operator's leader.
async fn install_chart_with_dashboard(w: &World, client: &kube::Client) -> (Value, Leader) {
    let out = w.kubectl_stdin(&["apply", "-f", "-"], MONITORING);
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader = w
        .install_operator(
            OPERATOR,
            PROFILE,
            &[
                "grafanaDashboard.enabled=true",
                "grafanaDashboard.namespace=monitoring",
                "energyIntervalSeconds=2",
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("the operator in-cluster: {e}"));
    let cm = Api::<ConfigMap>::namespaced(client.clone(), "monitoring")
        .get("strata-dashboard")
        .await
        .expect("the dashboard ConfigMap in the namespace asked for");
    assert_eq!(
        cm.labels().get("grafana_dashboard").map(String::as_str),
        Some("1"),
        "the Grafana sidecar's label"
    );
    let shipped = cm
        .data
        .as_ref()
        .and_then(|d| d.get("strata.json"))
        .expect("strata.json in the ConfigMap");
    let dashboard: Value = serde_json::from_str(shipped).expect("the shipped dashboard is JSON");
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("charts/strata/dashboards/strata.json"))
            .expect("dashboard file"),
    )
    .expect("JSON");
    assert_eq!(
        dashboard, file,
        "the ConfigMap carries the dashboard as it is"
    );
    (dashboard, leader)
}

/// A running Prometheus and the discovery that feeds it.
struct Prometheus {
    url: String,
    process: Component,
    discovery: tokio::task::JoinHandle<()>,
}

impl Prometheus {
    async fn stop(self) {
        self.discovery.abort();
        let mut process = self.process;
        process.stop(Duration::from_secs(5)).await;
    }
}

/// Prometheus scraping the operator leader's metrics port and the model
/// pods found with Prometheus' own ServiceAccount, its files and log in the
/// world's directory.
async fn start_prometheus(w: &World, bin: &std::path::Path, operator: &Leader) -> Prometheus {
    let kubeconfig = service_account_kubeconfig(w, "monitoring", "prometheus")
        .await
        .expect("Prometheus' kubeconfig");
    let dir = w.info.dir.join("prometheus");
    std::fs::create_dir_all(&dir).expect("dir");
    let config_file = dir.join("prometheus.yml");
    let targets_file = dir.join("model-pods.json");
    std::fs::write(&targets_file, "[]").expect("targets");
    std::fs::write(targets_file.with_file_name(AGENT_TARGETS), "[]").expect("targets");
    std::fs::write(&config_file, prometheus_config(operator, &targets_file)).expect("config");
    let discovery = tokio::spawn(discover_model_pods(
        strata_e2e::cluster::client_from(&kubeconfig)
            .await
            .expect("Prometheus' client"),
        targets_file,
    ));
    let port = free_port();
    let process = Component::spawn(
        "prometheus",
        bin,
        &[
            format!("--config.file={}", config_file.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--log.level=warn".to_string(),
        ],
        &[],
        &w.info.log_dir,
    )
    .expect("start Prometheus");
    Prometheus {
        url: format!("http://127.0.0.1:{port}"),
        process,
        discovery,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn argo_cd_health_of_real_objects_and_every_dashboard_panel_has_data() {
    let prometheus_bin = prometheus_bin();
    let w = the_world();
    let client = w.client().await;

    let (dashboard, leader) = install_chart_with_dashboard(w, &client).await;

    let mut prometheus = start_prometheus(w, &prometheus_bin, &leader).await;
    let prom_url = prometheus.url.clone();

    // Pools: the H100 sample, and one no node matches.
    let ar_pool = ApiResource::erase::<GPUPool>(&());
    let pools: Api<DynamicObject> = Api::all_with(client.clone(), &ar_pool);
    let h100: GPUPool =
        serde_json::from_value(repo_yaml("samples/gpupool-h100.yaml").expect("sample"))
            .expect("pool");
    let nowhere: GPUPool = serde_json::from_value(json!({
        "apiVersion": "strata.ai/v1alpha1",
        "kind": "GPUPool",
        "metadata": {"name": "nowhere"},
        "spec": {"nodeSelector": {"matchLabels": {"nvidia.com/gpu.product": "NVIDIA-B300"}}},
    }))
    .expect("pool");
    let typed_pools: Api<GPUPool> = Api::all(client.clone());
    for p in [&h100, &nowhere] {
        typed_pools
            .create(&Default::default(), p)
            .await
            .expect("pool");
    }

    // Models: `chat` autoscaled on its SLA with adapters; `big` fits no node.
    let ns = test_namespace(&client, "gitops").await.expect("namespace");
    let ar_model = ApiResource::erase::<Model>(&());
    let models: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar_model);
    let typed_models: Api<Model> = Api::namespaced(client.clone(), &ns);
    // Every version of `chat` Argo CD could see: as created (no status
    // yet), then each one a watch sees.
    let chat: DynamicObject = serde_json::from_value(
        serde_json::to_value(model(
            "chat",
            json!({
                "minReplicas": 1,
                "maxReplicas": 3,
                "sla": {"timeToFirstToken": "200ms", "interTokenLatency": "100ms",
                        "endToEndLatency": "20s", "percentile": 95},
                "autoscaling": {"mode": "SLA", "interval": "5s", "window": "15s",
                                "scaleDown": {"stabilizationWindow": "10m"}},
                "adapters": {"maxPerReplica": 4},
            }),
        ))
        .expect("json"),
    )
    .expect("dynamic");
    let created = models
        .create(&Default::default(), &chat)
        .await
        .expect("chat");
    let history: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(vec![
        serde_json::to_value(&created).expect("json"),
    ]));
    let recorder = {
        let (history, models) = (history.clone(), models.clone());
        tokio::spawn(async move {
            let mut stream = watcher(
                models,
                watcher::Config::default().fields("metadata.name=chat"),
            )
            .applied_objects()
            .boxed();
            while let Some(Ok(o)) = stream.next().await {
                if let (Ok(v), Ok(mut h)) = (serde_json::to_value(&o), history.lock()) {
                    h.push(v);
                }
            }
        })
    };
    let mut big = model(
        "big",
        json!({"gpusPerReplica": 16, "replicas": 1, "autoscaling": {"mode": "Manual"}}),
    );
    big.spec.adapters = None;
    typed_models
        .create(&Default::default(), &big)
        .await
        .expect("big");

    // Argo CD's verdicts on the pools and the Models.
    let (_, h) = wait_health(&pools, "h100", "Healthy", Duration::from_secs(60)).await;
    assert!(h.message.starts_with("NodesAvailable: "), "{h:?}");
    let (_, h) = wait_health(&pools, "nowhere", "Degraded", Duration::from_secs(60)).await;
    assert_eq!(h.message, "NoNodes: no node matches the nodeSelector");
    let (_, h) = wait_health(&models, "big", "Degraded", Duration::from_secs(60)).await;
    assert!(
        h.message.starts_with("Unplaceable: ") && h.message.contains("16 free"),
        "{h:?}"
    );
    let (_, h) = wait_health(&models, "chat", "Healthy", Duration::from_secs(90)).await;
    assert_eq!(h.message, "AllReplicasReady: 1 of 1 replicas ready");

    adapters_loaded_and_refused(&client, &ns).await;

    // Prometheus scrapes the operator, the replica and the node agents.
    let ready = Instant::now() + Duration::from_secs(60);
    loop {
        prometheus.process.check_running().expect("Prometheus runs");
        let up = instant(&prom_url, "sum by (job) (up == 1)").await;
        if let Ok(v) = &up
            && v.len() == 3
        {
            break;
        }
        assert!(Instant::now() < ready, "Prometheus' targets up: {up:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Load: the autoscaler adds replicas against the TTFT target.
    let stop = Arc::new(AtomicBool::new(false));
    start_load(Api::namespaced(client.clone(), &ns), stop.clone());
    wait_for(
        typed_models.clone(),
        "chat",
        Duration::from_secs(120),
        |m: Option<&Model>| {
            m.and_then(|m| m.status.as_ref()).is_some_and(|s| {
                s.desired_replicas.unwrap_or(0) >= 2
                    && s.ready_replicas == s.desired_replicas.unwrap_or(0)
            })
        },
    )
    .await
    .expect("the autoscaler scales chat up and the replicas become ready");

    // Every panel and variable of the shipped dashboard has data, for all
    // Models and for this one.
    let chat = Selection {
        namespace: ns.clone(),
        model: "chat".into(),
        pool: "h100".into(),
    };
    let selections = [Selection::all(), chat.clone()];
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 15, "{} queries", queries.len());
    let missing = dashboard_without_data(
        &prom_url,
        &dashboard,
        &selections,
        &chat,
        Duration::from_secs(90),
    )
    .await;
    assert!(
        missing.is_empty(),
        "queries without data:\n{}",
        missing.join("\n")
    );
    eprintln!(
        "dashboard: {} panel queries and {} variables returned data under {} selections",
        queries.len(),
        variable_queries(&dashboard).len(),
        selections.len()
    );

    // Settled at its new size: Healthy again. A spec change: Progressing
    // at once (a generation the operator has not seen, then the rollout),
    // Healthy once rolled out.
    let (_, h) = wait_health(&models, "chat", "Healthy", Duration::from_secs(120)).await;
    assert!(h.message.starts_with("AllReplicasReady: "), "{h:?}");
    typed_models
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"engine": {"env": [{"name": "GITOPS_E2E", "value": "1"}]}}}),
            ),
        )
        .await
        .expect("a spec change");
    let h = judge(&serde_json::to_value(models.get("chat").await.expect("get")).expect("json"));
    assert_eq!(h.status, "Progressing", "right after the change: {h:?}");
    let (rolled_out, _) = wait_health(&models, "chat", "Healthy", Duration::from_secs(180)).await;
    stop.store(true, Ordering::Relaxed);

    recorder.abort();
    let mut history = history.lock().map(|h| h.clone()).unwrap_or_default();
    history.push(rolled_out);
    check_history(&history);

    prometheus.stop().await;
}
