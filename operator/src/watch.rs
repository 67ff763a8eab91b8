//! One way to keep a watched cache: a reflector store fed by a watch with
//! [`backoff`], each object trimmed by `trim` before it is stored, and
//! `on_change` called after every event (the activator wakes its waiting
//! requests with it). Used by the controllers and the activator.

use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{self, Store};
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
/// store, and a stream per subscriber, each event delivered after the
/// store has it.
pub struct Shared<K: kube::Resource + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// The store.
    pub store: Store<K>,
    /// One stream per consumer, taken once each (a consumer must keep
    /// reading its stream: a full buffer holds the watch back).
    pub subscribers: Vec<reflector::ReflectHandle<K>>,
}

/// How many events a slow subscriber of a [`Shared`] cache may lag behind.
const SHARED_BUFFER: usize = 4096;

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
    let (reader, writer) = reflector::store_shared(SHARED_BUFFER);
    let subscribers = (0..subscribers)
        .filter_map(|_| writer.subscribe())
        .collect();
    let stream = watcher(api, config)
        .backoff(backoff())
        .modify(trim)
        .reflect_shared(writer);
    tokio::spawn(async move {
        tokio::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!("watch: {e}");
            }
        }
    });
    Shared {
        store: reader,
        subscribers,
    }
}

/// Drops managed fields (never read, often the largest part of an object).
pub fn drop_managed_fields<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_retries_double_to_eight_seconds_and_reset() {
        let mut b = Doubling::new(Duration::from_millis(500), Duration::from_secs(8));
        let got: Vec<u64> = b.by_ref().take(7).map(|d| d.as_millis() as u64).collect();
        assert_eq!(got, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(500)));
    }
}
