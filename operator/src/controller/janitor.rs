//! State that follows the cluster: every minute, what the operator keeps
//! per object (autoscaler memory, nodes to avoid, failure counts, adapter
//! plan locks) and the metric series labelled by a Model or Adapter are
//! dropped once their object is gone. Memory stays proportional to the
//! objects that exist, and a Model re-created under an old name inherits
//! nothing (its autoscaler memory is keyed by UID as well).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use strata_crds::{Adapter, Model};

use super::Context;

/// How often it looks.
const EVERY: Duration = Duration::from_secs(60);

/// Drops the entries of `map` whose key `live` does not hold. Pure.
pub fn prune<V>(map: &mut HashMap<String, V>, live: impl Fn(&str) -> bool) -> usize {
    let before = map.len();
    map.retain(|k, _| live(k));
    before - map.len()
}

/// Keys that were known and are not live any more. Pure.
pub fn gone(known: &BTreeSet<String>, live: &BTreeSet<String>) -> Vec<String> {
    known.difference(live).cloned().collect()
}

fn key_of<K: ResourceExt>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

/// Runs until `stop` turns true.
pub async fn run(
    ctx: Arc<Context>,
    models: Store<Model>,
    adapters: Store<Adapter>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut known_models = BTreeSet::new();
    let mut known_adapters = BTreeSet::new();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        // Until the first lists arrive, everything would look gone.
        if models.wait_until_ready().await.is_err() || adapters.wait_until_ready().await.is_err() {
            return;
        }
        let live_models: BTreeSet<String> =
            models.state().iter().map(|m| key_of(m.as_ref())).collect();
        let live_scalers: BTreeSet<String> = models
            .state()
            .iter()
            .map(|m| format!("{}#{}", key_of(m.as_ref()), m.uid().unwrap_or_default()))
            .collect();
        let live_adapters: BTreeSet<String> = adapters
            .state()
            .iter()
            .map(|a| key_of(a.as_ref()))
            .collect();

        let mut dropped = prune(&mut *ctx.scalers.lock().await, |k| live_scalers.contains(k));
        if let Ok(mut memos) = ctx.memos.lock() {
            dropped += prune(&mut memos, |k| live_scalers.contains(k));
        }
        dropped += prune(&mut *ctx.avoid.lock().await, |k| live_models.contains(k));
        dropped += prune(&mut *ctx.adapter_locks.lock().await, |k| {
            live_models.contains(k)
        });
        let live_adapter_uids: BTreeSet<String> =
            adapters.state().iter().filter_map(|a| a.uid()).collect();
        {
            let mut f = ctx.adapter_failures.lock().await;
            let before = f.len();
            f.retain(|(uid, _), _| live_adapter_uids.contains(uid));
            dropped += before - f.len();
        }
        if let Ok(mut f) = ctx.failures.lock() {
            dropped += prune(&mut f, |k| match k.split_once('/') {
                Some(("model", rest)) => live_models.contains(rest),
                Some(("adapter", rest)) => live_adapters.contains(rest),
                _ => true,
            });
        }
        for key in gone(&known_models, &live_models) {
            if let Some((ns, name)) = key.split_once('/') {
                ctx.metrics.forget_model(ns, name);
                dropped += 1;
            }
        }
        for key in gone(&known_adapters, &live_adapters) {
            if let Some((ns, name)) = key.split_once('/') {
                ctx.metrics.forget_adapter(ns, name);
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::debug!(dropped, "forgot the state of deleted objects");
        }
        known_models = live_models;
        known_adapters = live_adapters;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_live_keys_stay() {
        let mut m: HashMap<String, u32> = [("ns/a#1", 1), ("ns/a#2", 2), ("ns/b#3", 3)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let live: BTreeSet<String> = ["ns/a#2".to_string()].into();
        assert_eq!(prune(&mut m, |k| live.contains(k)), 2);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["ns/a#2"]);
        let known: BTreeSet<String> = ["x/a".into(), "x/b".into()].into();
        let now: BTreeSet<String> = ["x/b".into(), "x/c".into()].into();
        assert_eq!(gone(&known, &now), ["x/a"]);
    }
}
