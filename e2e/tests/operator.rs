//! The operator in the local world: strata-operator runs as local processes
//! with the credentials of the chart's ServiceAccount (RBAC enforced by the
//! real API server); model pods get stand-in processes on their pod IPs from
//! the pod runner (the real sidecar arrives with issue [4]).
//!
//! One scenario, in order, because its steps share the GPUs of one world.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
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
    World, free_port, repo_yaml, service_account_kubeconfig, test_namespace, wait_for,
    workspace_binary, world,
};
use strata_e2e::runner::{ProcessSpec, Profile, RUN_LABEL, RunnerConfig};
use strata_e2e::wait::poll_until;
use tokio::process::{Child, Command};

const TIMEOUT: Duration = Duration::from_secs(90);
const PROFILE: &str = "model-replica";

fn the_world() -> &'static World {
    let http = PathBuf::from(env!("CARGO_BIN_EXE_strata-e2e-http"));
    world(env!("CARGO_BIN_EXE_strata-cluster"), move || {
        let process = |name: &str, port: u16| ProcessSpec {
            name: name.into(),
            command: http.clone(),
            args: vec![
                "--listen".into(),
                format!("${{POD_IP}}:{port}"),
                "--name".into(),
                "${POD_NAMESPACE}/${POD_NAME}".into(),
            ],
            ..ProcessSpec::default()
        };
        // The admin port (9090) is the real sidecar, serving TLS with the
        // certificate the operator put in the Model's Secret (the runner
        // writes a Secret volume's files under ${POD_DIR}/volumes/<volume>),
        // so that the pod's HTTPS probes pass; its "engine" is the stand-in.
        let secret = "${POD_DIR}/volumes/sidecar-secret";
        let admin = ProcessSpec {
            name: "strata-sidecar".into(),
            command: workspace_binary("strata-sidecar"),
            args: vec![
                "--listen=${POD_IP}:18080".into(),
                "--admin-listen=${POD_IP}:9090".into(),
                "--engine-url=http://${POD_IP}:8080".into(),
                "--engine=custom".into(),
                "--engine-health-path=/healthz".into(),
                "--served-model=stand-in".into(),
                "--gpus=none".into(),
                format!("--admin-tls-cert-file={secret}/tls.crt"),
                format!("--admin-tls-key-file={secret}/tls.key"),
            ],
            ..ProcessSpec::default()
        };
        RunnerConfig {
            profiles: BTreeMap::from([(
                PROFILE.to_string(),
                // A stand-in for the sidecar's API port (8080), the sidecar
                // itself on the admin port (9090).
                Profile {
                    processes: vec![process("http", 8080), admin],
                    restart: false,
                    ..Profile::default()
                },
            )]),
            ..RunnerConfig::default()
        }
    })
}

/// Operator processes, killed when the scenario ends (also on panic).
struct Operators {
    children: Vec<(String, Child, u16)>,
}

impl Drop for Operators {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.children {
            let _ = c.start_kill();
        }
    }
}

fn start_operator(kubeconfig: &PathBuf, identity: &str, log: &PathBuf) -> (Child, u16) {
    let port = free_port();
    let out = std::fs::File::create(log).expect("log");
    let err = out.try_clone().expect("log");
    let child = Command::new(workspace_binary("strata-operator"))
        .args([
            &format!("--metrics-addr=127.0.0.1:{port}"),
            "--activator-addr=",
            "--lease-namespace=strata-system",
            "--lease-name=strata-operator",
            "--lease-duration-seconds=6",
            &format!("--identity={identity}"),
            &format!("--pod-label={RUN_LABEL}={PROFILE}"),
            "--sidecar-image=ghcr.io/strata-ai/strata-sidecar:e2e",
            "--unschedulable-grace-seconds=5",
            "--resync-seconds=10",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,strata_operator=debug")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("start strata-operator");
    (child, port)
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
    w.install_chart_for_local_operator();

    let kubeconfig = service_account_kubeconfig(w, "strata-system", "strata-operator")
        .await
        .expect("SA kubeconfig");
    let log_dir = w.info.log_dir.clone();
    let mut ops = Operators {
        children: Vec::new(),
    };
    for id in ["operator-a", "operator-b"] {
        let (child, port) = start_operator(&kubeconfig, id, &log_dir.join(format!("{id}.log")));
        ops.children.push((id.to_string(), child, port));
    }

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
    let mut llama = repo_yaml("samples/model-llama.yaml").expect("sample");
    llama["metadata"] = json!({"name": "llama"});
    llama["spec"]["autoscaling"] = json!({"mode": "Manual"});
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
        let addr: SocketAddr = format!("{ip}:8080").parse().expect("addr");
        let r = strata_e2e::http::get(addr, "/", Duration::from_secs(5))
            .await
            .expect("pod answers");
        assert_eq!(r.status, 200);
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
    let mut fb = repo_yaml("samples/model-llama.yaml").expect("sample");
    fb["metadata"] = json!({"name": "fallback"});
    fb["spec"]["autoscaling"] = json!({"mode": "Manual"});
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
    let mut big = repo_yaml("samples/model-llama.yaml").expect("sample");
    big["metadata"] = json!({"name": "big"});
    big["spec"]["autoscaling"] = json!({"mode": "Manual"});
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
    let ip = pod.status.and_then(|s| s.pod_ip).expect("ip");
    let _ = strata_e2e::http::get(
        format!("{ip}:8080").parse().expect("addr"),
        "/exit?code=1",
        Duration::from_secs(5),
    )
    .await;
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

    // Metrics on the leader.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "strata-system");
    let holder = leases
        .get("strata-operator")
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("holder");
    let (_, _, port) = ops
        .children
        .iter()
        .find(|(id, _, _)| *id == holder)
        .expect("the leader is one of ours");
    let metrics = strata_e2e::http::get(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        "/metrics",
        Duration::from_secs(5),
    )
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
    let metrics_addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
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

    // Leader failover: stop the leader gracefully; the standby takes over and reconciles.
    let idx = ops
        .children
        .iter()
        .position(|(id, _, _)| *id == holder)
        .expect("leader");
    let (_, mut leader, _) = ops.children.remove(idx);
    if let Some(pid) = leader.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let status = tokio::time::timeout(Duration::from_secs(20), leader.wait())
        .await
        .expect("leader exits")
        .expect("status");
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    let standby = ops.children[0].0.clone();
    wait_for(
        leases.clone(),
        "strata-operator",
        TIMEOUT,
        move |l: Option<&Lease>| {
            l.and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.as_deref())
                == Some(standby.as_str())
        },
    )
    .await
    .expect("the standby holds the lease");
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
    let mut blocked = repo_yaml("samples/model-llama.yaml").expect("sample");
    blocked["metadata"] = json!({"name": "blocked"});
    blocked["spec"]["autoscaling"] = json!({"mode": "Manual"});
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
    let mut needs = repo_yaml("samples/model-llama.yaml").expect("sample");
    needs["metadata"] = json!({"name": "needs-secret"});
    needs["spec"]["autoscaling"] = json!({"mode": "Manual"});
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
}
