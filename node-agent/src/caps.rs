//! Which power limit this node's GPUs should run at, from the API server:
//! the agent watches its own Node (one object, by field selector) and every
//! GPUPool, and publishes [`Desired`] (pure: `strata_core::powercap`) on a
//! watch channel that the sampling loop reads before each NVML sample.
//!
//! Read-only (RBAC: get/list/watch nodes and gpupools); only with
//! `--apply-power-caps`. Until both watches have listed once the node is
//! [`Desired::Unmanaged`] (nothing is touched on a guess); an API outage
//! keeps the last answer (the watches retry with backoff).

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use strata_core::powercap::{self, Desired};
use strata_crds::GPUPool;
use tokio::sync::watch;

/// What the node's GPUs should run at, from the stores (Unmanaged until
/// both listed once).
fn current(node: &Store<Node>, pools: &Store<GPUPool>, name: &str) -> Option<Desired> {
    use futures::FutureExt;
    // Ready once the first list completed.
    node.wait_until_ready().now_or_never()?.ok()?;
    pools.wait_until_ready().now_or_never()?.ok()?;
    let labels = node
        .state()
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    let pools = pools.state();
    Some(powercap::desired(&labels, pools.iter().map(|p| p.as_ref())))
}

/// Watches until the channel's receivers are gone; publishes each change.
pub async fn run(client: Client, node_name: String, tx: watch::Sender<Desired>) {
    let (nodes, node_writer) = reflector::store::<Node>();
    let (pools, pool_writer) = reflector::store::<GPUPool>();
    let node_events = reflector::reflector(
        node_writer,
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        )
        .default_backoff(),
    )
    .map(|e| e.err().map(|e| format!("watching Node {node_name}: {e}")));
    let pool_events = reflector::reflector(
        pool_writer,
        watcher(Api::<GPUPool>::all(client), watcher::Config::default()).default_backoff(),
    )
    .map(|e| e.err().map(|e| format!("watching GPUPools: {e}")));
    let mut events = std::pin::pin!(futures::stream::select(node_events, pool_events));
    let mut last_error = None::<String>;
    while let Some(error) = events.next().await {
        if let Some(e) = error {
            if last_error.as_deref() != Some(&e) {
                tracing::warn!("{e} (retrying; power limits stay as they are)");
            }
            last_error = Some(e);
            continue;
        }
        last_error = None;
        if let Some(d) = current(&nodes, &pools, &node_name) {
            tx.send_if_modified(|old| {
                if *old == d {
                    return false;
                }
                tracing::info!(from = ?*old, to = ?d, "power limit target");
                *old = d;
                true
            });
        }
        if tx.is_closed() {
            return;
        }
    }
}
