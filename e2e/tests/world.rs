//! Self-tests of the local world: a real control plane (etcd, kube-apiserver
//! with RBAC and PodSecurity, kube-controller-manager, kube-scheduler) with
//! KWOK-simulated GPU nodes, the pod runner, and Strata's chart and CRDs
//! installed with Helm and checked by the real API server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use strata_core::view::pod_ready;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::{Api, Client};
use serde_json::{Value, json};
use strata_e2e::control::{Action, Component};
use strata_e2e::harness::{World, delete_namespace, repo_path, test_namespace, wait_for, world};
use strata_e2e::runner::{ProcessSpec, Profile, RUN_LABEL, RunnerConfig};
use strata_e2e::supervisor::State;

const TIMEOUT: Duration = Duration::from_secs(90);

/// The fault self-tests stop parts of the shared world: each runs alone
/// (write), the other tests share the world (read).
static FAULTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn the_world() -> &'static World {
    world(env!("CARGO_BIN_EXE_strata-cluster"), || RunnerConfig {
        profiles: BTreeMap::from([(
            "http-echo".to_string(),
            Profile {
                processes: vec![ProcessSpec {
                    name: "http".into(),
                    command: PathBuf::from(env!("CARGO_BIN_EXE_strata-e2e-http")),
                    args: vec![
                        "--listen".into(),
                        "${POD_IP}:8080".into(),
                        "--name".into(),
                        "${POD_NAMESPACE}/${POD_NAME}".into(),
                    ],
                    ..ProcessSpec::default()
                }],
                restart: false,
                ..Profile::default()
            },
        )]),
        ..RunnerConfig::default()
    })
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

static CHART: Mutex<bool> = Mutex::new(false);

/// Installs charts/strata once per world, with the real helm.
fn ensure_chart(w: &World) {
    let mut installed = CHART.lock().unwrap_or_else(|p| p.into_inner());
    if *installed {
        return;
    }
    let chart = repo_path("charts/strata");
    let chart = chart.to_string_lossy();
    let out = w.helm(&["lint", &chart]);
    assert!(out.status.success(), "helm lint: {}", text(&out));
    let out = w.helm(&[
        "upgrade",
        "--install",
        "strata",
        &chart,
        "--namespace",
        "strata-system",
        "--create-namespace",
        "--wait",
        "--timeout",
        "2m",
    ]);
    assert!(out.status.success(), "helm install: {}", text(&out));
    *installed = true;
}

async fn crds_established(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "gpupools.strata.ai",
        "models.strata.ai",
        "adapters.strata.ai",
    ] {
        wait_for(
            crds.clone(),
            name,
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
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

fn api_for(client: &Client, obj: &Value, ns: &str) -> Api<DynamicObject> {
    let kind = obj["kind"].as_str().expect("kind");
    let gvk = GroupVersionKind::gvk("strata.ai", "v1alpha1", kind);
    let plural = match kind {
        "GPUPool" => "gpupools",
        "Model" => "models",
        _ => "adapters",
    };
    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
    if kind == "GPUPool" {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), ns, &ar)
    }
}

fn sample(name: &str, unique: &str) -> Value {
    let text = std::fs::read_to_string(repo_path(&format!("samples/{name}"))).expect("sample");
    let mut obj: Value = serde_yaml_ng::from_str(&text).expect("sample yaml");
    // Cluster-scoped names must not collide between cases; namespaces come from the test.
    let name = format!(
        "{}-{unique}",
        obj["metadata"]["name"].as_str().expect("name")
    );
    obj["metadata"] = json!({ "name": name });
    obj
}

#[tokio::test]
async fn kubectl_reports_kubernetes_1_36() {
    let _shared = FAULTS.read().await;
    let w = the_world();
    let out = w.kubectl(&["version", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let server = v["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default();
    assert!(server.starts_with("v1.36."), "server version {server}");
    assert_eq!(v["serverVersion"]["minor"], "36");
}

#[tokio::test]
async fn simulated_gpu_nodes_follow_the_topology() {
    let _shared = FAULTS.read().await;
    let w = the_world();
    let client = w.client().await;
    let nodes: Api<Node> = Api::all(client);
    let list = nodes.list(&Default::default()).await.expect("list nodes");
    let mut gpus: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for n in &list.items {
        let labels = n.metadata.labels.clone().unwrap_or_default();
        let status = n.status.clone().expect("status");
        for a in status
            .addresses
            .iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
        {
            assert!(
                a.address.starts_with("127."),
                "{:?}: InternalIP {} is not loopback",
                n.metadata.name,
                a.address
            );
        }
        assert!(
            strata_core::view::node_ready(n),
            "{:?} is Ready",
            n.metadata.name
        );
        let taints = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        match labels.get("nvidia.com/gpu.product") {
            Some(product) => {
                let cap = status
                    .allocatable
                    .as_ref()
                    .and_then(|a| a.get("nvidia.com/gpu"))
                    .expect("gpu capacity");
                assert_eq!(
                    labels.get("nvidia.com/gpu.count"),
                    Some(&cap.0),
                    "count label matches capacity"
                );
                assert!(labels.contains_key("nvidia.com/gpu.memory"));
                assert!(
                    taints
                        .iter()
                        .any(|t| t.key == "nvidia.com/gpu" && t.effect == "NoSchedule"),
                    "GPU taint"
                );
                let e = gpus.entry(product.clone()).or_insert((0, cap.0.clone()));
                e.0 += 1;
            }
            // (The node lifecycle controller's not-ready taint may still be
            // there just after the world starts; only the GPU taint matters.)
            None => assert!(
                !taints.iter().any(|t| t.key == "nvidia.com/gpu"),
                "the CPU node has no GPU taint: {taints:?}"
            ),
        }
    }
    assert_eq!(
        gpus.get("NVIDIA-H100-80GB-HBM3"),
        Some(&(2, "8".to_string()))
    );
    assert_eq!(
        gpus.get("NVIDIA-A100-SXM4-80GB"),
        Some(&(1, "4".to_string()))
    );
    assert_eq!(gpus.get("NVIDIA-L4"), Some(&(2, "1".to_string())));
    assert_eq!(list.items.len(), 6);
}

fn gpu_pod(name: &str, gpus: u32) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [{
                "name": "engine",
                "image": "vllm/vllm-openai:v0.11.0",
                "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}},
            }],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    }))
    .expect("pod")
}

#[tokio::test]
async fn the_scheduler_binds_gpu_pods_and_rejects_oversized_ones() {
    let _shared = FAULTS.read().await;
    let w = the_world();
    let client = w.client().await;
    let ns = test_namespace(&client, "sched").await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    pods.create(&PostParams::default(), &gpu_pod("two-gpus", 2))
        .await
        .expect("create");
    wait_for(pods.clone(), "two-gpus", TIMEOUT, |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Running")
    })
    .await
    .expect("the 2-GPU pod runs");
    let pod = pods.get("two-gpus").await.expect("get");
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("bound");
    assert!(
        node.starts_with("h100-") || node.starts_with("a100-"),
        "bound to a node with 2 free GPUs: {node}"
    );
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    assert!(
        ip.starts_with("127.")
            && ip
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| (64..128).contains(&a.octets()[1])),
        "pod IP {ip} is in the loopback pod CIDR"
    );

    pods.create(&PostParams::default(), &gpu_pod("nine-gpus", 9))
        .await
        .expect("create");
    wait_for(pods.clone(), "nine-gpus", TIMEOUT, |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
            })
    })
    .await
    .expect("the 9-GPU pod is Unschedulable");
    let pod = pods.get("nine-gpus").await.expect("get");
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
    assert!(pod.spec.and_then(|s| s.node_name).is_none(), "not bound");

    delete_namespace(&client, &ns, TIMEOUT)
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn the_pod_runner_serves_http_on_the_pod_ip_and_reports_crashes() {
    let _shared = FAULTS.read().await;
    let w = the_world();
    let client = w.client().await;
    let ns = test_namespace(&client, "runner").await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "labels": {RUN_LABEL: "http-echo"}},
        "spec": {"containers": [{
            "name": "http",
            "image": "strata.ai/e2e-http:test",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
        }]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    wait_for(pods.clone(), "web", TIMEOUT, |p: Option<&Pod>| {
        p.is_some_and(pod_ready)
    })
    .await
    .expect("the runner makes the pod Ready once its probe passes");

    let ip = pods
        .get("web")
        .await
        .expect("get")
        .status
        .and_then(|s| s.pod_ip)
        .expect("pod IP");
    let addr: SocketAddr = format!("{ip}:8080").parse().expect("addr");
    let resp = strata_e2e::http::get(addr, "/", Duration::from_secs(5))
        .await
        .expect("GET /");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, format!("hello from {ns}/web"));

    // A crash: the process exits, the pod fails with a message saying so.
    let resp = strata_e2e::http::get(addr, "/exit?code=3", Duration::from_secs(5))
        .await
        .expect("GET /exit");
    assert_eq!(resp.status, 200);
    wait_for(pods.clone(), "web", TIMEOUT, |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Failed")
    })
    .await
    .expect("a crashed process fails the pod");
    let status = pods.get("web").await.expect("get").status.expect("status");
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("http") && message.contains("exit status: 3"),
        "message: {message}"
    );
    assert!(
        strata_e2e::http::get(addr, "/", Duration::from_secs(2))
            .await
            .is_err(),
        "nothing listens any more"
    );

    delete_namespace(&client, &ns, TIMEOUT)
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn the_pod_runner_stops_processes_of_deleted_pods() {
    let _shared = FAULTS.read().await;
    let w = the_world();
    let client = w.client().await;
    let ns = test_namespace(&client, "runner-del")
        .await
        .expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "labels": {RUN_LABEL: "http-echo"}},
        "spec": {"containers": [{
            "name": "http",
            "image": "strata.ai/e2e-http:test",
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        }]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    wait_for(pods.clone(), "web", TIMEOUT, |p: Option<&Pod>| {
        p.is_some_and(pod_ready)
    })
    .await
    .expect("ready");
    let ip = pods
        .get("web")
        .await
        .expect("get")
        .status
        .and_then(|s| s.pod_ip)
        .expect("pod IP");
    let addr: SocketAddr = format!("{ip}:8080").parse().expect("addr");
    assert!(
        strata_e2e::http::get(addr, "/healthz", Duration::from_secs(5))
            .await
            .is_ok()
    );

    pods.delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(pods.clone(), "web", TIMEOUT, |p: Option<&Pod>| p.is_none())
        .await
        .expect("pod gone");
    strata_e2e::wait::poll_until(
        "the process to stop listening",
        TIMEOUT,
        Duration::from_millis(200),
        || async move {
            Ok(
                strata_e2e::http::get(addr, "/healthz", Duration::from_secs(1))
                    .await
                    .is_err(),
            )
        },
    )
    .await
    .expect("process stopped");

    delete_namespace(&client, &ns, TIMEOUT)
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn helm_installs_the_crds_and_the_api_server_enforces_their_rules() {
    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        base: String,
        patch: Value,
        #[serde(default)]
        update: bool,
        expect: String,
    }
    let _shared = FAULTS.read().await;
    let w = the_world();
    ensure_chart(w);
    let client = w.client().await;
    crds_established(&client).await;
    let ns = test_namespace(&client, "api").await.expect("namespace");

    // Every sample is accepted.
    for (i, name) in [
        "gpupool-h100.yaml",
        "gpupool-l4.yaml",
        "model-llama.yaml",
        "adapter-sql.yaml",
    ]
    .iter()
    .enumerate()
    {
        let obj = sample(name, &format!("{ns}-s{i}"));
        let dynobj: DynamicObject = serde_json::from_value(obj.clone()).expect("dynamic");
        api_for(&client, &obj, &ns)
            .create(&PostParams::default(), &dynobj)
            .await
            .unwrap_or_else(|e| panic!("{name} should be accepted: {e}"));
    }

    let table =
        std::fs::read_to_string(repo_path("crds/testdata/invalid-specs.yaml")).expect("table");
    let cases: Vec<Case> = serde_yaml_ng::from_str(&table).expect("cases");
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let base = sample(&case.base, &format!("{ns}-c{i}"));
        let mut obj = base.clone();
        strata_crds::validation::merge_patch(&mut obj, &case.patch);
        let api = api_for(&client, &obj, &ns);
        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
        let result = if case.update {
            let base_obj: DynamicObject = serde_json::from_value(base).expect("dynamic");
            api.create(&PostParams::default(), &base_obj)
                .await
                .expect("base is accepted");
            let pp = PatchParams::apply("strata-e2e").force();
            api.patch(&name, &pp, &Patch::Apply(&obj)).await.map(|_| ())
        } else {
            let dynobj: DynamicObject = serde_json::from_value(obj).expect("dynamic");
            api.create(
                &PostParams {
                    dry_run: true,
                    ..PostParams::default()
                },
                &dynobj,
            )
            .await
            .map(|_| ())
        };
        match result {
            Ok(()) => failures.push(format!("{}: accepted by the API server", case.name)),
            Err(kube::Error::Api(e)) if e.message.contains(&case.expect) => {}
            Err(e) => failures.push(format!("{}: {e}; expected {:?}", case.name, case.expect)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The scale subresource: kubectl scale within bounds works, outside is refused.
    let model = sample("model-llama.yaml", &format!("{ns}-scale"));
    let mname = model["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let out = w.kubectl(&[
        "scale",
        "-n",
        &ns,
        &format!("model/{mname}"),
        "--replicas=3",
    ]);
    assert!(!out.status.success(), "no such model yet");
    let dynobj: DynamicObject = serde_json::from_value(model.clone()).expect("dynamic");
    api_for(&client, &model, &ns)
        .create(&PostParams::default(), &dynobj)
        .await
        .expect("model");
    let out = w.kubectl(&[
        "scale",
        "-n",
        &ns,
        &format!("model/{mname}"),
        "--replicas=3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let got = api_for(&client, &model, &ns)
        .get(&mname)
        .await
        .expect("get");
    assert_eq!(got.data["spec"]["replicas"], 3);
    let out = w.kubectl(&[
        "scale",
        "-n",
        &ns,
        &format!("model/{mname}"),
        "--replicas=30",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("replicas must lie between minReplicas and maxReplicas"),
        "{}",
        text(&out)
    );

    // kubectl explain teaches the API.
    let out = w.kubectl(&["explain", "model.spec.sla"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("timeToFirstToken"), "{}", text(&out));

    // Clean up cluster-scoped pools made above.
    let pools = api_for(&client, &json!({"kind": "GPUPool"}), &ns);
    for p in pools.list(&Default::default()).await.expect("pools").items {
        if p.metadata.name.as_deref().is_some_and(|n| n.contains(&ns)) {
            let _ = pools
                .delete(
                    p.metadata.name.as_deref().unwrap_or_default(),
                    &DeleteParams::default(),
                )
                .await;
        }
    }
    delete_namespace(&client, &ns, TIMEOUT)
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn pod_security_admission_and_rbac_are_enforced() {
    let _shared = FAULTS.read().await;
    let w = the_world();
    let client = w.client().await;
    let ns = test_namespace(&client, "psa").await.expect("namespace");
    let out = w.kubectl(&[
        "label",
        "namespace",
        &ns,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // No securityContext at all: fine for "privileged", not for "restricted".
    let unhardened: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .expect("pod");
    let err = pods
        .create(&PostParams::default(), &unhardened)
        .await
        .expect_err("PodSecurity rejects it");
    assert!(
        err.to_string()
            .contains("violates PodSecurity \"restricted"),
        "{err}"
    );

    let out = w.kubectl(&["create", "serviceaccount", "nobody", "-n", &ns]);
    assert!(out.status.success(), "{}", text(&out));
    let who = format!("system:serviceaccount:{ns}:nobody");
    let out = w.kubectl(&["auth", "can-i", "list", "pods", "-n", &ns, "--as", &who]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "no",
        "RBAC denies an unbound ServiceAccount"
    );
    delete_namespace(&client, &ns, TIMEOUT)
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn deleting_a_namespace_removes_everything_in_it() {
    let _shared = FAULTS.read().await;
    let w = the_world();
    let client = w.client().await;
    let ns = test_namespace(&client, "gone").await.expect("namespace");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"k": "v"}}))
            .expect("cm");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("configmap");
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "svc"},
        "spec": {"selector": {"app": "x"}, "ports": [{"port": 80}]}
    }))
    .expect("svc");
    let svc = svcs
        .create(&PostParams::default(), &svc)
        .await
        .expect("service");
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
    assert!(
        cluster_ip.starts_with("127.128."),
        "ClusterIPs are loopback too: {cluster_ip}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &gpu_pod("engine", 1))
        .await
        .expect("pod");
    wait_for(pods.clone(), "engine", TIMEOUT, |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Running")
    })
    .await
    .expect("running");

    delete_namespace(&client, &ns, TIMEOUT)
        .await
        .expect("namespace deleted");
    assert!(matches!(cms.get("cfg").await, Err(kube::Error::Api(e)) if e.code == 404));
    assert!(matches!(svcs.get("svc").await, Err(kube::Error::Api(e)) if e.code == 404));
    assert!(matches!(pods.get("engine").await, Err(kube::Error::Api(e)) if e.code == 404));
}

// ---- The world survives faults (it supervises its components as a kubelet
// would, and injects faults on request through its control socket). ----

/// A lease in kube-system renewed within the last `fresh`: its holder acts.
async fn lease_renewed(client: &Client, name: &str, fresh: Duration, timeout: Duration) {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    strata_e2e::wait::poll_until(
        &format!("lease kube-system/{name} renewed"),
        timeout,
        Duration::from_millis(500),
        || {
            let leases = leases.clone();
            async move {
                let Ok(l) = leases.get(name).await else {
                    return Ok(false);
                };
                let renewed = l
                    .spec
                    .and_then(|s| s.renew_time)
                    .map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0));
                Ok(renewed.is_some_and(|d| d.unsigned_abs() < fresh))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The control plane works end to end: a new namespace gets its default
/// ServiceAccount (kube-controller-manager), and a pod in it is bound
/// (kube-scheduler), started (KWOK, the pod runner) and answers on its IP.
async fn a_new_pod_runs(w: &World, prefix: &str) {
    let client = w.client().await;
    let ns = test_namespace(&client, prefix).await.expect("namespace");
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
    wait_for(sas, "default", TIMEOUT, |sa: Option<&_>| sa.is_some())
        .await
        .expect("the controller-manager creates the default ServiceAccount");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "labels": {RUN_LABEL: "http-echo"}},
        "spec": {"containers": [{
            "name": "http",
            "image": "strata.ai/e2e-http:test",
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
        }]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    wait_for(pods.clone(), "web", TIMEOUT, |p: Option<&Pod>| {
        p.is_some_and(pod_ready)
    })
    .await
    .expect("the new pod is scheduled, started and Ready");
    let ip = pods
        .get("web")
        .await
        .expect("get")
        .status
        .and_then(|s| s.pod_ip)
        .expect("pod IP");
    let addr: SocketAddr = format!("{ip}:8080").parse().expect("addr");
    let resp = strata_e2e::http::get(addr, "/", Duration::from_secs(5))
        .await
        .expect("GET /");
    assert_eq!(resp.status, 200);
    delete_namespace(&client, &ns, TIMEOUT)
        .await
        .expect("cleanup");
}

async fn all_running(w: &World) {
    w.heal(TIMEOUT).await.expect("every component running");
    for c in w.components().await.expect("status") {
        assert_eq!(c.state, State::Running, "{c:?}");
        assert!(c.pid.is_some(), "{c:?}");
    }
}

#[tokio::test]
async fn the_world_comes_back_after_the_api_server_is_paused_for_35_seconds() {
    let _alone = FAULTS.write().await;
    let w = the_world();
    all_running(w).await;
    let before = w.components().await.expect("status");
    let api = w
        .fault(Component::ApiServer, Action::Pause)
        .await
        .expect("pause");
    assert_eq!(api.state, State::Paused);
    let paused_pid = api.pid.expect("pid");
    // The fault itself: the API server is stalled for 35 s (longer than the
    // controller-manager's and scheduler's 15 s leases).
    tokio::time::sleep(Duration::from_secs(35)).await;
    let api = w
        .fault(Component::ApiServer, Action::Resume)
        .await
        .expect("resume");
    assert_eq!(
        (api.state, api.pid),
        (State::Running, Some(paused_pid)),
        "the same process, continued"
    );
    let resumed = std::time::Instant::now();
    w.api_ready(TIMEOUT).await.expect("the API server answers");
    let out = w.kubectl(&["get", "nodes"]);
    assert!(out.status.success(), "kubectl works: {}", text(&out));
    let client = w.client().await;
    // The controller-manager and the scheduler lost their leases and (as
    // upstream does) exited; the world restarted them and they lead again.
    lease_renewed(
        &client,
        "kube-controller-manager",
        Duration::from_secs(10),
        TIMEOUT,
    )
    .await;
    lease_renewed(&client, "kube-scheduler", Duration::from_secs(10), TIMEOUT).await;
    a_new_pod_runs(w, "after-pause").await;
    let after = w.components().await.expect("status");
    for (b, a) in before.iter().zip(&after) {
        eprintln!(
            "{}: restarts {} -> {} ({})",
            a.component,
            b.restarts,
            a.restarts,
            a.last_exit.as_deref().unwrap_or("no exit")
        );
        assert_eq!(a.state, State::Running, "{a:?}");
    }
    let kcm = after
        .iter()
        .find(|c| c.component == Component::ControllerManager)
        .expect("kcm");
    let log = std::fs::read_to_string(&kcm.log).unwrap_or_default();
    if kcm.restarts > before[2].restarts {
        assert!(
            log.contains("strata-cluster: restarting kube-controller-manager"),
            "its log continues across the restart"
        );
    }
    eprintln!(
        "the world was back {:.1} s after the API server resumed",
        resumed.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn a_killed_controller_manager_is_restarted_by_the_world() {
    let _alone = FAULTS.write().await;
    let w = the_world();
    all_running(w).await;
    let before = w
        .component(Component::ControllerManager)
        .await
        .expect("status");
    let killed = w
        .fault(Component::ControllerManager, Action::Kill)
        .await
        .expect("kill");
    assert_eq!(killed.state, State::Restarting);
    assert!(
        killed
            .last_exit
            .as_deref()
            .is_some_and(|e| e.contains("SIGKILL")),
        "{killed:?}"
    );
    strata_e2e::wait::poll_until(
        "the controller-manager restarted",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let c = w.component(Component::ControllerManager).await?;
            Ok(c.state == State::Running && c.pid.is_some() && c.pid != before.pid)
        },
    )
    .await
    .expect("restarted by the supervisor");
    let after = w
        .component(Component::ControllerManager)
        .await
        .expect("status");
    assert_eq!(after.restarts, before.restarts + 1);
    let pid = after.pid.expect("pid");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "its process runs"
    );
    let client = w.client().await;
    lease_renewed(
        &client,
        "kube-controller-manager",
        Duration::from_secs(10),
        TIMEOUT,
    )
    .await;
    a_new_pod_runs(w, "after-kcm-kill").await;
}

#[tokio::test]
async fn etcd_stopped_and_started_again_keeps_the_data() {
    let _alone = FAULTS.write().await;
    let w = the_world();
    all_running(w).await;
    let client = w.client().await;
    let ns = test_namespace(&client, "etcd").await.expect("namespace");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "kept"}, "data": {"k": "v"}}))
            .expect("cm");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("configmap");

    let etcd = w.fault(Component::Etcd, Action::Stop).await.expect("stop");
    assert_eq!((etcd.state, etcd.pid), (State::Stopped, None));
    // Stopped stays stopped: the supervisor does not start it on its own.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let etcd = w.component(Component::Etcd).await.expect("status");
    assert_eq!(etcd.state, State::Stopped);
    let fresh = w.client().await;
    let down = tokio::time::timeout(
        Duration::from_secs(3),
        Api::<ConfigMap>::namespaced(fresh, &ns).get("kept"),
    )
    .await;
    assert!(
        !matches!(down, Ok(Ok(_))),
        "nothing is read without etcd: {down:?}"
    );

    let etcd = w
        .fault(Component::Etcd, Action::Start)
        .await
        .expect("start");
    assert_eq!(etcd.state, State::Running);
    w.api_ready(TIMEOUT)
        .await
        .expect("the API server is ready again");
    let client = w.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    strata_e2e::wait::poll_until(
        "the ConfigMap read back",
        TIMEOUT,
        Duration::from_millis(300),
        || {
            let cms = cms.clone();
            async move {
                Ok(cms.get("kept").await.is_ok_and(|c| {
                    c.data
                        .is_some_and(|d| d.get("k").map(String::as_str) == Some("v"))
                }))
            }
        },
    )
    .await
    .expect("the data survived");
    a_new_pod_runs(w, "after-etcd").await;
    delete_namespace(&client, &ns, TIMEOUT)
        .await
        .expect("cleanup");
}

/// As on a GPU node: the runner allocates the node's devices to the
/// containers that request GPUs when it starts a pod, serves the node's
/// kubelet PodResources API (the real v1 gRPC API on the node's socket)
/// from those assignments, and frees them when the pod goes.
#[tokio::test]
async fn gpu_nodes_allocate_devices_and_serve_the_podresources_api() {
    use strata_e2e::devices::{SOCKET, device_id};
    use strata_podresources::{Client as PodResources, device_holders, is_nvidia_gpu};
    let _shared = FAULTS.read().await;
    let w = the_world();
    let client = w.client().await;
    let ns = test_namespace(&client, "devices").await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "holder", "labels": {RUN_LABEL: "http-echo"}},
        "spec": {
            "containers": [
                {"name": "engine", "image": "strata.ai/e2e-http:test",
                 "resources": {"limits": {"nvidia.com/gpu": "2"}}},
                {"name": "sidecar", "image": "strata.ai/e2e-http:test"},
            ],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create");
    wait_for(pods.clone(), "holder", TIMEOUT, |p: Option<&Pod>| {
        p.is_some_and(pod_ready)
    })
    .await
    .expect("the pod runs");
    let node = pods
        .get("holder")
        .await
        .expect("get")
        .spec
        .and_then(|s| s.node_name)
        .expect("bound");
    let capacity: u32 = Api::<Node>::all(client.clone())
        .get(&node)
        .await
        .expect("node")
        .status
        .and_then(|s| s.capacity)
        .and_then(|c| c.get("nvidia.com/gpu").map(|q| q.0.clone()))
        .and_then(|q| q.parse().ok())
        .expect("GPU capacity");

    let socket = w.info.log_dir.join("nodes").join(&node).join(SOCKET);
    let mut api = PodResources::connect(&socket, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let node_ids: Vec<String> = (0..capacity)
        .map(|i| device_id(&node, "nvidia.com/gpu", i))
        .collect();
    let alloc = api.allocatable().await.expect("GetAllocatableResources");
    let mut allocatable = strata_podresources::allocatable_devices(&alloc, is_nvidia_gpu)
        .into_iter()
        .collect::<Vec<_>>();
    allocatable.sort();
    let mut expected = node_ids.clone();
    expected.sort();
    assert_eq!(allocatable, expected, "every GPU of {node}");

    let holders = device_holders(&api.list().await.expect("List"), is_nvidia_gpu);
    let mine: Vec<_> = holders
        .iter()
        .filter(|(_, h)| h.namespace == ns && h.pod == "holder")
        .collect();
    assert_eq!(mine.len(), 2, "{holders:?}");
    assert!(
        mine.iter()
            .all(|(id, h)| h.container == "engine" && node_ids.contains(id)),
        "the engine container holds two of {node}'s GPUs: {mine:?}"
    );

    // The pod goes: its devices are free again.
    pods.delete("holder", &DeleteParams::default())
        .await
        .expect("delete");
    strata_e2e::wait::poll_until(
        "the deleted pod's devices to be free",
        TIMEOUT,
        Duration::from_millis(300),
        || {
            let mut api = api.clone();
            let ns = ns.clone();
            async move {
                let list = api
                    .list()
                    .await
                    .map_err(|e| strata_e2e::error::Error::Control(e.to_string()))?;
                Ok(!list.pod_resources.iter().any(|p| p.namespace == ns))
            }
        },
    )
    .await
    .expect("freed");
    delete_namespace(&client, &ns, TIMEOUT)
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn the_charts_network_policies_with_the_gateway_pass_the_api_servers_validation() {
    let _shared = FAULTS.read().await;
    let w = the_world();
    ensure_chart(w);
    let client = w.client().await;
    let ns = test_namespace(&client, "netpol").await.expect("namespace");
    let chart = repo_path("charts/strata");
    let chart = chart.to_string_lossy();
    let models = format!("networkPolicy.modelNamespaces={{{ns}}}");
    let values = [
        "gateway.enabled=true",
        "networkPolicy.enabled=true",
        &models,
        "networkPolicy.clientsFrom[0].namespaceSelector.matchLabels.team=a",
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.monitoring=yes",
        // And the operator's Prometheus credentials, mounted from a Secret.
        "prometheusAuth.secretName=prometheus-credentials",
    ];
    let mut args = vec!["template", "strata", &chart, "--namespace", "strata-system"];
    for v in &values {
        args.extend(["--set", v]);
    }
    let out = w.helm(&args);
    assert!(out.status.success(), "helm template: {}", text(&out));
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    // Every object the chart renders with these values is one the API
    // server accepts (validation and admission, nothing stored).
    let out = w.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered);
    assert!(out.status.success(), "dry-run apply: {}", text(&out));

    let docs: Vec<Value> = rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml_ng::from_str::<Value>(doc).ok())
        .collect();
    // The credentials file is where the operator is told to read it.
    let operator = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "strata-operator")
        .expect("the operator's Deployment");
    let pod = &operator["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "prometheus-credentials"
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["volumeMounts"][0]["mountPath"],
        "/etc/strata/prometheus-auth"
    );
    assert!(
        container["args"]
            .as_array()
            .expect("args")
            .iter()
            .any(|a| a == "--prometheus-auth-file=/etc/strata/prometheus-auth/endpoints.yaml"),
        "{container}"
    );
    let policies: Vec<Value> = docs
        .into_iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    let named = |name: &str| {
        policies
            .iter()
            .find(|p| p["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no NetworkPolicy {name}: {policies:?}"))
    };
    // The gateway's pods: its OpenAI port from the clients' peers only,
    // its metrics port from the metrics peers only.
    let gateway = named("strata-gateway");
    assert_eq!(
        gateway["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "strata-gateway"
    );
    let ingress = gateway["spec"]["ingress"].as_array().expect("ingress");
    let from_port = |port: u64| {
        ingress
            .iter()
            .find(|r| r["ports"][0]["port"] == port)
            .map(|r| r["from"].clone())
            .unwrap_or_else(|| panic!("no rule for {port}: {ingress:?}"))
    };
    assert_eq!(
        from_port(8080),
        json!([{"namespaceSelector": {"matchLabels": {"team": "a"}}}])
    );
    assert_eq!(
        from_port(9090),
        json!([{"namespaceSelector": {"matchLabels": {"monitoring": "yes"}}}])
    );
    // The model pods take 8080 from the gateway as well as the clients.
    let pods = named("strata-models");
    assert_eq!(pods["metadata"]["namespace"], ns.as_str());
    let api = pods["spec"]["ingress"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["ports"][0]["port"] == 8080))
        .expect("8080 rule");
    let peers: Vec<&Value> = api["from"].as_array().expect("from").iter().collect();
    assert!(
        peers.iter().any(
            |p| p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "strata-gateway"
                && p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                    == "strata-system"
        ),
        "{peers:?}"
    );
    delete_namespace(&client, &ns, TIMEOUT)
        .await
        .expect("namespace deleted");
}
