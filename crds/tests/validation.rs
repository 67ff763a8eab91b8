//! The samples are valid; every case of the invalid-spec table is rejected
//! with its message; the CRDs have the shape the issue asks for.

use std::path::PathBuf;

use kube::CustomResourceExt;
use serde::Deserialize;
use serde_json::Value;
use strata_crds::validation::{merge_patch, validate};
use strata_crds::{Adapter, GPUPool, Model};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sample(name: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("samples").join(name))
        .unwrap_or_else(|e| panic!("reading samples/{name}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("parsing samples/{name}: {e}"))
}

fn sample_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo().join("samples"))
        .expect("samples/ exists")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    names
}

#[derive(Deserialize)]
struct Case {
    name: String,
    base: String,
    patch: Value,
    #[serde(default)]
    update: bool,
    expect: String,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(repo().join("crds/testdata/invalid-specs.yaml"))
        .expect("reading the invalid-spec table");
    serde_yaml_ng::from_str(&text).expect("parsing the invalid-spec table")
}

#[test]
fn every_sample_parses_and_passes_validation() {
    let names = sample_names();
    assert!(
        names.len() >= 4,
        "expected the four samples, found {names:?}"
    );
    for name in names {
        let obj = sample(&name);
        match obj["kind"].as_str() {
            Some("GPUPool") => drop(serde_json::from_value::<GPUPool>(obj.clone()).expect(&name)),
            Some("Model") => drop(serde_json::from_value::<Model>(obj.clone()).expect(&name)),
            Some("Adapter") => drop(serde_json::from_value::<Adapter>(obj.clone()).expect(&name)),
            other => panic!("{name}: unexpected kind {other:?}"),
        }
        if let Err(e) = validate(&obj, None) {
            panic!("{name} should be valid: {e}");
        }
        // An unchanged object is a valid update (transition rules hold).
        if let Err(e) = validate(&obj, Some(&obj)) {
            panic!("{name} unchanged should be a valid update: {e}");
        }
    }
}

#[test]
fn the_samples_cover_the_realistic_setup() {
    let model: Model = serde_json::from_value(sample("model-llama.yaml")).expect("model parses");
    let pools: Vec<&str> = model.spec.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(pools, ["h100", "l4"], "falls back from H100 to L4");
    assert!(!model.spec.pools[1].args.is_empty(), "L4 has its own args");
    assert!(model.spec.sla.is_some());
    let adapter: Adapter =
        serde_json::from_value(sample("adapter-sql.yaml")).expect("adapter parses");
    assert_eq!(adapter.spec.model, "llama-3-1-8b");
}

#[test]
fn invalid_specs_are_rejected_with_their_messages() {
    let cases = cases();
    assert!(
        cases.len() >= 20,
        "the table must hold at least 20 cases, has {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let base = sample(&case.base);
        let mut obj = base.clone();
        merge_patch(&mut obj, &case.patch);
        let old = case.update.then_some(&base);
        match validate(&obj, old) {
            Ok(()) => failures.push(format!(
                "{}: accepted, expected {:?}",
                case.name, case.expect
            )),
            Err(e) => {
                let messages = e.messages();
                if !messages.iter().any(|m| m.contains(&case.expect)) {
                    failures.push(format!(
                        "{}: rejected with {messages:?}, expected a message containing {:?}",
                        case.name, case.expect
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn case_names_are_unique() {
    let cases = cases();
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "duplicate case names");
}

#[test]
fn every_cel_rule_compiles() {
    for crd in strata_crds::crds() {
        let schema = schema_of(&crd);
        let compiled = kube::core::cel::compile_schema(&schema);
        let errors: Vec<String> = compiled
            .compilation_errors()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{:?}: {errors:?}", crd.metadata.name);
    }
}

fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("json")
}

fn walk_descriptions(path: &str, schema: &Value, missing: &mut Vec<String>) {
    if let Some(props) = schema["properties"].as_object() {
        for (name, child) in props {
            let p = format!("{path}.{name}");
            if path.contains("metadata") || p == ".metadata" || p == ".apiVersion" || p == ".kind" {
                continue;
            }
            if child["description"]
                .as_str()
                .is_none_or(|d| d.trim().is_empty())
            {
                missing.push(p.clone());
            }
            walk_descriptions(&p, child, missing);
            walk_descriptions(&format!("{p}[]"), &child["items"], missing);
        }
    }
}

#[test]
fn every_field_has_a_description() {
    for crd in strata_crds::crds() {
        let schema = schema_of(&crd);
        let mut missing = Vec::new();
        walk_descriptions("", &schema, &mut missing);
        assert!(
            missing.is_empty(),
            "{:?} fields without a description: {missing:?}",
            crd.metadata.name
        );
    }
}

#[test]
fn crds_have_the_names_scopes_and_subresources_of_the_api() {
    let model = Model::crd();
    assert_eq!(model.spec.group, "strata.ai");
    assert_eq!(model.spec.scope, "Namespaced");
    assert_eq!(model.spec.versions[0].name, "v1alpha1");
    let scale = model.spec.versions[0]
        .subresources
        .as_ref()
        .and_then(|s| s.scale.as_ref())
        .expect("Model has the scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );

    let pool = GPUPool::crd();
    assert_eq!(pool.spec.scope, "Cluster");
    let adapter = Adapter::crd();
    assert_eq!(adapter.spec.scope, "Namespaced");

    for crd in [&model, &pool, &adapter] {
        let v = &crd.spec.versions[0];
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["strata".to_string()][..])
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty())
        );
    }

    let columns = |crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        crd.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .map(|c| c.iter().map(|c| c.name.clone()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(
        columns(&model),
        ["READY", "DESIRED", "POOL", "TTFT-P95", "WATTS", "AGE"]
    );
    assert_eq!(columns(&pool)[..4], ["NODES", "GPUS", "FREE", "WATTS"]);
}

#[test]
fn printer_column_paths_exist_in_the_schema() {
    for crd in strata_crds::crds() {
        let v = &crd.spec.versions[0];
        let schema = serde_json::to_value(
            v.schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("schema"),
        )
        .expect("json");
        for col in v.additional_printer_columns.iter().flatten() {
            if col.json_path.starts_with(".metadata") {
                continue;
            }
            let mut node = &schema;
            for part in col.json_path.trim_start_matches('.').split('.') {
                node = &node["properties"][part];
                assert!(
                    !node.is_null(),
                    "{}: column {} points at a missing field {}",
                    crd.spec.names.kind,
                    col.name,
                    col.json_path
                );
            }
        }
    }
}

#[test]
fn defaults_are_filled_in_by_serde_like_the_api_server() {
    let mut obj = sample("model-llama.yaml");
    merge_patch(
        &mut obj,
        &serde_json::json!({"spec": {"autoscaling": null, "rollout": null, "minReplicas": null}}),
    );
    let model: Model = serde_json::from_value(obj).expect("parses without the defaulted fields");
    assert_eq!(model.spec.min_replicas, 1);
    assert_eq!(model.spec.autoscaling.interval, "15s");
    assert_eq!(model.spec.rollout.max_surge, 1);
    assert_eq!(model.spec.rollout.max_unavailable, 0);
}

#[test]
fn shape_errors_name_the_problem() {
    let mut obj = sample("model-llama.yaml");
    merge_patch(
        &mut obj,
        &serde_json::json!({"spec": {"engine": {"type": "Triton"}}}),
    );
    let err = validate(&obj, None).expect_err("unknown engine is rejected");
    assert!(err.to_string().contains("Triton"), "{err}");

    let other = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}});
    let err = validate(&other, None).expect_err("not a Strata kind");
    assert!(err.to_string().contains("not a Strata object"), "{err}");
}
