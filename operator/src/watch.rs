//! One way to keep a watched cache: a reflector store fed by a watch with
//! the default backoff, each object trimmed by `trim` before it is stored,
//! and `on_change` called after every event (the activator wakes its
//! waiting requests with it). Used by the controllers and the activator.

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};

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
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff().modify(trim));
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

/// Drops managed fields (never read, often the largest part of an object).
pub fn drop_managed_fields<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}
