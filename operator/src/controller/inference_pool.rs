//! The Model's InferencePool (`inference.networking.k8s.io/v1`, the Gateway
//! API Inference Extension), for Models with `spec.routing.inferencePool`:
//! built by [`strata_core::inference_pool`], applied only when the cached
//! one differs, deleted when the Model stops asking, and garbage-collected
//! with the Model (owner reference).
//!
//! The extension's CRDs are optional. Whether the API server serves
//! InferencePools is asked once (one discovery request) when the first
//! Model is reconciled, and again at most every [`RECHECK`] while a Model
//! asks for one and they are missing; only once they are served is a watch
//! of Strata's InferencePools started. Without them a Model that asks gets
//! `Degraded/InferencePoolUnavailable` and a Warning Event, and is served
//! through its Service as always; nothing else is sent, and no watch fails.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use prometheus::IntCounter;

use kube::api::{DeleteParams, Patch, PatchParams};
use kube::core::{NamespaceResourceScope, ObjectMeta};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde::{Deserialize, Serialize};
use strata_core::inference_pool::{self as pool, Problem};
use strata_core::labels;
use strata_crds::Model;

use crate::error::{Error, Result};

/// How often a Model that asks for an InferencePool checks again whether
/// the API server serves them, while it does not.
pub const RECHECK: Duration = Duration::from_secs(10);

/// How long the first list of the InferencePool watch may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// An InferencePool as the operator reads it: metadata and spec (its status
/// belongs to the gateways).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct InferencePool {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// The spec, as the API server returns it.
    #[serde(default)]
    pub spec: serde_json::Value,
}

impl Resource for InferencePool {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(pool::KIND)
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(pool::GROUP)
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(pool::VERSION)
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(pool::PLURAL)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl InferencePool {
    /// The object as JSON (metadata and spec), for the pure comparison.
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "metadata": serde_json::to_value(&self.metadata).unwrap_or_default(),
            "spec": self.spec,
        })
    }
}

/// Whether InferencePools are served, and Strata's once they are.
enum State {
    /// Not asked yet.
    Unknown,
    /// Not served when last asked.
    Absent(Instant),
    /// Served: the cache of Strata's InferencePools, kept by its watch.
    Present(Watched),
}

/// The cache of Strata's InferencePools and the task that keeps it.
struct Watched {
    store: Store<InferencePool>,
    /// Set by the task when the API server answers that InferencePools are
    /// not served any more (the CRD was deleted).
    gone: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the watch of Strata's InferencePools. A failing watch is said
/// once at warn level (then at debug until it recovers); a 404 (the CRD
/// deleted) marks it gone, and [`InferencePools::store`] drops it. A pool
/// changed by another field manager, or deleted, wakes the Model that owns
/// it (see [`Drift`]), which puts it back.
fn watch(client: &Client, wake: UnboundedSender<ObjectRef<Model>>, drifted: IntCounter) -> Watched {
    use futures::{StreamExt, TryStreamExt};
    use kube::runtime::WatchStreamExt;
    use std::sync::atomic::Ordering;
    let (store, writer) = kube::runtime::reflector::store();
    let api = Api::<InferencePool>::all(client.clone());
    let config =
        watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER));
    // (Each event is read for drift before its managed fields, which say
    // who wrote it, are dropped for the cache.)
    let mut drift = Drift::default();
    let stream = kube::runtime::reflector::reflector(
        writer,
        watcher(api, config)
            .backoff(crate::watch::backoff())
            .map_ok(move |event| {
                for (model, cause) in drift.event(&event) {
                    let (ns, name) = (model.namespace.as_deref().unwrap_or_default(), &model.name);
                    match &cause {
                        Cause::EditedBy(manager) => {
                            drifted.inc();
                            tracing::info!(
                                namespace = ns,
                                model = %name,
                                manager = %manager,
                                "the Model's InferencePool was changed by someone else: putting it back"
                            );
                        }
                        // (Debug: the garbage collector's deletion after the
                        // Model's own is one too.)
                        Cause::Deleted => tracing::debug!(
                            namespace = ns,
                            model = %name,
                            "the Model's InferencePool was deleted: putting it back if the Model still asks for one"
                        ),
                    }
                    // (Closed only when the controllers stop.)
                    let _ = wake.unbounded_send(model);
                }
                event.modify(crate::watch::drop_managed_fields)
            }),
    );
    let gone = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = gone.clone();
    let task = tokio::spawn(async move {
        tokio::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => failing = false,
                Err(e) => {
                    if not_found(&e) {
                        flag.store(true, Ordering::Relaxed);
                    }
                    if failing {
                        tracing::debug!("InferencePool watch: {e}");
                    } else {
                        tracing::warn!("InferencePool watch: {e}");
                    }
                    failing = true;
                }
            }
        }
    });
    Watched { store, gone, task }
}

/// Whether a watch error says the resource is not served (HTTP 404).
fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// Which watch events of Strata's InferencePools should wake their Model,
/// pure: a change of what the Model decides (its spec, labels, annotations
/// or owners) written by another field manager than the operator's, or a
/// deletion. A pool seen for the first time does not (the Model created
/// it), nor do the operator's own writes (the reconcile that wrote them
/// knows), nor a change of its status (the gateways'). After a re-list,
/// the pools the watch no longer shows count as deleted (a watch that lost
/// its place sends no deletion for them). A deletion is not told apart by
/// who made it: the garbage collector's, after the Model's, looks the
/// same.
#[derive(Debug, Default)]
pub(crate) struct Drift {
    /// What each pool looked like: its fingerprint, owning Model and the
    /// writers its managed fields name.
    seen: HashMap<ObjectRef<InferencePool>, Seen>,
    /// The pools a re-list in progress has shown.
    relisted: Option<HashSet<ObjectRef<InferencePool>>>,
}

#[derive(Debug)]
struct Seen {
    print: u64,
    owner: Option<ObjectRef<Model>>,
    writers: Vec<Writer>,
}

/// A managed-fields entry: who wrote, how, and when (second resolution).
type Writer = (String, String, String, Option<String>);

/// Why a Model is woken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Another field manager (named) changed the pool.
    EditedBy(String),
    /// The pool was deleted.
    Deleted,
}

impl Drift {
    /// The Models to wake for one watch event, and why.
    pub(crate) fn event(
        &mut self,
        event: &watcher::Event<InferencePool>,
    ) -> Vec<(ObjectRef<Model>, Cause)> {
        match event {
            watcher::Event::Apply(p) => self.applied(p).into_iter().collect(),
            watcher::Event::InitApply(p) => {
                if let Some(r) = self.relisted.as_mut() {
                    r.insert(ObjectRef::from_obj(p));
                }
                self.applied(p).into_iter().collect()
            }
            watcher::Event::Delete(p) => self
                .seen
                .remove(&ObjectRef::from_obj(p))
                .and_then(|s| s.owner)
                .or_else(|| owner(p))
                .map(|o| (o, Cause::Deleted))
                .into_iter()
                .collect(),
            watcher::Event::Init => {
                self.relisted = Some(HashSet::new());
                Vec::new()
            }
            watcher::Event::InitDone => {
                let Some(relisted) = self.relisted.take() else {
                    return Vec::new();
                };
                let mut gone = Vec::new();
                self.seen.retain(|k, s| {
                    let keep = relisted.contains(k);
                    if !keep && let Some(o) = s.owner.take() {
                        gone.push((o, Cause::Deleted));
                    }
                    keep
                });
                gone
            }
        }
    }

    fn applied(&mut self, p: &InferencePool) -> Option<(ObjectRef<Model>, Cause)> {
        let key = ObjectRef::from_obj(p);
        let now = Seen {
            print: fingerprint(p),
            owner: owner(p),
            writers: writers(p),
        };
        let wake = self.seen.get(&key).and_then(|before| {
            if before.print == now.print {
                return None;
            }
            // Who wrote this change: the entries new or rewritten since.
            let foreign = now
                .writers
                .iter()
                .filter(|w| !before.writers.contains(w))
                .find(|w| w.0 != labels::FIELD_MANAGER)?;
            Some((now.owner.clone()?, Cause::EditedBy(foreign.0.clone())))
        });
        self.seen.insert(key, now);
        wake
    }
}

/// The writers of an object's main resource (not its status) in its
/// managed fields.
fn writers(p: &InferencePool) -> Vec<Writer> {
    p.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref().unwrap_or_default().is_empty())
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
                m.api_version.clone().unwrap_or_default(),
                m.time.as_ref().map(|t| t.0.to_string()),
            )
        })
        .collect()
}

/// The Model that controls the pool, if any.
fn owner(p: &InferencePool) -> Option<ObjectRef<Model>> {
    let ns = p.metadata.namespace.as_deref()?;
    p.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| {
            o.controller == Some(true)
                && o.kind == Model::kind(&())
                && o.api_version == Model::api_version(&())
        })
        .map(|o| ObjectRef::new(&o.name).within(ns))
}

/// A hash of what the Model decides of a pool.
fn fingerprint(p: &InferencePool) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::json!([
        p.spec,
        p.metadata.labels,
        p.metadata.annotations,
        p.metadata.owner_references
    ])
    .to_string()
    .hash(&mut h);
    h.finish()
}

/// The operator's view of InferencePools (one per process).
pub struct InferencePools {
    state: tokio::sync::Mutex<State>,
    /// The problem each Model (by `namespace/name#uid`) was last warned
    /// about, so that it is told once, not at every reconcile.
    warned: std::sync::Mutex<HashMap<String, &'static str>>,
    /// Wakes the Model whose InferencePool someone else changed.
    wake: UnboundedSender<ObjectRef<Model>>,
    /// Counts those changes (`strata_child_drift_total`).
    drifted: IntCounter,
}

impl InferencePools {
    /// Nothing known yet; `wake` wakes a Model (the Model controller's
    /// `reconcile_on`), `drifted` counts why.
    pub fn new(wake: UnboundedSender<ObjectRef<Model>>, drifted: IntCounter) -> Self {
        Self {
            state: tokio::sync::Mutex::new(State::Unknown),
            warned: std::sync::Mutex::new(HashMap::new()),
            wake,
            drifted,
        }
    }

    /// Whether the Model `key` should be warned about `problem` now: true
    /// the first time (and again after it went away). `None`: no problem
    /// (forgets the Model).
    pub fn first_warning(&self, key: &str, problem: Option<&Problem>) -> bool {
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match problem {
            None => {
                warned.remove(key);
                false
            }
            Some(p) => warned.insert(key.to_string(), p.reason()) != Some(p.reason()),
        }
    }

    /// The cache of Strata's InferencePools if the API server serves them;
    /// asks it when not known yet, or when `want` and the last answer (no)
    /// is older than [`RECHECK`].
    pub async fn store(&self, client: &Client, want: bool) -> Result<Option<Store<InferencePool>>> {
        let mut state = self.state.lock().await;
        if let State::Present(w) = &*state
            && w.gone.load(std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(
                "the API server does not serve {} {} any more: watch stopped",
                pool::API_VERSION,
                pool::PLURAL
            );
            *state = State::Absent(Instant::now());
        }
        match &*state {
            State::Present(w) => return Ok(Some(w.store.clone())),
            State::Absent(at) if !want || at.elapsed() < RECHECK => return Ok(None),
            State::Absent(_) | State::Unknown => {}
        }
        if !served(client).await? {
            if !matches!(*state, State::Absent(_)) {
                tracing::info!(
                    "the API server does not serve {} {}: Models that ask for an InferencePool report InferencePoolUnavailable",
                    pool::API_VERSION,
                    pool::PLURAL
                );
            }
            *state = State::Absent(Instant::now());
            return Ok(None);
        }
        let watched = watch(client, self.wake.clone(), self.drifted.clone());
        let store = watched.store.clone();
        match tokio::time::timeout(SYNC_TIMEOUT, store.wait_until_ready()).await {
            Ok(Ok(())) => {}
            _ => {
                tracing::warn!("the InferencePool cache did not sync; asking again later");
                *state = State::Absent(Instant::now());
                return Ok(None);
            }
        }
        tracing::info!(
            "the API server serves {} {}: watching Strata's",
            pool::API_VERSION,
            pool::PLURAL
        );
        *state = State::Present(watched);
        Ok(Some(store))
    }
}

/// Whether the API server serves `inference.networking.k8s.io/v1`
/// InferencePools (one discovery request).
async fn served(client: &Client) -> Result<bool> {
    match client.list_api_group_resources(pool::API_VERSION).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == pool::PLURAL)),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(source) => Err(Error::Get {
            kind: "APIResourceList",
            name: pool::API_VERSION.to_string(),
            source,
        }),
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing asked, nothing there.
    None,
    /// The cached one is what the Model asks.
    Unchanged,
    /// Created or updated.
    Applied,
    /// Deleted (the Model stopped asking).
    Deleted,
}

/// The Model `ns/name` (UID `uid`)'s InferencePool: applied when
/// `routing` asks for one and the cached one differs, deleted when it does
/// not ask and one it owns exists. Returns what it did, or why the Model
/// does not have the one it asks for.
pub async fn apply(
    pools: &InferencePools,
    client: &Client,
    ns: &str,
    name: &str,
    uid: &str,
    routing: Option<&strata_crds::model::InferencePoolRouting>,
) -> Result<std::result::Result<Outcome, Problem>> {
    let Some(store) = pools.store(client, routing.is_some()).await? else {
        return Ok(match routing {
            Some(_) => Err(Problem::NotInstalled),
            None => Ok(Outcome::None),
        });
    };
    let api: Api<InferencePool> = Api::namespaced(client.clone(), ns);
    let cached = store.get(&ObjectRef::new(name).within(ns));
    let Some(routing) = routing else {
        // Not asked: delete the one this Model owns, if any.
        let Some(have) = cached else {
            return Ok(Ok(Outcome::None));
        };
        if !pool::owned_by(&have.to_json(), uid) {
            return Ok(Ok(Outcome::None));
        }
        return match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(Ok(Outcome::Deleted)),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Ok(Outcome::None)),
            Err(source) => Err(Error::Write {
                kind: "InferencePool",
                name: name.to_string(),
                source,
            }),
        };
    };
    let desired = pool::build(ns, name, uid, routing);
    match cached {
        Some(have) => {
            let have = have.to_json();
            if !pool::owned_by(&have, uid) {
                return Ok(Err(Problem::Conflict));
            }
            if pool::matches(&have, &desired, uid) {
                return Ok(Ok(Outcome::Unchanged));
            }
        }
        None => {
            // Not in the cache: someone else's of that name may exist (the
            // cache holds Strata's only).
            let existing = api.get_opt(name).await.map_err(|source| Error::Get {
                kind: "InferencePool",
                name: name.to_string(),
                source,
            })?;
            if existing.is_some_and(|e| !pool::owned_by(&e.to_json(), uid)) {
                return Ok(Err(Problem::Conflict));
            }
        }
    }
    api.patch(
        name,
        &PatchParams::apply(labels::FIELD_MANAGER).force(),
        &Patch::Apply(&desired),
    )
    .await
    .map_err(|source| Error::Write {
        kind: "InferencePool",
        name: name.to_string(),
        source,
    })?;
    tracing::info!(namespace = ns, name, "applied the Model's InferencePool");
    Ok(Ok(Outcome::Applied))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_warned_once_per_problem() {
        let pools = InferencePools::new(
            futures::channel::mpsc::unbounded().0,
            IntCounter::new("drift", "drift").expect("counter"),
        );
        let (a, b) = ("ns/a#1", "ns/b#2");
        assert!(pools.first_warning(a, Some(&Problem::NotInstalled)));
        assert!(!pools.first_warning(a, Some(&Problem::NotInstalled)));
        assert!(pools.first_warning(b, Some(&Problem::NotInstalled)));
        assert!(
            pools.first_warning(a, Some(&Problem::Conflict)),
            "another problem"
        );
        assert!(!pools.first_warning(a, None));
        assert!(
            pools.first_warning(a, Some(&Problem::Conflict)),
            "again after it went away"
        );
    }

    #[test]
    fn the_resource_is_the_extensions_v1_inferencepool() {
        assert_eq!(
            InferencePool::api_version(&()),
            "inference.networking.k8s.io/v1"
        );
        assert_eq!(
            InferencePool::url_path(&(), Some("team")),
            "/apis/inference.networking.k8s.io/v1/namespaces/team/inferencepools"
        );
    }

    #[test]
    fn a_pool_read_from_the_api_server_compares_with_the_built_one() {
        let routing = strata_crds::model::InferencePoolRouting::default();
        let desired = pool::build("team", "llama", "u1", &routing);
        // As a list or watch returns it: kind, apiVersion and status too.
        let mut wire = desired.clone();
        wire["status"] = serde_json::json!({"parents": []});
        wire["spec"]["endpointPickerRef"]["failureMode"] = serde_json::json!("FailClose");
        wire["metadata"]["uid"] = serde_json::json!("p1");
        let read: InferencePool = serde_json::from_value(wire).expect("pool");
        assert!(pool::owned_by(&read.to_json(), "u1"));
        assert!(pool::matches(&read.to_json(), &desired, "u1"));
        assert!(!pool::matches(&read.to_json(), &desired, "u2"));
    }

    /// A pool of `model`, last written by `by` at second `at` (after the
    /// operator's apply at second 0).
    fn owned(name: &str, model: &str, port: i64, by: &str, at: i64) -> InferencePool {
        let routing = strata_crds::model::InferencePoolRouting::default();
        let mut wire = pool::build("team", model, "u1", &routing);
        wire["metadata"]["name"] = serde_json::json!(name);
        wire["spec"]["targetPorts"] = serde_json::json!([{"number": port}]);
        let entry = |manager: &str, op: &str, at: i64| {
            serde_json::json!({"manager": manager, "operation": op, "apiVersion": "inference.networking.k8s.io/v1",
                "time": format!("2026-12-05T12:00:{at:02}Z"), "fieldsType": "FieldsV1", "fieldsV1": {}})
        };
        let mut fields = vec![entry(labels::FIELD_MANAGER, "Apply", 0)];
        if by == labels::FIELD_MANAGER {
            fields[0] = entry(by, "Apply", at);
        } else if !by.is_empty() {
            fields.push(entry(by, "Update", at));
        }
        // A gateway's status write: never a reason.
        let mut status = entry("gateway", "Update", at);
        status["subresource"] = serde_json::json!("status");
        fields.push(status);
        wire["metadata"]["managedFields"] = serde_json::json!(fields);
        serde_json::from_value(wire).expect("pool")
    }

    fn woken(wakes: Vec<(ObjectRef<Model>, Cause)>) -> Vec<(String, Cause)> {
        wakes
            .into_iter()
            .map(|(m, c)| (format!("{}/{}", m.namespace.unwrap_or_default(), m.name), c))
            .collect()
    }

    const OURS: &str = labels::FIELD_MANAGER;

    #[test]
    fn a_pool_changed_by_someone_else_or_deleted_wakes_its_model() {
        use watcher::Event;
        let edited_by = |m: &str| vec![("team/llama".to_string(), Cause::EditedBy(m.into()))];
        let mut d = Drift::default();
        let a = owned("a", "llama", 8080, "", 0);
        assert!(
            d.event(&Event::Apply(a.clone())).is_empty(),
            "first seen: created by the Model"
        );
        let mut status_only = owned("a", "llama", 8080, "", 5);
        status_only.metadata.resource_version = Some("2".into());
        assert!(
            d.event(&Event::Apply(status_only)).is_empty(),
            "a status write changes nothing the Model decides"
        );
        assert_eq!(
            woken(d.event(&Event::Apply(owned("a", "llama", 9999, "kubectl-patch", 6)))),
            edited_by("kubectl-patch")
        );
        assert!(
            d.event(&Event::Apply(owned("a", "llama", 8080, OURS, 7)))
                .is_empty(),
            "the operator putting it back wakes nobody (its other writer left as it was)"
        );
        let mut relabelled = owned("a", "llama", 8080, "argocd-controller", 8);
        relabelled
            .metadata
            .labels
            .get_or_insert_default()
            .insert("x".into(), "y".into());
        assert_eq!(
            woken(d.event(&Event::Apply(relabelled.clone()))),
            edited_by("argocd-controller")
        );
        assert_eq!(
            woken(d.event(&Event::Delete(relabelled))),
            vec![("team/llama".to_string(), Cause::Deleted)]
        );
        // The operator's own change (a new picker for the Model) wakes nobody.
        d.event(&Event::Apply(owned("b", "llama", 8080, "", 0)));
        assert!(
            d.event(&Event::Apply(owned("b", "llama", 7000, OURS, 9)))
                .is_empty()
        );
        let mut foreign = owned("f", "llama", 8080, "", 0);
        foreign.metadata.owner_references = None;
        d.event(&Event::Apply(foreign.clone()));
        let mut changed = owned("f", "llama", 1, "kubectl-patch", 3);
        changed.metadata.owner_references = None;
        assert!(
            d.event(&Event::Apply(changed)).is_empty(),
            "no Model owns it"
        );
        assert!(d.event(&Event::Delete(foreign)).is_empty());
    }

    #[test]
    fn after_a_relist_the_pools_not_shown_again_count_as_deleted() {
        use watcher::Event;
        let mut d = Drift::default();
        for e in [
            Event::Init,
            Event::InitApply(owned("a", "llama", 8080, "", 0)),
            Event::InitApply(owned("b", "qwen", 8080, "", 0)),
            Event::InitDone,
        ] {
            assert!(d.event(&e).is_empty(), "the first list wakes nobody");
        }
        // The watch lost its place; b was deleted and a edited meanwhile.
        assert!(d.event(&Event::Init).is_empty());
        assert_eq!(
            woken(d.event(&Event::InitApply(owned("a", "llama", 9999, "helm", 4)))),
            vec![("team/llama".to_string(), Cause::EditedBy("helm".into()))]
        );
        assert_eq!(
            woken(d.event(&Event::InitDone)),
            vec![("team/qwen".to_string(), Cause::Deleted)]
        );
        assert!(
            d.event(&Event::Apply(owned("a", "llama", 9999, "helm", 4)))
                .is_empty(),
            "a as the re-list showed it"
        );
    }
}
