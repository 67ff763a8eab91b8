//! A new Model's Service, created in the background.
//!
//! Allocating a ClusterIP is serialized in the API server (kube-apiserver's
//! `MetaAllocator` holds one lock per IP family while it creates the
//! `IPAddress` object through its loopback client), so a burst of new
//! Services queues there: in the scale benchmark a Service create took 2 s
//! on average while a pod create took 0.1 s. A reconcile that waited for
//! its Service held one of the `--concurrent-model-reconciles` slots (and
//! the Model's status) that long. Nothing a Model's replicas or status need
//! waits for its Service, so the reconcile hands the create to a task
//! (at most [`IN_FLIGHT`] at once) and goes on; the Service's watch wakes
//! the Model when it appears. A create that fails (or finds a Service of
//! that name, perhaps someone else's) wakes the Model through a channel,
//! and its next reconcile takes the synchronous path, which looks and
//! reports (a conflict in status, an error through the error policy with
//! its backoff), so a failure never turns into a hot loop.
//!
//! [`Creates`] is the bookkeeping (pure: time is passed in); the task is
//! in the Model controller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use kube::runtime::reflector::ObjectRef;
use strata_crds::Model;

/// Service creates in flight at most (the API server does them one at a
/// time anyway; beyond, tasks wait for a slot, not the reconciles). More
/// would not go faster, and each waits seconds there, holding a seat of
/// the API server's priority level and counting as in flight for the
/// client's [`busy`](crate::ratelimit::RateLimit::busy) signal: at 64 the
/// trickling Service creates alone kept the client busy, and the status
/// writes that say a Model is Ready yielded to them for 10 s.
pub const IN_FLIGHT: usize = 8;

/// How long a created Service may take to show in the cache before the
/// Model looks for itself (it may have been deleted meanwhile).
pub const SHOW_WITHIN: Duration = Duration::from_secs(30);

/// Where one Model's Service create stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A task is creating it.
    InFlight,
    /// Created at this instant; not yet in the cache.
    Created(Instant),
    /// The create failed or found a Service of that name: the next
    /// reconcile looks for itself.
    Look,
}

/// What a reconcile that finds no Service in the cache does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Start a background create (the caller spawns it, then reports with
    /// [`Creates::finished`]).
    Start,
    /// A create is in flight or done: nothing to do; the Service's watch
    /// or the retrigger channel wakes the Model.
    Wait,
    /// Look synchronously: create, and on a conflict read and apply
    /// (reporting what it finds).
    Look,
}

/// The bookkeeping of background Service creates, by `namespace/name`.
#[derive(Debug, Default)]
pub struct Creates {
    states: HashMap<String, State>,
}

impl Creates {
    /// A reconcile found no Service for `key` in the cache at `now`.
    pub fn next(&mut self, key: &str, now: Instant) -> Next {
        // Entries of Models that went away before their Service showed.
        self.states.retain(|_, s| match s {
            State::Created(at) => now.saturating_duration_since(*at) < SHOW_WITHIN * 10,
            _ => true,
        });
        match self.states.get(key).copied() {
            None => {
                self.states.insert(key.to_string(), State::InFlight);
                Next::Start
            }
            Some(State::InFlight) => Next::Wait,
            Some(State::Created(at)) if now.saturating_duration_since(at) < SHOW_WITHIN => {
                Next::Wait
            }
            Some(State::Created(_) | State::Look) => {
                self.states.remove(key);
                Next::Look
            }
        }
    }

    /// The background create of `key` finished: `created` or not (failed,
    /// or a Service of that name exists). Returns whether the Model must
    /// be woken (nothing else will: a foreign Service does not).
    pub fn finished(&mut self, key: &str, created: bool, now: Instant) -> bool {
        let state = if created {
            State::Created(now)
        } else {
            State::Look
        };
        self.states.insert(key.to_string(), state);
        !created
    }

    /// The cache shows `key`'s Service: nothing more to track.
    pub fn seen(&mut self, key: &str) {
        self.states.remove(key);
    }

    /// Entries tracked (a gauge for tests and metrics).
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

/// The Model controller's background Service creates: the bookkeeping,
/// the slots, and the channel that wakes a Model whose create failed.
#[derive(Debug)]
pub struct Background {
    creates: Mutex<Creates>,
    /// Creates in flight at most ([`IN_FLIGHT`]).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Wakes a Model (the Model controller's `reconcile_on`). Unbounded but
    /// holds at most one message per Model with a create in flight.
    wake: UnboundedSender<ObjectRef<Model>>,
}

impl Background {
    /// With the sender of the Model controller's wake channel.
    pub fn new(wake: UnboundedSender<ObjectRef<Model>>) -> Self {
        Self {
            creates: Mutex::new(Creates::default()),
            slots: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            wake,
        }
    }

    fn creates(&self) -> std::sync::MutexGuard<'_, Creates> {
        self.creates.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// See [`Creates::next`].
    pub fn next(&self, key: &str) -> Next {
        self.creates().next(key, Instant::now())
    }

    /// See [`Creates::seen`].
    pub fn seen(&self, key: &str) {
        self.creates().seen(key);
    }

    /// See [`Creates::finished`]; wakes `model` when it must look.
    pub fn finished(&self, key: &str, created: bool, model: ObjectRef<Model>) {
        if self.creates().finished(key, created, Instant::now()) {
            // The receiver is gone only when the controller stopped.
            let _ = self.wake.unbounded_send(model);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_create_per_model_until_it_shows() {
        let t0 = Instant::now();
        let mut c = Creates::default();
        assert_eq!(c.next("ns/a", t0), Next::Start);
        // Reconciles while it is in flight start nothing.
        assert_eq!(c.next("ns/a", t0), Next::Wait);
        assert_eq!(c.next("ns/b", t0), Next::Start);
        assert!(!c.finished("ns/a", true, t0));
        // Created, not yet in the cache: still nothing.
        assert_eq!(c.next("ns/a", t0 + Duration::from_secs(1)), Next::Wait);
        c.seen("ns/a");
        assert_eq!(c.len(), 1);
        // Deleted later: the next miss starts a create again.
        assert_eq!(c.next("ns/a", t0 + Duration::from_secs(2)), Next::Start);
    }

    #[test]
    fn a_failed_or_conflicting_create_wakes_the_model_to_look_once() {
        let t0 = Instant::now();
        let mut c = Creates::default();
        assert_eq!(c.next("ns/a", t0), Next::Start);
        assert!(c.finished("ns/a", false, t0), "woken");
        assert_eq!(c.next("ns/a", t0), Next::Look);
        // The synchronous path owns it now; if it fails too, the error
        // policy backs off and the next miss starts over.
        assert!(c.is_empty());
        assert_eq!(c.next("ns/a", t0), Next::Start);
    }

    #[test]
    fn a_created_service_that_never_shows_is_looked_for() {
        let t0 = Instant::now();
        let mut c = Creates::default();
        c.next("ns/a", t0);
        c.finished("ns/a", true, t0);
        assert_eq!(c.next("ns/a", t0 + SHOW_WITHIN), Next::Look);
    }

    #[test]
    fn entries_of_models_gone_long_ago_are_dropped() {
        let t0 = Instant::now();
        let mut c = Creates::default();
        c.next("ns/gone", t0);
        c.finished("ns/gone", true, t0);
        c.next("ns/b", t0 + SHOW_WITHIN * 11);
        assert_eq!(c.len(), 1, "only ns/b");
    }
}
