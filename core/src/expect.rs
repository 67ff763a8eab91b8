//! What a controller did that its cache may not show yet, pure: reconciles
//! read a Model's pods from a watch cache, and the pods this process has
//! just created or deleted reach that cache a moment later. Without this a
//! reconcile that runs in between would create the same replicas again, or
//! delete more than the plan asked for (it would still count the ones it
//! had deleted as alive). This is the controller pattern's "expectations"
//! (kube-controller-manager's ReplicaSet controller keeps the same).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// How long an expectation is kept at most: a watch that has not shown a
/// write after this long has lost it (it re-lists), and the cache rules.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A Model's pods created or deleted by this process and not yet shown so
/// by the cache.
///
/// Writes go in the background (the reconcile does not wait for the API
/// server), so a creation is expected from the moment it is decided
/// ([`Expectations::creating`]: the pod is named here, not by the server),
/// and never expires while its request is on its way, however long the
/// client's rate limiter holds it; [`MAX_WAIT`] counts from the answer.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    created: Vec<Creation>,
    deleted: HashMap<String, Deletion>,
}

/// A pod whose deletion is expected.
#[derive(Debug, Clone, Copy)]
struct Deletion {
    /// When it was decided.
    at: Instant,
    /// Deleted without grace (`gracePeriodSeconds: 0`): the API server
    /// removes the pod without waiting for a kubelet.
    forced: bool,
}

impl Deletion {
    /// Whether the cached pod shows this deletion: terminating, and for a
    /// forced one with no grace left (a forced deletion of a pod the cache
    /// shows terminating gracefully is not met by that).
    fn shown_by(&self, cached: &Pod) -> bool {
        cached.metadata.deletion_timestamp.is_some()
            && (!self.forced || cached.metadata.deletion_grace_period_seconds == Some(0))
    }
}

/// A pod whose creation is expected.
#[derive(Debug, Clone)]
struct Creation {
    pod: Arc<Pod>,
    /// When the API server confirmed it (None: on its way).
    answered: Option<Instant>,
    /// When the watch first showed it (None: not yet).
    observed: Option<Instant>,
}

fn name(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap_or_default()
}

impl Expectations {
    /// Records pods whose creation is decided and on its way (named here):
    /// expected until [`Expectations::created`] or
    /// [`Expectations::not_created`] says how it went.
    pub fn creating(&mut self, pods: impl IntoIterator<Item = Arc<Pod>>) {
        for pod in pods {
            self.created.retain(|c| name(&c.pod) != name(&pod));
            self.created.push(Creation {
                pod,
                answered: None,
                observed: None,
            });
        }
    }

    /// The API server created `names` (announced by
    /// [`Expectations::creating`]): expected for [`MAX_WAIT`] from `now`
    /// unless the watch has shown them already (then nothing is expected:
    /// the watch can beat the answer).
    pub fn created<'a>(&mut self, names: impl IntoIterator<Item = &'a str>, now: Instant) {
        for n in names {
            for c in &mut self.created {
                if name(&c.pod) == n {
                    c.answered = Some(now);
                }
            }
        }
    }

    /// The creations of `names` failed: nothing to expect.
    pub fn not_created<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        for n in names {
            self.created.retain(|c| name(&c.pod) != n);
        }
    }

    /// The deletions of `names` failed: the pods are as the cache shows.
    pub fn not_deleted<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        for n in names {
            self.deleted.remove(n);
        }
    }

    /// Records that the watch showed the pod `pod_name` (created, changed
    /// or deleted) at `now`, after the cache had it: its creation is met
    /// for every cache snapshot taken after `now`. A pod the cache showed
    /// and lost between two reconciles (deleted at once: a force delete,
    /// an eviction) would otherwise count as alive until [`MAX_WAIT`], and
    /// its Model would stay a replica short that long. (Not for a snapshot
    /// taken before: that one may not have the pod yet, and a reconcile
    /// that saw neither would create it again.)
    pub fn observed(&mut self, pod_name: &str, now: Instant) {
        for c in &mut self.created {
            if name(&c.pod) == pod_name {
                c.observed.get_or_insert(now);
            }
        }
    }

    /// Records pods this process deleted, by name, each with whether it
    /// was deleted without grace (forced).
    pub fn deleted(&mut self, names: impl IntoIterator<Item = (String, bool)>, now: Instant) {
        for (n, forced) in names {
            self.deleted.insert(n, Deletion { at: now, forced });
        }
    }

    /// Whether nothing is expected any more.
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.deleted.is_empty()
    }

    /// The Model's pods as the reconcile should see them: the cached ones,
    /// those deleted here marked terminating until the cache shows it (and
    /// those deleted without grace marked so, with a
    /// `deletionGracePeriodSeconds` of 0, until the cache shows them gone
    /// or so: a reconcile in between must not delete them again), and
    /// those created here added until the cache has them. `cached` is a
    /// snapshot of the cache taken at `snapshot`. Expectations the cache
    /// has met, or older than [`MAX_WAIT`], are dropped.
    pub fn apply(
        &mut self,
        cached: Vec<Arc<Pod>>,
        snapshot: Instant,
        now: Instant,
        now_time: &Time,
    ) -> Vec<Arc<Pod>> {
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < MAX_WAIT;
        self.created.retain(|c| {
            c.answered.as_ref().is_none_or(fresh)
                && c.observed.is_none_or(|seen| seen >= snapshot)
                && !cached.iter().any(|p| name(p) == name(&c.pod))
        });
        self.deleted
            .retain(|n, d| fresh(&d.at) && cached.iter().any(|c| name(c) == n && !d.shown_by(c)));
        let mut out: Vec<Arc<Pod>> = cached
            .into_iter()
            .map(|mut p| {
                if let Some(d) = self.deleted.get(name(&p)) {
                    let meta = &mut Arc::make_mut(&mut p).metadata;
                    meta.deletion_timestamp
                        .get_or_insert_with(|| now_time.clone());
                    if d.forced {
                        meta.deletion_grace_period_seconds = Some(0);
                    }
                }
                p
            })
            .collect();
        out.extend(self.created.iter().map(|c| c.pod.clone()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(n: &str) -> Arc<Pod> {
        let mut p = Pod::default();
        p.metadata.name = Some(n.into());
        Arc::new(p)
    }

    fn names(pods: &[Arc<Pod>]) -> Vec<(String, bool)> {
        let mut v: Vec<(String, bool)> = pods
            .iter()
            .map(|p| (name(p).to_owned(), p.metadata.deletion_timestamp.is_some()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn own_writes_count_until_the_cache_shows_them() {
        let t0 = Instant::now();
        let ts = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut e = Expectations::default();
        e.creating([pod("m-c")]);
        e.created(["m-c"], t0);
        e.deleted([("m-a".to_owned(), false)], t0);
        // The cache still shows a alive and lacks c.
        let seen = e.apply(vec![pod("m-a"), pod("m-b")], t0, t0, &ts);
        assert_eq!(
            names(&seen),
            vec![
                ("m-a".into(), true),
                ("m-b".into(), false),
                ("m-c".into(), false)
            ]
        );
        assert!(!e.is_empty());
        // The cache catches up: a terminating, c present; nothing expected.
        let mut a = pod("m-a");
        Arc::make_mut(&mut a).metadata.deletion_timestamp = Some(ts.clone());
        let seen = e.apply(vec![a, pod("m-b"), pod("m-c")], t0, t0, &ts);
        assert_eq!(seen.len(), 3);
        assert!(e.is_empty());
    }

    #[test]
    fn a_pod_gone_from_the_cache_meets_its_deletion_and_old_ones_expire() {
        let t0 = Instant::now();
        let ts = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut e = Expectations::default();
        e.deleted([("m-a".to_owned(), false)], t0);
        assert!(e.apply(vec![pod("m-b")], t0, t0, &ts).len() == 1);
        assert!(e.is_empty());
        // A creation the watch never shows is forgotten after MAX_WAIT.
        e.creating([pod("m-x")]);
        e.created(["m-x"], t0);
        assert_eq!(
            e.apply(Vec::new(), t0 + MAX_WAIT / 2, t0 + MAX_WAIT / 2, &ts)
                .len(),
            1
        );
        assert_eq!(
            e.apply(Vec::new(), t0 + MAX_WAIT, t0 + MAX_WAIT, &ts).len(),
            0
        );
        assert!(e.is_empty());
    }

    #[test]
    fn a_creation_on_its_way_never_expires_and_a_failed_one_is_dropped() {
        let t0 = Instant::now();
        let ts = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut e = Expectations::default();
        e.creating([pod("m-a"), pod("m-b"), pod("m-c")]);
        // Held by the rate limiter for longer than MAX_WAIT: still expected.
        let later = t0 + MAX_WAIT * 3;
        assert_eq!(e.apply(Vec::new(), later, later, &ts).len(), 3);
        // a is created (counted once, from its answer), b failed.
        e.created(["m-a"], later);
        e.not_created(["m-b"]);
        assert_eq!(
            names(&e.apply(Vec::new(), later, later, &ts)),
            vec![("m-a".into(), false), ("m-c".into(), false)]
        );
        // a's answer was MAX_WAIT ago: the watch lost it; c still on its way.
        assert_eq!(
            names(&e.apply(Vec::new(), later + MAX_WAIT, later + MAX_WAIT, &ts)),
            vec![("m-c".into(), false)]
        );
        // A deletion that failed leaves the pod as the cache shows it.
        e.deleted([("m-x".to_owned(), false)], later);
        e.not_deleted(["m-x"]);
        assert_eq!(
            names(&e.apply(vec![pod("m-x")], later, later, &ts)),
            vec![("m-c".into(), false), ("m-x".into(), false)]
        );
    }

    #[test]
    fn a_pod_the_watch_showed_and_lost_between_reconciles_is_not_expected() {
        let t0 = Instant::now();
        let ts = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut e = Expectations::default();
        e.creating([pod("m-a"), pod("m-b")]);
        e.created(["m-a", "m-b"], t0);
        // The watch shows a created, then deleted, before the next
        // reconcile reads the cache (which lacks it): a is gone, b is
        // still on its way.
        e.observed("m-a", t0);
        let after = t0 + Duration::from_millis(1);
        let seen = e.apply(Vec::new(), after, after, &ts);
        assert_eq!(names(&seen), vec![("m-b".into(), false)]);
    }

    #[test]
    fn a_snapshot_older_than_the_watch_event_still_counts_the_pod() {
        let t0 = Instant::now();
        let ts = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut e = Expectations::default();
        e.creating([pod("m-a")]);
        e.created(["m-a"], t0);
        // A reconcile snapshots the cache (without a) at t0; the watch adds
        // a and says so just after, before the reconcile applies the
        // expectations: a counts (it is not created twice).
        e.observed("m-a", t0 + Duration::from_millis(1));
        let seen = e.apply(Vec::new(), t0, t0, &ts);
        assert_eq!(names(&seen), vec![("m-a".into(), false)]);
        // The next snapshot has it: met.
        let later = t0 + Duration::from_millis(2);
        assert_eq!(e.apply(vec![pod("m-a")], later, later, &ts).len(), 1);
        assert!(e.is_empty());
    }

    #[test]
    fn a_pod_the_watch_showed_before_its_create_returned_is_not_expected() {
        let t0 = Instant::now();
        let ts = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut e = Expectations::default();
        e.creating([pod("m-a"), pod("m-b")]);
        e.observed("m-a", t0);
        // The answer comes after the watch event: a stays met.
        e.created(["m-a", "m-b"], t0);
        let after = t0 + Duration::from_millis(1);
        let seen = e.apply(Vec::new(), after, after, &ts);
        assert_eq!(names(&seen), vec![("m-b".into(), false)]);
    }

    #[test]
    fn a_forced_deletion_is_expected_until_the_cache_shows_it_without_grace_or_gone() {
        let t0 = Instant::now();
        let ts = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let grace = |p: &Arc<Pod>| p.metadata.deletion_grace_period_seconds;
        let mut e = Expectations::default();
        // a: forced while the cache shows it terminating with grace (a
        // graceful deletion before it); b: forced while alive.
        let mut a = pod("m-a");
        {
            let meta = &mut Arc::make_mut(&mut a).metadata;
            meta.deletion_timestamp = Some(ts.clone());
            meta.deletion_grace_period_seconds = Some(30);
        }
        e.deleted([("m-a".to_owned(), true), ("m-b".to_owned(), true)], t0);
        let seen = e.apply(vec![a.clone(), pod("m-b")], t0, t0, &ts);
        assert_eq!(
            names(&seen),
            vec![("m-a".into(), true), ("m-b".into(), true)]
        );
        assert!(
            seen.iter().all(|p| grace(p) == Some(0)),
            "both shown deleted without grace while the cache lags"
        );
        assert!(!e.is_empty());
        // The cache shows a as before and b gone: a is still expected.
        let seen = e.apply(vec![a], t0, t0, &ts);
        assert_eq!(seen.iter().map(grace).collect::<Vec<_>>(), vec![Some(0)]);
        // The cache shows a forced (it has finalizers): met.
        let mut forced = pod("m-a");
        {
            let meta = &mut Arc::make_mut(&mut forced).metadata;
            meta.deletion_timestamp = Some(ts.clone());
            meta.deletion_grace_period_seconds = Some(0);
        }
        e.apply(vec![forced], t0, t0, &ts);
        assert!(e.is_empty());
    }
}
