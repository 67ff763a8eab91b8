//! The plumbing every reconciler shares, once: the wrapper that measures a
//! reconcile and reports its outcome on the object ([`run`]), the error
//! policy with its backoff ([`error_policy`]), the status write
//! ([`apply_status`]) and Event publishing ([`publish`]).

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
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
    /// The cached status as JSON (None before the first status).
    fn status_json(&self) -> Option<serde_json::Value>;
    /// Status fields that other writers own (the energy accountant): left
    /// out when the controller's status is compared with the cached one.
    const FOREIGN_STATUS_FIELDS: &'static [&'static str];
    /// Whether a reconcile's writes are still on their way in the
    /// background: its success is not reported until they have gone (a
    /// failure is reported by the reconcile after it).
    fn settling(&self, _ctx: &Context) -> bool {
        false
    }
}

impl Reconciled for Model {
    const CONTROLLER: &'static str = "model";
    const KIND: &'static str = "Model";
    const FOREIGN_STATUS_FIELDS: &'static [&'static str] = &["energy", "cost"];
    fn conditions(&self) -> &[Condition] {
        self.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default()
    }
    fn status_json(&self) -> Option<serde_json::Value> {
        self.status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
    }
    fn settling(&self, ctx: &Context) -> bool {
        super::model::writes_on_their_way(ctx, self)
    }
}

impl Reconciled for Adapter {
    const CONTROLLER: &'static str = "adapter";
    const KIND: &'static str = "Adapter";
    const FOREIGN_STATUS_FIELDS: &'static [&'static str] =
        &["energyJoules", "generatedTokens", "requests"];
    fn conditions(&self) -> &[Condition] {
        self.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default()
    }
    fn status_json(&self) -> Option<serde_json::Value> {
        self.status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
    }
}

impl Reconciled for GPUPool {
    const CONTROLLER: &'static str = "gpupool";
    const KIND: &'static str = "GPUPool";
    const FOREIGN_STATUS_FIELDS: &'static [&'static str] =
        &["powerWatts", "energyJoules", "cost", "powerCap"];
    fn conditions(&self) -> &[Condition] {
        self.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default()
    }
    fn status_json(&self) -> Option<serde_json::Value> {
        self.status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
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
    // A success whose writes are on their way is not reported yet.
    let settling = res.is_ok() && obj.settling(&ctx);
    if obj.meta().deletion_timestamp.is_none() && !settling {
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

/// Whether `desired` (the controller's status) equals what `cached` shows,
/// leaving out the fields other writers own. Pure.
pub fn status_unchanged(
    desired: &serde_json::Value,
    cached: Option<&serde_json::Value>,
    foreign: &[&str],
) -> bool {
    let strip = |v: &serde_json::Value| -> serde_json::Map<String, serde_json::Value> {
        v.as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| !foreign.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    cached.is_some_and(|c| strip(c) == strip(desired))
}

/// [`apply_status`] with the controllers' field manager, as a reconcile
/// error naming the object; nothing is sent when the cached object already
/// shows this status (a reconcile that changes nothing writes nothing).
pub async fn write_status<K: Reconciled>(
    ctx: &Context,
    obj: &K,
    status: impl Serialize,
) -> Result<()> {
    if let Ok(desired) = serde_json::to_value(&status)
        && status_unchanged(
            &desired,
            obj.status_json().as_ref(),
            K::FOREIGN_STATUS_FIELDS,
        )
    {
        ctx.metrics
            .status_writes
            .with_label_values(&[K::CONTROLLER, "unchanged"])
            .inc();
        return Ok(());
    }
    ctx.metrics
        .status_writes
        .with_label_values(&[K::CONTROLLER, "written"])
        .inc();
    apply_status(&ctx.client, obj, strata_core::labels::FIELD_MANAGER, status)
        .await
        .map_err(|source| Error::WriteStatus {
            kind: K::KIND,
            name: obj.name_any(),
            source,
        })
}

/// How long kube-runtime's Recorder keeps an Event to count repeats into
/// it (its own cache TTL).
const EVENT_CACHE_TTL: Duration = Duration::from_secs(6 * 60);

/// Values by an Event's (reason, note), each forgotten `ttl` after its last
/// use. Pure (the caller passes the time).
#[derive(Debug)]
pub struct ByNote<T> {
    ttl: Duration,
    entries: HashMap<u64, (T, Instant)>,
}

impl<T: Clone> ByNote<T> {
    /// Empty, forgetting entries `ttl` after their last use.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: HashMap::new(),
        }
    }

    /// The value for (reason, note), made now if there is none; forgets the
    /// entries unused for `ttl` first.
    pub fn get(&mut self, reason: &str, note: &str, now: Instant, make: impl FnOnce() -> T) -> T {
        let ttl = self.ttl;
        self.entries
            .retain(|_, (_, used)| now.saturating_duration_since(*used) < ttl);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (reason, note).hash(&mut h);
        let entry = self
            .entries
            .entry(h.finish())
            .or_insert_with(|| (make(), now));
        entry.1 = now;
        entry.0.clone()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The controllers' Event recorders. kube-runtime's `Recorder` counts an
/// object's Events of the same type, reason and action into one Event (a
/// series), keeping the first note: a second scale-up (`2 -> 3` after
/// `1 -> 2`) or a second replica placed would only raise the first one's
/// count. As client-go does, an Event here aggregates only with Events of
/// the same note (a failure repeated every reconcile stays one Event with
/// a count); another note is an Event of its own, so the trail of
/// decisions and placements reads as it happened.
pub struct Recorders {
    client: Client,
    reporter: Reporter,
    by_note: std::sync::Mutex<ByNote<Recorder>>,
}

impl Recorders {
    /// Recorders for `client` reporting as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            by_note: std::sync::Mutex::new(ByNote::new(EVENT_CACHE_TTL)),
        }
    }

    fn for_note(&self, reason: &str, note: &str) -> Recorder {
        let make = || Recorder::new(self.client.clone(), self.reporter.clone());
        match self.by_note.lock() {
            Ok(mut m) => m.get(reason, note, Instant::now(), make),
            Err(_) => make(),
        }
    }
}

/// Events that may be in flight at once (waiting in their lane or sent).
pub const EVENTS_IN_FLIGHT: usize = 2048;

/// Publishes an Event on `obj` in the background: a reconcile never waits
/// for an Event (as client-go's recorder, which queues them for a
/// broadcaster). The Event waits in its lane while the client's rate
/// limiter is busy with other writes and statuses (at most
/// two minutes; its time is when it is sent). A
/// failure to publish is logged, never fatal; with [`EVENTS_IN_FLIGHT`]
/// already waiting or on their way (an API server that does not answer),
/// the Event is dropped and counted (`strata_events_dropped_total`).
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
    let note = ev.note.as_deref().unwrap_or_default();
    let recorder = ctx.events.for_note(reason, note);
    let Ok(slot) = ctx.event_slots.clone().try_acquire_owned() else {
        ctx.metrics.events_dropped.inc();
        tracing::debug!(name = %obj.name_any(), "dropped event {reason}: {EVENTS_IN_FLIGHT} in flight");
        return;
    };
    let reference = obj.object_ref(&());
    let name = obj.name_any();
    let reason = reason.to_string();
    let lanes = ctx.lanes.clone();
    tokio::spawn(async move {
        let turn = lanes.turn(crate::ratelimit::Lane::Event).await;
        if let Err(e) = recorder.publish(&ev, &reference).await {
            tracing::debug!(%name, "publishing event {reason}: {e}");
        }
        drop((turn, slot));
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_the_cache_already_shows_is_not_written() {
        let cached = json!({"replicas": 2, "conditions": [{"type": "Ready"}], "energy": {"energyJoules": 5.0}});
        let foreign = ["energy", "cost"];
        // The same, without the accountant's fields: unchanged.
        let same = json!({"replicas": 2, "conditions": [{"type": "Ready"}]});
        assert!(status_unchanged(&same, Some(&cached), &foreign));
        // A changed field, a new field, a dropped field: written.
        for desired in [
            json!({"replicas": 3, "conditions": [{"type": "Ready"}]}),
            json!({"replicas": 2, "conditions": [{"type": "Ready"}], "pools": "h100"}),
            json!({"replicas": 2}),
        ] {
            assert!(
                !status_unchanged(&desired, Some(&cached), &foreign),
                "{desired}"
            );
        }
        // No status yet: written.
        assert!(!status_unchanged(&same, None, &foreign));
    }

    use super::*;

    #[test]
    fn events_aggregate_by_note_and_are_forgotten_after_the_ttl() {
        let mut by = ByNote::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let mut made = 0;
        let mut get = |by: &mut ByNote<u32>, reason: &str, note: &str, at: Duration| {
            by.get(reason, note, t0 + at, || {
                made += 1;
                made
            })
        };
        let up1 = get(&mut by, "ScaledUp", "1 -> 2", Duration::ZERO);
        assert_eq!(
            get(&mut by, "ScaledUp", "1 -> 2", Duration::from_secs(30)),
            up1,
            "same note: same recorder"
        );
        let up2 = get(&mut by, "ScaledUp", "2 -> 3", Duration::from_secs(31));
        assert_ne!(up2, up1, "another note: an Event of its own");
        assert_ne!(
            get(&mut by, "ScaledDown", "1 -> 2", Duration::from_secs(32)),
            up1,
            "another reason"
        );
        assert_eq!(by.len(), 3);
        // Used at 30 s, so kept until 90 s; the others go after 91 and 92 s.
        assert_eq!(
            get(&mut by, "ScaledUp", "1 -> 2", Duration::from_secs(89)),
            up1
        );
        assert_eq!(by.len(), 3);
        let again = get(&mut by, "ScaledUp", "2 -> 3", Duration::from_secs(200));
        assert_ne!(again, up2, "forgotten after the TTL: a new Event");
        assert_eq!(by.len(), 1);
        assert!(!by.is_empty());
    }
}
