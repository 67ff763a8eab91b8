//! A Model reconcile's writes, sent in the background.
//!
//! The reconcile decides (which pods to delete, where new replicas go, a
//! new Model's Secret), records what it decided as expectations (the pods
//! named here, so that the next reconcile counts them before the API
//! server has answered) and hands the writes to a task; it does not wait
//! behind the client's rate limiter for them. At 1,000 new Models those
//! waits were the reconcile's p99 (2.5 s for three requests).
//!
//! The task sends them in order: the Secret the replicas mount, the
//! deletions (each with its Event), then the new pods at once (each with
//! its `Placed` Event). A write that fails stops the rest; what was not
//! sent is taken back (expectations, GPU reservations), and the failure is
//! left in the Model's memo and the Model woken: its next reconcile reports
//! it as its own (`ReconcileError`, a Warning Event) and backs off, as a
//! reconcile that had failed itself would (see [`super::model`]).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use strata_core::placement::Assignment;
use strata_core::rollout::DeleteReason;
use strata_crds::Model;

use super::Context;
use super::reconcile::publish;
use crate::error::Error;

/// Background write tasks sending at once at most (each waits for its
/// turn at the client's rate limiter anyway); beyond, they wait for a slot.
pub const IN_FLIGHT: usize = 256;

/// A deletion: the pod, why, and its Event.
pub struct Delete {
    pub pod: String,
    pub reason: DeleteReason,
    pub params: DeleteParams,
    pub event: (EventType, String),
}

/// A new replica: its pod (named) and where placement put it.
pub struct Create {
    /// (Shared with the Model's expectations while it is on its way.)
    pub pod: Arc<Pod>,
    pub assignment: Assignment,
}

/// One reconcile's writes.
#[derive(Default)]
pub struct Writes {
    /// A new Model's Secret, created first.
    pub secret: Option<Secret>,
    pub deletes: Vec<Delete>,
    pub creates: Vec<Create>,
}

impl Writes {
    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.secret.is_none() && self.deletes.is_empty() && self.creates.is_empty()
    }
}

/// Sends `writes` of `model` (memo `memo`) in a task; the caller has
/// recorded them in the memo (expectations, `writes` in flight).
pub fn spawn(ctx: &Arc<Context>, model: &Arc<Model>, memo: String, writes: Writes) {
    let (ctx, model) = (ctx.clone(), model.clone());
    tokio::spawn(async move {
        let slot = ctx.write_slots.clone().acquire_owned().await;
        let deleting: Vec<String> = writes.deletes.iter().map(|d| d.pod.clone()).collect();
        let creating: Vec<String> = writes.creates.iter().map(|c| c.pod.name_any()).collect();
        let sent = AssertUnwindSafe(send(&ctx, &model, &memo, writes))
            .catch_unwind()
            .await;
        drop(slot);
        let failure = match sent {
            Ok(result) => result.err(),
            // A panic (a bug) left expectations and reservations behind
            // that no answer will settle: all are taken back, so the next
            // reconcile starts from what the cache shows.
            Err(_) => {
                tracing::error!(model = %model.name_any(), "the writes task panicked; its writes are taken back");
                take_back(&ctx, &memo, &deleting, &creating).await;
                Some(Error::WritesAborted {
                    model: model.name_any(),
                })
            }
        };
        let wake = super::model::with_memo(&ctx, &memo, |m| {
            m.writes = m.writes.saturating_sub(1);
            let failed = failure.is_some();
            if failed {
                m.failure = failure;
            }
            failed
        });
        // Woken to report a failure, or to clear a `ReconcileError` an
        // earlier failure left (nothing else may wake it for a while).
        let key = super::report::key_of(model.as_ref());
        let failing = ctx
            .failures
            .lock()
            .map(|f| f.contains_key(&key))
            .unwrap_or(false);
        if wake || failing {
            // The receiver is gone only when the controller stopped.
            let _ = ctx
                .wake_models
                .unbounded_send(ObjectRef::from_obj(model.as_ref()));
        }
    });
}

async fn send(ctx: &Context, model: &Model, memo: &str, writes: Writes) -> Result<(), Error> {
    let Writes {
        secret,
        deletes,
        creates,
    } = writes;
    let ns = model.namespace().unwrap_or_default();
    let creating: Vec<String> = creates.iter().map(|c| c.pod.name_any()).collect();
    // What was not sent is taken back: the deletions from `from_delete`
    // on and every create.
    let undo = async |from_delete: usize, e: Error| {
        let deleting: Vec<String> = deletes[from_delete..]
            .iter()
            .map(|d| d.pod.clone())
            .collect();
        take_back(ctx, memo, &deleting, &creating).await;
        e
    };
    if let Some(secret) = secret
        && let Err(e) = create_secret(ctx, memo, &ns, &secret).await
    {
        return Err(undo(0, e).await);
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for (i, d) in deletes.iter().enumerate() {
        match pods.delete(&d.pod, &d.params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                let e = Error::DeletePod {
                    pod: d.pod.clone(),
                    source,
                };
                return Err(undo(i, e).await);
            }
        }
        ctx.metrics
            .deletions
            .with_label_values(&[d.reason.as_str()])
            .inc();
        let (ty, note) = d.event.clone();
        publish(ctx, model, ty, d.reason.as_str(), "Delete", note).await;
    }
    create_pods(ctx, model, memo, &pods, creates).await
}

/// Creates the new replicas' pods at once; confirms each created one (its
/// expectation and reservation count from now) and takes back the others.
async fn create_pods(
    ctx: &Context,
    model: &Model,
    memo: &str,
    api: &Api<Pod>,
    creates: Vec<Create>,
) -> Result<(), Error> {
    let results = futures::future::join_all(
        creates
            .iter()
            .map(|c| async { api.create(&PostParams::default(), c.pod.as_ref()).await }),
    )
    .await;
    let now = Instant::now();
    let mut failed = None;
    let (mut created, mut not_created) = (Vec::new(), Vec::new());
    for (c, result) in creates.iter().zip(results) {
        let name = c.pod.name_any();
        match result {
            Ok(_) => created.push(name),
            Err(source) => {
                not_created.push(name);
                failed.get_or_insert(Error::CreatePod {
                    model: model.name_any(),
                    node: c.assignment.node.clone(),
                    source,
                });
            }
        }
    }
    super::model::with_memo(ctx, memo, |m| {
        m.pods.created(created.iter().map(String::as_str), now);
        m.pods.not_created(not_created.iter().map(String::as_str));
    });
    {
        let mut ledger = ctx.placement.lock().await;
        for n in &created {
            if let Some(p) = ledger.get_mut(n) {
                p.at = now;
                p.sending = false;
            }
        }
        for n in &not_created {
            ledger.remove(n);
        }
    }
    for c in creates
        .iter()
        .filter(|c| created.contains(&c.pod.name_any()))
    {
        let a = &c.assignment;
        ctx.metrics.placements.with_label_values(&[&a.pool]).inc();
        publish(
            ctx,
            model,
            EventType::Normal,
            "Placed",
            "Create",
            format!(
                "replica {} on node {} (pool {}, {} GPU(s))",
                c.pod.name_any(),
                a.node,
                a.pool,
                a.gpus
            ),
        )
        .await;
    }
    failed.map_or(Ok(()), Err)
}

/// Takes back writes that will not be sent: their expectations (the
/// pods `deleting` stay, the pods `creating` are not coming) and the GPU
/// reservations of the pods `creating`.
async fn take_back(ctx: &Context, memo: &str, deleting: &[String], creating: &[String]) {
    super::model::with_memo(ctx, memo, |m| {
        m.pods.not_deleted(deleting.iter().map(String::as_str));
        m.pods.not_created(creating.iter().map(String::as_str));
    });
    let mut ledger = ctx.placement.lock().await;
    for n in creating {
        ledger.remove(n);
    }
}

/// Creates a new Model's Secret. One that exists already (a create that
/// raced, or the Model's own from before) is looked at by the next
/// reconcile.
async fn create_secret(ctx: &Context, memo: &str, ns: &str, secret: &Secret) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let label = match api.create(&PostParams::default(), secret).await {
        Ok(_) => "created",
        Err(kube::Error::Api(e)) if e.code == 409 => {
            super::model::with_memo(ctx, memo, super::model::Memo::look_at_secret);
            "exists"
        }
        Err(source) => {
            super::model::with_memo(ctx, memo, super::model::Memo::look_at_secret);
            return Err(Error::Write {
                kind: "Secret",
                name: secret.name_any(),
                source,
            });
        }
    };
    ctx.metrics
        .child_applies
        .with_label_values(&["Secret", label])
        .inc();
    Ok(())
}
