//! The operator's request budget, as a regression guard that counts and
//! never times: twelve Models (one GPU each; their pods left to KWOK, which
//! marks them Running and Ready) are applied to the chart's operator; the
//! operator's own request counter (`strata_kube_requests_total`, every
//! request but the Lease's) and reconcile counter are read when every Model
//! is Ready, and again after a minute at rest.
//!
//! Ceilings (generous, so that only a regression crosses them):
//! - converging: at most 16 writes and 40 requests per Model (a Secret, a
//!   pod, a Service, a few status writes; the caches' first lists);
//! - at rest, one minute: fewer writes than Models (the goal is
//!   under one request per Model per minute beyond status that changed; at
//!   rest nothing changes), fewer requests than 2 per Model, and at most 5
//!   reconciles per Model (each is evaluated every autoscaling interval,
//!   15 s, in every scaling mode: CPU and scrapes of its replicas, no API
//!   request when nothing changed).
//!
//! Before [11] the operator made about 4 reconciles, 4 pod LISTs, 4 Service
//! GETs and 8 writes per Model per minute at rest.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use strata_core::view::pod_ready;
use strata_crds::Model;
use strata_e2e::harness::{
    World, chart_world, ensure_sample_pool, operator_leader, test_namespace, world,
};
use strata_e2e::wait::poll_until;

const OPERATOR: &str = "quiet-operator";
const MODELS: usize = 12;

fn the_world() -> &'static World {
    world(env!("CARGO_BIN_EXE_strata-cluster"), || {
        chart_world(
            OPERATOR,
            Vec::<(String, strata_e2e::runner::Profile)>::new(),
            &[],
        )
    })
}

/// The leader's counters: requests by verb, and Model reconciles (its
/// status-write and child-apply counters are printed, to say which writes
/// a failure is made of).
async fn counters(w: &World) -> (BTreeMap<String, f64>, f64) {
    let client = w.client().await;
    let leader = operator_leader(&client, Duration::from_secs(60))
        .await
        .expect("leader");
    let page = strata_e2e::http::get(leader.metrics_addr(), "/metrics", Duration::from_secs(5))
        .await
        .expect("the leader's metrics");
    let mut by_verb = BTreeMap::new();
    let mut reconciles = 0.0;
    for line in page.body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        if let Some(labels) = series.strip_prefix("strata_kube_requests_total{") {
            // {verb="GET",resource="secrets"}: summed by verb.
            let verb = labels
                .split(',')
                .find_map(|l| l.strip_prefix("verb=\""))
                .map(|v| v.trim_end_matches('}').trim_end_matches('"').to_string())
                .unwrap_or_default();
            *by_verb.entry(verb).or_insert(0.0) += v;
            eprintln!("  {series} {v}");
        } else if series.starts_with("strata_reconcile_total{controller=\"model\"") {
            reconciles += v;
        } else if series.starts_with("strata_status_writes_total")
            || series.starts_with("strata_child_applies_total")
            || series.starts_with("strata_energy_status_writes_total")
        {
            eprintln!("  {series} {v}");
        }
    }
    (by_verb, reconciles)
}

fn writes(by_verb: &BTreeMap<String, f64>) -> f64 {
    by_verb
        .iter()
        .filter(|(verb, _)| !matches!(verb.as_str(), "GET" | "HEAD" | "OPTIONS"))
        .map(|(_, v)| v)
        .sum()
}

fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .collect()
}

#[tokio::test]
async fn at_rest_the_operator_sends_almost_nothing() {
    let w = the_world();
    let client = w.client().await;
    // Model pods without a runner profile: KWOK runs them (Ready, no
    // processes), so that only the operator's own work is counted.
    w.install_operator(OPERATOR, "", &[])
        .await
        .unwrap_or_else(|e| panic!("the operator in-cluster: {e}"));
    ensure_sample_pool(&client, "samples/gpupool-h100.yaml")
        .await
        .expect("pool");
    let ns = test_namespace(&client, "quiet").await.expect("namespace");
    let models: Api<Model> = Api::namespaced(client.clone(), &ns);
    let (before, reconciles_before) = counters(w).await;
    for i in 0..MODELS {
        let m: Model = serde_json::from_value(json!({
            "apiVersion": "strata.ai/v1alpha1",
            "kind": "Model",
            "metadata": {"name": format!("m{i}")},
            "spec": {
                "source": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"},
                "engine": {"type": "vLLM", "image": "vllm/vllm-openai:v0.11.0"},
                "pools": [{"name": "h100"}],
                "replicas": 1,
                "minReplicas": 1,
                "maxReplicas": 2,
                "autoscaling": {"mode": "Manual"},
            },
        }))
        .expect("model");
        models
            .create(&PostParams::default(), &m)
            .await
            .expect("create");
    }
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    poll_until(
        "every Model Ready",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let (models, pods) = (models.clone(), pods.clone());
            async move {
                let ready_pods = pods
                    .list(&Default::default())
                    .await
                    .map(|l| l.items.iter().filter(|p| pod_ready(p)).count())
                    .unwrap_or(0);
                let ready_models = models
                    .list(&Default::default())
                    .await
                    .map(|l| {
                        l.items
                            .iter()
                            .filter(|m| m.status.as_ref().is_some_and(|s| s.ready_replicas == 1))
                            .count()
                    })
                    .unwrap_or(0);
                Ok(ready_pods == MODELS && ready_models == MODELS)
            }
        },
    )
    .await
    .expect("every Model Ready");
    // Converged includes the energy accountant's first reading of each
    // Model (its first energy status is a change, not rest).
    poll_until(
        "every Model's first energy status",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let models = models.clone();
            async move {
                Ok(models
                    .list(&Default::default())
                    .await
                    .map(|l| {
                        l.items.iter().all(|m| {
                            m.status
                                .as_ref()
                                .and_then(|s| s.energy.as_ref())
                                .is_some_and(|e| e.observed_at.is_some())
                        })
                    })
                    .unwrap_or(false))
            }
        },
    )
    .await
    .expect("energy status");
    let (converged, reconciles_converged) = counters(w).await;
    let converging = delta(&before, &converged);
    let n = MODELS as f64;
    eprintln!(
        "converging {MODELS} Models: requests {converging:?} ({:.1} writes, {:.1} requests per Model), {:.0} Model reconciles",
        writes(&converging) / n,
        converging.values().sum::<f64>() / n,
        reconciles_converged - reconciles_before
    );
    assert!(
        writes(&converging) <= 16.0 * n,
        "converging: {converging:?}"
    );
    assert!(
        converging.values().sum::<f64>() <= 40.0 * n,
        "converging: {converging:?}"
    );

    // A minute at rest (the duration being measured, not a wait).
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (rested, reconciles_rested) = counters(w).await;
    let at_rest = delta(&converged, &rested);
    let reconciles = reconciles_rested - reconciles_converged;
    eprintln!(
        "a minute at rest with {MODELS} Models: requests {at_rest:?}, {reconciles:.0} Model reconciles"
    );
    assert!(writes(&at_rest) < n, "at rest: {at_rest:?}");
    assert!(
        at_rest.values().sum::<f64>() < 2.0 * n,
        "at rest: {at_rest:?}"
    );
    assert!(
        reconciles <= 5.0 * n,
        "{reconciles} Model reconciles at rest"
    );
}
