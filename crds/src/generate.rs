//! Generated artifacts: the CRD YAML (for `kubectl apply` and the Helm
//! chart) and the API reference in docs/api.md. `strata-crdgen write`
//! writes them; `strata-crdgen check` fails when the committed files differ.

use std::fmt::Write as _;
use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

/// Command that regenerates every file below.
pub const REGENERATE: &str = "cargo run -p strata-crds --bin strata-crdgen -- write";

/// Directories (relative to the repository root) that receive the CRD YAML.
pub const CRD_DIRS: [&str; 2] = ["crds/yaml", "charts/strata/crds"];

/// Where the API reference goes.
pub const API_DOC: &str = "docs/api.md";

/// Errors while generating.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A CRD could not be serialized.
    #[error("serializing CRD {name}: {source}")]
    Serialize {
        /// CRD name.
        name: String,
        /// Cause.
        source: serde_yaml_ng::Error,
    },
    /// A CRD could not be turned into JSON for the reference.
    #[error("reading the schema of {0}")]
    Schema(String),
}

/// One generated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedFile {
    /// Path relative to the repository root.
    pub path: PathBuf,
    /// Full contents.
    pub contents: String,
}

fn crd_name(crd: &CustomResourceDefinition) -> String {
    crd.metadata.name.clone().unwrap_or_default()
}

/// The YAML of one CRD, with a header saying how it was made.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, GenerateError> {
    let body = serde_yaml_ng::to_string(crd).map_err(|source| GenerateError::Serialize {
        name: crd_name(crd),
        source,
    })?;
    Ok(format!(
        "# Generated from the Rust types in crds/src by `{REGENERATE}`.\n# Do not edit by hand; the test command fails when this file drifts.\n{body}"
    ))
}

/// Every generated file, in a stable order.
pub fn generated_files() -> Result<Vec<GeneratedFile>, GenerateError> {
    let crds = crate::crds();
    let mut files = Vec::new();
    for dir in CRD_DIRS {
        for crd in &crds {
            let file = format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural);
            files.push(GeneratedFile {
                path: PathBuf::from(dir).join(file),
                contents: crd_yaml(crd)?,
            });
        }
    }
    files.push(GeneratedFile {
        path: PathBuf::from(API_DOC),
        contents: api_reference(&crds)?,
    });
    Ok(files)
}

/// Why each kind exists; the reference puts it above the field table.
fn rationale(kind: &str) -> &'static str {
    match kind {
        "GPUPool" => {
            "A GPUPool names a set of NVIDIA nodes by label (usually the GPU feature discovery labels) and says how \
             Strata may use them: the tolerations its pods need, whether replicas are bin-packed (the default, keeping \
             whole nodes free for large models) or spread, the GPU resource name (whole GPUs or a MIG profile), and \
             the price per GPU-hour. It is cluster-scoped because nodes are: the platform team owns pools, model teams \
             refer to them by name. Its status is the capacity view the operator places from: nodes, GPUs allocated \
             and free, the models on it, and the power and energy they use."
        }
        "Model" => {
            "A Model is one served foundation model: where the weights come from, which engine serves them with which \
             arguments, how many GPUs a replica needs, and an ordered list of acceptable pools with per-pool \
             overrides, so that a model can fall back from H100 to L4 with a smaller context length. Its SLA targets \
             (time to first token, inter-token and end-to-end latency at a percentile, queue depth per replica) drive \
             Strata's autoscaler; in External mode HPA or KEDA drive it instead through the scale subresource. Its \
             status tells where every replica runs, the observed latency against each target, the last scaling \
             decision and why, and the power and energy per thousand tokens. The operator never writes its spec."
        }
        "Adapter" => {
            "An Adapter is a LoRA adapter for a Model in the same namespace. Strata loads it into the running engines \
             without a restart, onto all of the Model's replicas or onto N of them, and gives new replicas their \
             adapters before they serve. Its source and target Model are immutable because engines cannot swap \
             weights under a served name: a new version is a new Adapter. Its status lists the replicas that carry it \
             and its share of the Model's traffic and energy."
        }
        _ => "",
    }
}

/// Paths whose type is a standard Kubernetes type: documented upstream, not expanded here.
fn upstream_type(path: &str) -> Option<&'static str> {
    if path.ends_with("nodeSelector") {
        Some(
            "[LabelSelector](https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/label-selector/)",
        )
    } else if path.ends_with("tolerations[]") {
        Some(
            "[Toleration](https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#scheduling)",
        )
    } else if path.ends_with("env[]") {
        Some(
            "[EnvVar](https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#environment-variables)",
        )
    } else if path.ends_with("conditions[]") {
        Some(
            "[Condition](https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/condition/)",
        )
    } else {
        None
    }
}

fn type_of(schema: &Value) -> String {
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return "quantity".to_string();
    }
    let base = schema["type"].as_str().unwrap_or("object");
    let base = match (base, schema["format"].as_str()) {
        ("integer", Some(f)) => format!("integer ({f})"),
        ("number", _) => "number".to_string(),
        ("string", Some("date-time")) => "timestamp".to_string(),
        (b, _) => b.to_string(),
    };
    if let Some(values) = schema["enum"].as_array() {
        let values: Vec<String> = values
            .iter()
            .filter_map(Value::as_str)
            .map(|v| format!("`{v}`"))
            .collect();
        return format!("enum: {}", values.join(", "));
    }
    base
}

fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn constraints(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (key, label) in [
        ("minimum", "min"),
        ("maximum", "max"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
    ] {
        if let Some(v) = schema.get(key) {
            out.push(format!("{label} {v}"));
        }
    }
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        for rule in rules {
            let msg = rule["message"]
                .as_str()
                .or_else(|| rule["rule"].as_str())
                .unwrap_or_default();
            let msg = one_line(msg);
            if rule["rule"].as_str().is_some_and(|r| r.contains("oldSelf")) {
                out.push(format!("immutable: {msg}"));
            } else {
                out.push(msg);
            }
        }
    }
    out
}

fn walk(rows: &mut Vec<String>, path: &str, schema: &Value, required: bool) {
    let ty = upstream_type(path)
        .map(str::to_string)
        .unwrap_or_else(|| type_of(schema));
    let ty = if schema["type"] == "array" {
        let item = &schema["items"];
        let inner = upstream_type(&format!("{path}[]"))
            .map(str::to_string)
            .unwrap_or_else(|| type_of(item));
        format!("[]{inner}")
    } else {
        ty
    };
    let default = schema
        .get("default")
        .map(|d| format!("`{}`", one_line(&d.to_string())))
        .unwrap_or_default();
    let mut notes = constraints(schema);
    if schema["type"] == "array" {
        notes.extend(constraints(&schema["items"]));
    }
    let desc = one_line(schema["description"].as_str().unwrap_or_default());
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(" <br>**Rules:** {}", notes.join("; "))
    };
    let req = if required { "yes" } else { "" };
    rows.push(format!(
        "| `{path}` | {ty} | {req} | {default} | {desc}{notes} |"
    ));

    if upstream_type(path).is_some() {
        return;
    }
    let (props, req_list, child_prefix) = if schema["type"] == "array" {
        let item = &schema["items"];
        if upstream_type(&format!("{path}[]")).is_some() {
            return;
        }
        (&item["properties"], &item["required"], format!("{path}[]"))
    } else {
        (&schema["properties"], &schema["required"], path.to_string())
    };
    if let Some(map) = props.as_object() {
        for (name, child) in map {
            let is_req = req_list
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x.as_str() == Some(name)));
            walk(rows, &format!("{child_prefix}.{name}"), child, is_req);
        }
    }
}

/// The Markdown API reference of every CRD.
pub fn api_reference(crds: &[CustomResourceDefinition]) -> Result<String, GenerateError> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<!-- Generated from the Rust types in crds/src by `{REGENERATE}`. Do not edit by hand. -->\n\n# API reference: strata.ai/v1alpha1\n\nEvery field below is also described in the cluster: `kubectl explain model.spec.sla`,\n`kubectl explain gpupool.spec --recursive`. Rules are enforced by the API server (CEL and\nOpenAPI validation in the CRD); the messages are the ones you will see on `kubectl apply`.\n\nKinds: {}.\n",
        crds.iter()
            .map(|c| format!(
                "[{}](#{})",
                c.spec.names.kind,
                c.spec.names.kind.to_lowercase()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for crd in crds {
        let kind = &crd.spec.names.kind;
        let version = crd
            .spec
            .versions
            .first()
            .ok_or_else(|| GenerateError::Schema(crd_name(crd)))?;
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or_else(|| GenerateError::Schema(crd_name(crd)))?;
        let schema =
            serde_json::to_value(schema).map_err(|_| GenerateError::Schema(crd_name(crd)))?;
        let _ = writeln!(out, "## {kind}\n\n{}\n", rationale(kind));
        let short = crd.spec.names.short_names.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "- Scope: {}; resource `{}`; short names: {}; categories: {}",
            crd.spec.scope,
            crd.spec.names.plural,
            short
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", "),
            crd.spec
                .names
                .categories
                .clone()
                .unwrap_or_default()
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(sub) = &version.subresources {
            let mut subs = Vec::new();
            if sub.status.is_some() {
                subs.push("status".to_string());
            }
            if let Some(scale) = &sub.scale {
                subs.push(format!(
                    "scale (`{}` / `{}` / `{}`)",
                    scale.spec_replicas_path,
                    scale.status_replicas_path,
                    scale.label_selector_path.clone().unwrap_or_default()
                ));
            }
            let _ = writeln!(out, "- Subresources: {}", subs.join(", "));
        }
        if let Some(cols) = &version.additional_printer_columns {
            let cols: Vec<String> = cols
                .iter()
                .map(|c| format!("{} (`{}`)", c.name, c.json_path))
                .collect();
            let _ = writeln!(out, "- `kubectl get` columns: {}", cols.join(", "));
        }
        if let Some(rules) = schema["x-kubernetes-validations"].as_array()
            && !rules.is_empty()
        {
            let _ = writeln!(out, "- Object rules: {}", constraints(&schema).join("; "));
        }
        for part in ["spec", "status"] {
            let sub = &schema["properties"][part];
            if sub.is_null() {
                continue;
            }
            let _ = writeln!(
                out,
                "\n### {kind} {part}\n\n| Field | Type | Required | Default | Description |\n|---|---|---|---|---|"
            );
            let mut rows = Vec::new();
            let req = schema["required"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x.as_str() == Some(part)));
            walk(&mut rows, part, sub, req);
            for row in rows {
                let _ = writeln!(out, "{row}");
            }
        }
        out.push('\n');
    }
    Ok(out)
}
