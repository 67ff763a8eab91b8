//! Model status writes, in the background and coalesced.
//!
//! A reconcile computes the Model's status and hands it here; it does not
//! wait for the API server (whose answer, behind the client's rate limiter,
//! took most of a reconcile's time at 1,000 Models). One write per Model is
//! on its way at a time: statuses computed meanwhile replace each other and
//! only the newest is written after it (a burst of pod events costs one or
//! two writes, not one per reconcile), so an older status never lands
//! after a newer one. A status equal to what the cache shows, or to what
//! this process wrote moments ago (the cache may not show it yet), is not
//! sent. A failed write is retried with backoff (1 s doubling to 1 minute)
//! unless a newer status supersedes it; a Model that is gone drops it. A
//! status the API server rejects as invalid (400, 422: e.g. an older CRD
//! schema than this operator's) is not retried: it is logged with the
//! server's message and counted (`result="rejected"`), and the same status
//! submitted again counts as written for [`REJECTED_HOLD`] (a different
//! one is sent at once; after the hold it is tried again, in case the CRD
//! was upgraded meanwhile).
//!
//! A write waits for its turn in the status lane ([`Lanes`]): while the
//! client's rate limiter is busy with the operator's other writes (the
//! pods, Secrets and Services of a thousand new Models), statuses wait, up
//! to a minute, and the one sent at the turn is
//! the newest: a Model created in a busy minute gets one status write
//! (its replicas Ready), not one per step on the way.
//!
//! [`Coalescer`] is the bookkeeping (pure: time is passed in); [`Writer`]
//! runs the writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use prometheus::IntCounterVec;
use serde_json::Value;
use strata_crds::Model;

use super::reconcile::{Reconciled, apply_status};
use crate::ratelimit::{Lane, Lanes};

/// How long a status this process wrote is taken as the truth about its
/// own fields, while the cache catches up.
pub const WRITTEN_FRESH: Duration = Duration::from_secs(30);

/// Longest wait before retrying a failed write.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// How long a status the API server rejected is not sent again.
pub const REJECTED_HOLD: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
struct Slot {
    /// A task writes this key's statuses (waiting for its turn, sending,
    /// or backing off).
    task: bool,
    /// The status being sent now.
    writing: Option<Value>,
    /// The newest status submitted, to send at the task's next turn.
    next: Option<Value>,
    /// The last status written, and when.
    written: Option<(Value, Instant)>,
    /// Failed writes in a row.
    failures: u32,
    /// The last status the API server rejected as invalid, and when.
    rejected: Option<(Value, Instant)>,
}

impl Slot {
    /// Whether `status` is what the object holds: what this process wrote
    /// moments ago, or else what the cache shows (`shown`).
    fn holds(&self, status: &Value, shown: bool, now: Instant) -> bool {
        if self.rejected_lately(now).is_some_and(|r| r == status) {
            // Sending it again would be rejected again.
            return true;
        }
        match &self.written {
            // What this process wrote moments ago is what the object holds
            // for these fields, whatever the (possibly older) cache shows.
            Some((written, at)) if now.saturating_duration_since(*at) < WRITTEN_FRESH => {
                written == status
            }
            _ => shown,
        }
    }

    /// The status rejected less than [`REJECTED_HOLD`] ago.
    fn rejected_lately(&self, now: Instant) -> Option<&Value> {
        self.rejected
            .as_ref()
            .filter(|(_, at)| now.saturating_duration_since(*at) < REJECTED_HOLD)
            .map(|(v, _)| v)
    }
}

/// What [`Coalescer::submit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submit {
    /// Already shown or written: nothing to send.
    Unchanged,
    /// Start a task for the key (it sends the newest status at its turn).
    Start,
    /// The key's task sends this status at its next turn (replacing any
    /// other waiting), or not at all if it is what the object holds or
    /// the one being sent.
    Queued,
}

/// How a write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Written,
    Failed,
    /// The API server refused the status as invalid: not retried.
    Rejected,
    /// The object is gone.
    Gone,
}

/// The bookkeeping, by key (`namespace/name#uid`).
#[derive(Debug, Default)]
pub struct Coalescer {
    slots: HashMap<String, Slot>,
    /// When the slots were last pruned.
    pruned: Option<Instant>,
}

impl Coalescer {
    /// A reconcile's status for `key`; `shown` tells whether the cache
    /// already shows it.
    pub fn submit(&mut self, key: &str, status: Value, shown: bool, now: Instant) -> Submit {
        self.prune(now);
        if let Some(slot) = self.slots.get_mut(key)
            && slot.task
        {
            slot.next = match &slot.writing {
                // Being sent: this one after it, unless it is the same.
                Some(writing) => (*writing != status).then_some(status),
                // Still waiting for its turn (or backing off): this one
                // instead, unless the object holds it already.
                None => (!slot.holds(&status, shown, now)).then_some(status),
            };
            return Submit::Queued;
        }
        if self
            .slots
            .get(key)
            .map_or(shown, |slot| slot.holds(&status, shown, now))
        {
            // (No slot made for a status that needs nothing.)
            return Submit::Unchanged;
        }
        let slot = self.slots.entry(key.to_string()).or_default();
        slot.task = true;
        slot.next = Some(status);
        Submit::Start
    }

    /// Forgets slots with no task and nothing recent to remember; at most
    /// once per [`WRITTEN_FRESH`] (a pass over every Model's slot is not
    /// work for each submit).
    fn prune(&mut self, now: Instant) {
        if self
            .pruned
            .is_some_and(|at| now.saturating_duration_since(at) < WRITTEN_FRESH)
        {
            return;
        }
        self.pruned = Some(now);
        self.slots.retain(|_, s| {
            s.task
                || s.rejected_lately(now).is_some()
                || s.written
                    .as_ref()
                    .is_some_and(|(_, at)| now.saturating_duration_since(*at) < WRITTEN_FRESH)
        });
    }

    /// The key's task has its turn: the status to send now (the newest
    /// submitted), or None when there is none left (the task ends).
    pub fn sending(&mut self, key: &str) -> Option<Value> {
        let slot = self.slots.get_mut(key)?;
        match slot.next.take() {
            Some(next) => {
                slot.writing = Some(next.clone());
                Some(next)
            }
            None => {
                slot.task = false;
                None
            }
        }
    }

    /// The write of `key` finished: how long the task waits before its
    /// next turn, or None when it is done.
    pub fn done(&mut self, key: &str, how: Done, now: Instant) -> Option<Duration> {
        let slot = self.slots.get_mut(key)?;
        let writing = slot.writing.take()?;
        match how {
            Done::Gone => {
                self.slots.remove(key);
                None
            }
            // Settled either way (a rejection is not retried): the task
            // goes on with a newer status at once, or ends.
            Done::Written | Done::Rejected => {
                slot.failures = 0;
                let settled = Some((writing, now));
                if how == Done::Written {
                    slot.written = settled;
                } else {
                    slot.rejected = settled;
                }
                if slot.next.is_none() {
                    slot.task = false;
                    return None;
                }
                Some(Duration::ZERO)
            }
            Done::Failed => {
                slot.failures = slot.failures.saturating_add(1);
                slot.written = None;
                slot.next.get_or_insert(writing);
                let exp = slot.failures.saturating_sub(1).min(6);
                Some((Duration::from_secs(1) * (1 << exp)).min(MAX_RETRY))
            }
        }
    }

    /// The newest status handed over for `key`: waiting, being written, or
    /// written less than [`WRITTEN_FRESH`] ago.
    pub fn latest(&self, key: &str, now: Instant) -> Option<&Value> {
        let slot = self.slots.get(key)?;
        slot.next.as_ref().or(slot.writing.as_ref()).or(slot
            .written
            .as_ref()
            .filter(|(_, at)| now.saturating_duration_since(*at) < WRITTEN_FRESH)
            .map(|(v, _)| v))
    }

    /// Keys with a task (a write waiting, on its way or backing off).
    pub fn in_flight(&self) -> usize {
        self.slots.values().filter(|s| s.task).count()
    }
}

/// Whether the cache shows `model` itself: its name with its UID.
fn shows(models: &Store<Model>, model: &Model) -> bool {
    models
        .get(&ObjectRef::from_obj(model))
        .is_some_and(|cached| cached.metadata.uid == model.metadata.uid)
}

/// Writes Model statuses in the background.
pub struct Writer {
    coalescer: Mutex<Coalescer>,
    client: Client,
    /// The Model cache: a write is sent only while it shows the Model the
    /// status was computed for (same UID).
    models: Store<Model>,
    /// Statuses wait for the operator's other writes (see [`Lanes`]).
    lanes: Lanes,
    /// `strata_status_writes_total`.
    writes: IntCounterVec,
}

impl Writer {
    /// Writes with `client` the statuses of the Models `models` shows,
    /// counting in `writes`.
    pub fn new(
        client: Client,
        models: Store<Model>,
        lanes: Lanes,
        writes: IntCounterVec,
    ) -> Arc<Self> {
        Arc::new(Self {
            coalescer: Mutex::new(Coalescer::default()),
            client,
            models,
            lanes,
            writes,
        })
    }

    fn coalescer(&self) -> std::sync::MutexGuard<'_, Coalescer> {
        self.coalescer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, result: &str) {
        self.writes
            .with_label_values(&[Model::CONTROLLER, result])
            .inc();
    }

    /// Hands `model`'s status over: written in the background unless it is
    /// shown or written already (see the module's description).
    pub fn submit(self: &Arc<Self>, model: &Model, key: &str, status: Value) {
        let shown = super::reconcile::status_unchanged(
            &status,
            model.status_json().as_ref(),
            Model::FOREIGN_STATUS_FIELDS,
        );
        match self.coalescer().submit(key, status, shown, Instant::now()) {
            Submit::Unchanged => self.count("unchanged"),
            Submit::Queued => self.count("coalesced"),
            Submit::Start => {
                let this = self.clone();
                let (key, target) = (key.to_string(), model.clone());
                tokio::spawn(async move { this.write(&key, &target).await });
            }
        }
    }

    /// The key's task: at each turn, the newest status submitted.
    async fn write(&self, key: &str, model: &Model) {
        loop {
            let turn = self.lanes.turn(Lane::Status).await;
            let Some(status) = self.coalescer().sending(key) else {
                return;
            };
            let how = if !shows(&self.models, model) {
                // Deleted, maybe replaced by a Model of the same name: a
                // status write carries no UID precondition (the status
                // subresource keeps the stored metadata), so it would land
                // on the new one.
                self.count("gone");
                Done::Gone
            } else {
                self.send(key, model, &status).await
            };
            drop(turn);
            let Some(delay) = self.coalescer().done(key, how, Instant::now()) else {
                return;
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// One write of `status` to `model`.
    async fn send(&self, key: &str, model: &Model, status: &Value) -> Done {
        match apply_status(
            &self.client,
            model,
            strata_core::labels::FIELD_MANAGER,
            status,
        )
        .await
        {
            Ok(()) => {
                self.count("written");
                Done::Written
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                self.count("gone");
                Done::Gone
            }
            Err(kube::Error::Api(e)) if e.code == 400 || e.code == 422 => {
                self.count("rejected");
                tracing::error!(
                    model = %key,
                    name = %model.name_any(),
                    code = e.code,
                    reason = %e.reason,
                    "the API server rejected the Model's status (not retried while the status stays the same): {}",
                    e.message
                );
                Done::Rejected
            }
            Err(e) => {
                self.count("failed");
                tracing::warn!(model = %key, name = %model.name_any(), "writing the Model's status failed (retried): {e}");
                Done::Failed
            }
        }
    }

    /// See [`Coalescer::latest`], as the status type.
    pub fn latest<S: serde::de::DeserializeOwned>(&self, key: &str) -> Option<S> {
        let value = self.coalescer().latest(key, Instant::now())?.clone();
        serde_json::from_value(value).ok()
    }

    /// Models with a status write on its way (for tests and diagnostics).
    pub fn in_flight(&self) -> usize {
        self.coalescer().in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The sample Model, named `name` in namespace `ns` with `uid`.
    fn model(name: &str, uid: &str) -> Model {
        let text = include_str!("../../../samples/model-llama.yaml");
        let mut model: Model =
            serde_json::from_value(strata_crds::validation::yaml_to_json(text).expect("yaml"))
                .expect("a Model");
        model.metadata.name = Some(name.into());
        model.metadata.namespace = Some("ns".into());
        model.metadata.uid = Some(uid.into());
        model
    }

    #[test]
    fn a_status_is_for_the_model_the_cache_shows_by_uid() {
        use kube::runtime::watcher::Event;
        let (store, mut writer) = kube::runtime::reflector::store::<Model>();
        let old = model("llama", "uid-1");
        // Not in the cache (deleted before the write's turn): not sent.
        assert!(!shows(&store, &old));
        writer.apply_watcher_event(&Event::Apply(old.clone()));
        assert!(shows(&store, &old));
        // Deleted and created again under its name: the old Model's status
        // must not land on the new one.
        writer.apply_watcher_event(&Event::Delete(old.clone()));
        let new = model("llama", "uid-2");
        writer.apply_watcher_event(&Event::Apply(new.clone()));
        assert!(!shows(&store, &old));
        assert!(shows(&store, &new));
    }

    #[test]
    fn a_rejected_status_is_not_sent_again_until_it_changes_or_the_hold_passes() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        assert_eq!(c.submit("a", json!(1), false, t0), Submit::Start);
        assert_eq!(c.sending("a"), Some(json!(1)));
        // Rejected: no retry, the task ends.
        assert_eq!(c.done("a", Done::Rejected, t0), None);
        assert_eq!(c.in_flight(), 0);
        // The same status again (every reconcile computes it): nothing to
        // send, even after the slots are pruned.
        let later = t0 + WRITTEN_FRESH * 2;
        assert_eq!(c.submit("a", json!(1), false, later), Submit::Unchanged);
        // A different status is sent at once.
        assert_eq!(c.submit("a", json!(2), false, later), Submit::Start);
        assert_eq!(c.sending("a"), Some(json!(2)));
        assert_eq!(c.done("a", Done::Written, later), None);
        // After the hold, the rejected one is tried again (the CRD may have
        // been upgraded).
        assert_eq!(
            c.submit("a", json!(1), false, t0 + REJECTED_HOLD),
            Submit::Start
        );
    }

    #[test]
    fn a_rejected_status_gives_way_to_the_newer_one_waiting() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        assert_eq!(c.submit("a", json!(1), false, t0), Submit::Start);
        assert_eq!(c.sending("a"), Some(json!(1)));
        assert_eq!(c.submit("a", json!(2), false, t0), Submit::Queued);
        assert_eq!(c.done("a", Done::Rejected, t0), Some(Duration::ZERO));
        assert_eq!(c.sending("a"), Some(json!(2)));
    }

    #[test]
    fn one_write_at_a_time_and_only_the_newest_waits() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        assert_eq!(c.submit("a", json!(1), false, t0), Submit::Start);
        // Before its turn, 2 replaces 1: only 2 is sent.
        assert_eq!(c.submit("a", json!(2), false, t0), Submit::Queued);
        assert_eq!(c.latest("a", t0), Some(&json!(2)));
        assert_eq!(c.sending("a"), Some(json!(2)));
        // While 2 is sent, 3 then 4 arrive: only 4 is sent next.
        assert_eq!(c.submit("a", json!(3), false, t0), Submit::Queued);
        assert_eq!(c.submit("a", json!(4), false, t0), Submit::Queued);
        assert_eq!(c.in_flight(), 1);
        assert_eq!(c.done("a", Done::Written, t0), Some(Duration::ZERO));
        assert_eq!(c.latest("a", t0), Some(&json!(4)));
        assert_eq!(c.sending("a"), Some(json!(4)));
        assert_eq!(c.done("a", Done::Written, t0), None);
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.latest("a", t0), Some(&json!(4)), "written moments ago");
        assert_eq!(c.latest("a", t0 + WRITTEN_FRESH), None);
        // Another key is independent.
        assert_eq!(c.submit("b", json!(1), false, t0), Submit::Start);
    }

    #[test]
    fn a_status_equal_to_the_one_being_written_cancels_the_waiting_one() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        c.submit("a", json!(1), false, t0);
        assert_eq!(c.sending("a"), Some(json!(1)));
        c.submit("a", json!(2), false, t0);
        // Back to 1 (the one on its way): nothing more to write.
        assert_eq!(c.submit("a", json!(1), false, t0), Submit::Queued);
        assert_eq!(c.done("a", Done::Written, t0), None);
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn a_waiting_status_back_to_what_the_object_holds_is_not_sent() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        // The cache shows 1; 2 waits for its turn, then 1 again.
        assert_eq!(c.submit("a", json!(2), false, t0), Submit::Start);
        assert_eq!(c.submit("a", json!(1), true, t0), Submit::Queued);
        assert_eq!(c.latest("a", t0), None);
        // At its turn there is nothing to send, and the task ends.
        assert_eq!(c.sending("a"), None);
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.submit("a", json!(3), false, t0), Submit::Start);
    }

    #[test]
    fn what_was_just_written_counts_over_a_lagging_cache() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        assert_eq!(c.submit("a", json!(1), true, t0), Submit::Unchanged);
        c.submit("a", json!(2), false, t0);
        c.sending("a");
        c.done("a", Done::Written, t0);
        // The cache still shows 1 (so 2 is "not shown"): 2 is not sent again.
        assert_eq!(c.submit("a", json!(2), false, t0), Submit::Unchanged);
        // And 1, which the cache shows, is written back: the object holds 2.
        assert_eq!(c.submit("a", json!(1), true, t0), Submit::Start);
        c.sending("a");
        c.done("a", Done::Written, t0);
        // Once the memory is stale the cache rules again.
        let later = t0 + WRITTEN_FRESH;
        assert_eq!(c.submit("a", json!(1), true, later), Submit::Unchanged);
        assert_eq!(c.submit("a", json!(5), false, later), Submit::Start);
    }

    #[test]
    fn failures_retry_with_backoff_the_newest_status_and_gone_drops_it() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        c.submit("a", json!(1), false, t0);
        c.sending("a");
        assert_eq!(c.done("a", Done::Failed, t0), Some(Duration::from_secs(1)));
        // During the backoff a newer status replaces the failed one.
        c.submit("a", json!(2), false, t0);
        assert_eq!(c.sending("a"), Some(json!(2)));
        assert_eq!(c.done("a", Done::Failed, t0), Some(Duration::from_secs(2)));
        let mut delays = Vec::new();
        for _ in 0..8 {
            assert_eq!(c.sending("a"), Some(json!(2)), "the failed one again");
            delays.push(c.done("a", Done::Failed, t0).map(|d| d.as_secs()));
        }
        assert_eq!(delays.last(), Some(&Some(60)), "{delays:?}");
        // A success resets the backoff; a failure after it forgets what
        // was written (the object may hold anything).
        c.sending("a");
        assert!(c.done("a", Done::Written, t0).is_none());
        assert_eq!(c.submit("a", json!(2), false, t0), Submit::Unchanged);
        assert_eq!(c.submit("a", json!(3), false, t0), Submit::Start);
        c.sending("a");
        assert_eq!(c.done("a", Done::Failed, t0), Some(Duration::from_secs(1)));
        c.sending("a");
        assert_eq!(c.done("a", Done::Gone, t0), None);
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.submit("a", json!(3), true, t0), Submit::Unchanged);
    }
}
