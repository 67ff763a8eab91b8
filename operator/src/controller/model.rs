//! The Model controller: dereference (read pods, nodes, pools) -> plan
//! (pure: desired replicas, rollout, placement, templates) -> apply (delete,
//! create pods, apply the Service) -> status.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use strata_crds::GPUPool;
use strata_crds::model::{AutoscalingMode, Model, ModelSpec, ModelStatus, ReplicaPlacement};

use super::{Context, Planned};
use crate::conditions::{self, Set};
use crate::error::{Error, Result};
use crate::placement::{self, Preference, Request};
use crate::rollout::{self, DeleteReason, Replica, Target};
use crate::template::{self, ReplicaTemplate, SIDECAR_ADMIN_PORT, SIDECAR_HTTP_PORT};
use crate::{labels, view};

const CONTROLLER: &str = "model";

/// Replicas from the spec: spec.replicas (written by people, `kubectl
/// scale`, HPA or KEDA), else minReplicas, within the bounds. Manual and
/// External modes run this; in SLA mode it is only the autoscaler's starting
/// point when status has no desiredReplicas yet.
pub fn desired_replicas(spec: &ModelSpec) -> i32 {
    let min = spec.min_replicas.max(0);
    let max = spec.max_replicas.max(min);
    let base = match spec.autoscaling.mode {
        AutoscalingMode::Manual | AutoscalingMode::External | AutoscalingMode::Sla => {
            spec.replicas.unwrap_or(min)
        }
    };
    base.clamp(min, max)
}

fn seconds_since(t: Option<&Time>, now: Timestamp) -> u64 {
    t.map(|t| (now - t.0).get_seconds().max(0) as u64)
        .unwrap_or(0)
}

fn to_replica(pod: &Pod, nodes: &HashSet<String>, now: Timestamp) -> Replica {
    let labels = pod.labels();
    let status = pod.status.as_ref();
    let node = view::pod_node(pod);
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
        node_gone: node.as_ref().is_some_and(|n| !nodes.contains(n)),
        node,
        unschedulable_for,
        age: seconds_since(pod.metadata.creation_timestamp.as_ref(), now),
    }
}

async fn publish(
    ctx: &Context,
    model: &Model,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &model.object_ref(&())).await {
        tracing::warn!("publishing event {reason}: {e}");
    }
}

/// Reconciles one Model.
pub async fn reconcile(model: Arc<Model>, ctx: Arc<Context>) -> Result<Action> {
    let m = &ctx.metrics;
    m.in_flight.with_label_values(&[CONTROLLER]).inc();
    let start = Instant::now();
    let res = reconcile_inner(&model, &ctx).await;
    m.in_flight.with_label_values(&[CONTROLLER]).dec();
    m.reconcile_duration
        .with_label_values(&[CONTROLLER])
        .observe(start.elapsed().as_secs_f64());
    let result = if res.is_ok() { "success" } else { "error" };
    m.reconciles.with_label_values(&[CONTROLLER, result]).inc();
    if model.metadata.deletion_timestamp.is_none() {
        let existing = model
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let outcome = res.as_ref().map(|_| ());
        super::report::report(&ctx, CONTROLLER, model.as_ref(), &existing, outcome).await;
    }
    res
}

/// On error: count it and retry with backoff (the reconcile wrapper has
/// told the Model: a Warning Event and the ReconcileError condition).
pub fn error_policy(model: Arc<Model>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .with_label_values(&[CONTROLLER, err.metric_label()])
        .inc();
    tracing::warn!(model = %model.name_any(), namespace = ?model.namespace(), category = err.metric_label(), "reconcile failed: {err}");
    Action::requeue(super::report::retry_after(&ctx, CONTROLLER, model.as_ref()))
}

struct PoolTemplate<'a> {
    pref: &'a strata_crds::model::PoolPreference,
    pool: Arc<GPUPool>,
    hash: String,
}

async fn reconcile_inner(model: &Model, ctx: &Context) -> Result<Action> {
    let ns = model.namespace().ok_or(Error::MissingKey("namespace"))?;
    let name = model.name_any();
    let uid = model.uid().ok_or(Error::MissingKey("uid"))?;
    if model.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove pods and the Service.
        return Ok(Action::await_change());
    }
    let key = format!("{ns}/{name}");
    let now = Timestamp::now();

    // The sidecars mount the Model's Secret (admin TLS certificate, adapter
    // token): it exists before any replica.
    ensure_adapter_token(ctx, model, &ns, &uid).await?;

    // Dereference.
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let own: Vec<Pod> = pods_api
        .list(&ListParams::default().labels(&format!("{}={name}", labels::MODEL)))
        .await?
        .items
        .into_iter()
        .filter(|p| p.owner_references().iter().any(|o| o.uid == uid))
        .collect();
    let nodes = ctx.nodes.state();
    let node_names: HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
    let pools = ctx.pools.state();

    // Desired replicas: the spec (Manual, External) or the SLA autoscaler.
    let spec_desired = desired_replicas(&model.spec);
    let mut last_decision: Option<strata_crds::model::ScaleDecision> = None;
    let mut evaluation: Option<super::scale::Evaluation> = None;
    let desired = if model.spec.autoscaling.mode == AutoscalingMode::Sla {
        let (min, max) = (
            model.spec.min_replicas.max(0),
            model.spec.max_replicas.max(model.spec.min_replicas),
        );
        let ready_pods: Vec<&Pod> = own
            .iter()
            .filter(|p| view::pod_ready(p) && p.metadata.deletion_timestamp.is_none())
            .collect();
        // Take this Model's scaler out so that scraping does not hold the lock.
        // Keyed by UID too: a Model re-created under the same name starts afresh.
        let scaler_key = format!("{key}#{uid}");
        let mut scaler = ctx
            .scalers
            .lock()
            .await
            .remove(&scaler_key)
            .unwrap_or_default();
        // The count this process decided last; the status in the cache can
        // lag behind its own write (a reconcile woken by the pods it just
        // deleted would otherwise read the old count and create them again).
        let current_desired = scaler
            .desired
            .or_else(|| model.status.as_ref().and_then(|s| s.desired_replicas))
            .unwrap_or(spec_desired)
            .clamp(min, max);
        // The activator holds a request for this Model: wake it.
        if let Some(at) = model.annotations().get(crate::activator::WAKE_ANNOTATION)
            && scaler.wake(at, 600.0)
        {
            tracing::info!(model = %key, "the activator holds a request: evaluating now");
        }
        let (d, ev) =
            super::scale::evaluate(&mut scaler, model, &ready_pods, current_desired).await;
        let evaluated = ev;
        evaluation = scaler.last.clone();
        scaler.desired = Some(d);
        if let (true, Some(e)) = (evaluated, &evaluation)
            && d != current_desired
        {
            scaler.last_decision = Some(super::scale::decision_status(e));
        }
        last_decision = scaler.last_decision.clone();
        ctx.scalers.lock().await.insert(scaler_key, scaler);
        if let (true, Some(e)) = (evaluated, &evaluation) {
            ctx.metrics
                .autoscaler_decisions
                .with_label_values(&[e.decision.reason.as_str()])
                .inc();
            if d != current_desired {
                let reason = if d > current_desired {
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
                tracing::info!(model = %key, from = current_desired, to = d, signal = %e.decision.signal, "{}", e.decision.message);
            }
        }
        d
    } else {
        // Not autoscaled: forget the autoscaler's memory, so that coming back
        // to SLA mode starts from the status, not from an old decision.
        ctx.scalers.lock().await.remove(&format!("{key}#{uid}"));
        spec_desired
    };
    ctx.metrics
        .desired_replicas
        .with_label_values(&[&ns, &name])
        .set(i64::from(desired));

    // Plan (pure).
    let settings = &ctx.config.template;
    let mut templates: Vec<PoolTemplate> = Vec::new();
    for pref in &model.spec.pools {
        if let Some(pool) = pools.iter().find(|p| p.name_any() == pref.name) {
            let t = ReplicaTemplate {
                model,
                pool: pref,
                tolerations: &pool.spec.tolerations,
                gpu_resource: &pool.spec.gpu_resource_name,
                settings,
            };
            templates.push(PoolTemplate {
                pref,
                pool: pool.clone(),
                hash: t.hash()?,
            });
        }
    }
    let replicas: Vec<Replica> = own
        .iter()
        .map(|p| to_replica(p, &node_names, now))
        .collect();
    let target = Target {
        replicas: desired as usize,
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
    };
    let plan = rollout::plan(&replicas, &target);

    // Apply: deletions.
    let mut deleted: HashSet<String> = HashSet::new();
    let mut failures = 0;
    for (pod, reason) in &plan.delete {
        let dp = if *reason == DeleteReason::NodeGone {
            // No kubelet will confirm the deletion of a pod on a vanished node.
            DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            }
        } else {
            DeleteParams::default()
        };
        match pods_api.delete(pod, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        deleted.insert(pod.clone());
        ctx.metrics
            .deletions
            .with_label_values(&[reason.as_str()])
            .inc();
        let (ty, note) = match reason {
            DeleteReason::Failed => {
                failures += 1;
                (
                    EventType::Warning,
                    format!("replica {pod} failed; replacing it"),
                )
            }
            DeleteReason::NodeGone => (
                EventType::Warning,
                format!("the node of replica {pod} is gone; placing it again"),
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
        };
        publish(ctx, model, ty, reason.as_str(), "Delete", note).await;
    }
    if !plan.avoid_nodes.is_empty() {
        let mut avoid = ctx.avoid.lock().await;
        let entry = avoid.entry(key.clone()).or_default();
        for n in &plan.avoid_nodes {
            entry.push((n.clone(), Instant::now()));
        }
    }

    // Apply: creations, one placement at a time across all Models.
    let mut created: Vec<Pod> = Vec::new();
    let mut unplaced_message: Option<String> = None;
    ctx.metrics
        .unplaceable
        .with_label_values(&[&ns, &name])
        .set(0);
    if plan.create > 0 {
        let mut ledger = ctx.placement.lock().await;
        let cached = ctx.pods.state();
        let cached_names: HashSet<String> = cached
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        let own_names: HashSet<String> = own.iter().map(|p| p.name_any()).collect();
        // Forget pods the cache has caught up with, this Model's pods that are
        // gone (the list above is fresh), and anything old.
        ledger.retain(|pod, p| {
            !cached_names.contains(pod)
                && (p.model != key || own_names.contains(pod))
                && p.at.elapsed() < Duration::from_secs(60)
        });
        let own_uids: HashSet<String> = own.iter().filter_map(|p| p.uid()).collect();
        let view_pods: Vec<&Pod> = cached
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| p.uid().is_none_or(|u| !own_uids.contains(&u)))
            .chain(own.iter())
            .collect();
        let mut node_views = view::node_views(nodes.iter().map(|n| n.as_ref()), view_pods);
        for planned in ledger.values() {
            if let Some(v) = node_views.iter_mut().find(|v| v.name == planned.node) {
                *v.used.entry(planned.resource.clone()).or_default() += planned.gpus;
            }
        }
        let live: Vec<&Replica> = replicas
            .iter()
            .filter(|r| !r.terminating && !deleted.contains(&r.name))
            .collect();
        let mut per_node: BTreeMap<String, i64> = BTreeMap::new();
        for r in &live {
            if let Some(n) = &r.node {
                *per_node.entry(n.clone()).or_default() += 1;
            }
        }
        let avoid_nodes: Vec<String> = {
            let mut avoid = ctx.avoid.lock().await;
            let entry = avoid.entry(key.clone()).or_default();
            entry.retain(|(_, at)| at.elapsed() < Duration::from_secs(120));
            entry.iter().map(|(n, _)| n.clone()).collect()
        };
        let request = Request {
            // Every listed pool, existing or not, so that the reason names a missing one.
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
            replicas: plan.create,
            existing_per_node: per_node,
            avoid_nodes,
        };
        let pool_views: Vec<placement::PoolView> =
            templates.iter().map(|t| view::pool_view(&t.pool)).collect();
        let outcome = placement::place(&node_views, &pool_views, &request);
        for a in &outcome.assignments {
            let Some(t) = templates.iter().find(|t| t.pref.name == a.pool) else {
                continue;
            };
            let tmpl = ReplicaTemplate {
                model,
                pool: t.pref,
                tolerations: &t.pool.spec.tolerations,
                gpu_resource: &t.pool.spec.gpu_resource_name,
                settings,
            };
            let pod = tmpl.pod(&a.node)?;
            let pod = pods_api.create(&PostParams::default(), &pod).await?;
            let pod_name = pod.name_any();
            ledger.insert(
                pod_name.clone(),
                Planned {
                    model: key.clone(),
                    node: a.node.clone(),
                    resource: t.pool.spec.gpu_resource_name.clone(),
                    gpus: a.gpus,
                    at: Instant::now(),
                },
            );
            ctx.metrics.placements.with_label_values(&[&a.pool]).inc();
            publish(
                ctx,
                model,
                EventType::Normal,
                "Placed",
                "Create",
                format!(
                    "replica {pod_name} on node {} (pool {}, {} GPU(s))",
                    a.node, a.pool, a.gpus
                ),
            )
            .await;
            created.push(pod);
        }
        if outcome.unplaced > 0 {
            let gpus = templates
                .first()
                .map(|t| template::gpus_on(model, t.pref))
                .unwrap_or(i64::from(model.spec.gpus_per_replica));
            let msg = if templates.is_empty() {
                format!(
                    "{} replica(s) cannot be placed: none of the GPUPools {:?} exists",
                    outcome.unplaced,
                    model
                        .spec
                        .pools
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                )
            } else {
                outcome.explain(gpus)
            };
            ctx.metrics
                .unplaceable
                .with_label_values(&[&ns, &name])
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
            unplaced_message = Some(msg);
        }
    }

    // Apply: the Service.
    let service_conflict = apply_service(ctx, model, &ns, &name, &uid).await?;

    // Status.
    let current: Vec<&Pod> = own
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && !deleted.contains(&p.name_any()))
        .chain(created.iter())
        .collect();
    let hashes: BTreeMap<&str, &str> = templates
        .iter()
        .map(|t| (t.pref.name.as_str(), t.hash.as_str()))
        .collect();
    let mut placement_status: Vec<ReplicaPlacement> = current
        .iter()
        .map(|p| {
            let l = p.labels();
            ReplicaPlacement {
                pod: p.name_any(),
                node: view::pod_node(p).unwrap_or_default(),
                pool: l.get(labels::POOL).cloned().unwrap_or_default(),
                gpus: view::pod_gpu_requests(p).values().sum::<i64>() as i32,
                ready: view::pod_ready(p),
                template_hash: l.get(labels::TEMPLATE_HASH).cloned(),
            }
        })
        .collect();
    placement_status.sort_by(|a, b| a.pod.cmp(&b.pod));
    let ready = placement_status.iter().filter(|p| p.ready).count() as i32;
    let updated = placement_status
        .iter()
        .filter(|p| hashes.get(p.pool.as_str()).copied() == p.template_hash.as_deref())
        .count() as i32;
    let replicas_now = placement_status.len() as i32;
    let mut pool_names: Vec<&str> = Vec::new();
    for pref in &model.spec.pools {
        if placement_status.iter().any(|p| p.pool == pref.name) {
            pool_names.push(&pref.name);
        }
    }

    let deadline =
        parse_duration(&model.spec.rollout.progress_deadline).unwrap_or(Duration::from_secs(900));
    let stalled = replicas.iter().any(|r| {
        !r.terminating
            && !r.ready
            && hashes.get(r.pool.as_str()).copied() == Some(r.hash.as_str())
            && Duration::from_secs(r.age) > deadline
    });
    let ready_cond = if desired == 0 {
        Set::new(
            "Ready",
            true,
            "ScaledToZero",
            "the Model has no replicas by request",
        )
    } else if ready >= desired {
        Set::new(
            "Ready",
            true,
            "AllReplicasReady",
            format!("{ready} of {desired} replicas ready"),
        )
    } else if ready > 0 {
        Set::new(
            "Ready",
            false,
            "PartiallyReady",
            format!("{ready} of {desired} replicas ready"),
        )
    } else {
        Set::new(
            "Ready",
            false,
            "NoReplicaReady",
            format!("0 of {desired} replicas ready"),
        )
    };
    let converged = !plan.rolling
        && updated == desired
        && replicas_now == desired
        && ready >= desired
        && plan.delete.is_empty();
    let progressing = if stalled {
        Set::new(
            "Progressing",
            false,
            "ProgressDeadlineExceeded",
            format!(
                "a replica on the current template has not become ready within {}",
                model.spec.rollout.progress_deadline
            ),
        )
    } else if converged {
        Set::new(
            "Progressing",
            true,
            "RolloutComplete",
            format!("{desired} replica(s) on the current template"),
        )
    } else if plan.rolling || updated < replicas_now {
        Set::new(
            "Progressing",
            true,
            "RollingOut",
            format!("{updated} of {desired} replicas on the current template"),
        )
    } else {
        Set::new(
            "Progressing",
            true,
            "Scaling",
            format!("{replicas_now} replica(s), converging to {desired}"),
        )
    };
    let degraded = if let Some(msg) = &unplaced_message {
        Set::new("Degraded", true, "Unplaceable", msg.clone())
    } else if service_conflict {
        Set::new(
            "Degraded",
            true,
            "ServiceConflict",
            format!(
                "a Service named {name} exists and is not owned by this Model; Strata leaves it alone"
            ),
        )
    } else if failures > 0 {
        Set::new(
            "Degraded",
            true,
            "ReplicaFailures",
            format!("{failures} replica(s) failed and were replaced"),
        )
    } else {
        Set::new("Degraded", false, "AsExpected", "no problems")
    };
    let time_now = Time(now);
    let existing = model
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let status = ModelStatus {
        observed_generation: model.metadata.generation,
        conditions: conditions::merge(
            &existing,
            &[ready_cond, progressing, degraded],
            model.metadata.generation,
            &time_now,
        ),
        replicas: replicas_now,
        ready_replicas: ready,
        updated_replicas: updated,
        desired_replicas: Some(desired),
        selector: Some(template::selector_string(&name)),
        pools: (!pool_names.is_empty()).then(|| pool_names.join(",")),
        placement: placement_status,
        sla: match &evaluation {
            Some(e) => Some(super::scale::sla_status(model, e)),
            None => model.status.as_ref().and_then(|s| s.sla.clone()),
        },
        // The last change this process decided, else the one in status (the
        // cached status can lag behind this process's own last write).
        last_scale_decision: last_decision.or_else(|| {
            model
                .status
                .as_ref()
                .and_then(|s| s.last_scale_decision.clone())
        }),
        // status.energy belongs to the energy accountant (its own field
        // manager): left out here, so neither overwrites the other.
        energy: None,
        adapters: adapters_status(&own),
    };
    let models: Api<Model> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": strata_crds::API_VERSION,
        "kind": "Model",
        "status": status,
    });
    models
        .patch_status(
            &name,
            &PatchParams::apply(labels::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;

    let busy = plan.create > 0
        || !plan.delete.is_empty()
        || plan.rolling
        || unplaced_message.is_some()
        || ready < desired;
    let mut after = if busy {
        Duration::from_secs(5)
    } else {
        ctx.config.resync
    };
    if model.spec.autoscaling.mode == AutoscalingMode::Sla {
        // Evaluate the SLA every autoscaling interval.
        let (_, _, interval, _, _) = super::scale::policy_and_targets(model);
        after = after.min(Duration::from_secs_f64(interval.max(1.0)));
    }
    Ok(Action::requeue(after))
}

/// Ensures the Secret of the Model's replicas (every Model has one; the
/// sidecars mount it): the adapter API token (random, 32 bytes, hex; made
/// once), and the sidecars' admin port certificate for the Model's server
/// name (`template::sidecar_server_name`) with its key and the CA
/// certificate, issued again when it expires within 30 days or is not the
/// current CA's (`pki::needs_reissue`). The Adapter controller reads the
/// token to call the sidecars. Sidecars pick up a new certificate without
/// a restart (the mounted files are re-read when they change).
async fn ensure_adapter_token(ctx: &Context, model: &Model, ns: &str, uid: &str) -> Result<()> {
    let name = template::adapter_token_secret(&model.name_any());
    let server_name = template::sidecar_server_name(ns, &model.name_any());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let ca = &ctx.config.ca;
    let now = std::time::SystemTime::now();
    let new_token = || -> Result<k8s_openapi::ByteString> {
        let mut bytes = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(k8s_openapi::ByteString(token.into_bytes()))
    };
    let issue = || crate::pki::sidecar_entries(ca, &server_name, now).map_err(Error::from);
    if let Some(mut existing) = api.get_opt(&name).await? {
        let data = existing.data.get_or_insert_with(BTreeMap::new);
        let has_token = data
            .get(template::ADAPTER_TOKEN_KEY)
            .is_some_and(|t| !t.0.is_empty());
        let reissue = crate::pki::needs_reissue(ca, data, &server_name, now);
        if has_token && !reissue {
            return Ok(());
        }
        if !has_token {
            data.insert(template::ADAPTER_TOKEN_KEY.into(), new_token()?);
        }
        if reissue {
            data.extend(issue()?);
        }
        existing.string_data = None;
        // Optimistic concurrency (resourceVersion): on a conflict the next
        // reconcile looks again.
        return match api.replace(&name, &PostParams::default(), &existing).await {
            Ok(_) => {
                tracing::info!(model = %model.name_any(), namespace = %ns, secret = %name, "issued the sidecars' admin TLS certificate");
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        };
    }
    let mut data = issue()?;
    data.insert(template::ADAPTER_TOKEN_KEY.into(), new_token()?);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name),
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
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Applies the Model's Service unless a foreign Service has its name.
/// Returns true on such a conflict.
async fn apply_service(
    ctx: &Context,
    model: &Model,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<bool> {
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
            "ownerReferences": [template::controller_ref("Model", &model.name_any(), uid)],
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
    // true: a Service of that name exists and is not the Model's.
    Ok(!super::apply_owned_service(&ctx.client, ns, name, uid, &svc).await?)
}

/// Parses the Go-style durations the CRD accepts (e.g. 15m, 1h30m, 500ms).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let value: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += value * unit;
        any = true;
    }
    (any && num.is_empty()).then(|| Duration::from_secs_f64(total))
}

/// Adapters carried by the Model's replicas, from the replicas' adapter labels.
pub fn adapters_status(pods: &[Pod]) -> Vec<strata_crds::model::ModelAdapterStatus> {
    let mut counts: std::collections::BTreeMap<String, i32> = std::collections::BTreeMap::new();
    for p in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        for (k, v) in p.labels() {
            if let Some(name) = k.strip_prefix(labels::ADAPTER_PREFIX)
                && v == labels::ADAPTER_LOADED
            {
                *counts.entry(name.to_string()).or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .map(|(name, replicas)| strata_crds::model::ModelAdapterStatus { name, replicas })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_adapters_a_model_carries_come_from_its_replicas_labels() {
        let pod = |name: &str, labels: &[(&str, &str)], deleting: bool| -> Pod {
            let mut p: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels.iter().copied().collect::<BTreeMap<_, _>>()}
            }))
            .expect("pod");
            if deleting {
                p.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
            }
            p
        };
        let pods = [
            pod(
                "a",
                &[
                    ("adapter.strata.ai/sql", "loaded"),
                    ("adapter.strata.ai/poet", "loaded"),
                ],
                false,
            ),
            pod(
                "b",
                &[
                    ("adapter.strata.ai/sql", "loaded"),
                    ("strata.ai/model", "m"),
                ],
                false,
            ),
            pod("c", &[("adapter.strata.ai/sql", "loaded")], true),
            pod("d", &[("adapter.strata.ai/poet", "pending")], false),
        ];
        let got: Vec<(String, i32)> = adapters_status(&pods)
            .into_iter()
            .map(|a| (a.name, a.replicas))
            .collect();
        assert_eq!(got, [("poet".to_string(), 1), ("sql".to_string(), 2)]);
    }

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("1d"), None);
    }

    #[test]
    fn desired_replicas_follow_spec_within_bounds() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../samples/model-llama.yaml"
        ))
        .expect("sample");
        let mut m: Model =
            serde_json::from_value(strata_crds::validation::yaml_to_json(&text).expect("yaml"))
                .expect("model");
        assert_eq!(
            desired_replicas(&m.spec),
            1,
            "minReplicas when spec.replicas is unset"
        );
        m.spec.replicas = Some(3);
        assert_eq!(desired_replicas(&m.spec), 3);
        m.spec.replicas = Some(60);
        assert_eq!(desired_replicas(&m.spec), 6, "clamped to maxReplicas");
    }
}
