//! The plumbing every reconciler shares, once: the wrapper that measures a
//! reconcile and reports its outcome on the object ([`run`]), the error
//! policy with its backoff ([`error_policy`]), the status write
//! ([`apply_status`]) and Event publishing ([`publish`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use strata_crds::{Adapter, GPUPool, Model};

use super::Context;
use crate::error::{Error, Result};

/// A kind a Strata controller reconciles.
pub trait Reconciled:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
    /// The controller's name: the `controller` label of its metrics.
    const CONTROLLER: &'static str;
    /// The kind, for messages.
    const KIND: &'static str;
    /// The object's status conditions (none before its first status).
    fn conditions(&self) -> &[Condition];
}

impl Reconciled for Model {
    const CONTROLLER: &'static str = "model";
    const KIND: &'static str = "Model";
    fn conditions(&self) -> &[Condition] {
        self.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default()
    }
}

impl Reconciled for Adapter {
    const CONTROLLER: &'static str = "adapter";
    const KIND: &'static str = "Adapter";
    fn conditions(&self) -> &[Condition] {
        self.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default()
    }
}

impl Reconciled for GPUPool {
    const CONTROLLER: &'static str = "gpupool";
    const KIND: &'static str = "GPUPool";
    fn conditions(&self) -> &[Condition] {
        self.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default()
    }
}

/// Runs one reconcile (`phases`) of `obj`: counts it in flight, times it,
/// counts its result, and reports it on the object (a failure as a Warning
/// Event and the `ReconcileError` condition, see [`super::report`]).
pub async fn run<K, F, Fut>(obj: Arc<K>, ctx: Arc<Context>, phases: F) -> Result<Action>
where
    K: Reconciled,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action>>,
{
    let m = &ctx.metrics;
    let controller = K::CONTROLLER;
    m.in_flight.with_label_values(&[controller]).inc();
    let start = Instant::now();
    let res = phases(obj.clone(), ctx.clone()).await;
    m.in_flight.with_label_values(&[controller]).dec();
    m.reconcile_duration
        .with_label_values(&[controller])
        .observe(start.elapsed().as_secs_f64());
    let result = if res.is_ok() { "success" } else { "error" };
    m.reconciles.with_label_values(&[controller, result]).inc();
    if obj.meta().deletion_timestamp.is_none() {
        let outcome = res.as_ref().map(|_| ());
        super::report::report(&ctx, obj.as_ref(), outcome).await;
    }
    res
}

/// On error: count it and retry with backoff (5 s doubling to 5 minutes;
/// [`run`] has already told the object).
pub fn error_policy<K: Reconciled>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    let controller = K::CONTROLLER;
    ctx.metrics
        .errors
        .with_label_values(&[controller, err.metric_label()])
        .inc();
    tracing::warn!(
        controller,
        name = %obj.name_any(),
        namespace = ?obj.namespace(),
        category = err.metric_label(),
        "reconcile failed: {err}"
    );
    Action::requeue(super::report::retry_after(&ctx, obj.as_ref()))
}

/// Writes `status` (the fields `manager` owns) by server-side apply, forced:
/// each writer of a status (the controller, the energy accountant, the
/// error reporter) has its own field manager and never removes another's
/// fields. Works for namespaced and cluster-scoped kinds.
pub async fn apply_status<K: Reconciled>(
    client: &Client,
    obj: &K,
    manager: &str,
    status: impl Serialize,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let url = K::url_path(&(), obj.namespace().as_deref());
    let req = kube::core::Request::new(url)
        .patch_subresource(
            "status",
            &obj.name_any(),
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&patch),
        )
        .map_err(kube::Error::BuildRequest)?;
    client.request::<K>(req).await.map(|_| ())
}

/// [`apply_status`] with the controllers' field manager, as a reconcile
/// error naming the object.
pub async fn write_status<K: Reconciled>(
    ctx: &Context,
    obj: &K,
    status: impl Serialize,
) -> Result<()> {
    apply_status(&ctx.client, obj, strata_core::labels::FIELD_MANAGER, status)
        .await
        .map_err(|source| Error::WriteStatus {
            kind: K::KIND,
            name: obj.name_any(),
            source,
        })
}

/// Publishes an Event on `obj`; a failure to publish is logged, never fatal.
pub async fn publish<K: Reconciled>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(super::report::cut(&note, super::report::MAX_NOTE)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::debug!(name = %obj.name_any(), "publishing event {reason}: {e}");
    }
}
