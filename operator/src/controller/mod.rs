//! The controllers: the thin layer that reads the cluster, runs the pure
//! planners, and applies their plans.

pub mod adapter;
pub mod energy;
pub mod inference_pool;
pub mod janitor;
pub mod model;
pub mod model_writes;
pub mod pool;
pub mod prometheus;
pub mod reconcile;
pub mod report;
pub mod scale;
pub mod service_create;
pub mod status_write;
pub mod telemetry;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use strata_crds::{Adapter, GPUPool, Model};
use tokio::sync::Mutex;

use crate::metrics::Metrics;
use strata_core::labels;
use strata_core::podgpus::PodGpus;
use strata_core::template::Settings;

/// Operator settings from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// What shapes every pod.
    pub template: Settings,
    /// Seconds a pod may stay Unschedulable before it is placed elsewhere.
    pub unschedulable_grace: u64,
    /// Seconds a replica's node may stay NotReady before the replica is
    /// placed elsewhere.
    pub node_lost_grace: u64,
    /// How often converged objects are reconciled anyway.
    pub resync: Duration,
    /// Model reconciles that may run at once.
    pub model_workers: u16,
    /// How often the replicas' energy counters are read.
    pub energy_interval: Duration,
    /// The CA that signs the sidecars' admin port certificates (and the
    /// only one the operator trusts when it calls them).
    pub ca: Arc<crate::pki::Ca>,
    /// Where GPU readings come from.
    pub telemetry: TelemetryConfig,
}

/// Where the energy accountant reads GPUs.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// The source.
    pub source: telemetry::Source,
    /// The node agents' namespace (the operator's).
    pub agent_namespace: String,
    /// The node agents' metrics port.
    pub agent_port: u16,
    /// The Prometheus that scrapes dcgm-exporter.
    pub dcgm_url: Option<String>,
}

/// A replica pod decided or created but not yet seen in the pod cache:
/// placement must count its GPUs.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The Model's key (namespace/name).
    pub model: String,
    /// Node it is pinned to.
    pub node: String,
    /// GPU resource name.
    pub resource: String,
    /// GPUs.
    pub gpus: i64,
    /// When it was decided, then when its create was answered.
    pub at: Instant,
    /// Its create is on its way (kept however long that takes).
    pub sending: bool,
}

impl Planned {
    /// Whether the reservation still counts at `now`: while its create is
    /// on its way, and for a minute after the answer unless the cache
    /// (`cached`) shows the pod by then.
    pub fn holds(&self, cached: bool, now: Instant) -> bool {
        self.sending
            || (!cached && now.saturating_duration_since(self.at) < Duration::from_secs(60))
    }
}

/// Shared by every reconcile.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event recorders (one Event per distinct note; see [`reconcile::Recorders`]).
    pub events: reconcile::Recorders,
    /// Events being published in the background, waiting in their lane
    /// or sent (at most [`reconcile::EVENTS_IN_FLIGHT`]; beyond, an Event
    /// is dropped, as client-go's broadcaster drops when its queue is
    /// full).
    pub event_slots: Arc<tokio::sync::Semaphore>,
    /// Metrics.
    pub metrics: Metrics,
    /// Settings.
    pub config: Config,
    /// Every node.
    pub nodes: Store<Node>,
    /// Strata's pods (its replicas), whole.
    pub pods: Store<Pod>,
    /// Strata's Services (of Models and Adapters).
    pub services: Store<Service>,
    /// New Models' Services being created in the background (see
    /// [`service_create`]).
    pub service_creates: Arc<service_create::Background>,
    /// Wakes a Model (the Model controller's `reconcile_on`): its
    /// background writes failed or a failure it reported is over.
    pub wake_models: futures::channel::mpsc::UnboundedSender<ObjectRef<Model>>,
    /// Model reconciles' writes on their way (at most
    /// [`model_writes::IN_FLIGHT`] sending at once).
    pub write_slots: Arc<tokio::sync::Semaphore>,
    /// Model statuses, written in the background and coalesced.
    pub model_status: Arc<status_write::Writer>,
    /// The lanes in which status writes and Events yield to the other
    /// requests (see [`crate::ratelimit::Lanes`]).
    pub lanes: crate::ratelimit::Lanes,
    /// What the Model controller did to each Model's children (see
    /// [`model::Memo`]), by `namespace/name#uid`.
    pub memos: std::sync::Mutex<HashMap<String, model::Memo>>,
    /// Every pod of the cluster as GPU accounting sees it (other workloads
    /// hold GPUs too): identity, node and GPUs only.
    pub gpu_pods: Store<PodGpus>,
    /// Every GPUPool.
    pub pools: Store<GPUPool>,
    /// Serializes placement across Models and remembers pods created but
    /// not yet in the cache (pod name to what it holds).
    pub placement: Mutex<HashMap<String, Planned>>,
    /// Nodes the scheduler refused, per Model key, with when.
    pub avoid: Mutex<HashMap<String, Vec<(String, Instant)>>>,
    /// The SLA autoscaler's memory, per Model key.
    pub scalers: Mutex<HashMap<String, scale::ModelScaler>>,
    /// One Adapter plan at a time per Model (its replicas' room is shared),
    /// by Model key.
    pub adapter_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Failed reconciles in a row, by controller/namespace/name (backoff).
    pub failures: std::sync::Mutex<HashMap<String, u32>>,
    /// Failed adapter loads by (Adapter UID, pod).
    pub adapter_failures: Mutex<HashMap<(String, String), adapter::Failures>>,
    /// The client of the sidecars' admin ports (TLS, trusting `config.ca`).
    pub sidecars: crate::sidecar_client::SidecarClient,
    /// Where GPU readings come from, with the node agents' pods.
    pub telemetry: telemetry::Telemetry,
    /// Whether InferencePools are served, and Strata's (see
    /// [`inference_pool`]).
    pub inference_pools: inference_pool::InferencePools,
}

/// A digest of what matters about a node for placement: readiness,
/// cordon, taints, labels and GPU allocatable (not heartbeats).
fn node_digest(node: &Node) -> u64 {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.status.clone())
        });
    let gpus: BTreeMap<String, String> = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .map(|a| {
            a.iter()
                .filter(|(k, _)| k.starts_with("nvidia.com/"))
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect()
        })
        .unwrap_or_default();
    let spec = node.spec.as_ref();
    let key = serde_json::json!([
        node.metadata.deletion_timestamp.is_some(),
        ready,
        spec.and_then(|s| s.unschedulable),
        spec.and_then(|s| s.taints.clone()),
        node.metadata.labels,
        gpus,
    ]);
    strata_core::template::fnv1a(key.to_string().as_bytes())
}

/// Every node as it changes, and every deleted node once more marked with a
/// deletion time (nodes have no finalizers, so a watch's delete event is
/// the first sign): [`node_digest`] tells both apart from heartbeats.
fn node_changes(
    client: Client,
) -> impl futures::Stream<Item = Result<Node, watcher::Error>> + Send {
    use kube::runtime::WatchStreamExt;
    watcher(Api::<Node>::all(client), watcher::Config::default())
        .backoff(crate::watch::backoff())
        .map(|event| {
            event.map(|e| match e {
                watcher::Event::Delete(mut n) => {
                    n.metadata.deletion_timestamp.get_or_insert_with(|| {
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                            k8s_openapi::jiff::Timestamp::now(),
                        )
                    });
                    vec![n]
                }
                watcher::Event::Apply(n) | watcher::Event::InitApply(n) => vec![n],
                watcher::Event::Init | watcher::Event::InitDone => Vec::new(),
            })
        })
        .flat_map(|r| {
            futures::stream::iter(match r {
                Ok(nodes) => nodes.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })
        })
}

/// Tasks aborted when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The caches every controller reads.
struct Caches {
    nodes: Store<Node>,
    pods: crate::watch::Shared<Pod>,
    services: crate::watch::Shared<Service>,
    gpu_pods: Store<PodGpus>,
    pools: Store<GPUPool>,
}

/// Starts the caches and waits until each has its first list.
async fn caches(client: &Client) -> Option<Caches> {
    let nodes = crate::watch::spawn_store(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        crate::watch::drop_managed_fields,
        || {},
    );
    // Strata's own pods, whole, in one shared watch: the cache reconciles
    // read, and the stream that wakes the Model, Adapter and GPUPool
    // controllers (each event after the cache has it, so a reconcile never
    // reads a cache older than what woke it); every pod of the cluster only
    // as GPU accounting reads it (deserialized lean: see
    // strata_core::podgpus).
    let pods = crate::watch::spawn_shared_store(
        Api::<Pod>::all(client.clone()),
        owned_pods(),
        crate::watch::drop_managed_fields,
        3,
    );
    // Strata's Services: a Model's is applied only when it differs, and
    // its deletion or change wakes the Model.
    let services = crate::watch::spawn_shared_store(
        Api::<Service>::all(client.clone()),
        owned_pods(),
        crate::watch::drop_managed_fields,
        1,
    );
    let gpu_pods = crate::watch::spawn_store(
        Api::<PodGpus>::all(client.clone()),
        watcher::Config::default(),
        |_| {},
        || {},
    );
    let pools = crate::watch::spawn_store(
        Api::<GPUPool>::all(client.clone()),
        watcher::Config::default(),
        crate::watch::drop_managed_fields,
        || {},
    );
    for (what, fut) in [
        (
            "nodes",
            Box::pin(nodes.wait_until_ready())
                as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
        ),
        ("pods", Box::pin(pods.store.wait_until_ready())),
        ("services", Box::pin(services.store.wait_until_ready())),
        ("all pods", Box::pin(gpu_pods.wait_until_ready())),
        ("gpupools", Box::pin(pools.wait_until_ready())),
    ] {
        if fut.await.is_err() {
            tracing::error!("the {what} cache stopped before it was ready");
            return None;
        }
    }
    Some(Caches {
        nodes,
        pods,
        services,
        gpu_pods,
        pools,
    })
}

/// Pods Strata manages (its replicas).
fn owned_pods() -> watcher::Config {
    watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER))
}

/// Resolves when `stop` turns true.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// Logs what a controller's stream yields (errors at debug: the reporter
/// has told the object already).
async fn drain<S, T, E>(name: &'static str, stream: S)
where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    stream
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!("{name} controller: {e}");
            }
        })
        .await;
}

/// What about a Model can change a reconcile's outcome: its spec (the
/// generation), its annotations (the activator's wake request), labels,
/// finalizers and deletion. Its status (written by the controller itself,
/// the energy accountant and the error reporter) cannot: a status write
/// wakes nobody. Pure.
pub fn model_trigger_hash(model: &Model) -> Option<u64> {
    let m = &model.metadata;
    let key = serde_json::json!([
        m.uid,
        m.generation,
        m.annotations,
        m.labels,
        m.finalizers,
        m.deletion_timestamp.is_some(),
    ]);
    Some(strata_core::template::fnv1a(key.to_string().as_bytes()))
}

/// The Model controller's own watch: its cache sees every change, its
/// trigger only those [`model_trigger_hash`] tells apart.
fn model_trigger(client: Client, workers: u16) -> Controller<Model> {
    use kube::runtime::WatchStreamExt;
    use kube::runtime::utils::PredicateConfig;
    let (reader, writer) = kube::runtime::reflector::store();
    let trigger = watcher(Api::<Model>::all(client), watcher::Config::default())
        .backoff(crate::watch::backoff())
        .modify(crate::watch::drop_managed_fields)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(model_trigger_hash, PredicateConfig::default());
    Controller::for_stream(trigger, reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(workers))
}

/// The Model controller: woken by its Model, its pods, placement-relevant
/// node changes (readiness, cordon, taints, labels, GPUs; not heartbeats)
/// and changes of the GPUPools it lists.
fn model_controller(
    ctx: Arc<Context>,
    controller: Controller<Model>,
    pods: impl futures::Stream<Item = Arc<Pod>> + Send + 'static,
    services: impl futures::Stream<Item = Arc<Service>> + Send + 'static,
    woken: impl futures::Stream<Item = ObjectRef<Model>> + Send + 'static,
    stop: tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> {
    let client = ctx.client.clone();
    let models_for_nodes = controller.store();
    let models_for_pools = controller.store();
    let node_digests: std::sync::Mutex<HashMap<String, u64>> =
        std::sync::Mutex::new(HashMap::new());
    let pool_generations: std::sync::Mutex<HashMap<String, i64>> =
        std::sync::Mutex::new(HashMap::new());
    let observer = ctx.clone();
    let pods = pods.inspect(move |pod| model::observe_pod(&observer, pod));
    let stream = controller
        .owns_shared_stream(pods)
        .owns_shared_stream(services)
        .reconcile_on(woken)
        .watches_stream(node_changes(client.clone()), move |node: Node| {
            let digest = node_digest(&node);
            let changed = match node_digests.lock() {
                Ok(mut d) => d.insert(node.name_any(), digest) != Some(digest),
                Err(_) => true,
            };
            if changed {
                models_for_nodes
                    .state()
                    .iter()
                    .map(|m| ObjectRef::from_obj(m.as_ref()))
                    .collect()
            } else {
                Vec::new()
            }
        })
        .watches(
            Api::<GPUPool>::all(client),
            watcher::Config::default(),
            move |pool: GPUPool| {
                // A pool's spec (a new generation) can change every one of
                // its Models' placement; its status (written with every
                // allocation and every energy reading) can only matter to
                // the Models that wait for capacity there.
                let name = pool.name_any();
                let generation = pool.metadata.generation.unwrap_or(0);
                let spec_changed = pool.metadata.deletion_timestamp.is_some()
                    || match pool_generations.lock() {
                        Ok(mut g) => g.insert(name.clone(), generation) != Some(generation),
                        Err(_) => true,
                    };
                models_for_pools
                    .state()
                    .iter()
                    .filter(|m| m.spec.pools.iter().any(|p| p.name == name))
                    .filter(|m| spec_changed || strata_core::status::waits_for_capacity(m))
                    .map(|m| ObjectRef::from_obj(m.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .trigger_backoff(crate::watch::trigger_backoff())
        .graceful_shutdown_on(stopped(stop))
        .run(model::reconcile, reconcile::error_policy, ctx);
    drain("model", stream)
}

/// The Adapter controller: woken by its Adapter and by its Model's pods
/// (new, ready, gone).
fn adapter_controller(
    ctx: Arc<Context>,
    controller: Controller<Adapter>,
    pods: impl futures::Stream<Item = Arc<Pod>> + Send + 'static,
    stop: tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> {
    let adapters_for_pods = controller.store();
    let stream = controller
        .watches_shared_stream(pods, move |pod: Arc<Pod>| {
            let model = pod.labels().get(labels::MODEL).cloned();
            let ns = pod.namespace();
            adapters_for_pods
                .state()
                .iter()
                .filter(|a| a.namespace() == ns && Some(&a.spec.model) == model.as_ref())
                .map(|a| ObjectRef::from_obj(a.as_ref()))
                .collect::<Vec<_>>()
        })
        .trigger_backoff(crate::watch::trigger_backoff())
        .graceful_shutdown_on(stopped(stop))
        .run(adapter::reconcile, reconcile::error_policy, ctx);
    drain("adapter", stream)
}

/// How long a pool's triggers must be quiet before it is reconciled.
const POOL_DEBOUNCE: Duration = Duration::from_secs(1);

/// The GPUPool controller: woken by its pool, changes of nodes that matter
/// to placement, and the replicas placed on it, debounced.
fn pool_controller(
    ctx: Arc<Context>,
    pods: impl futures::Stream<Item = Arc<Pod>> + Send + 'static,
    stop: tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> {
    let client = ctx.client.clone();
    let for_nodes = ctx.pools.clone();
    let for_pods = ctx.pools.clone();
    let node_digests: std::sync::Mutex<HashMap<String, u64>> =
        std::sync::Mutex::new(HashMap::new());
    let stream = Controller::new(
        Api::<GPUPool>::all(client.clone()),
        watcher::Config::default(),
    )
    // A burst of pod events (a rollout, a thousand Models applied at once)
    // is one reconcile and at most one status write per pool, once the
    // burst has been quiet for a second.
    .with_config(kube::runtime::controller::Config::default().debounce(POOL_DEBOUNCE))
    .watches_stream(node_changes(client.clone()), move |node: Node| {
        // Heartbeats change nothing a pool reports.
        let digest = node_digest(&node);
        let changed = match node_digests.lock() {
            Ok(mut d) => d.insert(node.name_any(), digest) != Some(digest),
            Err(_) => true,
        };
        if !changed {
            return Vec::new();
        }
        for_nodes
            .state()
            .iter()
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect::<Vec<_>>()
    })
    .watches_shared_stream(pods, move |pod: Arc<Pod>| {
        let pool = pod.labels().get(labels::POOL).cloned();
        for_pods
            .state()
            .iter()
            .filter(|p| Some(p.name_any()) == pool)
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect::<Vec<_>>()
    })
    .trigger_backoff(crate::watch::trigger_backoff())
    .graceful_shutdown_on(stopped(stop))
    .run(pool::reconcile, reconcile::error_policy, ctx);
    drain("gpupool", stream)
}

/// Every 5 s, the objects whose latest generation no reconcile has handled
/// yet (`strata_reconcile_queue_depth`).
async fn backlog(
    metrics: Metrics,
    models: Store<Model>,
    pools: Store<GPUPool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        let models = models
            .state()
            .iter()
            .filter(|m| {
                m.status.as_ref().and_then(|s| s.observed_generation) != m.metadata.generation
            })
            .count();
        let pools = pools
            .state()
            .iter()
            .filter(|p| {
                p.status.as_ref().and_then(|s| s.observed_generation) != p.metadata.generation
            })
            .count();
        metrics
            .queue_depth
            .with_label_values(&["model"])
            .set(models as i64);
        metrics
            .queue_depth
            .with_label_values(&["gpupool"])
            .set(pools as i64);
    }
}

/// Runs the controllers, the janitor and the energy accountant until
/// `shutdown` resolves.
pub async fn run(
    client: Client,
    metrics: Metrics,
    config: Config,
    lanes: crate::ratelimit::Lanes,
    identity: String,
    ready: Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let Some(caches) = caches(&client).await else {
        return;
    };
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("caches synced; reconciling");

    let sidecars = match crate::sidecar_client::SidecarClient::new(&config.ca) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("the sidecars' client: {e}");
            return;
        }
    };
    // The autoscaler's scrapes (scale::evaluate has no Context) use the same.
    let _ = scale::CLIENT.set(sidecars.clone());
    let events = reconcile::Recorders::new(
        client.clone(),
        Reporter {
            controller: labels::MANAGER.into(),
            instance: Some(identity),
        },
    );
    // The node agents' pods, when they are the GPU source.
    let agents = (config.telemetry.source == telemetry::Source::NodeAgent).then(|| {
        crate::watch::spawn_store(
            Api::<Pod>::namespaced(client.clone(), &config.telemetry.agent_namespace),
            watcher::Config::default().labels(telemetry::AGENT_SELECTOR),
            crate::watch::drop_managed_fields,
            || {},
        )
    });
    let telemetry = telemetry::Telemetry {
        source: config.telemetry.source,
        agents,
        agent_port: config.telemetry.agent_port,
        dcgm_url: config.telemetry.dcgm_url.clone(),
    };
    // Wakes a Model whose background Service create failed, or whose
    // InferencePool someone else changed.
    let (wake_models, woken_models) = futures::channel::mpsc::unbounded();
    let inference_pools = inference_pool::InferencePools::new(
        wake_models.clone(),
        metrics.child_drift.with_label_values(&["InferencePool"]),
    );
    let model_ctl = model_trigger(client.clone(), config.model_workers);
    let ctx = Arc::new(Context {
        service_creates: Arc::new(service_create::Background::new(wake_models.clone())),
        wake_models,
        write_slots: Arc::new(tokio::sync::Semaphore::new(model_writes::IN_FLIGHT)),
        model_status: status_write::Writer::new(
            client.clone(),
            model_ctl.store(),
            lanes.clone(),
            metrics.status_writes.clone(),
        ),
        lanes,
        event_slots: Arc::new(tokio::sync::Semaphore::new(reconcile::EVENTS_IN_FLIGHT)),
        client: client.clone(),
        events,
        metrics,
        config,
        nodes: caches.nodes,
        pods: caches.pods.store.clone(),
        services: caches.services.store.clone(),
        memos: std::sync::Mutex::new(HashMap::new()),
        gpu_pods: caches.gpu_pods,
        pools: caches.pools,
        placement: Mutex::new(HashMap::new()),
        avoid: Mutex::new(HashMap::new()),
        scalers: Mutex::new(HashMap::new()),
        adapter_locks: Mutex::new(HashMap::new()),
        adapter_failures: Mutex::new(HashMap::new()),
        failures: std::sync::Mutex::new(HashMap::new()),
        sidecars,
        telemetry,
        inference_pools,
    });

    let (tx, rx) = tokio::sync::watch::channel(false);
    let adapter_ctl = Controller::new(Api::<Adapter>::all(client), watcher::Config::default());
    let (model_store, adapter_store) = (model_ctl.store(), adapter_ctl.store());
    let mut subscribers = caches.pods.subscribers.into_iter();
    let (Some(for_models), Some(for_adapters), Some(for_pools)) =
        (subscribers.next(), subscribers.next(), subscribers.next())
    else {
        tracing::error!("the pod cache cannot be shared");
        return;
    };
    let Some(services) = caches.services.subscribers.into_iter().next() else {
        tracing::error!("the Service cache cannot be shared");
        return;
    };
    let models = model_controller(
        ctx.clone(),
        model_ctl,
        for_models,
        services,
        woken_models,
        rx.clone(),
    );
    let adapters = adapter_controller(ctx.clone(), adapter_ctl, for_adapters, rx.clone());
    let gpupools = pool_controller(ctx.clone(), for_pools, rx.clone());
    // Stopped when this function returns or its future is dropped (the
    // leader lost its lease: main drops it).
    let _tasks = AbortOnDrop(vec![
        tokio::spawn(janitor::run(
            ctx.clone(),
            model_store.clone(),
            adapter_store.clone(),
            rx.clone(),
        )),
        tokio::spawn(energy::run(
            ctx.clone(),
            model_store.clone(),
            adapter_store,
            rx.clone(),
        )),
        tokio::spawn(backlog(
            ctx.metrics.clone(),
            model_store,
            ctx.pools.clone(),
            rx,
        )),
    ]);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    futures::join!(models, gpupools, adapters);
    tracing::info!("controllers stopped");
}

/// Applies (server-side, forced) a Service Strata owns, named `name`, unless
/// a Service of that name exists that `owner_uid` does not own: that one is
/// left alone. Returns whether it was applied.
pub(crate) async fn apply_owned_service(
    client: &Client,
    ns: &str,
    name: &str,
    owner_uid: &str,
    svc: &serde_json::Value,
) -> crate::error::Result<bool> {
    use crate::error::Error;
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), ns);
    let existing = api.get_opt(name).await.map_err(|source| Error::Get {
        kind: "Service",
        name: name.to_string(),
        source,
    })?;
    if existing.is_some_and(|e| !e.owner_references().iter().any(|o| o.uid == owner_uid)) {
        return Ok(false);
    }
    api.patch(
        name,
        &kube::api::PatchParams::apply(labels::FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(svc),
    )
    .await
    .map_err(|source| Error::Write {
        kind: "Service",
        name: name.to_string(),
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reservation_holds_while_its_create_is_on_its_way_and_briefly_after() {
        let t0 = Instant::now();
        let mut p = Planned {
            model: "ns/m".into(),
            node: "n".into(),
            resource: "nvidia.com/gpu".into(),
            gpus: 1,
            at: t0,
            sending: true,
        };
        let long = t0 + Duration::from_secs(600);
        assert!(
            p.holds(false, long),
            "however long the rate limiter holds it"
        );
        p.sending = false;
        p.at = long;
        assert!(p.holds(false, long + Duration::from_secs(59)));
        assert!(!p.holds(true, long), "the cache shows the pod");
        assert!(
            !p.holds(false, long + Duration::from_secs(60)),
            "the watch lost it"
        );
    }

    use super::*;

    #[test]
    fn heartbeats_leave_the_node_digest_alone_and_deletion_changes_it() {
        let mut n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"nvidia.com/gpu.product": "H100"}},
            "status": {
                "allocatable": {"nvidia.com/gpu": "8", "cpu": "64"},
                "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-12-03T10:00:00Z"}],
            },
        }))
        .expect("node");
        let base = node_digest(&n);
        let beat: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"nvidia.com/gpu.product": "H100"}, "resourceVersion": "9"},
            "status": {
                "allocatable": {"nvidia.com/gpu": "8", "cpu": "63"},
                "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-12-03T10:00:40Z"}],
            },
        }))
        .expect("node");
        assert_eq!(node_digest(&beat), base, "a heartbeat");
        n.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_ne!(node_digest(&n), base, "deleted");
    }

    #[test]
    fn a_models_status_wakes_nothing_its_spec_and_wake_requests_do() {
        let mut m: Model = serde_json::from_value(serde_json::json!({
            "apiVersion": "strata.ai/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": {"source": {"uri": "hf://m/x"}, "engine": {"type": "vLLM", "image": "vllm/vllm-openai:v0.11.0"}, "pools": [{"name": "h100"}], "minReplicas": 1, "maxReplicas": 2},
        }))
        .expect("model");
        let h = |m: &Model| model_trigger_hash(m);
        let base = h(&m);
        m.status = Some(strata_crds::ModelStatus {
            replicas: 3,
            ..Default::default()
        });
        m.metadata.resource_version = Some("42".into());
        m.metadata.managed_fields = None;
        assert_eq!(h(&m), base, "status and resourceVersion");
        m.metadata.annotations = Some(
            [(
                crate::activator::WAKE_ANNOTATION.to_string(),
                "now".to_string(),
            )]
            .into(),
        );
        let woken = h(&m);
        assert_ne!(woken, base, "the activator's wake request");
        m.metadata.generation = Some(2);
        assert_ne!(h(&m), woken, "a new spec");
        let spec = h(&m);
        m.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_ne!(h(&m), spec, "deletion");
    }
}
