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
//! unless a newer status supersedes it; a Model that is gone drops it.
//!
//! [`Coalescer`] is the bookkeeping (pure: time is passed in); [`Writer`]
//! runs the writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kube::{Client, ResourceExt};
use prometheus::IntCounterVec;
use serde_json::Value;
use strata_crds::Model;

use super::reconcile::{Reconciled, apply_status};

/// How long a status this process wrote is taken as the truth about its
/// own fields, while the cache catches up.
pub const WRITTEN_FRESH: Duration = Duration::from_secs(30);

/// Longest wait before retrying a failed write.
const MAX_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Slot {
    /// The status being written now.
    writing: Option<Value>,
    /// The newest status submitted while it was, to write next.
    next: Option<Value>,
    /// The last status written, and when.
    written: Option<(Value, Instant)>,
    /// Failed writes in a row.
    failures: u32,
}

/// What [`Coalescer::submit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submit {
    /// Already shown or written: nothing to send.
    Unchanged,
    /// Start writing it (the caller starts the task).
    Start,
    /// A write is on its way: this status is written after it (replacing
    /// any other waiting), or not at all if it is the one being written.
    Queued,
}

/// How a write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Written,
    Failed,
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
            && let Some(writing) = &slot.writing
        {
            slot.next = (*writing != status).then_some(status);
            return Submit::Queued;
        }
        let unchanged = match self.slots.get(key).and_then(|s| s.written.as_ref()) {
            // What this process wrote moments ago is what the object holds
            // for these fields, whatever the (possibly older) cache shows.
            Some((written, at)) if now.saturating_duration_since(*at) < WRITTEN_FRESH => {
                *written == status
            }
            _ => shown,
        };
        if unchanged {
            // (No slot made for a status that needs nothing.)
            return Submit::Unchanged;
        }
        self.slots.entry(key.to_string()).or_default().writing = Some(status);
        Submit::Start
    }

    /// Forgets slots with nothing on its way and nothing recent to
    /// remember; at most once per [`WRITTEN_FRESH`] (a pass over every
    /// Model's slot is not work for each submit).
    fn prune(&mut self, now: Instant) {
        if self
            .pruned
            .is_some_and(|at| now.saturating_duration_since(at) < WRITTEN_FRESH)
        {
            return;
        }
        self.pruned = Some(now);
        self.slots.retain(|_, s| {
            s.writing.is_some()
                || s.written
                    .as_ref()
                    .is_some_and(|(_, at)| now.saturating_duration_since(*at) < WRITTEN_FRESH)
        });
    }

    /// The write of `key` finished: the status to write next (after the
    /// returned delay), or None when the task is done.
    pub fn done(&mut self, key: &str, how: Done, now: Instant) -> Option<(Value, Duration)> {
        let slot = self.slots.get_mut(key)?;
        let writing = slot.writing.take()?;
        match how {
            Done::Gone => {
                self.slots.remove(key);
                None
            }
            Done::Written => {
                slot.failures = 0;
                slot.written = Some((writing, now));
                let next = slot.next.take()?;
                slot.writing = Some(next.clone());
                Some((next, Duration::ZERO))
            }
            Done::Failed => {
                slot.failures = slot.failures.saturating_add(1);
                slot.written = None;
                let next = slot.next.take().unwrap_or(writing);
                slot.writing = Some(next.clone());
                let exp = slot.failures.saturating_sub(1).min(6);
                Some((next, (Duration::from_secs(1) * (1 << exp)).min(MAX_RETRY)))
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

    /// Keys with a write on its way.
    pub fn in_flight(&self) -> usize {
        self.slots.values().filter(|s| s.writing.is_some()).count()
    }
}

/// Writes Model statuses in the background.
pub struct Writer {
    coalescer: Mutex<Coalescer>,
    client: Client,
    /// `strata_status_writes_total`.
    writes: IntCounterVec,
}

impl Writer {
    /// Writes with `client`, counting in `writes`.
    pub fn new(client: Client, writes: IntCounterVec) -> Arc<Self> {
        Arc::new(Self {
            coalescer: Mutex::new(Coalescer::default()),
            client,
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
        match self
            .coalescer()
            .submit(key, status.clone(), shown, Instant::now())
        {
            Submit::Unchanged => self.count("unchanged"),
            Submit::Queued => self.count("coalesced"),
            Submit::Start => {
                let this = self.clone();
                let (key, target) = (key.to_string(), model.clone());
                tokio::spawn(async move { this.write(&key, &target, status).await });
            }
        }
    }

    async fn write(&self, key: &str, model: &Model, mut status: Value) {
        loop {
            let how = match apply_status(
                &self.client,
                model,
                strata_core::labels::FIELD_MANAGER,
                &status,
            )
            .await
            {
                Ok(()) => {
                    self.count("written");
                    Done::Written
                }
                Err(kube::Error::Api(e)) if e.code == 404 => Done::Gone,
                Err(e) => {
                    self.count("failed");
                    tracing::warn!(model = %key, name = %model.name_any(), "writing the Model's status failed (retried): {e}");
                    Done::Failed
                }
            };
            let next = self.coalescer().done(key, how, Instant::now());
            let Some((next, delay)) = next else {
                return;
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            status = next;
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

    #[test]
    fn one_write_at_a_time_and_only_the_newest_waits() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        assert_eq!(c.submit("a", json!(1), false, t0), Submit::Start);
        // While 1 is written, 2 then 3 arrive: only 3 is written next.
        assert_eq!(c.submit("a", json!(2), false, t0), Submit::Queued);
        assert_eq!(c.submit("a", json!(3), false, t0), Submit::Queued);
        assert_eq!(c.in_flight(), 1);
        assert_eq!(
            c.done("a", Done::Written, t0),
            Some((json!(3), Duration::ZERO))
        );
        assert_eq!(c.latest("a", t0), Some(&json!(3)));
        assert_eq!(c.done("a", Done::Written, t0), None);
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.latest("a", t0), Some(&json!(3)), "written moments ago");
        assert_eq!(c.latest("a", t0 + WRITTEN_FRESH), None);
        // Another key is independent.
        assert_eq!(c.submit("b", json!(1), false, t0), Submit::Start);
    }

    #[test]
    fn a_status_equal_to_the_one_being_written_cancels_the_waiting_one() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        c.submit("a", json!(1), false, t0);
        c.submit("a", json!(2), false, t0);
        // Back to 1 (the one on its way): nothing more to write.
        assert_eq!(c.submit("a", json!(1), false, t0), Submit::Queued);
        assert_eq!(c.done("a", Done::Written, t0), None);
    }

    #[test]
    fn what_was_just_written_counts_over_a_lagging_cache() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        assert_eq!(c.submit("a", json!(1), true, t0), Submit::Unchanged);
        c.submit("a", json!(2), false, t0);
        c.done("a", Done::Written, t0);
        // The cache still shows 1 (so 2 is "not shown"): 2 is not sent again.
        assert_eq!(c.submit("a", json!(2), false, t0), Submit::Unchanged);
        // And 1, which the cache shows, is written back: the object holds 2.
        assert_eq!(c.submit("a", json!(1), true, t0), Submit::Start);
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
        assert_eq!(
            c.done("a", Done::Failed, t0),
            Some((json!(1), Duration::from_secs(1)))
        );
        c.submit("a", json!(2), false, t0);
        assert_eq!(
            c.done("a", Done::Failed, t0),
            Some((json!(2), Duration::from_secs(2)))
        );
        let mut delays = Vec::new();
        for _ in 0..8 {
            delays.push(c.done("a", Done::Failed, t0).map(|(_, d)| d.as_secs()));
        }
        assert_eq!(delays.last(), Some(&Some(60)), "{delays:?}");
        // A success resets the backoff; a failure after it forgets what
        // was written (the object may hold anything).
        assert!(c.done("a", Done::Written, t0).is_none());
        assert_eq!(c.submit("a", json!(2), false, t0), Submit::Unchanged);
        assert_eq!(c.submit("a", json!(3), false, t0), Submit::Start);
        assert_eq!(
            c.done("a", Done::Failed, t0),
            Some((json!(3), Duration::from_secs(1)))
        );
        assert_eq!(c.done("a", Done::Gone, t0), None);
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.submit("a", json!(3), true, t0), Submit::Unchanged);
    }
}
