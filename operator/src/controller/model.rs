//! The Model controller: a pipeline of phases, each a function whose
//! failure names the call that failed ([`crate::error`]):
//!
//! 1. [`dereference`]: the Model's Secret (checked, renewed, or for a new
//!    Model made in the background before its replicas), its pods (the
//!    shared pod cache, with what this process created or deleted and the
//!    cache does not show yet), the node and pool caches;
//! 2. [`desire`]: how many replicas, from the spec or the SLA autoscaler
//!    ([`super::scale`]);
//! 3. [`plan`] (pure: `strata_core::rollout`): the pool templates, what to
//!    delete and how many to create;
//! 4. apply: [`delete_replicas`] and [`place_and_create`] decide (placement
//!    is `strata_core::placement`, one Model at a time) and hand the
//!    requests to [`super::model_writes`], which sends them in the
//!    background; [`apply_service`], [`apply_inference_pool`];
//! 5. [`status`] (pure: `strata_core::status`), handed to
//!    [`super::status_write`] (written in the background, coalesced).
//!
//! [`reconcile`] runs them inside the shared wrapper (metrics, the error
//! reporter); [`super::reconcile::error_policy`] backs off on failure, and
//! a background write that failed is reported by the next reconcile.
//!
//! A reconcile that finds nothing to change sends nothing: pods come from
//! the cache, the Service is compared with the cached one, the Secrets are
//! checked at most every [`RECHECK`] ([`Memo`]), and the status is written
//! only when it differs from the cached one.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use strata_core::conditions;
use strata_core::placement::{self, Preference, Request};
use strata_core::podgpus::{GpuClaim, PodGpus};
use strata_core::rollout::{self, DeleteReason, Replica, Target};
use strata_core::sla::{self, Evaluation};
use strata_core::status::{self, Facts, Pace};
use strata_core::template::{self, ReplicaTemplate, SIDECAR_ADMIN_PORT, SIDECAR_HTTP_PORT};
use strata_core::{labels, view};
use strata_crds::GPUPool;
use strata_crds::model::{AutoscalingMode, Model, ModelStatus, ScaleDecision};

use super::model_writes::{self, Writes};
use super::reconcile::{self, publish};
use super::service_create;
use super::{Context, Planned};
use crate::error::{Error, Result};

/// Reconciles one Model (the phases, inside the shared wrapper).
pub async fn reconcile(model: Arc<Model>, ctx: Arc<Context>) -> Result<Action> {
    reconcile::run(model, ctx, |model, ctx| async move {
        phases(&model, &ctx).await
    })
    .await
}

async fn phases(model: &Arc<Model>, ctx: &Arc<Context>) -> Result<Action> {
    if model.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove pods and the Service.
        return Ok(Action::await_change());
    }
    let mut writes = Writes::default();
    let seen = dereference(ctx, model, &mut writes).await?;
    let memo = memo_key(&seen.key, &seen.uid);
    // A background write of an earlier reconcile failed: this reconcile
    // reports it as its own and writes nothing (the error policy backs
    // off before the next try, so a refused write never turns into a
    // loop).
    let failed = with_memo(ctx, &memo, |m| m.failure.take());
    let desire = desire(ctx, model, &seen).await;
    let plan = plan(ctx, model, &seen, desire.replicas)?;
    // The apply phases decide and record as they go; the status is
    // submitted even when one fails (so that it never shows a condition
    // the cluster has moved past), and then the failure is returned for
    // the error reporter (ReconcileError, a Warning Event, backoff).
    let mut deleted = Deleted::default();
    let mut created = Created::default();
    let mut children = Children::default();
    let applied = match failed {
        Some(e) => Err(e),
        None => {
            async {
                delete_replicas(ctx, &seen, &plan, &mut deleted, &mut writes).await;
                let placed = place_and_create(
                    ctx,
                    model,
                    &seen,
                    &plan,
                    &deleted,
                    &mut created,
                    &mut writes,
                )
                .await;
                // The Service and the InferencePool do not wait for each other.
                let (service, pool) = futures::join!(
                    apply_service(ctx, model, &seen),
                    apply_inference_pool(ctx, model, &seen),
                );
                children.service_conflict = service?;
                children.inference_pool = pool?;
                placed
            }
            .await
        }
    };
    if !writes.is_empty() {
        // What the cache will show in a moment counts from now on, before
        // the requests are sent.
        with_memo(ctx, &memo, |m| {
            m.pods.deleted(
                deleted
                    .pods
                    .iter()
                    .map(|p| (p.clone(), deleted.forced.contains(p))),
                Instant::now(),
            );
            m.pods
                .creating(writes.creates.iter().map(|c| c.pod.clone()));
            m.writes += 1;
        });
        model_writes::spawn(ctx, model, memo.clone(), writes);
    }
    let (status, pace) = status(model, &seen, &desire, &plan, &deleted, &created, &children);
    record_metrics(ctx, model, &seen, &desire, &status);
    match serde_json::to_value(&status) {
        Ok(status) => ctx.model_status.submit(model, &memo, status),
        Err(e) => tracing::error!(model = %seen.key, "serializing the Model's status: {e}"),
    }
    applied?;
    Ok(Action::requeue(next_look(ctx, model, pace)))
}

/// The Model's replica counts and SLA latencies (targets, and what the
/// autoscaler last read) as metrics, for dashboards.
fn record_metrics(
    ctx: &Context,
    model: &Model,
    seen: &Seen,
    desire: &Desire,
    status: &ModelStatus,
) {
    let (_, targets, ..) = sla::policy_and_targets(model);
    let observed = desire.evaluation.as_ref().map(|e| &e.observed);
    ctx.metrics.record_model(
        &seen.ns,
        &seen.name,
        status.replicas,
        status.ready_replicas,
        [targets.ttft, targets.itl, targets.e2e],
        [
            observed.and_then(|o| o.ttft),
            observed.and_then(|o| o.itl),
            observed.and_then(|o| o.e2e),
        ],
    );
}

/// How long a check of a Model's Secrets holds before it is made again.
pub const RECHECK: Duration = Duration::from_secs(600);

/// What this process did to one Model's children, kept between reconciles
/// (by `namespace/name#uid`; the janitor drops gone Models).
#[derive(Debug, Default)]
pub struct Memo {
    /// Pods created or deleted here that the cache may not show yet.
    pub pods: strata_core::expect::Expectations,
    /// When the Model's own Secret (token, TLS) was last found complete.
    secret_ok_at: Option<Instant>,
    /// When the source's credentials Secret was last found.
    credentials_ok_at: Option<Instant>,
    /// The Model's own Secret must be looked at before it is written (a
    /// create found one, or failed).
    look_at_secret: bool,
    /// Background writes of this Model on their way ([`model_writes`]).
    pub writes: u32,
    /// A background write that failed, for the next reconcile to report.
    pub failure: Option<Error>,
}

impl Memo {
    /// The Model's Secret is to be looked at (GET) before any write.
    pub fn look_at_secret(&mut self) {
        self.secret_ok_at = None;
        self.look_at_secret = true;
    }
}

fn recent(at: Option<Instant>) -> bool {
    at.is_some_and(|t| t.elapsed() < RECHECK)
}

/// Tells the Model that owns `pod` that the pod watch showed it (created,
/// changed or deleted): see [`strata_core::expect::Expectations::observed`].
/// Called for every event of the shared pod cache, before the event wakes
/// the Model; a Model this process has not reconciled yet has nothing to
/// meet.
pub fn observe_pod(ctx: &Context, pod: &Pod) {
    let (Some(ns), Some(pod_name)) = (
        pod.metadata.namespace.as_deref(),
        pod.metadata.name.as_deref(),
    ) else {
        return;
    };
    let now = Instant::now();
    let mut memos = ctx
        .memos
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for owner in pod.owner_references().iter().filter(|o| o.kind == "Model") {
        if let Some(m) = memos.get_mut(&memo_key(&format!("{ns}/{}", owner.name), &owner.uid)) {
            m.pods.observed(pod_name, now);
        }
    }
}

/// The memo's key: a Model re-created under the same name starts afresh.
/// Whether writes of `model`'s reconciles are on their way: its last
/// reconcile's outcome is known only when they have gone.
pub fn writes_on_their_way(ctx: &Context, model: &Model) -> bool {
    let (Some(ns), Some(uid)) = (model.namespace(), model.uid()) else {
        return false;
    };
    let key = memo_key(&format!("{ns}/{}", model.name_any()), &uid);
    ctx.memos
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&key)
        .is_some_and(|m| m.writes > 0)
}

fn memo_key(key: &str, uid: &str) -> String {
    format!("{key}#{uid}")
}

/// What the reconcile read.
struct Seen {
    ns: String,
    name: String,
    uid: String,
    /// namespace/name.
    key: String,
    now: Timestamp,
    /// The Model's pods (the cache, with this process's own creations and
    /// deletions that it does not show yet).
    own: Vec<Arc<Pod>>,
    nodes: Vec<Arc<Node>>,
    pools: Vec<Arc<GPUPool>>,
    /// A Secret the replicas mount that does not exist (described).
    missing_secret: Option<String>,
    /// The status this reconcile's follows: the one this process last
    /// handed to the status writer while it is fresh (the cache may not
    /// show it yet), else the cached one. Reconciles that run before the
    /// cache catches up then compute the same status, not new transition
    /// times (each a write).
    prior: Option<ModelStatus>,
}

/// Phase 1: the Model's Secret, its pods, nodes and pools.
async fn dereference(ctx: &Context, model: &Model, writes: &mut Writes) -> Result<Seen> {
    let ns = model.namespace().ok_or(Error::MissingKey("namespace"))?;
    let name = model.name_any();
    let uid = model.uid().ok_or(Error::MissingKey("uid"))?;
    let memo = memo_key(&format!("{ns}/{name}"), &uid);
    writes.secret = ensure_secret(ctx, model, &ns, &uid, &memo).await?;
    // (Taken before the cache is read: a watch event after it does not
    // meet an expectation for this snapshot; see Expectations::observed.)
    let snapshot = Instant::now();
    let cached: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            // (Borrowed, not `namespace()`: that clones a String per pod of
            // the cluster, the reconcile's costliest line in a profile.)
            p.metadata.namespace.as_deref() == Some(ns.as_str())
                && p.labels().get(labels::MODEL) == Some(&name)
                && p.owner_references().iter().any(|o| o.uid == uid)
        })
        .collect();
    let now = Timestamp::now();
    let own = with_memo(ctx, &memo, |m| {
        m.pods.apply(cached, snapshot, Instant::now(), &Time(now))
    });
    let nodes = ctx.nodes.state();
    let missing_secret = missing_secret(ctx, model, &ns, &memo).await?;
    let prior = ctx
        .model_status
        .latest(&memo)
        .or_else(|| model.status.clone());
    Ok(Seen {
        prior,
        missing_secret,
        key: format!("{ns}/{name}"),
        ns,
        name,
        uid,
        now,
        own,
        nodes,
        pools: ctx.pools.state(),
    })
}

/// The source's credentials Secret, when the Model names one that does
/// not exist: a replica would never start (the kubelet refuses a container
/// whose envFrom Secret is missing) and would hold its GPUs meanwhile.
async fn missing_secret(
    ctx: &Context,
    model: &Model,
    ns: &str,
    memo: &str,
) -> Result<Option<String>> {
    let Some(r) = &model.spec.source.credentials_secret_ref else {
        return Ok(None);
    };
    if with_memo(ctx, memo, |m| recent(m.credentials_ok_at)) {
        return Ok(None);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let found = api
        .get_metadata_opt(&r.name)
        .await
        .map_err(|source| Error::Get {
            kind: "Secret",
            name: r.name.clone(),
            source,
        })?;
    if found.is_some() {
        with_memo(ctx, memo, |m| m.credentials_ok_at = Some(Instant::now()));
    }
    Ok(found
        .is_none()
        .then(|| format!("the Secret {} (spec.source.credentialsSecretRef)", r.name)))
}

/// Runs `f` on the Model's memo (made if missing).
pub(super) fn with_memo<T>(ctx: &Context, key: &str, f: impl FnOnce(&mut Memo) -> T) -> T {
    let mut memos = ctx
        .memos
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(memos.entry(key.to_string()).or_default())
}

/// How many replicas, and what the autoscaler saw.
struct Desire {
    replicas: i32,
    /// This reconcile's SLA evaluation, if one ran or is remembered.
    evaluation: Option<Evaluation>,
    /// The last change this process decided.
    last_decision: Option<ScaleDecision>,
}

/// Phase 2: replicas from the spec (Manual, External) or the SLA autoscaler.
async fn desire(ctx: &Context, model: &Model, seen: &Seen) -> Desire {
    let spec_desired = sla::desired_replicas(&model.spec);
    // The autoscaler's memory is keyed by UID too: a Model re-created under
    // the same name starts afresh.
    let scaler_key = format!("{}#{}", seen.key, seen.uid);
    let desire = if model.spec.autoscaling.mode == AutoscalingMode::Sla {
        autoscale(ctx, model, seen, &scaler_key, spec_desired).await
    } else {
        observe(ctx, model, seen, &scaler_key, spec_desired).await
    };
    ctx.metrics
        .desired_replicas
        .with_label_values(&[&seen.ns, &seen.name])
        .set(i64::from(desire.replicas));
    desire
}

/// The pods that serve: ready and not being deleted.
fn ready_pods(seen: &Seen) -> Vec<&Pod> {
    seen.own
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| view::pod_ready(p) && p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// Manual and External modes: the replicas come from the spec, and the
/// signals are observed all the same (every autoscaling interval), so that
/// status.sla and the TTFT column show what the Model's users get in every
/// mode. What the autoscaler decided or learned in this process is
/// forgotten, so that coming back to SLA mode starts from the status, not
/// from an old decision.
async fn observe(
    ctx: &Context,
    model: &Model,
    seen: &Seen,
    scaler_key: &str,
    spec_desired: i32,
) -> Desire {
    let ready_pods = ready_pods(seen);
    let mut scaler = ctx
        .scalers
        .lock()
        .await
        .remove(scaler_key)
        .unwrap_or_default();
    scaler.forget_decisions();
    super::scale::evaluate(&mut scaler, model, &ready_pods, spec_desired).await;
    let evaluation = scaler.last.clone();
    ctx.scalers
        .lock()
        .await
        .insert(scaler_key.to_string(), scaler);
    Desire {
        replicas: spec_desired,
        evaluation,
        last_decision: None,
    }
}

async fn autoscale(
    ctx: &Context,
    model: &Model,
    seen: &Seen,
    scaler_key: &str,
    spec_desired: i32,
) -> Desire {
    let (min, max) = (
        model.spec.min_replicas.max(0),
        model.spec.max_replicas.max(model.spec.min_replicas),
    );
    let ready_pods = ready_pods(seen);
    // Take this Model's scaler out so that scraping does not hold the lock.
    let mut scaler = ctx
        .scalers
        .lock()
        .await
        .remove(scaler_key)
        .unwrap_or_default();
    // The count this process decided last; the status in the cache can lag
    // behind its own write (a reconcile woken by the pods it just deleted
    // would otherwise read the old count and create them again).
    let current = scaler
        .desired
        .or_else(|| model.status.as_ref().and_then(|s| s.desired_replicas))
        .unwrap_or(spec_desired)
        .clamp(min, max);
    // The activator holds a request for this Model: wake it.
    if let Some(at) = model.annotations().get(crate::activator::WAKE_ANNOTATION)
        && scaler.wake(at, 600.0)
    {
        tracing::info!(model = %seen.key, "the activator holds a request: evaluating now");
    }
    let (desired, evaluated) =
        super::scale::evaluate(&mut scaler, model, &ready_pods, current).await;
    let evaluation = scaler.last.clone();
    scaler.desired = Some(desired);
    if let (true, Some(e)) = (evaluated, &evaluation)
        && desired != current
    {
        scaler.last_decision = Some(sla::decision_status(e));
    }
    let last_decision = scaler.last_decision.clone();
    ctx.scalers
        .lock()
        .await
        .insert(scaler_key.to_string(), scaler);
    if let (true, Some(e)) = (evaluated, &evaluation) {
        ctx.metrics
            .autoscaler_decisions
            .with_label_values(&[e.decision.reason.as_str()])
            .inc();
        if desired != current {
            let reason = if desired > current {
                "ScaledUp"
            } else {
                "ScaledDown"
            };
            publish(
                ctx,
                model,
                EventType::Normal,
                reason,
                "Scale",
                e.decision.message.clone(),
            )
            .await;
            tracing::info!(model = %seen.key, from = current, to = desired, signal = %e.decision.signal, "{}", e.decision.message);
        }
    }
    Desire {
        replicas: desired,
        evaluation,
        last_decision,
    }
}

/// A pool the Model lists that exists, with its template's hash.
struct PoolTemplate<'a> {
    pref: &'a strata_crds::model::PoolPreference,
    pool: Arc<GPUPool>,
    hash: String,
}

impl PoolTemplate<'_> {
    fn template<'b>(
        &'b self,
        model: &'b Model,
        settings: &'b template::Settings,
    ) -> ReplicaTemplate<'b> {
        ReplicaTemplate {
            model,
            pool: self.pref,
            tolerations: &self.pool.spec.tolerations,
            gpu_resource: &self.pool.spec.gpu_resource_name,
            settings,
        }
    }
}

/// What phase 3 decided.
struct Plan<'a> {
    desired: i32,
    templates: Vec<PoolTemplate<'a>>,
    /// The Model's pods as the rollout planner sees them.
    replicas: Vec<Replica>,
    rollout: rollout::Plan,
}

impl Plan<'_> {
    fn hashes(&self) -> BTreeMap<String, String> {
        self.templates
            .iter()
            .map(|t| (t.pref.name.clone(), t.hash.clone()))
            .collect()
    }
}

/// Phase 3 (pure but for the settings): the templates of the listed pools
/// that exist, and the rollout plan.
fn plan<'a>(ctx: &Context, model: &'a Model, seen: &Seen, desired: i32) -> Result<Plan<'a>> {
    let settings = &ctx.config.template;
    let mut templates = Vec::new();
    for pref in &model.spec.pools {
        let Some(pool) = seen.pools.iter().find(|p| p.name_any() == pref.name) else {
            continue;
        };
        let hash = ReplicaTemplate {
            model,
            pool: pref,
            tolerations: &pool.spec.tolerations,
            gpu_resource: &pool.spec.gpu_resource_name,
            settings,
        }
        .hash()
        .map_err(|source| Error::Template {
            model: seen.name.clone(),
            pool: pref.name.clone(),
            source,
        })?;
        templates.push(PoolTemplate {
            pref,
            pool: pool.clone(),
            hash,
        });
    }
    let replicas: Vec<Replica> = seen.own.iter().map(|p| to_replica(p, seen)).collect();
    let target = Target {
        replicas: desired.max(0) as usize,
        hashes: templates
            .iter()
            .map(|t| (t.pref.name.clone(), t.hash.clone()))
            .collect(),
        pool_rank: model
            .spec
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect(),
        max_surge: model.spec.rollout.max_surge.max(0) as usize,
        max_unavailable: model.spec.rollout.max_unavailable.max(0) as usize,
        unschedulable_grace: ctx.config.unschedulable_grace,
        node_lost_grace: ctx.config.node_lost_grace,
    };
    let mut rollout = rollout::plan(&replicas, &target);
    if seen.missing_secret.is_some() {
        rollout.create = 0;
    }
    Ok(Plan {
        desired,
        templates,
        replicas,
        rollout,
    })
}

fn seconds_since(t: Option<&Time>, now: Timestamp) -> u64 {
    t.map(|t| (now - t.0).get_seconds().max(0) as u64)
        .unwrap_or(0)
}

fn to_replica(pod: &Pod, seen: &Seen) -> Replica {
    let now = seen.now;
    let labels = pod.labels();
    let status = pod.status.as_ref();
    let node = view::pod_node(pod);
    // The pod's node in the snapshot (a scan of a few hundred names per
    // replica is cheaper than indexing every node per reconcile).
    let on = node.as_deref().and_then(|n| {
        seen.nodes
            .iter()
            .find(|x| x.metadata.name.as_deref() == Some(n))
    });
    let unschedulable_for = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter().find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        })
        .map(|c| seconds_since(c.last_transition_time.as_ref(), now));
    Replica {
        name: pod.name_any(),
        pool: labels.get(labels::POOL).cloned().unwrap_or_default(),
        hash: labels
            .get(labels::TEMPLATE_HASH)
            .cloned()
            .unwrap_or_default(),
        ready: view::pod_ready(pod),
        phase: status
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into()),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        forced: pod.metadata.deletion_grace_period_seconds == Some(0),
        node_gone: node.is_some() && on.is_none(),
        node_not_ready_for: on.and_then(|n| view::node_not_ready_for(n, now.as_second())),
        node,
        unschedulable_for,
        age: seconds_since(pod.metadata.creation_timestamp.as_ref(), now),
    }
}

/// What phase 4a deleted.
#[derive(Default)]
struct Deleted {
    pods: HashSet<String>,
    /// Those among them deleted without grace.
    forced: HashSet<String>,
    /// Failed replicas among them.
    failures: usize,
}

/// Phase 4a: the deletions of the plan, each with an Event saying why
/// (sent in the background: [`model_writes`]).
async fn delete_replicas(
    ctx: &Context,
    seen: &Seen,
    plan: &Plan<'_>,
    deleted: &mut Deleted,
    writes: &mut Writes,
) {
    for (pod, reason) in &plan.rollout.delete {
        let params = if reason.without_grace() {
            deleted.forced.insert(pod.clone());
            DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            }
        } else {
            DeleteParams::default()
        };
        deleted.pods.insert(pod.clone());
        if *reason == DeleteReason::Failed {
            deleted.failures += 1;
        }
        writes.deletes.push(model_writes::Delete {
            pod: pod.clone(),
            reason: *reason,
            params,
            event: deletion_note(pod, *reason, plan.desired),
        });
    }
    if !plan.rollout.avoid_nodes.is_empty() {
        let mut avoid = ctx.avoid.lock().await;
        let entry = avoid.entry(seen.key.clone()).or_default();
        for n in &plan.rollout.avoid_nodes {
            entry.push((n.clone(), Instant::now()));
        }
    }
}

/// The Event of a deletion. Pure.
fn deletion_note(pod: &str, reason: DeleteReason, desired: i32) -> (EventType, String) {
    match reason {
        DeleteReason::Failed => (
            EventType::Warning,
            format!("replica {pod} failed; replacing it"),
        ),
        DeleteReason::NodeGone => (
            EventType::Warning,
            format!("the node of replica {pod} is gone; placing it again"),
        ),
        DeleteReason::Stranded => (
            EventType::Normal,
            format!(
                "replica {pod} was being deleted when its node went; removed without waiting for the node"
            ),
        ),
        DeleteReason::NodeNotReady => (
            EventType::Warning,
            format!(
                "the node of replica {pod} has not been Ready past the grace period; placing it elsewhere"
            ),
        ),
        DeleteReason::Unschedulable => (
            EventType::Warning,
            format!("the scheduler could not bind replica {pod}; placing it elsewhere"),
        ),
        DeleteReason::Outdated => (
            EventType::Normal,
            format!("replaced replica {pod} (old template)"),
        ),
        DeleteReason::ScaleDown => (
            EventType::Normal,
            format!("removed replica {pod} (scaling to {desired})"),
        ),
    }
}

/// What phase 4b created.
#[derive(Default)]
struct Created {
    pods: Vec<Arc<Pod>>,
    /// Why some replicas could not be placed.
    unplaced: Option<String>,
}

/// Phase 4b: place the plan's new replicas and decide their pods. Placement
/// is decided one Model at a time under the placement lock, and the chosen
/// GPUs are reserved in its ledger, under the pod's name (chosen here),
/// before the lock is released (the ledger counts pods decided but not yet
/// in the cache). The pods are created at once in the background
/// ([`model_writes`]), which drops the reservation of a pod whose create
/// failed; no lock is held meanwhile (an API round trip per pod under one
/// lock serialized every Model's creations: at 1,000 Models the
/// convergence took as long as 1,176 sequential POSTs).
async fn place_and_create(
    ctx: &Context,
    model: &Model,
    seen: &Seen,
    plan: &Plan<'_>,
    deleted: &Deleted,
    created: &mut Created,
    writes: &mut Writes,
) -> Result<()> {
    ctx.metrics
        .unplaceable
        .with_label_values(&[&seen.ns, &seen.name])
        .set(0);
    if plan.rollout.create == 0 {
        return Ok(());
    }
    let avoid_nodes: Vec<String> = {
        let mut avoid = ctx.avoid.lock().await;
        let entry = avoid.entry(seen.key.clone()).or_default();
        entry.retain(|(_, at)| at.elapsed() < Duration::from_secs(120));
        entry.iter().map(|(n, _)| n.clone()).collect()
    };
    let request = placement_request(model, plan, deleted, avoid_nodes);
    let pool_views: Vec<placement::PoolView> = plan
        .templates
        .iter()
        .map(|t| view::pool_view(&t.pool))
        .collect();
    let (outcome, creates) =
        decide_and_reserve(ctx, model, seen, plan, &pool_views, &request).await?;
    created.pods = creates.iter().map(|c| c.pod.clone()).collect();
    writes.creates = creates;
    if outcome.unplaced > 0 {
        let msg = unplaced_message(model, plan, &outcome);
        ctx.metrics
            .unplaceable
            .with_label_values(&[&seen.ns, &seen.name])
            .set(outcome.unplaced as i64);
        publish(
            ctx,
            model,
            EventType::Warning,
            "Unplaceable",
            "Place",
            msg.clone(),
        )
        .await;
        created.unplaced = Some(msg);
    }
    Ok(())
}

/// Decides where the new replicas go, under the placement lock, makes
/// their pods (named) and reserves their GPUs in the ledger before
/// releasing it. A pod that cannot be made reserves nothing.
///
/// The nodes' view is built from a snapshot of the pod cache before the
/// lock (every pod's claim: the costly part), and under the lock only
/// corrected by the pods that changed since (a second snapshot, compared
/// by identity) and the ledger's reservations: the view placement sees is
/// exact, and Models wait for each other only for the decision itself.
async fn decide_and_reserve(
    ctx: &Context,
    model: &Model,
    seen: &Seen,
    plan: &Plan<'_>,
    pool_views: &[placement::PoolView],
    request: &Request,
) -> Result<(placement::Outcome, Vec<model_writes::Create>)> {
    let own_uids: HashSet<String> = seen.own.iter().filter_map(|p| p.uid()).collect();
    let own_names: HashSet<String> = seen.own.iter().map(|p| p.name_any()).collect();
    let others = |p: &&Arc<PodGpus>| {
        p.metadata
            .uid
            .as_ref()
            .is_none_or(|u| !own_uids.contains(u))
    };
    let before = ctx.gpu_pods.state();
    let before_ids: HashSet<usize> = before.iter().map(|p| Arc::as_ptr(p).addr()).collect();
    let mut node_views = node_views(seen, &before, &own_uids);
    let mut ledger = ctx.placement.lock().await;
    let now_cached = ctx.gpu_pods.state();
    let now_ids: HashSet<usize> = now_cached.iter().map(|p| Arc::as_ptr(p).addr()).collect();
    // (Both snapshots hold their pods: an address names one pod version.)
    for p in before.iter().filter(others) {
        if !now_ids.contains(&Arc::as_ptr(p).addr()) {
            view::count_claim(&mut node_views, &p.claim, -1);
        }
    }
    for p in now_cached.iter().filter(others) {
        if !before_ids.contains(&Arc::as_ptr(p).addr()) {
            view::count_claim(&mut node_views, &p.claim, 1);
        }
    }
    let cached_names: HashSet<&str> = now_cached
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    // Forget pods the cache has caught up with, this Model's pods that
    // are gone (its list has those on their way too), and anything old.
    // (Another reconcile's reservations are another Model's: kept.)
    let now = Instant::now();
    ledger.retain(|pod, p| {
        p.holds(cached_names.contains(pod.as_str()), now)
            && (p.model != seen.key || own_names.contains(pod))
    });
    // The reservations of other Models' pods (this Model's are in its list).
    for (_, p) in ledger.iter().filter(|(name, _)| !own_names.contains(*name)) {
        if let Some(v) = node_views.iter_mut().find(|v| v.name == p.node) {
            *v.used.entry(p.resource.clone()).or_default() += p.gpus;
        }
    }
    let outcome = placement::place(&node_views, pool_views, request);
    let mut creates = Vec::with_capacity(outcome.assignments.len());
    for a in &outcome.assignments {
        let Some(t) = plan.templates.iter().find(|t| t.pref.name == a.pool) else {
            continue;
        };
        let mut pod = t
            .template(model, &ctx.config.template)
            .pod(&a.node)
            .map_err(|source| Error::Template {
                model: seen.name.clone(),
                pool: a.pool.clone(),
                source,
            })?;
        let mut random = [0u8; 5];
        getrandom::fill(&mut random).map_err(|e| Error::Random(e.into()))?;
        let prefix = pod.metadata.generate_name.take().unwrap_or_default();
        pod.metadata.name = Some(template::pod_name(&prefix, random));
        creates.push((t, pod, a.clone()));
    }
    let now = Instant::now();
    let creates = creates
        .into_iter()
        .map(|(t, pod, a)| {
            ledger.insert(
                pod.name_any(),
                Planned {
                    model: seen.key.clone(),
                    node: a.node.clone(),
                    resource: t.pool.spec.gpu_resource_name.clone(),
                    gpus: a.gpus,
                    at: now,
                    sending: true,
                },
            );
            model_writes::Create {
                pod: Arc::new(pod),
                assignment: a,
            }
        })
        .collect();
    Ok((outcome, creates))
}

/// The nodes as placement sees them from a pod cache snapshot: every
/// other pod's GPUs, and this Model's from its own list (which has those
/// on their way too).
fn node_views<'a>(
    seen: &'a Seen,
    cached: &[Arc<PodGpus>],
    own_uids: &HashSet<String>,
) -> Vec<placement::NodeView<'a>> {
    // Borrowed from the snapshot (thousands of claims), not cloned.
    let pods = cached
        .iter()
        .filter(|p| {
            p.metadata
                .uid
                .as_ref()
                .is_none_or(|u| !own_uids.contains(u))
        })
        .map(|p| Cow::Borrowed(&p.claim))
        .chain(seen.own.iter().map(|p| Cow::Owned(GpuClaim::of(p))));
    view::node_views(seen.nodes.iter().map(|n| n.as_ref()), pods)
}

/// What to ask placement for: the plan's new replicas over every listed
/// pool (existing or not, so that the reason names a missing one), with the
/// live replicas per pool and node. Pure.
fn placement_request(
    model: &Model,
    plan: &Plan<'_>,
    deleted: &Deleted,
    avoid_nodes: Vec<String>,
) -> Request {
    let live: Vec<&Replica> = plan
        .replicas
        .iter()
        .filter(|r| !r.terminating && !deleted.pods.contains(&r.name))
        .collect();
    let mut per_node: BTreeMap<String, i64> = BTreeMap::new();
    for r in &live {
        if let Some(n) = &r.node {
            *per_node.entry(n.clone()).or_default() += 1;
        }
    }
    Request {
        preferences: model
            .spec
            .pools
            .iter()
            .map(|p| Preference {
                pool: p.name.clone(),
                gpus: template::gpus_on(model, p),
                max_replicas: p.max_replicas.map(i64::from),
                existing: live.iter().filter(|r| r.pool == p.name).count() as i64,
            })
            .collect(),
        replicas: plan.rollout.create,
        existing_per_node: per_node,
        avoid_nodes,
    }
}

/// Why replicas could not be placed, for people. Pure.
fn unplaced_message(model: &Model, plan: &Plan<'_>, outcome: &placement::Outcome) -> String {
    if plan.templates.is_empty() {
        return format!(
            "{} replica(s) cannot be placed: none of the GPUPools {:?} exists",
            outcome.unplaced,
            model
                .spec
                .pools
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
        );
    }
    let gpus = plan
        .templates
        .first()
        .map(|t| template::gpus_on(model, t.pref))
        .unwrap_or(i64::from(model.spec.gpus_per_replica));
    outcome.explain(gpus)
}

/// What became of the Model's other children, for its status.
#[derive(Debug, Default)]
struct Children {
    /// A Service of the Model's name exists that it does not own.
    service_conflict: bool,
    /// Why the InferencePool the Model asks for is not there.
    inference_pool: Option<strata_core::inference_pool::Problem>,
}

/// Phase 4d: the Model's InferencePool, when it asks for one (see
/// [`super::inference_pool`]); a Warning Event the first time it cannot
/// have it (not at every reconcile). Returns why it cannot.
async fn apply_inference_pool(
    ctx: &Context,
    model: &Model,
    seen: &Seen,
) -> Result<Option<strata_core::inference_pool::Problem>> {
    use super::inference_pool::Outcome;
    let routing = strata_core::inference_pool::wanted(model);
    let outcome = super::inference_pool::apply(
        &ctx.inference_pools,
        &ctx.client,
        &seen.ns,
        &seen.name,
        &seen.uid,
        routing,
    )
    .await?;
    let key = format!("{}/{}#{}", seen.ns, seen.name, seen.uid);
    let problem = outcome.as_ref().err();
    if ctx.inference_pools.first_warning(&key, problem)
        && let Some(problem) = problem
    {
        let note = problem.message(&seen.name);
        tracing::warn!(namespace = %seen.ns, name = %seen.name, reason = problem.reason(), "{note}");
        publish(
            ctx,
            model,
            EventType::Warning,
            problem.reason(),
            "InferencePool",
            note,
        )
        .await;
    }
    let label = match outcome {
        Ok(Outcome::None) => return Ok(None),
        Err(problem) => return Ok(Some(problem)),
        Ok(Outcome::Unchanged) => "unchanged",
        Ok(Outcome::Applied) => "applied",
        Ok(Outcome::Deleted) => "deleted",
    };
    ctx.metrics
        .child_applies
        .with_label_values(&["InferencePool", label])
        .inc();
    Ok(None)
}

/// Phase 4c: the Model's Service, unless a foreign Service has its name.
/// Returns true on such a conflict.
async fn apply_service(ctx: &Context, model: &Model, seen: &Seen) -> Result<bool> {
    let (ns, name) = (seen.ns.as_str(), seen.name.as_str());
    let mut svc_labels = template::model_selector(name);
    svc_labels.insert(labels::MANAGED_BY.into(), labels::MANAGER.into());
    svc_labels.insert(labels::APP_NAME.into(), "strata-model".into());
    let svc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": svc_labels,
            "ownerReferences": [template::controller_ref("Model", &model.name_any(), &seen.uid)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": template::model_selector(name),
            "ports": [
                {"name": "http", "port": 80, "targetPort": SIDECAR_HTTP_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": SIDECAR_ADMIN_PORT, "targetPort": SIDECAR_ADMIN_PORT, "protocol": "TCP"},
            ],
        },
    });
    let cached = ctx.services.get(&ObjectRef::new(name).within(ns));
    let key = format!("{ns}/{name}");
    if cached.is_some() {
        ctx.service_creates.seen(&key);
    }
    if cached
        .as_ref()
        .is_some_and(|s| service_matches(s, &svc, &seen.uid))
    {
        ctx.metrics
            .child_applies
            .with_label_values(&["Service", "unchanged"])
            .inc();
        return Ok(false);
    }
    if cached.is_none() {
        // A new Model's Service: one create, no look first (a Service of
        // that name that is not in the cache, ours or someone else's,
        // makes the create fail, and the look below decides), in the
        // background (see super::service_create: ClusterIPs are allocated
        // one at a time by the API server).
        match ctx.service_creates.next(&key) {
            service_create::Next::Start => {
                spawn_service_create(ctx, ObjectRef::from_obj(model), key, svc);
                return Ok(false);
            }
            service_create::Next::Wait => return Ok(false),
            service_create::Next::Look => {
                if create_service(&ctx.client, ns, name, &svc).await? {
                    ctx.metrics
                        .child_applies
                        .with_label_values(&["Service", "created"])
                        .inc();
                    return Ok(false);
                }
            }
        }
    }
    let applied = super::apply_owned_service(&ctx.client, ns, name, &seen.uid, &svc).await?;
    ctx.metrics
        .child_applies
        .with_label_values(&["Service", "applied"])
        .inc();
    Ok(!applied)
}

/// Creates the Model's Service in a task (when a slot is free): the
/// Service's watch wakes the Model when it shows; a failure or conflict
/// wakes it through the controller's channel to look.
fn spawn_service_create(
    ctx: &Context,
    model: ObjectRef<Model>,
    key: String,
    svc: serde_json::Value,
) {
    let background = ctx.service_creates.clone();
    let client = ctx.client.clone();
    let applies = ctx.metrics.child_applies.clone();
    tokio::spawn(async move {
        let Ok(_slot) = background.slots.clone().acquire_owned().await else {
            return;
        };
        let (ns, name) = key.split_once('/').unwrap_or_default();
        let created = match create_service(&client, ns, name, &svc).await {
            Ok(created) => created,
            Err(e) => {
                tracing::warn!(model = %key, error = %e, "creating the Model's Service failed; the Model looks again");
                false
            }
        };
        applies
            .with_label_values(&["Service", if created { "created" } else { "exists" }])
            .inc();
        background.finished(&key, created, model);
    });
}

/// Creates the Model's Service; false when one of that name exists.
async fn create_service(
    client: &Client,
    ns: &str,
    name: &str,
    svc: &serde_json::Value,
) -> Result<bool> {
    let write_err = |source| Error::Write {
        kind: "Service",
        name: name.to_string(),
        source,
    };
    let svc: k8s_openapi::api::core::v1::Service =
        serde_json::from_value(svc.clone()).map_err(|e| write_err(kube::Error::SerdeError(e)))?;
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), ns);
    let params = PostParams {
        field_manager: Some(labels::FIELD_MANAGER.to_string()),
        ..PostParams::default()
    };
    match api.create(&params, &svc).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(write_err(e)),
    }
}

/// Whether a cached Service already is what `desired` (the applied JSON)
/// asks: owned by `uid`, its labels, type, selector and ports. Pure.
pub fn service_matches(
    cached: &k8s_openapi::api::core::v1::Service,
    desired: &serde_json::Value,
    uid: &str,
) -> bool {
    let Ok(have) = serde_json::to_value(cached) else {
        return false;
    };
    let owned = cached.owner_references().iter().any(|o| o.uid == uid);
    let labels_in = desired["metadata"]["labels"]
        .as_object()
        .is_some_and(|want| {
            want.iter()
                .all(|(k, v)| have["metadata"]["labels"].get(k) == Some(v))
        });
    let ports = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["spec"]["ports"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| json!([p["name"], p["port"], p["targetPort"], p["protocol"]]))
                    .collect()
            })
            .unwrap_or_default()
    };
    owned
        && labels_in
        && have["spec"]["type"] == desired["spec"]["type"]
        && have["spec"]["selector"] == desired["spec"]["selector"]
        && ports(&have) == ports(desired)
}

/// Phase 5 (pure): the Model's status from what the reconcile saw and did,
/// and how soon to look again. Conditions keep their transition times, and
/// the SLA its observation time, from the status it follows
/// ([`Seen::prior`]).
fn status(
    model: &Model,
    seen: &Seen,
    desire: &Desire,
    plan: &Plan<'_>,
    deleted: &Deleted,
    created: &Created,
    children: &Children,
) -> (ModelStatus, Pace) {
    let desired = desire.replicas;
    let current: Vec<&Pod> = seen
        .own
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none() && !deleted.pods.contains(&p.name_any())
        })
        .chain(created.pods.iter())
        .map(AsRef::as_ref)
        .collect();
    let hashes = plan.hashes();
    let placement = status::placement(current.iter().copied());
    let ready = placement.iter().filter(|p| p.ready).count() as i32;
    let updated = placement
        .iter()
        .filter(|p| hashes.get(&p.pool) == p.template_hash.as_ref())
        .count() as i32;
    let pool_names: Vec<&str> = model
        .spec
        .pools
        .iter()
        .filter(|pref| placement.iter().any(|p| p.pool == pref.name))
        .map(|pref| pref.name.as_str())
        .collect();
    let deadline = strata_core::duration::parse(&model.spec.rollout.progress_deadline)
        .unwrap_or(Duration::from_secs(900));
    let facts = Facts {
        name: seen.name.clone(),
        desired,
        replicas: placement.len() as i32,
        ready,
        updated,
        rolling: plan.rollout.rolling,
        deleted: plan.rollout.delete.len(),
        failures: deleted.failures,
        unplaced: created.unplaced.clone(),
        service_conflict: children.service_conflict,
        inference_pool: children.inference_pool.clone(),
        missing_secret: seen.missing_secret.clone(),
        no_pool: plan.templates.is_empty() && !model.spec.pools.is_empty(),
        acted: plan.rollout.create > 0 || !plan.rollout.delete.is_empty(),
        stalled: status::stalled(&plan.replicas, &hashes, deadline),
        progress_deadline: model.spec.rollout.progress_deadline.clone(),
    };
    let prior = seen.prior.as_ref();
    let existing = prior.map(|s| s.conditions.clone()).unwrap_or_default();
    let pace = facts.pace();
    let status = ModelStatus {
        observed_generation: model.metadata.generation,
        conditions: conditions::merge(
            &existing,
            &status::model_conditions(&facts),
            model.metadata.generation,
            &Time(seen.now),
        ),
        replicas: facts.replicas,
        ready_replicas: ready,
        updated_replicas: updated,
        desired_replicas: Some(desired),
        selector: Some(template::selector_string(&seen.name)),
        pools: (!pool_names.is_empty()).then(|| pool_names.join(",")),
        sla: match &desire.evaluation {
            Some(e) => Some(sla::unchanged_keeps_time(
                sla::sla_status(model, e),
                prior.and_then(|s| s.sla.as_ref()),
                sla::OBSERVED_AT_REFRESH,
            )),
            None => prior.and_then(|s| s.sla.clone()),
        },
        // The last change this process decided, else the one in status.
        last_scale_decision: desire
            .last_decision
            .clone()
            .or_else(|| prior.and_then(|s| s.last_scale_decision.clone())),
        // status.energy and status.cost belong to the energy accountant
        // (its own field manager): left out here, so neither overwrites the
        // other.
        energy: None,
        cost: None,
        adapters: status::adapters(seen.own.iter().map(AsRef::as_ref)),
        placement,
    };
    (status, pace)
}

/// When to look again.
fn next_look(ctx: &Context, model: &Model, pace: Pace) -> Duration {
    let (_, _, interval, _, _) = sla::policy_and_targets(model);
    look_after(pace, ctx.config.resync, interval)
}

/// When to look again (pure): 5 s while converging, 30 s while blocked,
/// else at the resync interval; and at least every autoscaling interval in
/// every mode (the SLA autoscaler decides then; in Manual and External
/// modes status.sla is observed then).
fn look_after(pace: Pace, resync: Duration, interval: f64) -> Duration {
    let after = match pace {
        Pace::Busy => Duration::from_secs(5),
        Pace::Waiting => Duration::from_secs(30).min(resync),
        Pace::Settled => resync,
    };
    after.min(Duration::from_secs_f64(interval.max(1.0)))
}

/// Ensures the Secret of the Model's replicas (every Model has one; the
/// sidecars mount it): the adapter API token (random, 32 bytes, hex; made
/// once), and the sidecars' admin port certificate for the Model's server
/// name (`template::sidecar_server_name`) with its key and the CA
/// certificate, issued again when it expires within 30 days or is not the
/// current CA's (`pki::needs_reissue`). The Adapter controller reads the
/// token to call the sidecars. Sidecars pick up a new certificate without
/// a restart (the mounted files are re-read when they change).
async fn ensure_secret(
    ctx: &Context,
    model: &Model,
    ns: &str,
    uid: &str,
    memo: &str,
) -> Result<Option<Secret>> {
    let (recent_ok, look) = with_memo(ctx, memo, |m| (recent(m.secret_ok_at), m.look_at_secret));
    if recent_ok {
        ctx.metrics
            .child_applies
            .with_label_values(&["Secret", "unchanged"])
            .inc();
        return Ok(None);
    }
    // A Model never reconciled before (no status) has no Secret yet: it is
    // created in the background with the first replicas, before them,
    // without looking first (one request instead of two for each new
    // Model; if it does exist, the create's conflict makes the next
    // reconcile look).
    if model.status.is_none() && !look {
        let secret = new_secret(ctx, model, ns, uid)?;
        with_memo(ctx, memo, |m| m.secret_ok_at = Some(Instant::now()));
        return Ok(Some(secret));
    }
    let settled = ensure_secret_now(ctx, model, ns, uid).await?;
    ctx.metrics
        .child_applies
        .with_label_values(&["Secret", "checked"])
        .inc();
    if settled {
        with_memo(ctx, memo, |m| {
            m.secret_ok_at = Some(Instant::now());
            m.look_at_secret = false;
        });
    }
    Ok(None)
}

/// A random token for the sidecars' admin API.
fn new_token() -> Result<k8s_openapi::ByteString> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.into()))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(k8s_openapi::ByteString(token.into_bytes()))
}

/// The Model's Secret's TLS entries, issued now by the operator's CA.
fn issue_tls(
    ctx: &Context,
    model: &Model,
    ns: &str,
) -> Result<BTreeMap<String, k8s_openapi::ByteString>> {
    let server_name = template::sidecar_server_name(ns, &model.name_any());
    crate::pki::sidecar_entries(&ctx.config.ca, &server_name, std::time::SystemTime::now()).map_err(
        |source| Error::Pki {
            name: server_name.clone(),
            source,
        },
    )
}

/// A new Model's Secret: the sidecars' admin token and TLS certificate.
fn new_secret(ctx: &Context, model: &Model, ns: &str, uid: &str) -> Result<Secret> {
    let mut data = issue_tls(ctx, model, ns)?;
    data.insert(template::ADAPTER_TOKEN_KEY.into(), new_token()?);
    Ok(Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(template::adapter_token_secret(&model.name_any())),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([
                (labels::MANAGED_BY.to_string(), labels::MANAGER.to_string()),
                (labels::MODEL.to_string(), model.name_any()),
            ])),
            owner_references: Some(vec![template::controller_ref(
                "Model",
                &model.name_any(),
                uid,
            )]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    })
}

/// [`ensure_secret`]'s look and write: reads the Secret, fills in a missing
/// token and renews the certificate when due, or creates it when missing;
/// false when a concurrent write got in the way (looked at again next
/// time).
async fn ensure_secret_now(ctx: &Context, model: &Model, ns: &str, uid: &str) -> Result<bool> {
    let name = template::adapter_token_secret(&model.name_any());
    let server_name = template::sidecar_server_name(ns, &model.name_any());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let write_err = |source| Error::Write {
        kind: "Secret",
        name: name.clone(),
        source,
    };
    let existing = api.get_opt(&name).await.map_err(|source| Error::Get {
        kind: "Secret",
        name: name.clone(),
        source,
    })?;
    let Some(mut existing) = existing else {
        let secret = new_secret(ctx, model, ns, uid)?;
        return match api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(write_err(e)),
        };
    };
    let data = existing.data.get_or_insert_with(BTreeMap::new);
    let has_token = data
        .get(template::ADAPTER_TOKEN_KEY)
        .is_some_and(|t| !t.0.is_empty());
    let reissue = crate::pki::needs_reissue(
        &ctx.config.ca,
        data,
        &server_name,
        std::time::SystemTime::now(),
    );
    if has_token && !reissue {
        return Ok(true);
    }
    if !has_token {
        data.insert(template::ADAPTER_TOKEN_KEY.into(), new_token()?);
    }
    if reissue {
        data.extend(issue_tls(ctx, model, ns)?);
    }
    existing.string_data = None;
    // Optimistic concurrency (resourceVersion): on a conflict the next
    // reconcile looks again.
    match api.replace(&name, &PostParams::default(), &existing).await {
        Ok(_) => {
            tracing::info!(model = %model.name_any(), namespace = %ns, secret = %name, "issued the sidecars' admin TLS certificate");
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(write_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_service_matches_only_when_owned_and_the_same() {
        let desired = json!({
            "metadata": {"name": "chat", "labels": {"strata.ai/model": "chat"}},
            "spec": {"type": "ClusterIP", "selector": {"strata.ai/model": "chat"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        });
        let cached = |uid: &str, port: i32, extra_label: bool| {
            let mut labels = serde_json::Map::new();
            labels.insert("strata.ai/model".into(), json!("chat"));
            if extra_label {
                labels.insert("team".into(), json!("a"));
            }
            serde_json::from_value::<k8s_openapi::api::core::v1::Service>(json!({
                "metadata": {"name": "chat", "labels": labels,
                    "ownerReferences": [{"apiVersion": "strata.ai/v1alpha1", "kind": "Model", "name": "chat", "uid": uid}]},
                "spec": {"type": "ClusterIP", "selector": {"strata.ai/model": "chat"}, "clusterIP": "10.0.0.1",
                         "ports": [{"name": "http", "port": port, "targetPort": 8080, "protocol": "TCP"}]},
            }))
            .expect("service")
        };
        // The API server's own fields (clusterIP) and other labels aside.
        assert!(service_matches(&cached("u1", 80, true), &desired, "u1"));
        assert!(
            !service_matches(&cached("u2", 80, false), &desired, "u1"),
            "another owner"
        );
        assert!(
            !service_matches(&cached("u1", 81, false), &desired, "u1"),
            "a changed port"
        );
    }

    #[test]
    fn every_mode_is_looked_at_every_autoscaling_interval() {
        let resync = Duration::from_secs(300);
        for (pace, interval, want) in [
            (Pace::Settled, 15.0, 15),
            (Pace::Settled, 600.0, 300),
            (Pace::Waiting, 15.0, 15),
            (Pace::Waiting, 60.0, 30),
            (Pace::Busy, 15.0, 5),
            (Pace::Busy, 0.0, 1),
        ] {
            assert_eq!(
                look_after(pace, resync, interval),
                Duration::from_secs(want),
                "{pace:?} with interval {interval}"
            );
        }
    }

    #[test]
    fn every_deletion_says_why_and_failures_warn() {
        for (reason, warning, words) in [
            (DeleteReason::Failed, true, "failed"),
            (DeleteReason::NodeGone, true, "node"),
            (DeleteReason::Stranded, false, "its node went"),
            (DeleteReason::NodeNotReady, true, "not been Ready"),
            (DeleteReason::Unschedulable, true, "scheduler"),
            (DeleteReason::Outdated, false, "old template"),
            (DeleteReason::ScaleDown, false, "scaling to 2"),
        ] {
            let (ty, note) = deletion_note("m-abc", reason, 2);
            assert_eq!(ty == EventType::Warning, warning, "{reason:?}");
            assert!(note.contains("m-abc") && note.contains(words), "{note}");
        }
    }
}
