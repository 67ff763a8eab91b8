//! The Adapter controller: loads an Adapter through the sidecar adapter API
//! of the replicas chosen by the pure planner (`strata_core::adapters`),
//! labels each replica by the adapters it carries, keeps a Service per
//! Adapter that selects exactly those replicas, retries failed loads with
//! backoff and then elsewhere, and unloads an Adapter everywhere before it
//! goes (a finalizer). A pipeline of phases, one Model's Adapters at a time:
//!
//! 1. [`dereference`]: the Model, its adapter settings, the source's
//!    credentials, the replicas' token; what is missing is the status
//!    (Pending or Failed with the reason), not an error;
//! 2. [`verify_carriers`]: ask each carrier's sidecar what it has: a
//!    replica that lost the adapter loses its label (it is loaded again),
//!    one whose engine restarted and whose sidecar reloaded it is counted;
//! 3. plan (pure: `strata_core::adapters::plan`) and [`load`] / [`unload`];
//! 4. [`apply_service`];
//! 5. status (pure: `strata_core::adapters::phase`), written once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, finalizer};
use kube::{Api, ResourceExt};
use serde_json::json;
use strata_core::adapters::{self, Replica};
use strata_core::conditions;
use strata_core::template::{self, SIDECAR_HTTP_PORT};
use strata_core::{labels, view};
use strata_crds::adapter::{AdapterPhase, AdapterReplicaStatus, AdapterStatus};
use strata_crds::{Adapter, Model};

use super::Context;
use super::reconcile;
use crate::error::{Error, Result};
use crate::sidecar_client::{ADAPTER_TIMEOUT, SidecarClient, Target};

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

/// Sets or removes the adapter label `key` on a replica.
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
        Err(source) => Err(Error::LabelPod {
            pod: pod.to_string(),
            source,
        }),
    }
}

async fn publish(ctx: &Context, a: &Adapter, type_: EventType, reason: &str, note: String) {
    reconcile::publish(ctx, a, type_, reason, "Adapter", note).await;
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
    let name = template::adapter_token_secret(model);
    Ok(api
        .get_opt(&name)
        .await
        .map_err(|source| Error::Get {
            kind: "Secret",
            name: name.clone(),
            source,
        })?
        .and_then(|s| s.data)
        .and_then(|d| d.get(template::ADAPTER_TOKEN_KEY).cloned())
        .map(|b| Admin {
            client: ctx.sidecars.clone(),
            namespace: ns.to_string(),
            model: model.to_string(),
            token: String::from_utf8_lossy(&b.0).trim().to_string(),
        }))
}

/// Reconciles one Adapter: the finalizer, then the phases, inside the
/// shared wrapper (metrics, the error reporter).
pub async fn reconcile(adapter: Arc<Adapter>, ctx: Arc<Context>) -> Result<Action> {
    reconcile::run(
        adapter,
        ctx,
        |a, ctx| async move { finalized(a, &ctx).await },
    )
    .await
}

/// Runs `apply`, or `cleanup` once the Adapter is being deleted, under the
/// finalizer that keeps it until it is unloaded everywhere.
async fn finalized(a: Arc<Adapter>, ctx: &Context) -> Result<Action> {
    let ns = a.namespace().ok_or(Error::MissingKey("namespace"))?;
    let name = a.name_any();
    let api: Api<Adapter> = Api::namespaced(ctx.client.clone(), &ns);
    let finalizer_err = |action, source| Error::Finalizer {
        action,
        kind: "Adapter",
        name: name.clone(),
        source,
    };
    finalizer(&api, labels::ADAPTER_FINALIZER, a, |ev| async {
        match ev {
            finalizer::Event::Apply(a) => apply(&a, ctx, &ns).await,
            finalizer::Event::Cleanup(a) => cleanup(&a, ctx, &ns).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        finalizer::Error::AddFinalizer(source) => finalizer_err("adding", source),
        finalizer::Error::RemoveFinalizer(source) => finalizer_err("removing", source),
        finalizer::Error::UnnamedObject => Error::MissingKey("name"),
        finalizer::Error::InvalidFinalizer => Error::MissingKey("valid finalizer name"),
    })
}

/// The replicas of `model` in the pod cache (not being deleted).
fn model_pods(ctx: &Context, ns: &str, model: &Model) -> Vec<Pod> {
    let uid = model.uid().unwrap_or_default();
    ctx.pods
        .state()
        .iter()
        .filter(|p| {
            p.metadata.namespace.as_deref() == Some(ns)
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

/// What the Adapter's status says after a round.
struct Outcome {
    phase: AdapterPhase,
    reason: &'static str,
    message: String,
    desired: i32,
    carriers: Vec<AdapterReplicaStatus>,
}

/// Writes the Adapter's status (phase, conditions, carriers).
async fn write_status(ctx: &Context, a: &Adapter, o: Outcome) -> Result<()> {
    let now = Time(Timestamp::now());
    let existing = a
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let status = AdapterStatus {
        observed_generation: a.metadata.generation,
        conditions: conditions::merge(
            &existing,
            &adapters::conditions(&o.phase, o.reason, &o.message),
            a.metadata.generation,
            &now,
        ),
        phase: o.phase,
        desired_replicas: o.desired,
        loaded_replicas: o.carriers.len() as i32,
        replicas: o.carriers,
        // Requests, tokens and energy belong to the energy accountant.
        requests: None,
        generated_tokens: None,
        energy_joules: None,
    };
    reconcile::write_status(ctx, a, &status).await
}

/// What an Adapter needs before it can be loaded anywhere.
struct Deps {
    model: Model,
    max_per_replica: i32,
    /// The source's credentials: they go to the sidecar with each load (it
    /// fetches the weights with them: an engine has one set of hub
    /// credentials).
    credentials: BTreeMap<String, String>,
    admin: Admin,
}

/// Why an Adapter cannot be worked on yet: its status says so, and the
/// controller looks again after `after` (or on a change).
struct Blocked {
    phase: AdapterPhase,
    reason: &'static str,
    message: String,
    after: Option<Duration>,
}

impl Blocked {
    fn pending(reason: &'static str, message: String, after: Duration) -> Self {
        Self {
            phase: AdapterPhase::Pending,
            reason,
            message,
            after: Some(after),
        }
    }
}

/// Phase 1: the Model, its adapter settings, the credentials, the token.
async fn dereference(
    ctx: &Context,
    a: &Adapter,
    ns: &str,
) -> Result<std::result::Result<Deps, Blocked>> {
    let models: Api<Model> = Api::namespaced(ctx.client.clone(), ns);
    let model = models
        .get_opt(&a.spec.model)
        .await
        .map_err(|source| Error::Get {
            kind: "Model",
            name: a.spec.model.clone(),
            source,
        })?;
    let Some(model) = model else {
        return Ok(Err(Blocked::pending(
            "ModelNotFound",
            format!("no Model {} in namespace {ns}", a.spec.model),
            Duration::from_secs(30),
        )));
    };
    let Some(limits) = model.spec.adapters.as_ref() else {
        return Ok(Err(Blocked {
            phase: AdapterPhase::Failed,
            reason: "AdaptersNotEnabled",
            message: format!(
                "Model {} takes no adapters: set spec.adapters on it",
                a.spec.model
            ),
            after: Some(Duration::from_secs(60)),
        }));
    };
    let max_per_replica = limits.max_per_replica;
    let mut credentials = BTreeMap::new();
    if let Some(r) = &a.spec.source.credentials_secret_ref {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let secret = secrets
            .get_opt(&r.name)
            .await
            .map_err(|source| Error::Get {
                kind: "Secret",
                name: r.name.clone(),
                source,
            })?;
        let Some(secret) = secret else {
            return Ok(Err(Blocked::pending(
                "CredentialsNotFound",
                format!("the credentials Secret {} does not exist", r.name),
                Duration::from_secs(30),
            )));
        };
        for (k, v) in secret.data.unwrap_or_default() {
            credentials.insert(k, String::from_utf8_lossy(&v.0).trim().to_string());
        }
    }
    let Some(admin) = token(ctx, ns, &model.name_any()).await? else {
        return Ok(Err(Blocked::pending(
            "WaitingForToken",
            "waiting for the Model's adapter token Secret".into(),
            Duration::from_secs(5),
        )));
    };
    Ok(Ok(Deps {
        model,
        max_per_replica,
        credentials,
        admin,
    }))
}

/// What the carriers' sidecars said.
#[derive(Default)]
struct Verified {
    /// Replicas that lost the adapter (their label is gone now).
    dropped: BTreeSet<String>,
    /// Replicas whose sidecar has it, with its reloads.
    listed: HashMap<String, adapters::Listed>,
}

/// Phase 2: asks each ready carrier's sidecar what it has. A replica that
/// no longer has the adapter (a restarted pod) loses its label, so the plan
/// loads it again; one whose engine restarted and whose sidecar loaded it
/// again says so (an Event, and `reloads` in status).
async fn verify_carriers(
    ctx: &Context,
    a: &Adapter,
    ns: &str,
    admin: &Admin,
    pods: &mut [Pod],
) -> Result<Verified> {
    let (key, served) = (label_key(a), served_name(a));
    let before: HashMap<&str, i32> = a
        .status
        .iter()
        .flat_map(|s| s.replicas.iter())
        .map(|r| (r.pod.as_str(), r.reloads.unwrap_or(0)))
        .collect();
    let mut out = Verified::default();
    for p in pods.iter_mut().filter(|p| p.labels().contains_key(&key)) {
        let Some(ip) = ip_of(p).filter(|_| view::pod_ready(p)) else {
            continue;
        };
        let pod = p.name_any();
        let Ok((200, body)) = call(&ip, http::Method::GET, "/v1/adapters", admin, None).await
        else {
            continue;
        };
        match adapters::listed(&body, &served) {
            Some(l) => {
                let was = before.get(pod.as_str()).copied().unwrap_or(0);
                if i64::from(l.reloads) > i64::from(was) {
                    publish(
                        ctx,
                        a,
                        EventType::Normal,
                        "Reloaded",
                        format!(
                            "the engine of replica {pod} restarted and lost {served}; its sidecar loaded it again ({} time(s) so far)",
                            l.reloads
                        ),
                    )
                    .await;
                }
                out.listed.insert(pod, l);
            }
            None => {
                set_label(ctx, ns, &pod, &key, false).await?;
                p.labels_mut().remove(&key);
                tracing::info!(adapter = %a.name_any(), %pod, "the replica no longer carries the adapter (restarted): loading it again");
                out.dropped.insert(pod);
            }
        }
    }
    Ok(out)
}

/// Replicas where loading kept failing (avoided for a while) and those
/// still backing off (they keep their turn: no other replica is chosen yet).
async fn failing_replicas(
    ctx: &Context,
    uid: &str,
    now: Instant,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let f = ctx.adapter_failures.lock().await;
    let mine: Vec<(&String, &Failures)> = f
        .iter()
        .filter(|((u, _), v)| u == uid && v.next > now)
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
}

/// The replicas as the planner sees them.
fn planner_view(pods: &[Pod]) -> Vec<Replica> {
    pods.iter()
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
        .collect()
}

/// What the loads of a round did.
#[derive(Default)]
struct Loaded {
    pods: BTreeSet<String>,
    failures: usize,
    last_error: String,
}

/// Phase 3a: loads the adapter on the plan's replicas (those backing off
/// wait for their turn); a failure backs off 10 s, 20 s, and after the third
/// in a row the replica is skipped for 5 minutes.
async fn load(
    ctx: &Context,
    a: &Adapter,
    ns: &str,
    deps: &Deps,
    plan: &adapters::Plan,
    pods: &[Pod],
    backing_off: &BTreeSet<String>,
) -> Result<Loaded> {
    let (key, served) = (label_key(a), served_name(a));
    let uid = a.uid().unwrap_or_default();
    let uid = uid.as_str();
    let now = Instant::now();
    let mut out = Loaded::default();
    for pod in plan.load.iter().filter(|p| !backing_off.contains(*p)) {
        let Some(ip) = pods.iter().find(|p| &p.name_any() == pod).and_then(ip_of) else {
            continue;
        };
        let body =
            json!({"name": served, "source": a.spec.source.uri, "credentials": deps.credentials});
        let res = call(
            &ip,
            http::Method::POST,
            "/v1/adapters",
            &deps.admin,
            Some(body),
        )
        .await;
        let why = match res {
            Ok((200 | 201, _)) => {
                set_label(ctx, ns, pod, &key, true).await?;
                out.pods.insert(pod.clone());
                ctx.adapter_failures
                    .lock()
                    .await
                    .remove(&(uid.to_string(), pod.clone()));
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
                continue;
            }
            Ok((code, body)) => format!("sidecar answered {code}: {}", body.trim()),
            Err(e) => e,
        };
        out.failures += 1;
        out.last_error = format!("loading on {pod}: {why}");
        let attempt = {
            let mut f = ctx.adapter_failures.lock().await;
            let e = f.entry((uid.to_string(), pod.clone())).or_insert(Failures {
                count: 0,
                next: now,
            });
            e.count += 1;
            e.next = now
                + if e.count >= MOVE_AFTER {
                    Duration::from_secs(300)
                } else {
                    Duration::from_secs(5 << e.count)
                };
            e.count
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
            format!("{} (attempt {attempt})", out.last_error),
        )
        .await;
    }
    let waiting: Vec<&str> = plan
        .load
        .iter()
        .filter(|p| backing_off.contains(*p))
        .map(String::as_str)
        .collect();
    if out.failures == 0 && !waiting.is_empty() {
        out.failures = waiting.len();
        out.last_error = format!(
            "a load failed on {}; retrying after a backoff",
            waiting.join(", ")
        );
    }
    Ok(out)
}

/// Phase 3b: unloads the adapter from the plan's extra carriers.
async fn unload(
    ctx: &Context,
    a: &Adapter,
    ns: &str,
    admin: &Admin,
    plan: &adapters::Plan,
    pods: &[Pod],
) -> Result<BTreeSet<String>> {
    let (key, served) = (label_key(a), served_name(a));
    let mut dropped = BTreeSet::new();
    for pod in &plan.unload {
        if let Some(ip) = pods.iter().find(|p| &p.name_any() == pod).and_then(ip_of) {
            let _ = call(
                &ip,
                http::Method::DELETE,
                &format!("/v1/adapters/{served}"),
                admin,
                None,
            )
            .await;
        }
        set_label(ctx, ns, pod, &key, false).await?;
        dropped.insert(pod.clone());
        publish(
            ctx,
            a,
            EventType::Normal,
            "Unloaded",
            format!("unloaded {served} from replica {pod} (fewer replicas wanted)"),
        )
        .await;
    }
    Ok(dropped)
}

/// The carriers for status: replicas labelled now (or loaded this round),
/// with when they got it and how often their sidecar reloaded it.
fn carriers(
    a: &Adapter,
    pods: &[Pod],
    loaded: &BTreeSet<String>,
    dropped: &BTreeSet<String>,
    listed: &HashMap<String, adapters::Listed>,
) -> Vec<AdapterReplicaStatus> {
    let key = label_key(a);
    let previous: HashMap<&str, Option<Time>> = a
        .status
        .iter()
        .flat_map(|s| s.replicas.iter())
        .map(|r| (r.pod.as_str(), r.loaded_at.clone()))
        .collect();
    pods.iter()
        .filter(|p| {
            let n = p.name_any();
            loaded.contains(&n) || (p.labels().contains_key(&key) && !dropped.contains(&n))
        })
        .map(|p| {
            let pod = p.name_any();
            let l = listed.get(&pod);
            AdapterReplicaStatus {
                node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
                loaded_at: previous
                    .get(pod.as_str())
                    .cloned()
                    .flatten()
                    .or_else(|| Some(Time(Timestamp::now()))),
                reloads: l
                    .filter(|l| l.reloads > 0)
                    .map(|l| i32::try_from(l.reloads).unwrap_or(i32::MAX)),
                last_reload_time: l
                    .and_then(|l| l.last_reload_unix)
                    .and_then(|s| i64::try_from(s).ok())
                    .and_then(|s| Timestamp::from_second(s).ok())
                    .map(Time),
                pod,
            }
        })
        .collect()
}

/// The phases for an Adapter that exists.
async fn apply(a: &Adapter, ctx: &Context, ns: &str) -> Result<Action> {
    let lock = model_lock(ctx, ns, &a.spec.model).await;
    let _serial = lock.lock().await;
    let uid = a.uid().ok_or(Error::MissingKey("uid"))?;
    let deps = match dereference(ctx, a, ns).await? {
        Ok(deps) => deps,
        Err(blocked) => {
            let outcome = Outcome {
                phase: blocked.phase,
                reason: blocked.reason,
                message: blocked.message,
                desired: 0,
                carriers: Vec::new(),
            };
            write_status(ctx, a, outcome).await?;
            return Ok(blocked
                .after
                .map_or_else(Action::await_change, Action::requeue));
        }
    };
    let mut pods = model_pods(ctx, ns, &deps.model);
    pods.sort_by_key(|p| p.name_any());
    let verified = verify_carriers(ctx, a, ns, &deps.admin, &mut pods).await?;

    let (avoid, backing_off) = failing_replicas(ctx, &uid, Instant::now()).await;
    let plan = adapters::plan(
        &a.name_any(),
        a.spec.replicas,
        deps.max_per_replica,
        &planner_view(&pods),
        &avoid,
    );
    let loaded = load(ctx, a, ns, &deps, &plan, &pods, &backing_off).await?;
    let mut dropped = unload(ctx, a, ns, &deps.admin, &plan, &pods).await?;
    dropped.extend(verified.dropped);

    apply_service(ctx, a, ns, &deps.model.name_any(), &uid).await?;

    // Status from the replicas' labels now (the cache may lag behind this
    // round's label changes: `loaded` and `dropped` cover them).
    let pods = model_pods(ctx, ns, &deps.model);
    let carriers = carriers(a, &pods, &loaded.pods, &dropped, &verified.listed);
    let (phase, reason, message) = adapters::phase(&adapters::Round {
        desired: plan.desired,
        loaded: carriers.len() as i32,
        failures: loaded.failures,
        last_error: loaded.last_error,
        short: plan.short,
        max_per_replica: deps.max_per_replica,
        model: a.spec.model.clone(),
    });
    let converged = phase == AdapterPhase::Ready;
    write_status(
        ctx,
        a,
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

/// Phase 4: the Adapter's Service, selecting exactly its carriers.
async fn apply_service(ctx: &Context, a: &Adapter, ns: &str, model: &str, uid: &str) -> Result<()> {
    let name = adapters::service_name(&a.name_any());
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

/// The finalizer's work: unload the adapter from every replica carrying
/// it; a sidecar that refuses keeps the finalizer (and says why).
async fn cleanup(a: &Adapter, ctx: &Context, ns: &str) -> Result<Action> {
    let lock = model_lock(ctx, ns, &a.spec.model).await;
    let _serial = lock.lock().await;
    let key = label_key(a);
    let served = served_name(a);
    let models: Api<Model> = Api::namespaced(ctx.client.clone(), ns);
    let model = models
        .get_opt(&a.spec.model)
        .await
        .map_err(|source| Error::Get {
            kind: "Model",
            name: a.spec.model.clone(),
            source,
        })?;
    let admin = match &model {
        Some(m) => token(ctx, ns, &m.name_any()).await?,
        None => None,
    };
    let pods: Vec<Pod> = ctx
        .pods
        .state()
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns) && p.labels().contains_key(&key))
        .map(|p| p.as_ref().clone())
        .collect();
    for p in &pods {
        let running = p.metadata.deletion_timestamp.is_none() && view::pod_ready(p);
        if let (true, Some(ip), Some(admin)) = (running, ip_of(p), admin.as_ref()) {
            let answer = call(
                &ip,
                http::Method::DELETE,
                &format!("/v1/adapters/{served}"),
                admin,
                None,
            )
            .await;
            let ok = matches!(answer, Ok((200, _)));
            ctx.metrics
                .adapter_operations
                .with_label_values(&["unload", if ok { "success" } else { "error" }])
                .inc();
            if !ok {
                let why = match answer {
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
