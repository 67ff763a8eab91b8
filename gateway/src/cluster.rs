//! The gateway's view from the cluster: three watches (Models, Adapters,
//! and the pods labelled `strata.ai/model`, as the activator's), each a
//! cache kept by the operator's `watch::spawn_store`; after every change
//! (coalesced over 50 ms) a new [`Snapshot`]. Pod IPs are read from the
//! pods, not from EndpointSlices: in the local test world pod IPs are
//! loopback addresses, which EndpointSlices reject.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client};
use strata_core::labels;
use strata_crds::{Adapter, Model};
use strata_operator::watch::{drop_managed_fields, spawn_store};
use tokio::sync::watch;

use crate::proxy::WakeFn;
use crate::table::{Snapshot, from_cluster};

/// Changes seen within this window make one snapshot.
const COALESCE: Duration = Duration::from_millis(50);

/// Starts the watches; the receiver gets a snapshot after the first lists
/// and after every change. Replicas are reached on `port` of their pod IP.
pub fn snapshots(client: Client, port: u16) -> watch::Receiver<Arc<Snapshot>> {
    let (bump, mut changes) = watch::channel(0u64);
    let bump = Arc::new(bump);
    let on_change = |b: Arc<watch::Sender<u64>>| move || b.send_modify(|n| *n = n.wrapping_add(1));
    let models = spawn_store(
        Api::<Model>::all(client.clone()),
        watcher::Config::default(),
        drop_managed_fields,
        on_change(bump.clone()),
    );
    let adapters = spawn_store(
        Api::<Adapter>::all(client.clone()),
        watcher::Config::default(),
        drop_managed_fields,
        on_change(bump.clone()),
    );
    let pods = spawn_store(
        Api::<Pod>::all(client),
        watcher::Config::default().labels(labels::MODEL),
        drop_managed_fields,
        on_change(bump),
    );
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(async move {
        for ready in [
            models.wait_until_ready().await,
            adapters.wait_until_ready().await,
            pods.wait_until_ready().await,
        ] {
            if ready.is_err() {
                return;
            }
        }
        tracing::info!("the view of the cluster is ready");
        loop {
            changes.borrow_and_update();
            let s = from_cluster(&models.state(), &adapters.state(), &pods.state(), port);
            if tx.send(Arc::new(s)).is_err() || changes.changed().await.is_err() {
                return;
            }
            tokio::time::sleep(COALESCE).await;
        }
    });
    rx
}

/// Wakes a Model by the activator's annotation.
pub fn waker(client: Client) -> WakeFn {
    Arc::new(move |ns: String, name: String| {
        let client = client.clone();
        Box::pin(async move {
            strata_operator::activator::request_wake(&client, &ns, &name)
                .await
                .map_err(|e| e.to_string())
        })
    })
}
