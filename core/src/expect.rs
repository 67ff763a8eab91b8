//! What a controller did that its cache may not show yet, pure: reconciles
//! read a Model's pods from a watch cache, and the pods this process has
//! just created or deleted reach that cache a moment later. Without this a
//! reconcile that runs in between would create the same replicas again, or
//! delete more than the plan asked for (it would still count the ones it
//! had deleted as alive). This is the controller pattern's "expectations"
//! (kube-controller-manager's ReplicaSet controller keeps the same).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// How long an expectation is kept at most: a watch that has not shown a
/// write after this long has lost it (it re-lists), and the cache rules.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// How long a pod the watch showed before its creation was recorded here
/// (the watch event can beat the API server's answer to the create) is
/// remembered, so that the creation is not expected again.
pub const EARLY: Duration = Duration::from_secs(10);

/// A Model's pods created or deleted by this process and not yet shown so
/// by the cache.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    created: Vec<(Pod, Instant)>,
    deleted: HashMap<String, Instant>,
    /// Pods the watch showed while no creation of theirs was expected.
    early: HashMap<String, Instant>,
}

fn name(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap_or_default()
}

impl Expectations {
    /// Records pods this process created (as the API server returned them).
    /// Pods the watch has shown already are not expected again.
    pub fn created(&mut self, pods: impl IntoIterator<Item = Pod>, now: Instant) {
        for p in pods {
            if self.early.remove(name(&p)).is_none() {
                self.created.push((p, now));
            }
        }
    }

    /// Records that the watch showed the pod `pod_name` (created, changed
    /// or deleted): its creation is met. A pod the cache showed and lost
    /// between two reconciles (deleted at once: a force delete, an
    /// eviction) would otherwise count as alive until [`MAX_WAIT`], and
    /// its Model would stay a replica short that long.
    pub fn observed(&mut self, pod_name: &str, now: Instant) {
        let before = self.created.len();
        self.created.retain(|(p, _)| name(p) != pod_name);
        self.early
            .retain(|_, at| now.saturating_duration_since(*at) < EARLY);
        if self.created.len() == before {
            self.early.insert(pod_name.to_owned(), now);
        }
    }

    /// Records pods this process deleted, by name.
    pub fn deleted(&mut self, names: impl IntoIterator<Item = String>, now: Instant) {
        for n in names {
            self.deleted.insert(n, now);
        }
    }

    /// Whether nothing is expected any more.
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.deleted.is_empty()
    }

    /// The Model's pods as the reconcile should see them: the cached ones,
    /// those deleted here marked terminating until the cache shows it, and
    /// those created here added until the cache has them. Expectations the
    /// cache has met, or older than [`MAX_WAIT`], are dropped.
    pub fn apply(&mut self, cached: Vec<Pod>, now: Instant, now_time: &Time) -> Vec<Pod> {
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < MAX_WAIT;
        self.created
            .retain(|(p, at)| fresh(at) && !cached.iter().any(|c| name(c) == name(p)));
        self.deleted.retain(|n, at| {
            fresh(at)
                && cached
                    .iter()
                    .any(|c| name(c) == n && c.metadata.deletion_timestamp.is_none())
        });
        let mut out: Vec<Pod> = cached
            .into_iter()
            .map(|mut p| {
                if self.deleted.contains_key(name(&p)) {
                    p.metadata.deletion_timestamp = Some(now_time.clone());
                }
                p
            })
            .collect();
        out.extend(self.created.iter().map(|(p, _)| p.clone()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(n: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(n.into());
        p
    }

    fn names(pods: &[Pod]) -> Vec<(String, bool)> {
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
        e.created([pod("m-c")], t0);
        e.deleted(["m-a".to_owned()], t0);
        // The cache still shows a alive and lacks c.
        let seen = e.apply(vec![pod("m-a"), pod("m-b")], t0, &ts);
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
        a.metadata.deletion_timestamp = Some(ts.clone());
        let seen = e.apply(vec![a, pod("m-b"), pod("m-c")], t0, &ts);
        assert_eq!(seen.len(), 3);
        assert!(e.is_empty());
    }

    #[test]
    fn a_pod_gone_from_the_cache_meets_its_deletion_and_old_ones_expire() {
        let t0 = Instant::now();
        let ts = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut e = Expectations::default();
        e.deleted(["m-a".to_owned()], t0);
        assert!(e.apply(vec![pod("m-b")], t0, &ts).len() == 1);
        assert!(e.is_empty());
        // A creation the watch never shows is forgotten after MAX_WAIT.
        e.created([pod("m-x")], t0);
        assert_eq!(e.apply(Vec::new(), t0 + MAX_WAIT / 2, &ts).len(), 1);
        assert_eq!(e.apply(Vec::new(), t0 + MAX_WAIT, &ts).len(), 0);
        assert!(e.is_empty());
    }

    #[test]
    fn a_pod_the_watch_showed_and_lost_between_reconciles_is_not_expected() {
        let t0 = Instant::now();
        let ts = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut e = Expectations::default();
        e.created([pod("m-a"), pod("m-b")], t0);
        // The watch shows a created, then deleted, before the next
        // reconcile reads the cache (which lacks it): a is gone, b is
        // still on its way.
        e.observed("m-a", t0);
        let seen = e.apply(Vec::new(), t0, &ts);
        assert_eq!(names(&seen), vec![("m-b".into(), false)]);
    }

    #[test]
    fn a_pod_the_watch_showed_before_its_create_returned_is_not_expected() {
        let t0 = Instant::now();
        let ts = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut e = Expectations::default();
        e.observed("m-a", t0);
        e.created([pod("m-a"), pod("m-b")], t0);
        let seen = e.apply(Vec::new(), t0, &ts);
        assert_eq!(names(&seen), vec![("m-b".into(), false)]);
        // A name seen long before is an older pod's: a new creation under
        // it is expected as usual.
        e.observed("m-c", t0);
        e.observed("m-x", t0 + EARLY);
        e.created([pod("m-c")], t0 + EARLY);
        let seen = e.apply(Vec::new(), t0 + EARLY, &ts);
        assert_eq!(
            names(&seen),
            vec![("m-b".into(), false), ("m-c".into(), false)]
        );
    }
}
