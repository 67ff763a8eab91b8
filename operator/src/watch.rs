//! One way to keep a watched cache: a reflector store fed by a watch with
//! [`backoff`], each object trimmed by `trim` before it is stored, and
//! `on_change` called after every event (the activator wakes its waiting
//! requests with it). Used by the controllers and the activator.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::{WatchStreamExt, watcher};

/// Retry delays of a failing watch: 0.5 s doubling to `max`. Pure.
#[derive(Debug, Clone)]
pub struct Doubling {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Doubling {
    /// From `min`, doubling, at most `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }
}

impl Iterator for Doubling {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(now)
    }
}

impl Backoff for Doubling {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The backoff of each of the operator's caches (one watch each): 0.5 s
/// doubling to 8 s, back to 0.5 s after 30 s without a retry.
/// kube-runtime's default (0.8 s doubling to 30 s, reset only after 120 s)
/// kept the operator deaf for minutes after an API server restart, whose
/// new watch cache answers the first watches with 410 Expired; a handful
/// of watches retrying every 8 s is no burden on a struggling API server.
pub fn backoff() -> ResetTimerBackoff<Doubling> {
    ResetTimerBackoff::new(
        Doubling::new(Duration::from_millis(500), Duration::from_secs(8)),
        Duration::from_secs(30),
    )
}

/// The backoff of a controller's triggers: 0.25 s doubling to 2 s, reset
/// after 10 s without a retry. kube-runtime applies a controller's trigger
/// backoff to the merged stream of all its watches (an error from any one
/// pauses them all), and after an API server restart each watch gets its
/// 410 Expired in turn: with [`backoff`]'s 8 s the Model controller's four
/// watches took 32 s more to resume one after another (fault suite R2,
/// docs/reliability.md). A short cap keeps that under 10 s; during an
/// outage a controller retries at most every 2 s.
pub fn trigger_backoff() -> ResetTimerBackoff<Doubling> {
    ResetTimerBackoff::new(
        Doubling::new(Duration::from_millis(250), Duration::from_secs(2)),
        Duration::from_secs(10),
    )
}

/// Spawns the watch and returns its store.
pub fn spawn_store<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    on_change: impl Fn() + Send + 'static,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).backoff(backoff()).modify(trim));
    tokio::spawn(async move {
        tokio::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => on_change(),
                Err(e) => tracing::warn!("watch: {e}"),
            }
        }
    });
    reader
}

/// A cache whose changes several controllers are woken by: one watch, one
/// store, and a stream per subscriber, each change delivered after the
/// store has it: objects added or modified, objects deleted (as last seen)
/// and, after a re-list, every object listed and every one the re-list no
/// longer shows.
///
/// kube-runtime's own shared reflector (`reflect_shared`) is not used:
/// it hands its subscribers a reference that they look up in the store,
/// so it never reports a deletion, and an object deleted before its
/// subscriber reads the earlier event is skipped as well. A pod deleted at
/// once (a force delete, KWOK) then woke no Model, and a replica created
/// and lost between two reconciles went unnoticed until the resync.
pub struct Shared<K: kube::Resource + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// The store.
    pub store: Store<K>,
    /// One stream per consumer, taken once each (a consumer must keep
    /// reading its stream: a full buffer holds the watch back).
    pub subscribers: Vec<futures::stream::BoxStream<'static, Arc<K>>>,
}

/// How many changes a slow subscriber of a [`Shared`] cache may lag behind.
const SHARED_BUFFER: usize = 4096;

/// What a [`Shared`] cache's subscribers are told for each watch event
/// (after the store has applied it). Pure but for the store it reads.
#[derive(Debug)]
pub struct Changes<K: kube::Resource + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// The store's objects when a re-list began: those it no longer lists
    /// are reported as deleted when it is done.
    before: Option<Vec<Arc<K>>>,
}

impl<K> Default for Changes<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn default() -> Self {
        Self { before: None }
    }
}

impl<K> Changes<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    /// The objects to report for `event`, which `store` has applied.
    pub fn of(&mut self, event: watcher::Event<K>, store: &Store<K>) -> Vec<Arc<K>> {
        match event {
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => vec![Arc::new(o)],
            watcher::Event::Init => {
                self.before = Some(store.state());
                Vec::new()
            }
            watcher::Event::InitApply(_) => Vec::new(),
            watcher::Event::InitDone => {
                let now = store.state();
                let listed: std::collections::HashSet<ObjectRef<K>> = now
                    .iter()
                    .map(|o| ObjectRef::from_obj(o.as_ref()))
                    .collect();
                let gone = self
                    .before
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|o| !listed.contains(&ObjectRef::from_obj(o.as_ref())));
                now.iter().cloned().chain(gone).collect()
            }
        }
    }
}

/// Spawns a shared watch ([`Shared`]) with `subscribers` streams.
pub fn spawn_shared_store<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    subscribers: usize,
) -> Shared<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..subscribers)
        .map(|_| tokio::sync::mpsc::channel::<Arc<K>>(SHARED_BUFFER))
        .unzip();
    let stream = watcher(api, config)
        .backoff(backoff())
        .modify(trim)
        .reflect(writer);
    let store = reader.clone();
    tokio::spawn(async move {
        tokio::pin!(stream);
        let mut changes = Changes::default();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    for o in changes.of(ev, &store) {
                        for tx in &senders {
                            // A subscriber that is gone (its controller
                            // stopped) is no reason to stop the others.
                            let _ = tx.send(o.clone()).await;
                        }
                    }
                }
                Err(e) => tracing::warn!("watch: {e}"),
            }
        }
    });
    Shared {
        store: reader,
        subscribers: receivers
            .into_iter()
            .map(|rx| {
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|o| (o, rx)) },
                )
                .boxed()
            })
            .collect(),
    }
}

/// Drops managed fields (never read, often the largest part of an object).
pub fn drop_managed_fields<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> k8s_openapi::api::core::v1::Pod {
        let mut p = k8s_openapi::api::core::v1::Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("ns".into());
        p
    }

    /// Feeds `events` to a store and to [`Changes`] as the shared watch
    /// does, and returns the names reported for each.
    fn reported(events: Vec<watcher::Event<k8s_openapi::api::core::v1::Pod>>) -> Vec<Vec<String>> {
        let (store, mut writer) = reflector::store();
        let mut changes = Changes::default();
        events
            .into_iter()
            .map(|ev| {
                writer.apply_watcher_event(&ev);
                let mut names: Vec<String> = changes
                    .of(ev, &store)
                    .iter()
                    .filter_map(|p| p.metadata.name.clone())
                    .collect();
                names.sort();
                names
            })
            .collect()
    }

    #[test]
    fn subscribers_hear_of_deletions_and_of_what_a_relist_dropped() {
        use watcher::Event::*;
        let got = reported(vec![
            Init,
            InitApply(pod("a")),
            InitApply(pod("b")),
            InitDone,
            Apply(pod("c")),
            // Deleted at once: kube-runtime's shared reflector reported
            // neither this nor, had it been read late, the Apply above.
            Delete(pod("c")),
            // A re-list after a lost watch: b was deleted meanwhile.
            Init,
            InitApply(pod("a")),
            InitApply(pod("d")),
            InitDone,
        ]);
        let want: Vec<Vec<&str>> = vec![
            vec![],
            vec![],
            vec![],
            vec!["a", "b"],
            vec!["c"],
            vec!["c"],
            vec![],
            vec![],
            vec![],
            vec!["a", "b", "d"],
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn watch_retries_double_to_eight_seconds_and_reset() {
        let mut b = Doubling::new(Duration::from_millis(500), Duration::from_secs(8));
        let got: Vec<u64> = b.by_ref().take(7).map(|d| d.as_millis() as u64).collect();
        assert_eq!(got, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(500)));
    }
}
