//! The Adapter controller: loads an Adapter through the sidecar adapter API
//! of the replicas chosen by the pure planner (crate::adapters), labels each
//! replica by the adapters it carries, keeps a Service per Adapter that
//! selects exactly those replicas, retries failed loads with backoff and
//! then elsewhere, and unloads an Adapter everywhere before it goes (a
//! finalizer).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{self, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use strata_crds::adapter::{AdapterPhase, AdapterReplicaStatus, AdapterStatus};
use strata_crds::{Adapter, Model};

use super::Context;
use crate::adapters::{self, Replica};
use crate::conditions::{self, Set};
use crate::error::{Error, Result};
use crate::labels;
use crate::sidecar_client::{ADAPTER_TIMEOUT, SidecarClient, Target};
use crate::template::{self, SIDECAR_HTTP_PORT};
use crate::view;

/// Failed loads of one Adapter on one replica.
#[derive(Debug, Clone, Copy)]
pub struct Failures {
    /// How many in a row.
    pub count: u32,
    /// Not before this.
    pub next: Instant,
}

/// Loads that failed this many times in a row on a replica move to another
/// for a while.
const MOVE_AFTER: u32 = 3;

/// What calling a Model's sidecars takes: the client (TLS, the operator's
/// CA), the Model (its replicas' certificate name) and the adapter API token.
struct Admin {
    client: SidecarClient,
    namespace: String,
    model: String,
    token: String,
}

/// One call to a sidecar's adapter API over TLS: (status, body) or why
/// not. The answer is bounded (4 MiB, 300 s: a load may fetch the adapter).
async fn call(
    ip: &str,
    method: http::Method,
    path: &str,
    admin: &Admin,
    body: Option<serde_json::Value>,
) -> std::result::Result<(u16, String), String> {
    let target = Target::pod(ip, &admin.namespace, &admin.model).map_err(|e| e.to_string())?;
    let answer = admin
        .client
        .call(
            &target,
            method,
            path,
            Some(&admin.token),
            body.map(|b| Bytes::from(b.to_string())),
            ADAPTER_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    ))
}

fn served_name(a: &Adapter) -> String {
    a.spec.served_name.clone().unwrap_or_else(|| a.name_any())
}

fn label_key(a: &Adapter) -> String {
    format!("{}{}", labels::ADAPTER_PREFIX, a.name_any())
}

/// The Service of an Adapter.
pub fn service_name(adapter: &str) -> String {
    let mut n = format!("{adapter}-lora");
    n.truncate(63);
    n.trim_end_matches('-').to_string()
}

async fn set_label(ctx: &Context, ns: &str, pod: &str, key: &str, on: bool) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let value = if on {
        json!(labels::ADAPTER_LOADED)
    } else {
        serde_json::Value::Null
    };
    let patch = json!({"metadata": {"labels": {key: value}}});
    match api
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn publish(ctx: &Context, a: &Adapter, type_: EventType, reason: &str, note: String) {
    let e = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Adapter".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&e, &a.object_ref(&())).await {
        tracing::debug!("event: {err}");
    }
}

/// The lock that serializes the Adapter plans of one Model.
async fn model_lock(ctx: &Context, ns: &str, model: &str) -> Arc<tokio::sync::Mutex<()>> {
    ctx.adapter_locks
        .lock()
        .await
        .entry(format!("{ns}/{model}"))
        .or_default()
        .clone()
}

/// The adapter API token of a Model's replicas (None until its Secret
/// exists), with what else calling them takes.
async fn token(ctx: &Context, ns: &str, model: &str) -> Result<Option<Admin>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .get_opt(&template::adapter_token_secret(model))
        .await?
        .and_then(|s| s.data)
        .and_then(|d| d.get(template::ADAPTER_TOKEN_KEY).cloned())
        .map(|b| Admin {
            client: ctx.sidecars.clone(),
            namespace: ns.to_string(),
            model: model.to_string(),
            token: String::from_utf8_lossy(&b.0).trim().to_string(),
        }))
}

/// Reconciles one Adapter.
pub async fn reconcile(adapter: Arc<Adapter>, ctx: Arc<Context>) -> Result<Action> {
    let ns = adapter.namespace().ok_or(Error::MissingKey("namespace"))?;
    let api: Api<Adapter> = Api::namespaced(ctx.client.clone(), &ns);
    let started = Instant::now();
    let obj = adapter.clone();
    let res = finalizer(&api, labels::ADAPTER_FINALIZER, adapter, |ev| async {
        match ev {
            finalizer::Event::Apply(a) => apply(&a, &ctx, &ns).await,
            finalizer::Event::Cleanup(a) => cleanup(&a, &ctx, &ns).await,
        }
    })
    .await;
    ctx.metrics
        .reconcile_duration
        .with_label_values(&["adapter"])
        .observe(started.elapsed().as_secs_f64());
    let res = into_result(&ctx, res);
    if obj.metadata.deletion_timestamp.is_none() {
        let existing = obj
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let outcome = res.as_ref().map(|_| ());
        super::report::report(&ctx, "adapter", obj.as_ref(), &existing, outcome).await;
    }
    res
}

fn into_result(
    ctx: &Context,
    res: std::result::Result<Action, finalizer::Error<Error>>,
) -> Result<Action> {
    match res {
        Ok(a) => {
            ctx.metrics
                .reconciles
                .with_label_values(&["adapter", "success"])
                .inc();
            Ok(a)
        }
        Err(finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e)) => {
            ctx.metrics
                .reconciles
                .with_label_values(&["adapter", "error"])
                .inc();
            Err(e)
        }
        Err(finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e)) => {
            Err(Error::Kube(e))
        }
        Err(finalizer::Error::UnnamedObject) => Err(Error::MissingKey("name")),
        Err(finalizer::Error::InvalidFinalizer) => Err(Error::MissingKey("finalizer")),
    }
}

/// Backoff after an error.
pub fn error_policy(a: Arc<Adapter>, e: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .with_label_values(&["adapter", e.metric_label()])
        .inc();
    tracing::warn!(adapter = %a.name_any(), namespace = ?a.namespace(), "adapter reconcile: {e}");
    Action::requeue(super::report::retry_after(&ctx, "adapter", a.as_ref()))
}

fn model_pods(ctx: &Context, ns: &str, model: &Model) -> Vec<Pod> {
    let uid = model.uid().unwrap_or_default();
    ctx.pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns)
                && p.labels().get(labels::MODEL) == Some(&model.name_any())
                && p.owner_references().iter().any(|o| o.uid == uid)
                && p.metadata.deletion_timestamp.is_none()
        })
        .map(|p| p.as_ref().clone())
        .collect()
}

fn ip_of(p: &Pod) -> Option<String> {
    p.status.as_ref().and_then(|s| s.pod_ip.clone())
}

struct Outcome {
    phase: AdapterPhase,
    reason: &'static str,
    message: String,
    desired: i32,
    carriers: Vec<AdapterReplicaStatus>,
}

async fn write_status(ctx: &Context, a: &Adapter, ns: &str, o: Outcome) -> Result<()> {
    let now = Time(Timestamp::now());
    let existing = a
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let ready = Set::new(
        "Ready",
        o.phase == AdapterPhase::Ready,
        o.reason,
        o.message.clone(),
    );
    let degraded = Set::new(
        "Degraded",
        matches!(o.phase, AdapterPhase::Degraded | AdapterPhase::Failed),
        if matches!(o.phase, AdapterPhase::Degraded | AdapterPhase::Failed) {
            o.reason
        } else {
            "AsExpected"
        },
        if matches!(o.phase, AdapterPhase::Degraded | AdapterPhase::Failed) {
            o.message.clone()
        } else {
            "no problems".to_string()
        },
    );
    let status = AdapterStatus {
        observed_generation: a.metadata.generation,
        phase: o.phase,
        conditions: conditions::merge(&existing, &[ready, degraded], a.metadata.generation, &now),
        desired_replicas: o.desired,
        loaded_replicas: o.carriers.len() as i32,
        replicas: o.carriers,
        // Requests, tokens and energy belong to the energy accountant.
        requests: None,
        generated_tokens: None,
        energy_joules: None,
    };
    let api: Api<Adapter> = Api::namespaced(ctx.client.clone(), ns);
    let patch = json!({
        "apiVersion": strata_crds::API_VERSION,
        "kind": "Adapter",
        "status": status,
    });
    api.patch_status(
        &a.name_any(),
        &PatchParams::apply(labels::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn apply(a: &Adapter, ctx: &Context, ns: &str) -> Result<Action> {
    let lock = model_lock(ctx, ns, &a.spec.model).await;
    let _serial = lock.lock().await;
    let name = a.name_any();
    let uid = a.uid().ok_or(Error::MissingKey("uid"))?;
    let pending = |reason: &'static str, message: String| Outcome {
        phase: AdapterPhase::Pending,
        reason,
        message,
        desired: 0,
        carriers: Vec::new(),
    };
    let models: Api<Model> = Api::namespaced(ctx.client.clone(), ns);
    let Some(model) = models.get_opt(&a.spec.model).await? else {
        write_status(
            ctx,
            a,
            ns,
            pending(
                "ModelNotFound",
                format!("no Model {} in namespace {ns}", a.spec.model),
            ),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let Some(limits) = model.spec.adapters.as_ref() else {
        write_status(
            ctx,
            a,
            ns,
            Outcome {
                phase: AdapterPhase::Failed,
                ..pending(
                    "AdaptersNotEnabled",
                    format!(
                        "Model {} takes no adapters: set spec.adapters on it",
                        a.spec.model
                    ),
                )
            },
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    };
    if name.len() > 63 {
        write_status(
            ctx,
            a,
            ns,
            Outcome {
                phase: AdapterPhase::Failed,
                ..pending(
                    "NameTooLong",
                    "an Adapter's name must be at most 63 characters: replicas carry it in a label key".into(),
                )
            },
        )
        .await?;
        return Ok(Action::await_change());
    }
    // The source's credentials go to the sidecar with each load (it fetches
    // the weights with them: an engine has one set of hub credentials).
    let mut credentials: std::collections::BTreeMap<String, String> =
        std::collections::BTreeMap::new();
    if let Some(r) = &a.spec.source.credentials_secret_ref {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        if let Some(secret) = secrets.get_opt(&r.name).await? {
            for (k, v) in secret.data.unwrap_or_default() {
                credentials.insert(k, String::from_utf8_lossy(&v.0).trim().to_string());
            }
        } else {
            write_status(
                ctx,
                a,
                ns,
                pending(
                    "CredentialsNotFound",
                    format!("the credentials Secret {} does not exist", r.name),
                ),
            )
            .await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    }
    let Some(token) = token(ctx, ns, &model.name_any()).await? else {
        write_status(
            ctx,
            a,
            ns,
            pending(
                "WaitingForToken",
                "waiting for the Model's adapter token Secret".into(),
            ),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let served = served_name(a);
    let key = label_key(a);
    let source = a.spec.source.uri.clone();
    let mut pods = model_pods(ctx, ns, &model);
    pods.sort_by_key(|p| p.name_any());
    // Label changes of this round (the pod cache may not show them yet).
    let mut loaded_now: BTreeSet<String> = BTreeSet::new();
    let mut dropped_now: BTreeSet<String> = BTreeSet::new();

    // Carriers whose sidecar no longer has it (a restarted replica) lose the
    // label until it is loaded again.
    for p in pods.iter_mut().filter(|p| p.labels().contains_key(&key)) {
        let Some(ip) = ip_of(p).filter(|_| view::pod_ready(p)) else {
            continue;
        };
        let listed = call(&ip, http::Method::GET, "/v1/adapters", &token, None).await;
        let has = matches!(&listed, Ok((200, body)) if serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("adapters").cloned())
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|l| l.iter().any(|x| x.get("name").and_then(|n| n.as_str()) == Some(served.as_str()))));
        if !has && matches!(listed, Ok((200, _))) {
            set_label(ctx, ns, &p.name_any(), &key, false).await?;
            p.labels_mut().remove(&key);
            dropped_now.insert(p.name_any());
            tracing::info!(adapter = %name, pod = %p.name_any(), "the replica no longer carries the adapter (restarted): loading it again");
        }
    }

    let now = Instant::now();
    // Replicas where loading kept failing are avoided for a while; those
    // still backing off keep their turn (no other replica is chosen yet).
    let (avoid, backing_off): (BTreeSet<String>, BTreeSet<String>) = {
        let f = ctx.adapter_failures.lock().await;
        let mine: Vec<(&String, &Failures)> = f
            .iter()
            .filter(|((u, _), v)| *u == uid && v.next > now)
            .map(|((_, pod), v)| (pod, v))
            .collect();
        (
            mine.iter()
                .filter(|(_, v)| v.count >= MOVE_AFTER)
                .map(|(p, _)| (*p).clone())
                .collect(),
            mine.iter()
                .filter(|(_, v)| v.count < MOVE_AFTER)
                .map(|(p, _)| (*p).clone())
                .collect(),
        )
    };
    let replicas: Vec<Replica> = pods
        .iter()
        .map(|p| Replica {
            pod: p.name_any(),
            ready: view::pod_ready(p),
            adapters: p
                .labels()
                .iter()
                .filter(|(_, v)| *v == labels::ADAPTER_LOADED)
                .filter_map(|(k, _)| k.strip_prefix(labels::ADAPTER_PREFIX))
                .map(str::to_string)
                .collect(),
        })
        .collect();
    let plan = adapters::plan(
        &name,
        a.spec.replicas,
        limits.max_per_replica,
        &replicas,
        &avoid,
    );

    let mut failures = 0;
    let mut last_error = String::new();
    for pod in &plan.load {
        if backing_off.contains(pod) {
            continue;
        }
        let Some(ip) = pods.iter().find(|p| &p.name_any() == pod).and_then(ip_of) else {
            continue;
        };
        let res = call(
            &ip,
            http::Method::POST,
            "/v1/adapters",
            &token,
            Some(json!({"name": served, "source": source, "credentials": credentials})),
        )
        .await;
        match res {
            Ok((200 | 201, _)) => {
                set_label(ctx, ns, pod, &key, true).await?;
                loaded_now.insert(pod.clone());
                ctx.adapter_failures
                    .lock()
                    .await
                    .remove(&(uid.clone(), pod.clone()));
                ctx.metrics
                    .adapter_operations
                    .with_label_values(&["load", "success"])
                    .inc();
                publish(
                    ctx,
                    a,
                    EventType::Normal,
                    "Loaded",
                    format!("loaded {served} on replica {pod}"),
                )
                .await;
            }
            other => {
                let why = match other {
                    Ok((code, body)) => format!("sidecar answered {code}: {}", body.trim()),
                    Err(e) => e,
                };
                failures += 1;
                last_error = format!("loading on {pod}: {why}");
                let mut f = ctx.adapter_failures.lock().await;
                let e = f.entry((uid.clone(), pod.clone())).or_insert(Failures {
                    count: 0,
                    next: now,
                });
                e.count += 1;
                // Again after 10 s, 20 s; after the third failure in a row
                // the replica is skipped for 5 minutes: another one is chosen.
                e.next = now
                    + if e.count >= MOVE_AFTER {
                        Duration::from_secs(300)
                    } else {
                        Duration::from_secs(5 << e.count)
                    };
                ctx.metrics
                    .adapter_operations
                    .with_label_values(&["load", "error"])
                    .inc();
                publish(
                    ctx,
                    a,
                    EventType::Warning,
                    "LoadFailed",
                    format!("{last_error} (attempt {})", e.count),
                )
                .await;
            }
        }
    }
    for pod in &plan.unload {
        if let Some(ip) = pods.iter().find(|p| &p.name_any() == pod).and_then(ip_of) {
            let _ = call(
                &ip,
                http::Method::DELETE,
                &format!("/v1/adapters/{served}"),
                &token,
                None,
            )
            .await;
        }
        set_label(ctx, ns, pod, &key, false).await?;
        dropped_now.insert(pod.clone());
        publish(
            ctx,
            a,
            EventType::Normal,
            "Unloaded",
            format!("unloaded {served} from replica {pod} (fewer replicas wanted)"),
        )
        .await;
    }

    let waiting: Vec<&String> = plan
        .load
        .iter()
        .filter(|p| backing_off.contains(*p))
        .collect();
    if failures == 0 && !waiting.is_empty() {
        failures = waiting.len();
        last_error = format!(
            "a load failed on {}; retrying after a backoff",
            waiting
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    apply_service(ctx, a, ns, &model.name_any(), &uid).await?;

    // Status from the replicas' labels now.
    let pods = model_pods(ctx, ns, &model);
    let previous: HashMap<String, Option<Time>> = a
        .status
        .as_ref()
        .map(|s| {
            s.replicas
                .iter()
                .map(|r| (r.pod.clone(), r.loaded_at.clone()))
                .collect()
        })
        .unwrap_or_default();
    let carriers: Vec<AdapterReplicaStatus> = pods
        .iter()
        .filter(|p| {
            let n = p.name_any();
            loaded_now.contains(&n) || (p.labels().contains_key(&key) && !dropped_now.contains(&n))
        })
        .map(|p| AdapterReplicaStatus {
            pod: p.name_any(),
            node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            loaded_at: previous
                .get(&p.name_any())
                .cloned()
                .flatten()
                .or_else(|| Some(Time(Timestamp::now()))),
        })
        .collect();
    let loaded = carriers.len() as i32;
    let (phase, reason, message) = if plan.desired == 0 {
        (
            AdapterPhase::Pending,
            "NoReadyReplicas",
            format!("Model {} has no ready replica yet", a.spec.model),
        )
    } else if loaded >= plan.desired {
        (
            AdapterPhase::Ready,
            "Loaded",
            format!("loaded on {loaded} of {} replica(s)", plan.desired),
        )
    } else if failures > 0 && loaded == 0 {
        (AdapterPhase::Failed, "LoadFailed", last_error)
    } else if failures > 0 || plan.short > 0 {
        (
            AdapterPhase::Degraded,
            if failures > 0 { "LoadFailed" } else { "NoRoom" },
            if failures > 0 {
                last_error
            } else {
                format!(
                    "{} replica(s) short: the others already carry adapters.maxPerReplica ({})",
                    plan.short, limits.max_per_replica
                )
            },
        )
    } else {
        (
            AdapterPhase::Loading,
            "Loading",
            format!("loaded on {loaded} of {} replica(s)", plan.desired),
        )
    };
    let converged = phase == AdapterPhase::Ready;
    write_status(
        ctx,
        a,
        ns,
        Outcome {
            phase,
            reason,
            message,
            desired: plan.desired,
            carriers,
        },
    )
    .await?;
    Ok(Action::requeue(if converged {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(5)
    }))
}

async fn apply_service(ctx: &Context, a: &Adapter, ns: &str, model: &str, uid: &str) -> Result<()> {
    let name = service_name(&a.name_any());
    let mut selector = template::model_selector(model);
    selector.insert(label_key(a), labels::ADAPTER_LOADED.into());
    let svc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                labels::MANAGED_BY: labels::MANAGER,
                labels::APP_NAME: "strata-adapter",
                labels::MODEL: model,
            },
            "ownerReferences": [template::controller_ref("Adapter", &a.name_any(), uid)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": 80, "targetPort": SIDECAR_HTTP_PORT, "protocol": "TCP"},
            ],
        },
    });
    if !super::apply_owned_service(&ctx.client, ns, &name, uid, &svc).await? {
        tracing::warn!(service = %name, "a Service with the Adapter's Service name exists and is not ours; leaving it alone");
    }
    Ok(())
}

async fn cleanup(a: &Adapter, ctx: &Context, ns: &str) -> Result<Action> {
    let lock = model_lock(ctx, ns, &a.spec.model).await;
    let _serial = lock.lock().await;
    let key = label_key(a);
    let served = served_name(a);
    let models: Api<Model> = Api::namespaced(ctx.client.clone(), ns);
    let model = models.get_opt(&a.spec.model).await?;
    let token = match &model {
        Some(m) => token(ctx, ns, &m.name_any()).await?,
        None => None,
    };
    let pods: Vec<Pod> = ctx
        .pods
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns) && p.labels().contains_key(&key))
        .map(|p| p.as_ref().clone())
        .collect();
    for p in &pods {
        let running = p.metadata.deletion_timestamp.is_none() && view::pod_ready(p);
        if let (true, Some(ip), Some(token)) = (running, ip_of(p), token.as_ref()) {
            match call(
                &ip,
                http::Method::DELETE,
                &format!("/v1/adapters/{served}"),
                token,
                None,
            )
            .await
            {
                Ok((200, _)) => {
                    ctx.metrics
                        .adapter_operations
                        .with_label_values(&["unload", "success"])
                        .inc();
                }
                other => {
                    ctx.metrics
                        .adapter_operations
                        .with_label_values(&["unload", "error"])
                        .inc();
                    let why = match other {
                        Ok((code, body)) => format!("sidecar answered {code}: {}", body.trim()),
                        Err(e) => e,
                    };
                    publish(
                        ctx,
                        a,
                        EventType::Warning,
                        "UnloadFailed",
                        format!("unloading {served} from {}: {why}", p.name_any()),
                    )
                    .await;
                    return Ok(Action::requeue(Duration::from_secs(5)));
                }
            }
        }
        set_label(ctx, ns, &p.name_any(), &key, false).await?;
    }
    let uid = a.uid().unwrap_or_default();
    ctx.adapter_failures
        .lock()
        .await
        .retain(|(u, _), _| *u != uid);
    publish(
        ctx,
        a,
        EventType::Normal,
        "Unloaded",
        format!("unloaded {served} from {} replica(s)", pods.len()),
    )
    .await;
    Ok(Action::await_change())
}
