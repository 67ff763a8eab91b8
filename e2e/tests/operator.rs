//! The operator in the local world as users run it: the chart installs it,
//! its two replicas run in-cluster from the operator image (pod runner in
//! image mode, the chart's RBAC enforced by the real API server, leader
//! election); the Models' replicas run from images too (the engine
//! simulator's and the product's sidecar) on their pod IPs.
//!
//! One scenario, in order, because its steps share the GPUs of one world.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use strata_core::view::pod_ready;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use strata_crds::{GPUPool, Model};
use strata_e2e::harness::{
    World, chart_world, engine_sim_image, model_image_profile, operator_leader, post_json,
    repo_yaml, sim_engine_gpu_injection, test_namespace, wait_for, world,
};
use strata_e2e::pod_images::Injection;
use strata_e2e::runner::Profile;
use strata_e2e::wait::poll_until;

const TIMEOUT: Duration = Duration::from_secs(90);
const PROFILE: &str = "model-replica";
const OPERATOR: &str = "operator";

fn the_world() -> &'static World {
    world(env!("CARGO_BIN_EXE_strata-cluster"), || {
        chart_world(
            OPERATOR,
            [(
                PROFILE.to_string(),
                // Model pods from their images: the simulator's engine and
                // the product's sidecar. A container that exits fails its
                // pod here (`restart: false`, as with `restartPolicy:
                // Never`), so that replacing a crashed replica is the
                // operator's work, which this scenario checks.
                Profile {
                    restart: false,
                    ..model_image_profile(
                        sim_engine_gpu_injection(&["--itl-ms", "5"]),
                        Injection::default(),
                    )
                },
            )],
            &[],
        )
    })
}

/// A Manual Model from `samples/model-llama.yaml` (its two pools, per-pool
/// args, credentials Secret), its engine the simulator's image.
fn sample_model(name: &str) -> serde_json::Value {
    let mut m = repo_yaml("samples/model-llama.yaml").expect("sample");
    m["metadata"] = json!({ "name": name });
    m["spec"]["autoscaling"] = json!({"mode": "Manual"});
    m["spec"]["engine"]["image"] = json!(engine_sim_image());
    if let Some(spec) = m["spec"].as_object_mut() {
        spec.remove("adapters");
    }
    m
}

async fn model_status(api: &Api<Model>, name: &str) -> strata_crds::ModelStatus {
    api.get(name)
        .await
        .expect("model")
        .status
        .unwrap_or_default()
}

async fn wait_model(
    api: &Api<Model>,
    name: &str,
    what: &str,
    check: impl Fn(&Model) -> bool + Send + Sync + 'static,
) {
    let check = Arc::new(check);
    wait_for(api.clone(), name, TIMEOUT, move |m: Option<&Model>| {
        m.is_some_and(|m| check(m))
    })
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"));
}

fn ready_replicas(m: &Model) -> i32 {
    m.status.as_ref().map_or(0, |s| s.ready_replicas)
}

fn condition(m: &Model, t: &str) -> Option<(String, String, String)> {
    m.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// A replica deleted as soon as it exists, three times in a row (force
/// deletes: no Terminating state, the watch shows the pod and then its
/// removal), is replaced each time. Before the pod watch met the
/// operator's expectations, a pod created and lost between two reconciles
/// counted as alive until the expectation expired (60 s), and the Model
/// stayed a replica short that long; the 40 s deadline below is under that
/// expiry and far above a replacement's seconds.
async fn young_replicas_are_replaced(client: &Client, models: &Api<Model>, ns: &str) {
    let pods_api = Api::<Pod>::namespaced(client.clone(), ns);
    let mut known: BTreeSet<String> = model_pods(client, ns, "fallback")
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    let mut doomed = known.iter().next().cloned().expect("a replica");
    let mut deleted = BTreeSet::new();
    let young_deadline = Duration::from_secs(40);
    for round in 0..3 {
        force_delete(&pods_api, &doomed).await;
        deleted.insert(doomed.clone());
        let newest = Arc::new(Mutex::new(None::<String>));
        let (c, seen, found) = (client.clone(), known.clone(), newest.clone());
        let ns2 = ns.to_owned();
        poll_until(
            &format!("round {round}: a replacement for {doomed}"),
            young_deadline,
            Duration::from_millis(100),
            move || {
                let (c, seen, found, ns2) = (c.clone(), seen.clone(), found.clone(), ns2.clone());
                async move {
                    let fresh = model_pods(&c, &ns2, "fallback")
                        .await
                        .into_iter()
                        .map(|p| p.name_any())
                        .find(|n| !seen.contains(n));
                    let done = fresh.is_some();
                    *found.lock().expect("lock") = fresh;
                    Ok(done)
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        doomed = newest.lock().expect("lock").clone().expect("found");
        known.insert(doomed.clone());
    }
    force_delete(&pods_api, &doomed).await;
    deleted.insert(doomed.clone());
    let gone = deleted;
    let healed = wait_for(
        models.clone(),
        "fallback",
        young_deadline,
        move |m: Option<&Model>| {
            m.and_then(|m| m.status.as_ref()).is_some_and(|s| {
                s.ready_replicas == 2 && s.placement.iter().all(|p| !gone.contains(&p.pod))
            })
        },
    )
    .await;
    if let Err(e) = healed {
        let s = model_status(models, "fallback").await;
        let pods: Vec<(String, bool)> = model_pods(client, ns, "fallback")
            .await
            .iter()
            .map(|p| (p.name_any(), pod_ready(p)))
            .collect();
        panic!(
            "two ready replicas again after young ones were deleted: {e}; status: {} ready, placement {:?}, conditions {:?}; pods (name, ready): {pods:?}",
            s.ready_replicas,
            s.placement.iter().map(|p| &p.pod).collect::<Vec<_>>(),
            s.conditions
                .iter()
                .map(|c| (&c.type_, &c.status, &c.reason))
                .collect::<Vec<_>>()
        );
    }
}

/// Deletes a pod at once (grace period 0); one already gone is fine.
async fn force_delete(api: &Api<Pod>, name: &str) {
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match api.delete(name, &force).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => panic!("delete {name}: {e}"),
    }
}

async fn model_pods(client: &Client, ns: &str, model: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("strata.ai/model={model}")))
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

#[tokio::test]
async fn the_operator_places_rolls_heals_and_cleans_up() {
    let w = the_world();
    let client = w.client().await;
    // The operator as users run it: the chart's two replicas from the
    // operator image, in-cluster, with leader election (a short lease for
    // the failover below; faster placement retries and resyncs for the
    // scenario's clock).
    let leader = w
        .install_operator(
            OPERATOR,
            PROFILE,
            &[
                "leaderElection.leaseDurationSeconds=6",
                "unschedulableGraceSeconds=5",
                "extraArgs={--resync-seconds=10}",
                "extraEnv[0].name=RUST_LOG",
                "extraEnv[0].value=info\\,strata_operator=debug",
            ],
        )
        .await
        .expect("the chart's operator runs");

    // Pools.
    let pools: Api<GPUPool> = Api::all(client.clone());
    for f in ["samples/gpupool-h100.yaml", "samples/gpupool-l4.yaml"] {
        let obj: GPUPool = serde_json::from_value(repo_yaml(f).expect("sample")).expect("pool");
        pools
            .create(&PostParams::default(), &obj)
            .await
            .expect("create pool");
    }
    wait_for(pools.clone(), "h100", TIMEOUT, |p: Option<&GPUPool>| {
        p.and_then(|p| p.status.as_ref())
            .is_some_and(|s| s.node_count == 2 && s.gpu_capacity == 16 && s.gpu_free == 16)
    })
    .await
    .expect("the h100 pool reports 2 nodes and 16 free GPUs");

    // A Model, manual replicas, H100 first then L4, in a namespace where
    // Pod Security enforces "restricted": its pods must be admitted there.
    let ns = test_namespace(&client, "models").await.expect("namespace");
    let out = w.kubectl(&[
        "label",
        "namespace",
        &ns,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    assert!(out.status.success(), "labelling the namespace restricted");
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "hf-token"}, "stringData": {"HF_TOKEN": "hf_e2e"}}),
    )
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");
    let models: Api<Model> = Api::namespaced(client.clone(), &ns);
    let mut llama = sample_model("llama");
    llama["spec"]["replicas"] = json!(2);
    let llama: Model = serde_json::from_value(llama).expect("model");
    models
        .create(&PostParams::default(), &llama)
        .await
        .expect("create model");
    wait_model(&models, "llama", "2 replicas ready", |m| {
        ready_replicas(m) == 2
    })
    .await;
    let status = model_status(&models, "llama").await;
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=llama,strata.ai/model=llama")
    );
    assert_eq!(status.pools.as_deref(), Some("h100"));
    assert_eq!(status.placement.len(), 2);
    let nodes: BTreeSet<&str> = status.placement.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(
        nodes.len(),
        1,
        "bin-packed onto one H100 node: {:?}",
        status.placement
    );
    let m = models.get("llama").await.expect("model");
    assert_eq!(condition(&m, "Ready").map(|c| c.0), Some("True".into()));
    assert_eq!(condition(&m, "Degraded").map(|c| c.0), Some("False".into()));
    assert_eq!(status.observed_generation, m.metadata.generation);

    // The pods: owned, pinned, tolerating, requesting GPUs, answering on their pod IPs.
    let pods = model_pods(&client, &ns, "llama").await;
    for p in &pods {
        assert_eq!(p.owner_references()[0].kind, "Model");
        let spec = p.spec.as_ref().expect("spec");
        assert!(
            spec.tolerations
                .iter()
                .flatten()
                .any(|t| t.key.as_deref() == Some("nvidia.com/gpu"))
        );
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .expect("ip");
        let body = json!({"model": "llama", "prompt": "hi", "max_tokens": 4}).to_string();
        let answer = post_json(&format!("{ip}:8080"), "/v1/completions", &body).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    // The Service selects exactly the ready replicas.
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .get("llama")
        .await
        .expect("service");
    assert_eq!(
        svc.spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .map(|s| s.len()),
        Some(2)
    );
    let svc_ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    // (The endpoint-slice controller cannot publish them here: the API server
    // rejects loopback endpoint addresses, and every pod IP of the local world
    // is loopback. So check the selector against the pods directly.)
    let selector = svc.spec.and_then(|s| s.selector).unwrap_or_default();
    let selector = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let selected = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("pods");
    let mut selected: Vec<String> = selected.items.iter().map(|p| p.name_any()).collect();
    let mut expected: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    selected.sort();
    expected.sort();
    assert_eq!(
        selected, expected,
        "the Service selects exactly the Model's replicas"
    );
    let ports: Vec<i32> = svc_ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, [80, 9090]);

    // kubectl scale through the scale subresource.
    let out = w.kubectl(&["scale", "-n", &ns, "model/llama", "--replicas=3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_model(
        &models,
        "llama",
        "3 replicas ready after kubectl scale",
        |m| ready_replicas(m) == 3,
    )
    .await;

    // A rollout: change the engine args; watch that a ready replica exists at every moment.
    let min_ready = Arc::new(Mutex::new(usize::MAX));
    let watch_min = min_ready.clone();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let watch = tokio::spawn(async move {
        let mut ready: BTreeMap<String, bool> = BTreeMap::new();
        let stream = watcher(
            pods_api,
            watcher::Config::default().labels("strata.ai/model=llama"),
        )
        .default_backoff();
        tokio::pin!(stream);
        // Counted from the first complete list on: while the initial list is
        // still arriving, the map holds only some of the pods.
        let mut synced = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => {
                    let r = p.metadata.deletion_timestamp.is_none() && pod_ready(&p);
                    ready.insert(p.name_any(), r);
                }
                Ok(watcher::Event::Delete(p)) => {
                    ready.remove(&p.name_any());
                }
                Ok(watcher::Event::Init) => {
                    synced = false;
                    ready.clear();
                    continue;
                }
                Ok(watcher::Event::InitDone) => synced = true,
                _ => continue,
            }
            if !synced {
                continue;
            }
            let n = ready.values().filter(|r| **r).count();
            if let Ok(mut m) = watch_min.lock() {
                *m = (*m).min(n);
            }
        }
    });
    let old_hashes: BTreeSet<String> = model_status(&models, "llama")
        .await
        .placement
        .iter()
        .filter_map(|p| p.template_hash.clone())
        .collect();
    let patch = json!({"spec": {"engine": {"args": ["--max-model-len", "16384"]}}});
    models
        .patch("llama", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    wait_model(&models, "llama", "rollout complete", move |m| {
        m.status.as_ref().is_some_and(|s| {
            s.updated_replicas == 3
                && s.ready_replicas == 3
                && s.replicas == 3
                && s.placement.iter().all(|p| {
                    p.template_hash
                        .as_ref()
                        .is_some_and(|h| !old_hashes.contains(h))
                })
        })
    })
    .await;
    wait_model(&models, "llama", "Progressing/RolloutComplete", |m| {
        condition(m, "Progressing").is_some_and(|c| c.0 == "True" && c.1 == "RolloutComplete")
    })
    .await;
    watch.abort();
    let min = *min_ready.lock().expect("lock");
    assert!(
        min >= 1,
        "a moment with {min} ready replicas during the rollout"
    );
    let args = model_pods(&client, &ns, "llama").await[0]
        .spec
        .as_ref()
        .expect("spec")
        .containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        args.windows(2).any(|a| a == ["--max-model-len", "16384"]),
        "new args: {args:?}"
    );

    // Fallback with per-pool args: one replica at most on H100, the rest on L4.
    let mut fb = sample_model("fallback");
    fb["spec"]["replicas"] = json!(2);
    fb["spec"]["pools"][0]["maxReplicas"] = json!(1);
    models
        .create(
            &PostParams::default(),
            &serde_json::from_value(fb).expect("model"),
        )
        .await
        .expect("create");
    wait_model(&models, "fallback", "fallback ready", |m| {
        ready_replicas(m) == 2
    })
    .await;
    let status = model_status(&models, "fallback").await;
    assert_eq!(status.pools.as_deref(), Some("h100,l4"));
    let l4_pod = status
        .placement
        .iter()
        .find(|p| p.pool == "l4")
        .expect("an l4 replica")
        .clone();
    let pod = Api::<Pod>::namespaced(client.clone(), &ns)
        .get(&l4_pod.pod)
        .await
        .expect("pod");
    let args = pod.spec.expect("spec").containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        args.windows(2).any(|a| a == ["--max-model-len", "8192"]),
        "L4 args: {args:?}"
    );

    // Unplaceable: 16 GPUs per replica fit no node; the condition says what is missing.
    let mut big = sample_model("big");
    big["spec"]["gpusPerReplica"] = json!(16);
    big["spec"]["pools"] = json!([{"name": "h100"}, {"name": "a100-missing"}]);
    models
        .create(
            &PostParams::default(),
            &serde_json::from_value(big).expect("model"),
        )
        .await
        .expect("create");
    wait_model(&models, "big", "Degraded Unplaceable", |m| {
        condition(m, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "Unplaceable")
    })
    .await;
    let m = models.get("big").await.expect("model");
    let msg = condition(&m, "Degraded").expect("degraded").2;
    assert!(
        msg.contains("h100:")
            && msg.contains("no node has 16 free")
            && msg.contains("a100-missing: no such GPUPool"),
        "{msg}"
    );
    models
        .delete("big", &DeleteParams::default())
        .await
        .expect("delete");

    // A crashed replica is replaced.
    let victim = model_status(&models, "fallback")
        .await
        .placement
        .iter()
        .find(|p| p.pool == "h100")
        .expect("h100 replica")
        .clone();
    let pod = Api::<Pod>::namespaced(client.clone(), &ns)
        .get(&victim.pod)
        .await
        .expect("pod");
    assert!(
        pod.status.and_then(|s| s.pod_ip).is_some(),
        "a running replica"
    );
    // The engine process dies (SIGKILL, as the OOM killer would).
    let pid_file = w
        .info
        .log_dir
        .join("pods")
        .join(format!("{ns}_{}.d", victim.pod))
        .join("engine.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
        .trim()
        .parse()
        .expect("a pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the engine");
    let victim_name = victim.pod.clone();
    wait_model(
        &models,
        "fallback",
        "the crashed replica replaced",
        move |m| {
            m.status.as_ref().is_some_and(|s| {
                s.ready_replicas == 2 && s.placement.iter().all(|p| p.pod != victim_name)
            })
        },
    )
    .await;

    // A replica deleted as soon as it exists is replaced at once (boxed:
    // this scenario's future is too large for a test thread's stack).
    Box::pin(young_replicas_are_replaced(&client, &models, &ns)).await;

    // A node disappears: its replica is placed again.
    let status = model_status(&models, "fallback").await;
    let l4 = status
        .placement
        .iter()
        .find(|p| p.pool == "l4")
        .expect("l4 replica")
        .clone();
    Api::<Node>::all(client.clone())
        .delete(&l4.node, &DeleteParams::default())
        .await
        .expect("delete node");
    let gone = l4.node.clone();
    wait_model(
        &models,
        "fallback",
        "replica placed again after its node vanished",
        move |m| {
            m.status.as_ref().is_some_and(|s| {
                s.ready_replicas == 2 && s.placement.iter().all(|p| p.node != gone)
            })
        },
    )
    .await;

    // The GPUPool reports what is placed on it.
    wait_for(pools.clone(), "h100", TIMEOUT, |p: Option<&GPUPool>| {
        p.and_then(|p| p.status.as_ref()).is_some_and(|s| {
            s.gpu_allocated == 4
                && s.gpu_free == 12
                && s.models.iter().map(|m| m.replicas).sum::<i32>() == 4
        })
    })
    .await
    .expect("h100 pool status counts llama (3) and fallback (1)");

    // The operator never writes a spec: its field manager owns status only.
    let m = models.get("llama").await.expect("model");
    for mf in m.metadata.managed_fields.iter().flatten() {
        if mf.manager.as_deref() == Some("strata-operator") {
            assert_eq!(
                mf.subresource.as_deref(),
                Some("status"),
                "strata-operator manages {:?}",
                mf.fields_v1
            );
        }
    }

    // Metrics on the leader (still the first one: no failover so far).
    let leases: Api<Lease> = Api::namespaced(client.clone(), "strata-system");
    assert_eq!(
        operator_leader(&client, TIMEOUT).await.expect("leader"),
        leader
    );
    let metrics_addr = leader.metrics_addr();
    let metrics = strata_e2e::http::get(metrics_addr, "/metrics", Duration::from_secs(5))
        .await
        .expect("metrics");
    assert!(
        metrics
            .body
            .contains("strata_reconcile_total{controller=\"model\",result=\"success\"}"),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("strata_leader 1"));
    // The backlog gauge is sampled every 5 s: wait for it to read 0.
    poll_until(
        "the reconcile backlog to drain",
        TIMEOUT,
        Duration::from_millis(500),
        || async move {
            let m = strata_e2e::http::get(metrics_addr, "/metrics", Duration::from_secs(5)).await;
            Ok(m.is_ok_and(|m| {
                m.body
                    .contains("strata_reconcile_queue_depth{controller=\"model\"} 0")
            }))
        },
    )
    .await
    .expect("backlog drained");
    assert!(
        metrics
            .body
            .contains("strata_reconcile_duration_seconds_bucket{controller=\"model\"")
    );
    assert!(
        metrics
            .body
            .contains("strata_replica_placements_total{pool=\"l4\"}")
    );

    // Leader failover: the leader's pod is deleted; its container gets
    // SIGTERM, and a graceful shutdown gives the Lease up (holder cleared)
    // instead of leaving it to expire; the standby takes over and reconciles.
    let released = Arc::new(Mutex::new(false));
    let seen = released.clone();
    let lease_watch = tokio::spawn({
        let leases = leases.clone();
        async move {
            let stream = watcher(
                leases,
                watcher::Config::default().fields("metadata.name=strata-operator"),
            )
            .applied_objects()
            .default_backoff();
            tokio::pin!(stream);
            while let Some(Ok(lease)) = stream.next().await {
                let holder = lease.spec.and_then(|s| s.holder_identity);
                if holder.is_none_or(|h| h.is_empty())
                    && let Ok(mut r) = seen.lock()
                {
                    *r = true;
                }
            }
        }
    });
    Api::<Pod>::namespaced(client.clone(), "strata-system")
        .delete(&leader.pod, &DeleteParams::default())
        .await
        .expect("delete the leader's pod");
    let old = leader.pod.clone();
    wait_for(
        leases.clone(),
        "strata-operator",
        TIMEOUT,
        move |l: Option<&Lease>| {
            l.and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.as_deref())
                .is_some_and(|h| !h.is_empty() && h != old)
        },
    )
    .await
    .expect("another replica holds the lease");
    lease_watch.abort();
    assert!(
        *released.lock().expect("lock"),
        "the old leader released the Lease on SIGTERM"
    );
    let out = w.kubectl(&["scale", "-n", &ns, "model/llama", "--replicas=1"]);
    assert!(out.status.success());
    wait_model(&models, "llama", "the new leader scales down", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.replicas == 1 && s.ready_replicas == 1)
    })
    .await;

    // Deleting a Model removes its pods and Service (owner references).
    models
        .delete("llama", &DeleteParams::default())
        .await
        .expect("delete");
    poll_until(
        "llama's pods and Service are gone",
        TIMEOUT,
        Duration::from_millis(300),
        || {
            let client = client.clone();
            let ns = ns.clone();
            async move {
                let pods = model_pods(&client, &ns, "llama").await;
                let svc = Api::<Service>::namespaced(client, &ns)
                    .get_opt("llama")
                    .await?;
                Ok(pods.is_empty() && svc.is_none())
            }
        },
    )
    .await
    .expect("garbage collected");

    // A persistent refusal (a quota that allows no pods) is visible on the
    // Model: the ReconcileError condition and a Warning Event carry the API
    // server's words, without the operator's logs.
    let quota_ns = test_namespace(&client, "quota").await.expect("namespace");
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}
    }))
    .expect("quota");
    Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(client.clone(), &quota_ns)
        .create(&PostParams::default(), &quota)
        .await
        .expect("quota");
    let hf_token: Secret = serde_json::from_value(
        json!({"metadata": {"name": "hf-token"}, "stringData": {"HF_TOKEN": "hf_e2e"}}),
    )
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &quota_ns)
        .create(&PostParams::default(), &hf_token)
        .await
        .expect("secret");
    let blocked_models: Api<Model> = Api::namespaced(client.clone(), &quota_ns);
    let mut blocked = sample_model("blocked");
    blocked["spec"]["replicas"] = json!(1);
    let blocked: Model = serde_json::from_value(blocked).expect("model");
    blocked_models
        .create(&PostParams::default(), &blocked)
        .await
        .expect("create model");
    wait_model(
        &blocked_models,
        "blocked",
        "ReconcileError True with the quota's words",
        |m| {
            m.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "ReconcileError"
                        && c.status == "True"
                        && c.message.contains("exceeded quota")
                })
            })
        },
    )
    .await;
    let warnings =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &quota_ns)
            .list(&ListParams::default())
            .await
            .expect("events");
    assert!(
        warnings.items.iter().any(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("blocked")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("exceeded quota"))
        }),
        "a Warning Event on the Model"
    );
    let m = blocked_models.get("blocked").await.expect("model");
    let msg = condition(&m, "ReconcileError").expect("condition").2;
    assert!(
        msg.starts_with("creating a replica of Model blocked on node "),
        "the message names the call that failed: {msg}"
    );

    // A Model whose source credentials Secret does not exist: Degraded
    // SecretNotFound, and no replica is even tried (a pod would never start
    // and would hold its GPUs); once the Secret exists, the Model goes on
    // (here into the quota).
    let mut needs = sample_model("needs-secret");
    needs["spec"]["replicas"] = json!(1);
    needs["spec"]["source"]["credentialsSecretRef"] = json!({"name": "other-token"});
    let needs: Model = serde_json::from_value(needs).expect("model");
    blocked_models
        .create(&PostParams::default(), &needs)
        .await
        .expect("create model");
    wait_model(
        &blocked_models,
        "needs-secret",
        "Degraded SecretNotFound naming the Secret",
        |m| {
            condition(m, "Degraded").is_some_and(|c| {
                c.0 == "True" && c.1 == "SecretNotFound" && c.2.contains("other-token")
            })
        },
    )
    .await;
    let m = blocked_models.get("needs-secret").await.expect("model");
    assert!(
        condition(&m, "ReconcileError").is_none_or(|c| c.0 == "False"),
        "no pod was tried while the Secret is missing: {:?}",
        condition(&m, "ReconcileError")
    );
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "other-token"}, "stringData": {"HF_TOKEN": "hf_test"}
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &quota_ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");
    wait_model(
        &blocked_models,
        "needs-secret",
        "past the Secret: the pod is tried (and refused by the quota)",
        |m| {
            condition(m, "Degraded").is_some_and(|c| c.1 != "SecretNotFound")
                && condition(m, "ReconcileError")
                    .is_some_and(|c| c.0 == "True" && c.2.contains("exceeded quota"))
        },
    )
    .await;
    the_inference_pool_follows_its_model(&client).await;
}

/// Someone else edits the Model's InferencePool, or deletes it: the watch
/// of Strata's InferencePools sees it (an edit by another field manager
/// counts in `strata_child_drift_total`) and wakes the Model, which puts
/// it back.
async fn an_edited_or_deleted_pool_is_put_back(
    client: &Client,
    pools: &Api<strata_operator::controller::inference_pool::InferencePool>,
) {
    use strata_operator::controller::inference_pool::InferencePool;
    // What the operator's watch saw changed by someone else (this
    // operator's resync, 10 s, would put the pool back too, if slower: the
    // counter tells the watch's wake-up apart). Summed over the operator's
    // ready pods: a change of leader in between (this test's lease is 6 s)
    // leaves the count with the pod that saw the edit.
    let drifted = || async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), "strata-system");
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/name=strata-operator"))
            .await
            .expect("the operator's pods");
        let mut sum = 0.0;
        for pod in list.items.iter().filter(|p| pod_ready(p)) {
            let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) else {
                continue;
            };
            let addr = format!("{ip}:8080").parse().expect("pod address");
            let m = strata_e2e::http::get(addr, "/metrics", Duration::from_secs(5))
                .await
                .expect("metrics");
            sum += strata_e2e::bench_memory::counter_sum(
                &m.body,
                "strata_child_drift_total",
                &["kind=\"InferencePool\""],
            );
        }
        sum
    };
    let before = drifted().await;
    pools
        .patch(
            "routed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"targetPorts": [{"number": 9999}]}})),
        )
        .await
        .expect("someone else edits the pool");
    wait_for(
        pools.clone(),
        "routed",
        TIMEOUT,
        |p: Option<&InferencePool>| {
            p.is_some_and(|p| p.spec["targetPorts"] == json!([{"number": 8080}]))
        },
    )
    .await
    .expect("the edit undone");
    let edited = drifted().await;
    assert!(
        edited >= before + 1.0,
        "the edit seen: {before} -> {edited}"
    );
    let uid = pools.get("routed").await.expect("pool").metadata.uid;
    pools
        .delete("routed", &DeleteParams::default())
        .await
        .expect("someone else deletes the pool");
    wait_for(
        pools.clone(),
        "routed",
        TIMEOUT,
        move |p: Option<&InferencePool>| p.is_some_and(|p| p.metadata.uid != uid),
    )
    .await
    .expect("the pool created again");
}

/// The extension's real endpoint picker (`epp` at the pinned version,
/// built from its Go module), configured as docs/routing.md says (the
/// example EndpointPickerConfig, the metrics port of the sidecars' admin
/// port) for the pool `pool` in `ns`, counts its `replicas` as pods with
/// fresh metrics: it read each sidecar's metrics over TLS under Strata's
/// names (when it finds none of them a pod's metrics stay stale, and the
/// pod is not counted), and it found every one it was told to read (its
/// log names each one missing).
async fn the_endpoint_picker_reads_the_sidecars(ns: &str, pool: &str, replicas: usize) {
    let w = the_world();
    let epp = strata_e2e::tools::ensure_endpoint_picker().expect("the endpoint picker");
    let config = strata_e2e::harness::repo_path("docs/examples/epp-config.yaml");
    let [grpc, health, metrics] = [(); 3].map(|()| strata_e2e::harness::free_port());
    let log = std::fs::File::create(w.info.log_dir.join(format!("epp-{ns}.log"))).expect("log");
    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::new(&epp)
        .args([
            format!("--pool-name={pool}"),
            format!("--pool-namespace={ns}"),
            "--pool-group=inference.networking.k8s.io".into(),
            "--model-server-metrics-port=9090".into(),
            format!("--config-file={}", config.display()),
            format!("--grpc-port={grpc}"),
            format!("--grpc-health-port={health}"),
            format!("--metrics-port={metrics}"),
            "--secure-serving=false".into(),
            "--metrics-endpoint-auth=false".into(),
            "--tracing=false".into(),
            "--enable-pprof=false".into(),
            "--refresh-prometheus-metrics-interval=500ms".into(),
        ])
        .env("KUBECONFIG", &w.info.kubeconfig)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the endpoint picker");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], metrics).into();
    let ready = format!("name=\"{pool}\"");
    let counted = poll_until(
        "the endpoint picker to count the pool's pods with fresh metrics",
        TIMEOUT,
        Duration::from_millis(300),
        || {
            let ready = ready.clone();
            async move {
                let Ok(m) = strata_e2e::http::get(addr, "/metrics", Duration::from_secs(2)).await
                else {
                    return Ok(false);
                };
                let pods = strata_e2e::bench_memory::counter_sum(
                    &m.body,
                    "inference_pool_ready_pods",
                    &[&ready],
                );
                Ok(pods >= replicas as f64)
            }
        },
    )
    .await;
    // The picker is ready; watch it for about 20 more polls (50 ms apart,
    // an observation window, not a wait for readiness), then read its
    // log: every metric the configuration names was found (a missing one
    // is logged as "extract failed" for the pod, once).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let exited = child.try_wait().ok().flatten();
    let _ = child.kill().await;
    let log =
        std::fs::read_to_string(w.info.log_dir.join(format!("epp-{ns}.log"))).unwrap_or_default();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("extract failed"))
        .collect();
    assert!(
        failed.is_empty(),
        "the picker found not every metric it was told to read: {failed:#?}"
    );
    counted.unwrap_or_else(|e| {
        panic!(
            "{e}; the picker {} (its log: {})",
            exited.map_or("ran".to_string(), |s| format!("exited: {s}")),
            w.info.log_dir.join(format!("epp-{ns}.log")).display()
        )
    });
    eprintln!(
        "the endpoint picker counted {replicas} pod(s) with fresh metrics {:.1?} after its start",
        started.elapsed()
    );
}

/// A Model with `spec.routing.inferencePool`: before the Gateway API
/// Inference Extension's CRD is installed it is served and says
/// Degraded/InferencePoolUnavailable (and a Warning Event); once the real
/// CRD (from the extension's Go module, `e2e/tools/build.sh gie`) is
/// installed, its InferencePool appears, accepted by the API server's
/// schema, selecting exactly the Model's pods on the sidecar's port; it
/// follows a change of the picker, goes when the Model stops asking, comes
/// back, and is garbage-collected with the Model.
async fn the_inference_pool_follows_its_model(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use strata_operator::controller::inference_pool::InferencePool;

    let ns = test_namespace(client, "routing").await.expect("namespace");
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "hf-token"}, "stringData": {"HF_TOKEN": "hf_e2e"}}),
    )
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");
    let models: Api<Model> = Api::namespaced(client.clone(), &ns);
    let pools: Api<InferencePool> = Api::namespaced(client.clone(), &ns);
    let mut routed = sample_model("routed");
    routed["spec"]["replicas"] = json!(1);
    routed["spec"]["routing"] = json!({"inferencePool": {}});
    let routed: Model = serde_json::from_value(routed).expect("model");
    models
        .create(&PostParams::default(), &routed)
        .await
        .expect("create model");

    // No CRD yet: served anyway, and it says why it has no InferencePool.
    wait_model(
        &models,
        "routed",
        "Ready, and Degraded InferencePoolUnavailable without the CRD",
        |m| {
            ready_replicas(m) == 1
                && condition(m, "Degraded").is_some_and(|c| {
                    c.0 == "True"
                        && c.1 == "InferencePoolUnavailable"
                        && c.2
                            .contains("inference.networking.k8s.io/v1 inferencepools")
                })
        },
    )
    .await;
    let m = models.get("routed").await.expect("model");
    assert!(
        condition(&m, "ReconcileError").is_none_or(|c| c.0 == "False"),
        "a missing CRD is not a reconcile error: {:?}",
        condition(&m, "ReconcileError")
    );
    poll_until(
        "a Warning Event InferencePoolUnavailable on the Model",
        TIMEOUT,
        Duration::from_millis(300),
        || {
            let events =
                Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns);
            async move {
                Ok(events
                    .list(&ListParams::default())
                    .await?
                    .items
                    .iter()
                    .any(|e| {
                        e.type_.as_deref() == Some("Warning")
                            && e.reason.as_deref() == Some("InferencePoolUnavailable")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                                == Some("routed")
                    }))
            }
        },
    )
    .await
    .expect("the Warning Event");

    // The extension's real CRD, at the pinned version.
    let crd_file = strata_e2e::tools::ensure_inference_pool_crd().expect("the InferencePool CRD");
    let text = std::fs::read_to_string(&crd_file).expect("read the CRD");
    let crd: CustomResourceDefinition =
        serde_json::from_value(strata_crds::validation::yaml_to_json(&text).expect("CRD YAML"))
            .expect("CRD");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("install the InferencePool CRD");
    wait_for(
        crds.clone(),
        "inferencepools.inference.networking.k8s.io",
        TIMEOUT,
        |c: Option<&CustomResourceDefinition>| {
            c.and_then(|c| c.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        },
    )
    .await
    .expect("the CRD is established");

    // The operator finds it (it asks again while a Model waits for it) and
    // writes the InferencePool, which the API server accepts.
    wait_for(
        pools.clone(),
        "routed",
        TIMEOUT,
        |p: Option<&InferencePool>| p.is_some(),
    )
    .await
    .expect("the InferencePool appears");
    wait_model(&models, "routed", "Degraded back to AsExpected", |m| {
        condition(m, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
    let m = models.get("routed").await.expect("model");
    let pool = pools.get("routed").await.expect("pool");
    assert!(
        pool.metadata.owner_references.as_ref().is_some_and(|o| o
            .iter()
            .any(|o| o.kind == "Model"
                && Some(&o.uid) == m.metadata.uid.as_ref()
                && o.controller == Some(true))),
        "owned by the Model: {:?}",
        pool.metadata.owner_references
    );
    assert_eq!(pool.spec["targetPorts"], json!([{"number": 8080}]));
    assert_eq!(
        pool.spec["endpointPickerRef"],
        json!({"group": "", "kind": "Service", "name": "routed-epp", "port": {"number": 9002},
               "failureMode": "FailClose"}),
        "the picker, with the CRD's defaults filled in by the API server"
    );
    // Its selector selects exactly the Model's pods, and each listens on
    // the target port (the sidecar's, which clients use).
    let selector: BTreeMap<String, String> =
        serde_json::from_value(pool.spec["selector"]["matchLabels"].clone()).expect("labels");
    let selector = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let selected: BTreeSet<String> = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("pods")
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect();
    let own: BTreeSet<String> = model_pods(client, &ns, "routed")
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert_eq!(selected, own, "the pool selects the Model's pods");
    assert_eq!(own.len(), 1);
    for p in model_pods(client, &ns, "routed").await {
        let ports: Vec<i32> = p
            .spec
            .as_ref()
            .map(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten().map(|p| p.container_port))
                    .collect()
            })
            .unwrap_or_default();
        assert!(ports.contains(&8080), "{}: ports {ports:?}", p.name_any());
    }
    the_endpoint_picker_reads_the_sidecars(&ns, "routed", own.len()).await;

    // The real schema: a pool without target ports is refused.
    let bad: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "bad"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "targetPorts": [],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    }))
    .expect("pool");
    let refused = Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &kube::api::ApiResource::erase::<InferencePool>(&()),
    )
    .create(&PostParams::default(), &bad)
    .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("targetPorts")),
        "the CRD's schema refuses an empty targetPorts: {refused:?}"
    );

    // It follows the Model's picker.
    models
        .patch(
            "routed",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"routing": {"inferencePool": {"endpointPicker": {
                "name": "gateway-epp", "port": 9100, "failureMode": "FailOpen"}}}}}),
            ),
        )
        .await
        .expect("patch");
    wait_for(
        pools.clone(),
        "routed",
        TIMEOUT,
        |p: Option<&InferencePool>| {
            p.is_some_and(|p| {
                p.spec["endpointPickerRef"]
                    == json!({"group": "", "kind": "Service", "name": "gateway-epp",
                          "port": {"number": 9100}, "failureMode": "FailOpen"})
            })
        },
    )
    .await
    .expect("the pool follows the Model's picker");

    an_edited_or_deleted_pool_is_put_back(client, &pools).await;

    // Not asked any more: deleted; asked again: back.
    models
        .patch(
            "routed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"routing": null}})),
        )
        .await
        .expect("patch");
    wait_for(
        pools.clone(),
        "routed",
        TIMEOUT,
        |p: Option<&InferencePool>| p.is_none(),
    )
    .await
    .expect("the pool goes when the Model stops asking");
    models
        .patch(
            "routed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"routing": {"inferencePool": {}}}})),
        )
        .await
        .expect("patch");
    wait_for(
        pools.clone(),
        "routed",
        TIMEOUT,
        |p: Option<&InferencePool>| p.is_some(),
    )
    .await
    .expect("the pool comes back");

    // The CRD uninstalled under a running operator: its watch stops, and
    // the Model says so again; installed again: the pool is back.
    crds.delete(
        "inferencepools.inference.networking.k8s.io",
        &DeleteParams::default(),
    )
    .await
    .expect("uninstall the CRD");
    wait_for(
        crds.clone(),
        "inferencepools.inference.networking.k8s.io",
        TIMEOUT,
        |c: Option<&CustomResourceDefinition>| c.is_none(),
    )
    .await
    .expect("the CRD is gone");
    wait_model(
        &models,
        "routed",
        "Degraded InferencePoolUnavailable once the CRD is gone",
        |m| condition(m, "Degraded").is_some_and(|c| c.1 == "InferencePoolUnavailable"),
    )
    .await;
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("install the InferencePool CRD again");
    wait_for(
        crds.clone(),
        "inferencepools.inference.networking.k8s.io",
        TIMEOUT,
        |c: Option<&CustomResourceDefinition>| {
            c.and_then(|c| c.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        },
    )
    .await
    .expect("the CRD is established again");
    wait_for(
        pools.clone(),
        "routed",
        TIMEOUT,
        |p: Option<&InferencePool>| p.is_some(),
    )
    .await
    .expect("the pool is back with the CRD");

    // Garbage-collected with the Model.
    models
        .delete("routed", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(
        pools.clone(),
        "routed",
        TIMEOUT,
        |p: Option<&InferencePool>| p.is_none(),
    )
    .await
    .expect("the pool is garbage-collected with the Model");
}
