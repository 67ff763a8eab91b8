//! The operator as users run it: installed with its chart, two replicas of
//! the operator Deployment run from the `strata-operator` image (pod runner
//! in image mode) with in-cluster configuration (the projected
//! ServiceAccount token, `KUBERNETES_SERVICE_HOST`), the chart's RBAC and
//! leader election; the leader serves a Model whose replica runs from the
//! engine simulator's and the sidecar's images; when the leader's pod is
//! deleted, the other replica takes the Lease over and goes on reconciling.
//!
//! Needs the images: `scripts/images --profile dev strata-operator
//! strata-sidecar strata-engine-sim` (scripts/test builds them first).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use strata_core::view::pod_ready;
use strata_crds::{GPUPool, Model};
use strata_e2e::harness::{
    NODE_AGENT, World, chart_world, model_image_profile, post_json, process_identity, repo_path,
    repo_yaml, sim_engine_gpu_injection, sim_image_model, test_namespace, wait_for, world,
};
use strata_e2e::pod_images::Injection;

const TIMEOUT: Duration = Duration::from_secs(120);
const OPERATOR: &str = "operator";
const MODEL: &str = "model";
const NS: &str = "strata-system";
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn the_world() -> &'static World {
    world(env!("CARGO_BIN_EXE_strata-cluster"), || {
        chart_world(
            OPERATOR,
            [(
                MODEL.to_string(),
                model_image_profile(
                    sim_engine_gpu_injection(&["--itl-ms", "5"]),
                    Injection::default(),
                ),
            )],
            &[],
        )
    })
}

fn operator_pods(list: &[Pod]) -> Vec<(String, bool)> {
    list.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.metadata.name.clone().unwrap_or_default(), pod_ready(p)))
        .collect()
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("strata-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// Requests the API server dispatched for the chart's FlowSchema
/// `strata-leader-election` at priority level `leader-election`
/// (`apiserver_flowcontrol_dispatched_requests_total`).
async fn lease_requests_dispatched(client: &kube::Client) -> f64 {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = client.request_text(req).await.expect("API server metrics");
    strata_e2e::bench_memory::counter_sum(
        &text,
        "apiserver_flowcontrol_dispatched_requests_total",
        &[
            r#"flow_schema="strata-leader-election""#,
            r#"priority_level="leader-election""#,
        ],
    )
}

#[tokio::test]
async fn the_chart_runs_the_operator_from_its_image_with_leader_election() {
    let w = the_world();
    let client = w.client().await;
    let chart = repo_path("charts/strata");
    let out = w.helm(&[
        "upgrade",
        "--install",
        "strata",
        &chart.to_string_lossy(),
        "--namespace",
        NS,
        "--create-namespace",
        "--set",
        &format!("podLabels.e2e\\.strata\\.ai/run={OPERATOR}"),
        "--set",
        &format!("modelPodLabels.e2e\\.strata\\.ai/run={MODEL}"),
        "--set",
        &format!("nodeAgent.podLabels.e2e\\.strata\\.ai/run={NODE_AGENT}"),
        "--set",
        "leaderElection.leaseDurationSeconds=10",
        "--set",
        "logFormat=text",
        "--wait",
        "--timeout",
        "3m",
    ]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let selector = "app.kubernetes.io/name=strata-operator";
    if !out.status.success() {
        let list = pods
            .list(&ListParams::default().labels(selector))
            .await
            .expect("pods");
        let statuses: Vec<_> = list
            .items
            .iter()
            .map(|p| (&p.metadata.name, &p.status))
            .collect();
        panic!(
            "helm install: {}{}\n{statuses:#?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .expect("pods");
    let ready = operator_pods(&list.items);
    assert_eq!(ready.len(), 2, "{ready:?}");
    assert!(ready.iter().all(|(_, r)| *r), "{ready:?}");
    // Each runs as the image's non-root user on a read-only root.
    for (name, _) in &ready {
        let dir = w.info.log_dir.join("pods").join(format!("{NS}_{name}.d"));
        let (uid, ro) = process_identity(&dir.join("operator.pid"));
        assert_eq!((uid, ro), (65532, true), "{name}");
        let pod = list
            .items
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .expect("pod");
        let image = pod
            .spec
            .as_ref()
            .map(|s| s.containers[0].image.clone())
            .expect("spec");
        assert_eq!(
            image.as_deref(),
            Some(format!("ghcr.io/strata-ai/strata-operator:{VERSION}").as_str())
        );
    }
    // One of them leads.
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let leader = loop {
        if let Some(h) = holder(&leases)
            .await
            .filter(|h| ready.iter().any(|(n, _)| n == h))
        {
            break h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no replica took the Lease"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The replicas' Lease requests are classified by the chart's FlowSchema
    // into the `leader-election` priority level, not `workload-low` with
    // their other requests (counted by the API server's flow control).
    let dispatched = lease_requests_dispatched(&client).await;
    assert!(
        dispatched > 0.0,
        "no request dispatched by FlowSchema strata-leader-election at priority level leader-election"
    );

    // The leader serves a Model whose replica runs from images.
    let pool: GPUPool =
        serde_json::from_value(repo_yaml("samples/gpupool-h100.yaml").expect("sample"))
            .expect("pool");
    Api::<GPUPool>::all(client.clone())
        .create(&PostParams::default(), &pool)
        .await
        .expect("pool");
    let ns = test_namespace(&client, "incluster")
        .await
        .expect("namespace");
    let models: Api<Model> = Api::namespaced(client.clone(), &ns);
    let model = sim_image_model("chat", 1, 2).expect("model");
    models
        .create(&PostParams::default(), &model)
        .await
        .expect("model");
    let replicas = |n: i32| {
        move |m: Option<&Model>| {
            m.is_some_and(|m| m.status.as_ref().is_some_and(|s| s.ready_replicas == n))
        }
    };
    wait_for(models.clone(), "chat", TIMEOUT, replicas(1))
        .await
        .expect("the in-cluster operator brings the Model's replica up");
    let model_pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let ip = model_pods
        .list(&ListParams::default().labels("strata.ai/model=chat"))
        .await
        .expect("pods")
        .items
        .iter()
        .find(|p| pod_ready(p))
        .and_then(|p| p.status.as_ref()?.pod_ip.clone())
        .expect("a ready replica");
    let body = json!({"model": "chat", "prompt": "hi", "max_tokens": 4}).to_string();
    let answer = post_json(&format!("{ip}:8080"), "/v1/completions", &body).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The leader's pod goes; the other replica takes over within the lease
    // and reconciles the next change.
    pods.delete(&leader, &DeleteParams::default())
        .await
        .expect("delete the leader");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let successor = loop {
        if let Some(h) = holder(&leases).await.filter(|h| *h != leader) {
            break h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby did not take the Lease over from {leader}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(ready.iter().any(|(n, _)| *n == successor) || !successor.is_empty());
    models
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minReplicas": 2}})),
        )
        .await
        .expect("scale");
    wait_for(models.clone(), "chat", TIMEOUT, replicas(2))
        .await
        .expect("the new leader reconciles the scale-up");
}
