//! The fault suite (issue [8] item 8): faults injected into the running
//! local world while strata-operator serves Models whose replicas run from
//! images (the real sidecar in front of the engine simulator, the fake NVML
//! library mounted as a GPU node's toolkit would), under load. Each case
//! asserts that nothing is lost and that the world converges, and prints
//! what it measured: recovery seconds, client requests failed, duplicate
//! pods.
//!
//! The operator runs here as local processes of the real binary with the
//! chart's RBAC (a ServiceAccount token), not from the chart's Deployment:
//! the cases SIGKILL and SIGSTOP one chosen operator at a chosen moment,
//! run two of them under different ServiceAccounts to tell their writes
//! apart in the audit log, and count on its process id staying the same
//! through an API outage; a Deployment would restart or replace it behind
//! the case's back. e2e/tests/incluster.rs and operator.rs cover the
//! operator as the chart runs it.
//!
//! The faults share one world and must not overlap: every case holds the
//! suite's lock, heals the world first (a case that failed half-way may
//! have left a component paused, a node deleted or its heartbeat stopped),
//! and works in its own namespace with its own operator processes.
//!
//! Run: `cargo test -p strata-e2e --test faults -- --nocapture`
//! (docs/reliability.md has the table of faults and the measured numbers).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use strata_core::view::pod_ready;
use strata_crds::{Adapter, GPUPool, Model};
use strata_e2e::audit;
use strata_e2e::control::{Action, Component};
use strata_e2e::fake_nvml;
use strata_e2e::harness::{
    World, engine_sim_image, model_image_profile, repo_yaml, service_account_kubeconfig,
    sidecar_fake_nvml_injection, sim_engine_injection, test_namespace, wait_for, workspace_binary,
    world,
};
use strata_e2e::runner::{RUN_LABEL, RunnerConfig};
use strata_e2e::supervisor::State;
use strata_e2e::wait::poll_until;
use tokio::process::{Child, Command};

const PROFILE: &str = "fault-replica";
const TIMEOUT: Duration = Duration::from_secs(90);
/// A client request ends (answered, refused or cut) within this, or it hung.
const REQUEST_BOUND: Duration = Duration::from_secs(20);
/// Replicas are re-placed within this after their node is lost (the promise).
const REPLACE_BOUND: Duration = Duration::from_secs(60);
/// The operators' lease in the leader cases.
const LEASE_SECONDS: u64 = 6;
const IDLE_W: f64 = 70.0;
const TDP_W: f64 = 700.0;
const OPERATOR_NS: &str = "strata-system";
/// The chart's ServiceAccount (release `strata`) and a second one bound to
/// the same roles, so that the audit log tells two operators apart.
const SA_A: &str = "strata-operator";
const SA_B: &str = "strata-operator-b";

/// One fault at a time.
static SUITE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn the_world() -> &'static World {
    world(env!("CARGO_BIN_EXE_strata-cluster"), || {
        // Model pods from their images, with what a GPU node adds: the
        // simulator's knobs, the sidecar's fake NVML library (its GPUs'
        // idle and full power) and faster reads for the faults' clock.
        let mut sidecar = sidecar_fake_nvml_injection(&[
            "--engine-health-interval=0.2",
            "--engine-metrics-interval=0.5",
            "--nvml-interval=0.2",
        ]);
        sidecar.env.extend([
            (fake_nvml::ENV_IDLE_WATTS.to_string(), IDLE_W.to_string()),
            (fake_nvml::ENV_TDP_WATTS.to_string(), TDP_W.to_string()),
        ]);
        RunnerConfig {
            profiles: BTreeMap::from([(
                PROFILE.to_string(),
                // Containers restart in place (restartPolicy Always).
                model_image_profile(
                    sim_engine_injection(&[
                        "--max-batch",
                        "4",
                        "--itl-ms",
                        "10",
                        "--max-tokens-default",
                        "16",
                    ]),
                    sidecar,
                ),
            )]),
            ..RunnerConfig::default()
        }
    })
}

// ---------------------------------------------------------------------------
// The fixture: the lock, a healed world, a namespace, operators.

/// Namespaces of this test binary, for the next case to clean up after a
/// case that failed before it could.
static NAMESPACES: StdMutex<Vec<String>> = StdMutex::new(Vec::new());
static PREPARED: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);

struct Fixture {
    _suite: tokio::sync::MutexGuard<'static, ()>,
    case: &'static str,
    w: &'static World,
    client: Client,
    ns: String,
    models: Api<Model>,
    pods: Api<Pod>,
    started: Instant,
}

async fn fixture(case: &'static str) -> Fixture {
    let guard = SUITE.lock().await;
    let started = Instant::now();
    let w = the_world();
    w.heal(TIMEOUT).await.expect("every component running");
    let client = w.client().await;
    heal_nodes(w, &client).await;
    clean_leftovers(&client).await;
    prepare(w, &client).await;
    let ns = test_namespace(&client, case).await.expect("namespace");
    if let Ok(mut all) = NAMESPACES.lock() {
        all.push(ns.clone());
    }
    eprintln!(
        "[{case}] world ready in {:.1} s; namespace {ns}",
        started.elapsed().as_secs_f64()
    );
    Fixture {
        _suite: guard,
        case,
        w,
        models: Api::namespaced(client.clone(), &ns),
        pods: Api::namespaced(client.clone(), &ns),
        client,
        ns,
        started,
    }
}

/// Brings back nodes a failed case left deleted or without heartbeat.
async fn heal_nodes(w: &World, client: &Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    for name in &w.info.nodes {
        match nodes.get_opt(name).await.expect("node") {
            None => w
                .recreate_node(name, TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("recreating {name}: {e}")),
            Some(n)
                if !n
                    .labels()
                    .contains_key(strata_e2e::topology::KWOK_NODE_LABEL) =>
            {
                w.resume_node_heartbeat(name, TIMEOUT)
                    .await
                    .unwrap_or_else(|e| panic!("{name}'s heartbeat: {e}"))
            }
            Some(_) => {}
        }
    }
}

/// Deletes the namespaces of earlier cases that are still there (their
/// Adapters' finalizers dropped: no operator runs to honour them).
async fn clean_leftovers(client: &Client) {
    let leftovers: Vec<String> = NAMESPACES
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in &leftovers {
        if namespaces.get_opt(ns).await.ok().flatten().is_none() {
            continue;
        }
        eprintln!("cleaning up namespace {ns} left by an earlier case");
        let adapters: Api<Adapter> = Api::namespaced(client.clone(), ns);
        for a in adapters
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
        {
            let _ = adapters
                .patch(
                    &a.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
        }
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
    for ns in &leftovers {
        wait_for(namespaces.clone(), ns, TIMEOUT, |n: Option<&Namespace>| {
            n.is_none()
        })
        .await
        .unwrap_or_else(|e| panic!("namespace {ns} of an earlier case: {e}"));
    }
}

/// Once per world: the chart (CRDs, RBAC, the operator's ServiceAccount),
/// the GPUPools, a second ServiceAccount bound to the operator's roles.
async fn prepare(w: &World, client: &Client) {
    let mut done = PREPARED.lock().await;
    if *done {
        return;
    }
    w.install_chart_for_local_operator();
    let pools: Api<GPUPool> = Api::all(client.clone());
    for f in ["samples/gpupool-h100.yaml", "samples/gpupool-l4.yaml"] {
        let pool: GPUPool = serde_json::from_value(repo_yaml(f).expect("sample")).expect("pool");
        match pools.create(&PostParams::default(), &pool).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("pool {f}: {e}"),
        }
    }
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), OPERATOR_NS);
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": SA_B}})).expect("sa");
    create_or_keep(sas.create(&PostParams::default(), &sa).await);
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": SA_B},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "strata-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": SA_B, "namespace": OPERATOR_NS}],
    }))
    .expect("crb");
    create_or_keep(
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&PostParams::default(), &crb)
            .await,
    );
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": SA_B},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "strata-leader-election"},
        "subjects": [{"kind": "ServiceAccount", "name": SA_B, "namespace": OPERATOR_NS}],
    }))
    .expect("rb");
    create_or_keep(
        Api::<RoleBinding>::namespaced(client.clone(), OPERATOR_NS)
            .create(&PostParams::default(), &rb)
            .await,
    );
    *done = true;
}

fn create_or_keep<T>(r: Result<T, kube::Error>) {
    match r {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create: {e}"),
    }
}

impl Fixture {
    async fn kubeconfig(&self, sa: &str) -> PathBuf {
        service_account_kubeconfig(self.w, OPERATOR_NS, sa)
            .await
            .expect("ServiceAccount kubeconfig")
    }

    /// Starts strata-operator as `sa`; with leader election on `lease` if given.
    fn operator(&self, kubeconfig: &Path, identity: &str, lease: Option<&str>) -> Operator {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = self
            .w
            .info
            .log_dir
            .join(format!("operator-{}-{identity}-{n}.log", self.case));
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let port = strata_e2e::harness::free_port();
        let mut args = vec![
            format!("--metrics-addr=127.0.0.1:{port}"),
            "--activator-addr=".into(),
            format!("--identity={identity}"),
            format!("--pod-label={RUN_LABEL}={PROFILE}"),
            "--unschedulable-grace-seconds=5".into(),
            "--resync-seconds=10".into(),
            "--energy-interval-seconds=2".into(),
            // The replicas' sidecars meter their GPUs here (opt-in,
            // --meter-gpus): the fault cases measure the operator, not the
            // node agent (adapters_energy.rs covers that path).
            "--gpu-telemetry=sidecar".into(),
        ];
        match lease {
            Some(lease) => args.extend([
                "--leader-elect=true".into(),
                format!("--lease-namespace={OPERATOR_NS}"),
                format!("--lease-name={lease}"),
                format!("--lease-duration-seconds={LEASE_SECONDS}"),
            ]),
            None => args.push("--leader-elect=false".into()),
        }
        let child = Command::new(workspace_binary("strata-operator"))
            .args(&args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,strata_operator=debug")
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("start strata-operator");
        let pid = child.id().expect("pid");
        Operator {
            child,
            pid,
            identity: identity.to_string(),
            log,
        }
    }

    async fn create_model(&self, name: &str, replicas: i32) {
        self.models
            .create(&PostParams::default(), &model(name, replicas))
            .await
            .unwrap_or_else(|e| panic!("create model {name}: {e}"));
    }

    /// Patches a Model's spec, retrying while the API server comes back.
    async fn patch_spec(&self, name: &str, spec: Value) {
        let models = self.models.clone();
        let patch = json!({ "spec": spec });
        poll_until(
            "the spec change accepted",
            TIMEOUT,
            Duration::from_millis(300),
            || {
                let (models, patch) = (models.clone(), patch.clone());
                async move {
                    Ok(models
                        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .is_ok())
                }
            },
        )
        .await
        .expect("patch");
    }

    async fn wait_model(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Model) -> bool + Send + Sync + 'static,
    ) -> Duration {
        let started = Instant::now();
        let check = Arc::new(check);
        wait_for(
            self.models.clone(),
            name,
            timeout,
            move |m: Option<&Model>| m.is_some_and(|m| check(m)),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "[{}] {what}: {e}\n(operator logs: {}/operator-{}-*.log)",
                self.case,
                self.w.info.log_dir.display(),
                self.case
            )
        });
        started.elapsed()
    }

    async fn converged(&self, name: &str, replicas: i32, timeout: Duration) -> Duration {
        self.wait_model(
            name,
            &format!("{name} converged on {replicas} ready replicas"),
            timeout,
            move |m| converged(m, replicas),
        )
        .await
    }

    /// The Model's live pods: no duplicate (more than desired) and no orphan
    /// (not owned by the Model, or not in its placement).
    async fn check_pods(&self, name: &str, desired: usize) -> PodCheck {
        let m = self.models.get(name).await.expect("model");
        let uid = m.uid().unwrap_or_default();
        let placed: BTreeSet<String> = m
            .status
            .as_ref()
            .map(|s| s.placement.iter().map(|p| p.pod.clone()).collect())
            .unwrap_or_default();
        let live = live_pods(&self.pods, name).await;
        let orphans: Vec<String> = live
            .iter()
            .filter(|p| {
                !p.owner_references().iter().any(|o| o.uid == uid)
                    || !placed.contains(&p.name_any())
            })
            .map(|p| p.name_any())
            .collect();
        PodCheck {
            live: live.len(),
            duplicates: live.len().saturating_sub(desired),
            orphans,
        }
    }

    /// Deletes the namespace (while its operators still run, to honour the
    /// Adapters' finalizers) without waiting for it to go: the next case
    /// does not need it gone.
    async fn finish(self) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        namespaces
            .delete(&self.ns, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("[{}] deleting the namespace: {e}", self.case));
        if let Ok(mut all) = NAMESPACES.lock() {
            all.retain(|n| n != &self.ns);
        }
        eprintln!(
            "[{}] done in {:.1} s",
            self.case,
            self.started.elapsed().as_secs_f64()
        );
    }
}

struct PodCheck {
    live: usize,
    duplicates: usize,
    orphans: Vec<String>,
}

/// A strata-operator process (killed when dropped).
struct Operator {
    child: Child,
    pid: u32,
    identity: String,
    log: PathBuf,
}

impl Operator {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal)
            .unwrap_or_else(|e| panic!("{signal} to operator {}: {e}", self.identity));
    }

    async fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// Waits (bounded) for the process to exit on its own; its status.
    async fn exited_within(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(bound, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    fn log_tail(&self) -> String {
        strata_e2e::process::tail(&self.log, 30)
    }
}

fn model(name: &str, replicas: i32) -> Model {
    let mut m = repo_yaml("samples/model-llama.yaml").expect("sample");
    m["metadata"] = json!({ "name": name });
    let spec = m["spec"].as_object_mut().expect("spec");
    spec.remove("sla");
    spec.insert(
        "source".into(),
        json!({"uri": "hf://meta-llama/Llama-3.1-8B-Instruct"}),
    );
    spec.insert(
        "engine".into(),
        json!({"type": "vLLM", "image": engine_sim_image()}),
    );
    spec.insert("pools".into(), json!([{"name": "h100"}]));
    spec.insert("replicas".into(), json!(replicas));
    spec.insert("minReplicas".into(), json!(1));
    spec.insert("maxReplicas".into(), json!(4));
    spec.insert("autoscaling".into(), json!({"mode": "Manual"}));
    spec.insert("adapters".into(), json!({"maxPerReplica": 4}));
    spec.insert(
        "rollout".into(),
        json!({"maxSurge": 1, "maxUnavailable": 0}),
    );
    serde_json::from_value(m).expect("model")
}

fn condition<'a>(
    m: &'a Model,
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    m.status.as_ref()?.conditions.iter().find(|c| c.type_ == t)
}

/// Every replica on the current template and ready, the status written
/// for the latest generation.
fn converged(m: &Model, replicas: i32) -> bool {
    m.status.as_ref().is_some_and(|s| {
        s.ready_replicas == replicas
            && s.replicas == replicas
            && s.updated_replicas == replicas
            && s.placement.len() == replicas as usize
            && s.observed_generation == m.metadata.generation
    }) && condition(m, "Progressing").is_some_and(|c| c.reason == "RolloutComplete")
}

fn live(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Failed") | Some("Succeeded")
        )
}

async fn live_pods(pods: &Api<Pod>, model: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("strata.ai/model={model}")))
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(live)
        .collect()
}

fn pod_ip(p: &Pod) -> String {
    let ip = p
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    assert!(strata_e2e::http::is_loopback_str(&ip), "{ip}");
    ip
}

// ---------------------------------------------------------------------------
// Load, the pod census, the report.

/// What the clients saw.
#[derive(Debug, Default, Clone)]
struct LoadStats {
    ok: u64,
    failed: u64,
    hung: u64,
    /// Failed requests: when (since the load started), which pod, what, how long.
    failures: Vec<(f64, String, String, f64)>,
}

struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<StdMutex<LoadStats>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Closed-loop streamed chat requests from `workers` clients at the
/// Model's ready replicas (pod IPs; the list refreshed every 300 ms and kept
/// while the API server is away, as an endpoints cache would), alternating
/// with `adapter` if given. A request that does not end within
/// REQUEST_BOUND hung; one that ends without a complete stream failed (and
/// its client waits 200 ms before the next).
fn start_load(
    client: &Client,
    ns: &str,
    model: &str,
    workers: usize,
    adapter: Option<&str>,
) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Arc<StdMutex<LoadStats>> = Arc::default();
    let targets: Arc<StdMutex<Vec<(String, String)>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    {
        let (pods, targets, stop) = (
            Api::<Pod>::namespaced(client.clone(), ns),
            targets.clone(),
            stop.clone(),
        );
        let selector = format!("strata.ai/model={model}");
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let listed = tokio::time::timeout(
                    Duration::from_secs(2),
                    pods.list(&ListParams::default().labels(&selector)),
                )
                .await;
                if let Ok(Ok(list)) = listed {
                    let ready: Vec<(String, String)> = list
                        .items
                        .iter()
                        .filter(|p| live(p) && pod_ready(p))
                        .filter_map(|p| {
                            p.status
                                .as_ref()
                                .and_then(|s| s.pod_ip.clone())
                                .map(|ip| (p.name_any(), ip))
                        })
                        .filter(|(_, ip)| strata_e2e::http::is_loopback_str(ip))
                        .collect();
                    if let Ok(mut t) = targets.lock() {
                        *t = ready;
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    for w in 0..workers {
        let (targets, stop, stats) = (targets.clone(), stop.clone(), stats.clone());
        let model = model.to_string();
        let adapter = adapter.map(str::to_string);
        tasks.push(tokio::spawn(async move {
            let http: HttpClient<HttpConnector, Full<Bytes>> =
                HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new());
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let target = targets
                    .lock()
                    .ok()
                    .and_then(|t| t.get(i % t.len().max(1)).cloned());
                let Some((pod, ip)) = target else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                i += 1;
                let served = match (&adapter, i % 2) {
                    (Some(a), 0) => a.clone(),
                    _ => model.clone(),
                };
                let t0 = Instant::now();
                let outcome =
                    tokio::time::timeout(REQUEST_BOUND, stream_chat(&http, &ip, &served)).await;
                let took = t0.elapsed().as_secs_f64();
                let failed = !matches!(outcome, Ok(Ok(())));
                {
                    let Ok(mut s) = stats.lock() else { return };
                    match outcome {
                        Ok(Ok(())) => s.ok += 1,
                        Ok(Err(e)) => {
                            s.failed += 1;
                            s.failures
                                .push((started.elapsed().as_secs_f64(), pod, e, took));
                        }
                        Err(_) => {
                            s.hung += 1;
                            s.failures.push((
                                started.elapsed().as_secs_f64(),
                                pod,
                                format!("no end within {REQUEST_BOUND:?}"),
                                took,
                            ));
                        }
                    }
                }
                // A client waits a little after a failure (a refused
                // connection fails at once), so that failures count the
                // outage, not how fast a loop can retry.
                if failed {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
    }
    Load { stop, stats, tasks }
}

/// One streamed chat request: Ok when the stream ends with `[DONE]`.
async fn stream_chat(
    http: &HttpClient<HttpConnector, Full<Bytes>>,
    ip: &str,
    model: &str,
) -> Result<(), String> {
    let body = json!({"model": model, "stream": true, "max_tokens": 16,
        "messages": [{"role": "user", "content": "x".repeat(200)}]});
    let req = http::Request::post(format!("http://{ip}:8080/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = http
        .request(req)
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let status = resp.status().as_u16();
    let mut text = Vec::new();
    let mut stream = resp.into_body().into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => text.extend_from_slice(&c),
            Err(e) => return Err(format!("HTTP {status}, stream cut: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&text);
    if status == 200 && text.contains("data: [DONE]") {
        Ok(())
    } else {
        Err(format!(
            "HTTP {status}: {}",
            text.chars().take(160).collect::<String>()
        ))
    }
}

impl Load {
    fn snapshot(&self) -> LoadStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    async fn stop(self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            // Workers finish their request in flight (bounded by REQUEST_BOUND).
            let _ = tokio::time::timeout(REQUEST_BOUND + Duration::from_secs(5), t).await;
        }
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The most live pods a Model had at once, from a watch (re-listed after
/// an outage).
struct Census {
    max_live: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

fn census(pods: &Api<Pod>, model: &str) -> Census {
    let max_live = Arc::new(AtomicUsize::new(0));
    let (pods, max) = (pods.clone(), max_live.clone());
    let selector = format!("strata.ai/model={model}");
    let task = tokio::spawn(async move {
        let stream = watcher(pods, watcher::Config::default().labels(&selector)).default_backoff();
        tokio::pin!(stream);
        let mut current: BTreeMap<String, bool> = BTreeMap::new();
        let mut listing: BTreeMap<String, bool> = BTreeMap::new();
        let mut synced = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Init) => listing.clear(),
                Ok(watcher::Event::InitApply(p)) => {
                    listing.insert(p.name_any(), live(&p));
                }
                Ok(watcher::Event::InitDone) => {
                    current = std::mem::take(&mut listing);
                    synced = true;
                }
                Ok(watcher::Event::Apply(p)) => {
                    current.insert(p.name_any(), live(&p));
                }
                Ok(watcher::Event::Delete(p)) => {
                    current.remove(&p.name_any());
                }
                Err(_) => continue,
            }
            if synced {
                let n = current.values().filter(|l| **l).count();
                max.fetch_max(n, Ordering::Relaxed);
            }
        }
    });
    Census { max_live, task }
}

impl Census {
    fn stop(self) -> usize {
        self.task.abort();
        self.max_live.load(Ordering::Relaxed)
    }
}

/// Prints one line per case, and appends it to the results file.
fn report(case: &str, recovery: f64, load: &LoadStats, duplicates: usize, extra: &str) {
    let line = format!(
        "FAULT {case}: recovery {recovery:.1} s; requests {} ok, {} failed, {} hung; duplicate pods {duplicates}; {extra}",
        load.ok, load.failed, load.hung
    );
    eprintln!("{line}");
    for f in load.failures.iter().take(12) {
        eprintln!(
            "    failed at +{:.1} s on {} after {:.2} s: {}",
            f.0, f.1, f.3, f.2
        );
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults-results.txt");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        use std::io::Write;
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let _ = writeln!(file, "{stamp} {line}");
    }
}

fn assert_clean(case: &str, load: &LoadStats, check: &PodCheck, max_live: usize, bound: usize) {
    assert_eq!(load.hung, 0, "[{case}] requests hung: {:?}", load.failures);
    assert_eq!(
        check.duplicates, 0,
        "[{case}] duplicate pods: {} live",
        check.live
    );
    assert!(
        check.orphans.is_empty(),
        "[{case}] orphaned pods: {:?}",
        check.orphans
    );
    assert!(
        max_live <= bound,
        "[{case}] {max_live} live pods at one moment (at most {bound} allowed)"
    );
}

// ---------------------------------------------------------------------------
// R1: the operator SIGKILLed in the middle of a rollout.

#[tokio::test]
async fn r1_operator_killed_mid_rollout_restarts_and_completes_it() {
    let f = fixture("r1").await;
    let kc = f.kubeconfig(SA_A).await;
    let mut op = f.operator(&kc, "r1-operator", None);
    f.create_model("chat", 3).await;
    f.converged("chat", 3, TIMEOUT).await;
    let old: BTreeSet<String> = f
        .models
        .get("chat")
        .await
        .expect("model")
        .status
        .map(|s| {
            s.placement
                .iter()
                .filter_map(|p| p.template_hash.clone())
                .collect()
        })
        .unwrap_or_default();
    let census = census(&f.pods, "chat");
    let load = start_load(&f.client, &f.ns, "chat", 4, None);
    f.patch_spec(
        "chat",
        json!({"engine": {"args": ["--max-model-len", "16384"]}}),
    )
    .await;
    // Mid-rollout: a replica on the new template exists while old ones
    // serve; the operator is killed at once.
    let hash = |p: &Pod| {
        p.labels()
            .get("strata.ai/template-hash")
            .cloned()
            .unwrap_or_default()
    };
    let deadline = Instant::now() + TIMEOUT;
    let (new_at_kill, old_at_kill) = loop {
        let live = live_pods(&f.pods, "chat").await;
        let old_n = live.iter().filter(|p| old.contains(&hash(p))).count();
        let new_n = live.len() - old_n;
        if new_n >= 1 && old_n >= 1 {
            break (new_n, old_n);
        }
        assert!(
            Instant::now() < deadline,
            "[R1] no moment with new- and old-template replicas"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    op.kill().await;
    let mut op = f.operator(&kc, "r1-operator", None);
    let restarted = Instant::now();
    f.wait_model(
        "chat",
        "the rollout completed by the restarted operator",
        TIMEOUT,
        move |m| {
            converged(m, 3)
                && m.status.as_ref().is_some_and(|s| {
                    s.placement
                        .iter()
                        .all(|p| p.template_hash.as_ref().is_some_and(|h| !old.contains(h)))
                })
        },
    )
    .await;
    let recovery = restarted.elapsed().as_secs_f64();
    let stats = load.stop().await;
    let max_live = census.stop();
    let check = f.check_pods("chat", 3).await;
    assert!(
        op.running(),
        "the restarted operator runs: {}",
        op.log_tail()
    );
    report(
        "R1 operator SIGKILLed mid-rollout",
        recovery,
        &stats,
        check.duplicates,
        &format!(
            "killed with {new_at_kill} new-template and {old_at_kill} old-template replicas live; most live pods at once {max_live} (3 + maxSurge 1 allowed)"
        ),
    );
    assert_clean("R1", &stats, &check, max_live, 4);
    f.finish().await;
}

// ---------------------------------------------------------------------------
// R2: the API server stopped for 30 s.

/// How soon after the API server is back a spec change shows in status
/// (the operator's watches retry within 2 s of each other's 410 Expired
/// from the restarted server's new watch cache; see docs/reliability.md).
const CATCH_UP_BOUND: Duration = Duration::from_secs(60);

#[tokio::test]
async fn r2_api_server_stopped_30s_the_operator_recovers_without_a_restart() {
    let f = fixture("r2").await;
    let kc = f.kubeconfig(SA_A).await;
    let mut op = f.operator(&kc, "r2-operator", None);
    f.create_model("chat", 3).await;
    f.converged("chat", 3, TIMEOUT).await;
    let census = census(&f.pods, "chat");
    let load = start_load(&f.client, &f.ns, "chat", 4, None);
    tokio::time::sleep(Duration::from_secs(2)).await; // load before the fault
    let api =
        f.w.fault(Component::ApiServer, Action::Stop)
            .await
            .expect("stop the API server");
    assert_eq!(api.state, State::Stopped);
    tokio::time::sleep(Duration::from_secs(30)).await; // the fault: 30 s without an API server
    f.w.fault(Component::ApiServer, Action::Start)
        .await
        .expect("start the API server");
    f.w.api_ready(TIMEOUT)
        .await
        .expect("the API server is back");
    let during = load.snapshot();
    let back = Instant::now();
    // A spec change right after the API returns is reflected in status. A
    // scale-down: it needs the operator alone (a new replica would also
    // wait for kube-scheduler, which lost its lease in the outage and takes
    // about 40 s to lead again, as upstream does).
    f.patch_spec("chat", json!({"replicas": 2})).await;
    f.converged("chat", 2, Duration::from_secs(240)).await;
    let recovery = back.elapsed().as_secs_f64();
    let stats = load.stop().await;
    let max_live = census.stop();
    let check = f.check_pods("chat", 2).await;
    assert!(
        op.running(),
        "the operator rode out the outage without exiting: {}",
        op.log_tail()
    );
    report(
        "R2 kube-apiserver stopped 30 s",
        recovery,
        &stats,
        check.duplicates,
        &format!(
            "operator pid {} unchanged; {} requests served and {} failed until the API server was back \
             (the rest failed on the replica the scale-down removed)",
            op.pid, during.ok, during.failed
        ),
    );
    assert_clean("R2", &stats, &check, max_live, 3);
    assert_eq!(
        during.failed, 0,
        "[R2] the data path needs no API server: {:?}",
        during.failures
    );
    assert!(during.ok > 0, "requests were served during the outage");
    assert!(
        recovery <= CATCH_UP_BOUND.as_secs_f64(),
        "[R2] the spec change reached status {recovery:.1} s after the API server was back (bound {CATCH_UP_BOUND:?})"
    );
    f.finish().await;
}

// ---------------------------------------------------------------------------
// R3: a GPU node lost.

/// Two replicas (bin-packed on one node) under load; then `lose` takes
/// their node away and returns once the control plane sees it gone (deleted,
/// or NotReady); seconds from then until both replicas are ready elsewhere,
/// what the clients saw, the pods, the most live pods at once.
async fn replicas_replaced_after<F, Fut>(f: &Fixture, lose: F) -> (f64, LoadStats, PodCheck, usize)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    f.create_model("chat", 2).await;
    f.converged("chat", 2, TIMEOUT).await;
    let m = f.models.get("chat").await.expect("model");
    let nodes: BTreeSet<String> = m
        .status
        .map(|s| s.placement.iter().map(|p| p.node.clone()).collect())
        .unwrap_or_default();
    assert_eq!(nodes.len(), 1, "bin-packed on one node: {nodes:?}");
    let node = nodes.into_iter().next().expect("node");
    let census = census(&f.pods, "chat");
    let load = start_load(&f.client, &f.ns, "chat", 4, None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    lose(node.clone()).await;
    let gone = node.clone();
    let replaced = f
        .wait_model(
            "chat",
            &format!("replicas re-placed off node {node}"),
            REPLACE_BOUND + Duration::from_secs(30),
            move |m| {
                converged(m, 2)
                    && m.status
                        .as_ref()
                        .is_some_and(|s| s.placement.iter().all(|p| p.node != gone))
            },
        )
        .await;
    let stats = load.stop().await;
    let max_live = census.stop();
    let check = f.check_pods("chat", 2).await;
    (replaced.as_secs_f64(), stats, check, max_live)
}

#[tokio::test]
async fn r3_a_deleted_gpu_node_has_its_replicas_replaced_within_60s() {
    let f = fixture("r3-deleted").await;
    let kc = f.kubeconfig(SA_A).await;
    let mut op = f.operator(&kc, "r3-operator", None);
    let nodes: Api<Node> = Api::all(f.client.clone());
    let (recovery, stats, check, max_live) = replicas_replaced_after(&f, |node| async move {
        nodes
            .delete(&node, &DeleteParams::default())
            .await
            .expect("delete the node");
    })
    .await;
    report(
        "R3a GPU node deleted",
        recovery,
        &stats,
        check.duplicates,
        &format!("replicas re-placed within the {REPLACE_BOUND:?} bound"),
    );
    assert!(op.running(), "{}", op.log_tail());
    assert_clean("R3a", &stats, &check, max_live, 4);
    assert!(
        recovery <= REPLACE_BOUND.as_secs_f64(),
        "re-placed after {recovery:.1} s"
    );
    // The node back for the next case.
    heal_nodes(f.w, &f.client).await;
    f.finish().await;
}

#[tokio::test]
async fn r3_a_node_whose_heartbeat_stopped_has_its_replicas_replaced_within_60s() {
    let f = fixture("r3-notready").await;
    let kc = f.kubeconfig(SA_A).await;
    let mut op = f.operator(&kc, "r3-operator", None);
    let nodes: Api<Node> = Api::all(f.client.clone());
    let grace = Arc::new(StdMutex::new(0.0));
    let noticed = grace.clone();
    let (recovery, stats, check, max_live) = replicas_replaced_after(&f, |node| async move {
        let stopped = Instant::now();
        f.w.stop_node_heartbeat(&node)
            .await
            .expect("stop the node's heartbeat");
        // The node lifecycle controller's grace period (50 s) passes first.
        wait_for(
            nodes,
            &node,
            Duration::from_secs(120),
            |n: Option<&Node>| n.is_some_and(|n| !strata_core::view::node_ready(n)),
        )
        .await
        .expect("the node lifecycle controller marks the node NotReady");
        if let Ok(mut g) = noticed.lock() {
            *g = stopped.elapsed().as_secs_f64();
        }
    })
    .await;
    let grace = grace.lock().map(|g| *g).unwrap_or(0.0);
    report(
        "R3b GPU node NotReady (heartbeat stopped)",
        recovery,
        &stats,
        check.duplicates,
        &format!(
            "the node was NotReady {grace:.1} s after its heartbeat stopped; replicas re-placed within the {REPLACE_BOUND:?} bound from then"
        ),
    );
    assert!(op.running(), "{}", op.log_tail());
    assert_clean("R3b", &stats, &check, max_live, 4);
    assert!(
        recovery <= REPLACE_BOUND.as_secs_f64(),
        "re-placed after {recovery:.1} s"
    );
    heal_nodes(f.w, &f.client).await;
    f.finish().await;
}

// ---------------------------------------------------------------------------
// R4: etcd restarted.

#[tokio::test]
async fn r4_etcd_restarted_the_operator_and_the_world_recover() {
    let f = fixture("r4").await;
    let kc = f.kubeconfig(SA_A).await;
    let mut op = f.operator(&kc, "r4-operator", None);
    f.create_model("chat", 2).await;
    f.converged("chat", 2, TIMEOUT).await;
    let census = census(&f.pods, "chat");
    let load = start_load(&f.client, &f.ns, "chat", 4, None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let etcd =
        f.w.fault(Component::Etcd, Action::Restart)
            .await
            .expect("restart etcd");
    assert_eq!((etcd.state, etcd.restarts > 0), (State::Running, true));
    let restarted = Instant::now();
    f.w.api_ready(TIMEOUT)
        .await
        .expect("the API server is ready");
    f.patch_spec("chat", json!({"replicas": 3})).await;
    f.converged("chat", 3, TIMEOUT).await;
    let recovery = restarted.elapsed().as_secs_f64();
    let stats = load.stop().await;
    let max_live = census.stop();
    let check = f.check_pods("chat", 3).await;
    assert!(op.running(), "{}", op.log_tail());
    report(
        "R4 etcd restarted",
        recovery,
        &stats,
        check.duplicates,
        &format!("operator pid {} unchanged", op.pid),
    );
    assert_clean("R4", &stats, &check, max_live, 3);
    assert_eq!(stats.failed, 0, "[R4] {:?}", stats.failures);
    f.finish().await;
}

// ---------------------------------------------------------------------------
// R5: a replica's engine, then another's sidecar, killed.

fn pod_dir(w: &World, ns: &str, pod: &str) -> PathBuf {
    w.info.log_dir.join("pods").join(format!("{ns}_{pod}.d"))
}

fn process_pid(w: &World, ns: &str, pod: &str, process: &str) -> Option<i32> {
    std::fs::read_to_string(pod_dir(w, ns, pod).join(format!("{process}.pid")))
        .ok()
        .and_then(|p| p.trim().parse().ok())
}

/// The fake NVML counters of a pod's GPUs now, in joules (the truth the
/// operator's accounting is checked against; see adapters_energy.rs).
fn counters_now(dir: &Path) -> f64 {
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // The simulated GPU's directory (the sidecar's /run/strata-sim).
    let text = std::fs::read_to_string(dir.join("gpu").join("nvml-state")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let mj = f.get(1)?.parse::<f64>().ok()?;
            let last_ns = f.get(2)?.parse::<u128>().ok()?;
            let util = f.get(3)?.parse::<f64>().ok()?;
            let watts = IDLE_W + (TDP_W - IDLE_W) * util.clamp(0.0, 1.0);
            Some(mj / 1000.0 + watts * now_ns.saturating_sub(last_ns) as f64 / 1e9)
        })
        .sum()
}

async fn chat_once(ip: &str, model: &str) -> u16 {
    let http: HttpClient<HttpConnector, Full<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new());
    match tokio::time::timeout(Duration::from_secs(10), stream_chat(&http, ip, model)).await {
        Ok(Ok(())) => 200,
        _ => 0,
    }
}

fn restart_count(p: &Pod, container: &str) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .map_or(0, |c| c.restart_count)
}

/// Kills `process` of `pod`, then waits until it is back in place (same pod,
/// restartCount 1, Ready) and serves `adapter`; seconds to that.
async fn kill_and_wait_back(
    f: &Fixture,
    pod: &Pod,
    process: &str,
    container: &str,
    adapter: &str,
) -> f64 {
    let name = pod.name_any();
    let uid = pod.uid().unwrap_or_default();
    let ip = pod_ip(pod);
    let pid = process_pid(f.w, &f.ns, &name, process).expect("pid file");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let killed = Instant::now();
    let container = container.to_string();
    wait_for(
        f.pods.clone(),
        &name,
        Duration::from_secs(60),
        move |p: Option<&Pod>| {
            p.is_some_and(|p| {
                p.uid().as_deref() == Some(uid.as_str())
                    && restart_count(p, &container) == 1
                    && pod_ready(p)
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("[R5] {name} restarted in place ({process} killed): {e}"));
    poll_until(
        &format!("{adapter} served again by {name}"),
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let ip = ip.clone();
            async move { Ok(chat_once(&ip, adapter).await == 200) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("[R5] {e}"));
    killed.elapsed().as_secs_f64()
}

#[tokio::test]
async fn r5_engine_and_sidecar_crashes_restart_in_place_and_lose_nothing() {
    let f = fixture("r5").await;
    let kc = f.kubeconfig(SA_A).await;
    let mut op = f.operator(&kc, "r5-operator", None);
    f.create_model("chat", 2).await;
    let adapters: Api<Adapter> = Api::namespaced(f.client.clone(), &f.ns);
    let adapter: Adapter = serde_json::from_value(json!({
        "apiVersion": "strata.ai/v1alpha1", "kind": "Adapter",
        "metadata": {"name": "poet"},
        "spec": {"model": "chat", "source": {"uri": "hf://strata-test/poet-lora"}},
    }))
    .expect("adapter");
    adapters
        .create(&PostParams::default(), &adapter)
        .await
        .expect("adapter");
    f.converged("chat", 2, TIMEOUT).await;
    let loaded_on_2 = |a: Option<&Adapter>| {
        a.and_then(|a| a.status.as_ref()).is_some_and(|s| {
            s.loaded_replicas == 2 && s.phase == strata_crds::adapter::AdapterPhase::Ready
        })
    };
    wait_for(adapters.clone(), "poet", TIMEOUT, loaded_on_2)
        .await
        .expect("poet loaded on both replicas");
    let replicas: Vec<Pod> = live_pods(&f.pods, "chat").await;
    assert_eq!(replicas.len(), 2);
    let names: Vec<String> = replicas.iter().map(|p| p.name_any()).collect();

    // Energy: the Model's counter sampled throughout, and the truth.
    let energy = |m: &Model| {
        m.status
            .as_ref()
            .and_then(|s| s.energy.as_ref())
            .and_then(|e| e.energy_joules)
    };
    f.wait_model("chat", "a first energy reading", TIMEOUT, move |m| {
        energy(m).is_some()
    })
    .await;
    let samples: Arc<StdMutex<Vec<(Instant, f64)>>> = Arc::default();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (models, samples, sampling) = (f.models.clone(), samples.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Ok(m) = models.get("chat").await
                    && let Some(j) = energy(&m)
                    && let Ok(mut s) = samples.lock()
                {
                    s.push((Instant::now(), j));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let truth = |names: &[String]| -> f64 {
        names
            .iter()
            .map(|n| counters_now(&pod_dir(f.w, &f.ns, n)))
            .sum()
    };
    let truth0 = truth(&names);
    let model0 = energy(&f.models.get("chat").await.expect("model")).unwrap_or(0.0);

    let census = census(&f.pods, "chat");
    let load = start_load(&f.client, &f.ns, "chat", 4, Some("poet"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let engine_back = kill_and_wait_back(&f, &replicas[0], "engine", "engine", "poet").await;
    let at_engine = load.snapshot();
    wait_for(adapters.clone(), "poet", TIMEOUT, loaded_on_2)
        .await
        .expect("poet loaded on both replicas after the engine restart");
    let sidecar_back =
        kill_and_wait_back(&f, &replicas[1], "strata-sidecar", "strata-sidecar", "poet").await;
    wait_for(adapters.clone(), "poet", TIMEOUT, loaded_on_2)
        .await
        .expect("poet loaded on both replicas after the sidecar restart");
    tokio::time::sleep(Duration::from_secs(3)).await; // load after both restarts
    let stats = load.stop().await;
    let max_live = census.stop();
    // A reading that covers the end of the load.
    let before = energy(&f.models.get("chat").await.expect("model")).unwrap_or(0.0);
    f.wait_model("chat", "a new energy reading", TIMEOUT, move |m| {
        energy(m).is_some_and(|j| j > before)
    })
    .await;
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let truth1 = truth(&names);
    let model1 = energy(&f.models.get("chat").await.expect("model")).unwrap_or(0.0);
    let check = f.check_pods("chat", 2).await;

    // No jump larger than what the elapsed time could explain (two GPUs at
    // full power, plus what one status write may carry: the energy status
    // is written at most every `status_every` of the 2 s reading interval
    // while only the totals grow, and a second for the sampling's lag).
    // Double counting over the whole scenario is the comparison with the
    // GPUs' counters below.
    let cadence =
        strata_operator::controller::energy::status_every(Duration::from_secs(2)).as_secs_f64();
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let mut worst = 0.0f64;
    for pair in samples.windows(2) {
        let ((t0, j0), (t1, j1)) = (pair[0], pair[1]);
        assert!(j1 >= j0, "[R5] the Model's joules went down: {j0} -> {j1}");
        let allowed = (t1.duration_since(t0).as_secs_f64() + cadence + 1.0) * TDP_W * 2.0;
        worst = worst.max((j1 - j0) / allowed);
        assert!(
            j1 - j0 <= allowed,
            "[R5] the Model's joules jumped {:.0} J in {:.2} s (at most {allowed:.0} J explicable)",
            j1 - j0,
            t1.duration_since(t0).as_secs_f64()
        );
    }
    let counted = model1 - model0;
    let happened = truth1 - truth0;
    // The two readings bracket the interval up to one reading (2 s) of two
    // GPUs at full power at each end.
    let slack = 2.0 * 2.0 * TDP_W * 2.0;
    assert!(
        counted <= happened + slack,
        "[R5] counted {counted:.0} J, the GPUs used {happened:.0} J: double counting"
    );
    assert!(
        counted >= happened - slack,
        "[R5] counted {counted:.0} J, the GPUs used {happened:.0} J: energy lost"
    );
    let victims: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let bad: Vec<_> = stats
        .failures
        .iter()
        .filter(|f| !victims.contains(f.1.as_str()) || f.3 > REQUEST_BOUND.as_secs_f64())
        .collect();
    report(
        "R5 engine / sidecar killed",
        engine_back.max(sidecar_back),
        &stats,
        check.duplicates,
        &format!(
            "engine back and poet served in {engine_back:.1} s ({} failed by then), sidecar in {sidecar_back:.1} s; \
             longest failed request {:.2} s; energy counted {counted:.0} J vs {happened:.0} J used; \
             largest jump {:.0} % of what elapsed time explains",
            at_engine.failed,
            stats.failures.iter().map(|f| f.3).fold(0.0, f64::max),
            worst * 100.0
        ),
    );
    assert!(
        bad.is_empty(),
        "[R5] failures off the victims or too slow: {bad:?}"
    );
    assert!(op.running(), "{}", op.log_tail());
    assert_clean("R5", &stats, &check, max_live, 2);
    let names_now: BTreeSet<String> = live_pods(&f.pods, "chat")
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert_eq!(
        names_now,
        names.iter().cloned().collect::<BTreeSet<_>>(),
        "restarted in place: the same pods"
    );
    f.finish().await;
}

// ---------------------------------------------------------------------------
// R6: leader failover with two operators.

fn user(sa: &str) -> String {
    format!("system:serviceaccount:{OPERATOR_NS}:{sa}")
}

async fn holder(client: &Client, lease: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), OPERATOR_NS)
        .get_opt(lease)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

async fn wait_holder(client: &Client, lease: &str, identity: &str, timeout: Duration) -> f64 {
    let started = Instant::now();
    let (client, lease2, identity2) = (client.clone(), lease.to_string(), identity.to_string());
    poll_until(
        &format!("{identity} holds the lease {lease}"),
        timeout,
        Duration::from_millis(100),
        || {
            let (client, lease, identity) = (client.clone(), lease2.clone(), identity2.clone());
            async move { Ok(holder(&client, &lease).await.as_deref() == Some(identity.as_str())) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("[R6] {e}"));
    started.elapsed().as_secs_f64()
}

/// Writes by `old` the API server received after `new`'s first write, among
/// writes received since `since` (wall clock): with one writer at any
/// moment, none.
fn overlapping_writes(
    w: &World,
    since: k8s_openapi::jiff::Timestamp,
    old: &str,
    new: &str,
) -> (Vec<String>, usize, usize) {
    let events: Vec<audit::Event> = w
        .audit_events()
        .expect("audit log")
        .into_iter()
        .filter(|e| e.received().is_some_and(|t| t >= since))
        .collect();
    let by = |u: &str| {
        events
            .iter()
            .filter(|e| e.user.username == u && e.succeeded())
            .count()
    };
    let bad = audit::writes_after_handover(&events, &user(old), &user(new))
        .iter()
        .map(|e| e.describe())
        .collect();
    (bad, by(&user(old)), by(&user(new)))
}

/// Two operators (op-a the leader, op-b the standby, each its own
/// ServiceAccount so the audit log tells them apart) and a converged Model
/// under load.
struct LeaderPair {
    a: Operator,
    b: Operator,
    lease: String,
    census: Census,
    load: Load,
}

async fn leader_pair(f: &Fixture) -> LeaderPair {
    let lease = format!("fault-leader-{}", f.ns);
    let (kc_a, kc_b) = (f.kubeconfig(SA_A).await, f.kubeconfig(SA_B).await);
    let a = f.operator(&kc_a, "op-a", Some(&lease));
    wait_holder(&f.client, &lease, "op-a", TIMEOUT).await;
    let b = f.operator(&kc_b, "op-b", Some(&lease));
    f.create_model("chat", 2).await;
    f.converged("chat", 2, TIMEOUT).await;
    let census = census(&f.pods, "chat");
    let load = start_load(&f.client, &f.ns, "chat", 4, None);
    // The leader writes (status, energy readings) before the fault.
    tokio::time::sleep(Duration::from_secs(3)).await;
    LeaderPair {
        a,
        b,
        lease,
        census,
        load,
    }
}

const LEASE: f64 = LEASE_SECONDS as f64;

#[tokio::test]
async fn r6a_the_leader_killed_the_standby_takes_over_within_the_lease() {
    let f = fixture("r6a").await;
    let LeaderPair {
        mut a,
        mut b,
        lease,
        census,
        load,
    } = leader_pair(&f).await;
    let since = k8s_openapi::jiff::Timestamp::now();
    a.kill().await;
    let takeover = wait_holder(&f.client, &lease, "op-b", Duration::from_secs(30)).await;
    f.patch_spec("chat", json!({"replicas": 3})).await;
    f.converged("chat", 3, TIMEOUT).await;
    let (bad, writes_old, writes_new) = overlapping_writes(f.w, since, SA_A, SA_B);
    let stats = load.stop().await;
    let max_live = census.stop();
    let check = f.check_pods("chat", 3).await;
    report(
        "R6a leader SIGKILLed",
        takeover,
        &stats,
        check.duplicates,
        &format!(
            "op-b held the lease {takeover:.1} s after op-a was killed (lease {LEASE} s); writes since: op-a {writes_old}, op-b {writes_new}; op-a's after op-b's first: {}",
            bad.len()
        ),
    );
    assert!(
        bad.is_empty(),
        "[R6a] op-a wrote after op-b began: {bad:#?}"
    );
    assert!(
        takeover <= LEASE + 3.0,
        "[R6a] takeover after {takeover:.1} s (lease {LEASE} s)"
    );
    assert!(b.running(), "{}", b.log_tail());
    assert_clean("R6a", &stats, &check, max_live, 4);
    f.finish().await;
}

#[tokio::test]
async fn r6b_the_leaders_api_stalled_past_its_lease_never_two_writers() {
    let f = fixture("r6b").await;
    let LeaderPair {
        mut a,
        mut b,
        lease,
        census,
        load,
    } = leader_pair(&f).await;
    // The API server paused longer than the lease: the leader cannot renew;
    // it must stop acting at its renew deadline (2/3 of the lease) and exit.
    let since = k8s_openapi::jiff::Timestamp::now();
    f.w.fault(Component::ApiServer, Action::Pause)
        .await
        .expect("pause the API server");
    tokio::time::sleep(Duration::from_secs(10)).await; // the stall: 10 s, the lease 6 s
    f.w.fault(Component::ApiServer, Action::Resume)
        .await
        .expect("resume the API server");
    let resumed = Instant::now();
    let a_exit = a.exited_within(Duration::from_secs(10)).await;
    let takeover = wait_holder(&f.client, &lease, "op-b", Duration::from_secs(30)).await;
    // The new leader acts (a scale-down needs no scheduler, which may be
    // re-electing itself after the same stall).
    f.patch_spec("chat", json!({"replicas": 1})).await;
    f.converged("chat", 1, TIMEOUT).await;
    let recovery = resumed.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await; // anything in flight has landed
    let (bad, writes_old, writes_new) = overlapping_writes(f.w, since, SA_A, SA_B);
    let stats = load.stop().await;
    let max_live = census.stop();
    let check = f.check_pods("chat", 1).await;
    report(
        "R6b leader's API stalled 10 s",
        recovery,
        &stats,
        check.duplicates,
        &format!(
            "op-a exited: {a_exit:?}; op-b held the lease {takeover:.1} s after the API server resumed; writes since the stall: op-a {writes_old}, op-b {writes_new}; op-a's after op-b's first: {}",
            bad.len()
        ),
    );
    assert!(
        a_exit.is_some(),
        "[R6b] the stalled leader exits once it cannot renew: {}",
        a.log_tail()
    );
    assert!(
        bad.is_empty(),
        "[R6b] op-a wrote after op-b began: {bad:#?}"
    );
    assert!(b.running(), "{}", b.log_tail());
    assert_clean("R6b", &stats, &check, max_live, 2);
    f.finish().await;
}

#[tokio::test]
async fn r6c_the_leader_process_stopped_past_its_lease_does_not_write_after_resuming() {
    let f = fixture("r6c").await;
    let LeaderPair {
        mut a,
        mut b,
        lease,
        census,
        load,
    } = leader_pair(&f).await;
    let since = k8s_openapi::jiff::Timestamp::now();
    a.signal(nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    let takeover = wait_holder(&f.client, &lease, "op-b", Duration::from_secs(30)).await;
    // op-b leads and writes while op-a is frozen; then op-a continues after
    // 10 s in all and must notice that its lease is gone before it acts.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed())).await;
    a.signal(nix::sys::signal::Signal::SIGCONT);
    let a_exit = a.exited_within(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // anything op-a sent has landed
    let (bad, writes_old, writes_new) = overlapping_writes(f.w, since, SA_A, SA_B);
    f.patch_spec("chat", json!({"replicas": 3})).await;
    f.converged("chat", 3, TIMEOUT).await;
    let stats = load.stop().await;
    let max_live = census.stop();
    let check = f.check_pods("chat", 3).await;
    report(
        "R6c leader process SIGSTOPped 10 s",
        takeover,
        &stats,
        check.duplicates,
        &format!(
            "op-b held the lease {takeover:.1} s after op-a was stopped (lease {LEASE} s); op-a exited after SIGCONT: {a_exit:?}; \
             writes since: op-a {writes_old}, op-b {writes_new}; op-a's after op-b's first: {}",
            bad.len()
        ),
    );
    assert!(
        bad.is_empty(),
        "[R6c] op-a wrote after op-b began: {bad:#?}\nop-a's log: {}",
        a.log_tail()
    );
    assert!(
        a_exit.is_some(),
        "[R6c] the continued old leader exits: {}",
        a.log_tail()
    );
    assert!(
        takeover <= LEASE + 3.0,
        "[R6c] takeover after {takeover:.1} s"
    );
    assert!(b.running(), "{}", b.log_tail());
    assert_clean("R6c", &stats, &check, max_live, 4);
    f.finish().await;
}

// ---------------------------------------------------------------------------
// R7: a burst of 200 invalid or hostile objects.

/// The admitted hostile objects that do not (yet) say what is wrong with
/// them, each with what it says now: a Model naming a missing pool, or
/// asking 16 GPUs of 8-GPU nodes, must be Degraded (Unplaceable) naming the
/// pool or the 16; an Adapter of a missing Model must say ModelNotFound
/// naming it.
fn unexplained(
    models: &[Model],
    expected_models: &[String],
    adapters: &[Adapter],
    expected_adapters: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    for name in expected_models {
        let m = models.iter().find(|m| &m.name_any() == name);
        let degraded = m.and_then(|m| condition(m, "Degraded"));
        // The message names what is missing: the pool, or the 16 GPUs.
        let wanted = match name.strip_prefix("nopool-") {
            Some(i) => format!("missing-pool-{i}"),
            None => "16".to_string(),
        };
        let ok = degraded.is_some_and(|c| {
            c.status == "True" && c.reason == "Unplaceable" && names(&c.message, &wanted)
        });
        if !ok {
            out.push(format!(
                "Model {name}: {:?}",
                m.and_then(|m| m.status.as_ref()).map(|s| &s.conditions)
            ));
        }
    }
    for name in expected_adapters {
        let a = adapters.iter().find(|a| &a.name_any() == name);
        let ghost = format!("ghost-{}", name.trim_start_matches("orphan-"));
        let ok = a.and_then(|a| a.status.as_ref()).is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.reason == "ModelNotFound" && names(&c.message, &ghost))
        });
        if !ok {
            out.push(format!(
                "Adapter {name}: {:?}",
                a.and_then(|a| a.status.as_ref()).map(|s| &s.conditions)
            ));
        }
    }
    out
}

/// Whether `text` names `token` (not merely a longer name that starts with it).
fn names(text: &str, token: &str) -> bool {
    text.match_indices(token).any(|(i, _)| {
        !text[i + token.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

fn with_name(mut m: Model, name: &str) -> Model {
    m.metadata.name = Some(name.into());
    m
}

#[tokio::test]
async fn r7_a_burst_of_200_hostile_objects_is_explained_and_good_models_converge() {
    let f = fixture("r7").await;
    let kc = f.kubeconfig(SA_A).await;
    let mut op = f.operator(&kc, "r7-operator", None);
    // How long a good Model takes here, without the burst.
    f.create_model("before", 1).await;
    let usual = f.converged("before", 1, TIMEOUT).await.as_secs_f64();

    enum Obj {
        Model(Box<Model>),
        Adapter(Box<Adapter>),
    }
    let mut burst: Vec<(String, Obj)> = Vec::new();
    for i in 0..20 {
        // Rejected by the API server: not DNS-1035 labels.
        burst.push((
            format!("bad name {i}"),
            Obj::Model(Box::new(with_name(model("x", 1), &format!("Bad_Name-{i}")))),
        ));
        burst.push((
            format!("dotted {i}"),
            Obj::Model(Box::new(with_name(
                model("x", 1),
                &format!("llama-3.1-{i}"),
            ))),
        ));
    }
    for i in 0..70 {
        let mut m = with_name(model("x", 1), &format!("nopool-{i}"));
        m.spec.pools[0].name = format!("missing-pool-{i}");
        burst.push((format!("unknown pool {i}"), Obj::Model(Box::new(m))));
    }
    for i in 0..40 {
        let mut m = with_name(model("x", 1), &format!("huge-{i}"));
        m.spec.gpus_per_replica = 16;
        burst.push((format!("16 GPUs {i}"), Obj::Model(Box::new(m))));
    }
    for i in 0..50 {
        let a: Adapter = serde_json::from_value(json!({
            "apiVersion": "strata.ai/v1alpha1", "kind": "Adapter",
            "metadata": {"name": format!("orphan-{i}")},
            "spec": {"model": format!("ghost-{i}"), "source": {"uri": "hf://strata-test/x-lora"}},
        }))
        .expect("adapter");
        burst.push((
            format!("adapter without model {i}"),
            Obj::Adapter(Box::new(a)),
        ));
    }
    assert_eq!(burst.len(), 200);
    let adapters: Api<Adapter> = Api::namespaced(f.client.clone(), &f.ns);
    let burst_started = Instant::now();
    let (models, adapters2) = (f.models.clone(), adapters.clone());
    let sent = tokio::spawn(async move {
        futures::stream::iter(burst)
            .map(|(what, obj)| {
                let (models, adapters) = (models.clone(), adapters2.clone());
                async move {
                    let r = match obj {
                        Obj::Model(m) => models
                            .create(&PostParams::default(), &m)
                            .await
                            .map(|m| m.name_any()),
                        Obj::Adapter(a) => adapters
                            .create(&PostParams::default(), &a)
                            .await
                            .map(|a| a.name_any()),
                    };
                    Ok::<_, String>((what, r))
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await
    });
    // A good Model applied during the burst.
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.create_model("during", 1).await;
    let during_started = Instant::now();
    let results = sent.await.expect("task").expect("burst");
    let burst_secs = burst_started.elapsed().as_secs_f64();
    let mut admitted_models = Vec::new();
    let mut admitted_adapters = Vec::new();
    let mut rejected = 0;
    for (what, r) in results {
        match r {
            Ok(name) if what.starts_with("adapter") => admitted_adapters.push(name),
            Ok(name) => admitted_models.push(name),
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => rejected += 1,
            Err(e) => panic!("[R7] {what}: {e}"),
        }
    }
    // Meanwhile: the good Model converges, and every admitted object
    // explains itself within a bound (both measured from their start).
    let explained_within = Duration::from_secs(90);
    let explain = async {
        loop {
            let models = f
                .models
                .list(&ListParams::default())
                .await
                .expect("models")
                .items;
            let adapters_now = adapters
                .list(&ListParams::default())
                .await
                .expect("adapters")
                .items;
            let missing = unexplained(&models, &admitted_models, &adapters_now, &admitted_adapters);
            if missing.is_empty() || burst_started.elapsed() > explained_within {
                return (missing, burst_started.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let good = async {
        f.converged("during", 1, TIMEOUT).await;
        during_started.elapsed().as_secs_f64()
    };
    let ((missing, explained), during) = tokio::join!(explain, good);
    assert!(
        missing.is_empty(),
        "[R7] {} admitted object(s) without their condition after {explained_within:?}, e.g.:\n{}",
        missing.len(),
        missing
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let check = f.check_pods("during", 1).await;
    report(
        "R7 burst of 200 hostile objects",
        explained,
        &LoadStats::default(),
        check.duplicates,
        &format!(
            "{rejected} rejected by the API server, {} Models and {} Adapters admitted, each with its condition \
             within {explained:.1} s of the burst's start (sent in {burst_secs:.1} s); a good Model Ready in {during:.1} s \
             during the burst ({usual:.1} s without)",
            admitted_models.len(),
            admitted_adapters.len()
        ),
    );
    assert_eq!(rejected, 40, "the bad names are refused by the API server");
    assert_eq!(admitted_models.len() + admitted_adapters.len(), 160);
    assert!(
        during <= (3.0 * usual).max(usual + 20.0),
        "[R7] the good Model took {during:.1} s during the burst ({usual:.1} s without)"
    );
    assert!(op.running(), "{}", op.log_tail());
    assert_eq!(check.duplicates, 0);
    f.finish().await;
}

/// Models that name a Secret that does not exist (their pods cannot start:
/// the kubelet, and the pod runner, report CreateContainerConfigError).
#[tokio::test]
async fn r7_models_naming_a_missing_secret_say_which() {
    let f = fixture("r7-secret").await;
    let kc = f.kubeconfig(SA_A).await;
    let mut op = f.operator(&kc, "r7s-operator", None);
    for i in 0..3 {
        let mut m = with_name(model("x", 1), &format!("nosecret-{i}"));
        m.spec.source.credentials_secret_ref = Some(
            serde_json::from_value(json!({"name": format!("missing-token-{i}")})).expect("ref"),
        );
        f.models
            .create(&PostParams::default(), &m)
            .await
            .expect("create");
    }
    let t0 = Instant::now();
    for i in 0..3 {
        let secret = format!("missing-token-{i}");
        f.wait_model(
            &format!("nosecret-{i}"),
            &format!("a condition naming the Secret {secret}"),
            Duration::from_secs(60),
            move |m| {
                m.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.status != "Unknown" && c.message.contains(&secret))
                })
            },
        )
        .await;
    }
    report(
        "R7 Models naming a missing Secret",
        t0.elapsed().as_secs_f64(),
        &LoadStats::default(),
        0,
        "each names the missing Secret in a condition",
    );
    assert!(op.running(), "{}", op.log_tail());
    f.finish().await;
}
