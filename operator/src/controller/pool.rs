//! The GPUPool controller: capacity, allocation and the Models on a pool.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use strata_crds::GPUPool;
use strata_crds::common::ObjectRef;
use strata_crds::gpupool::{GPUPoolStatus, PoolModelStatus, PoolNodeStatus};

use super::Context;
use super::reconcile;
use crate::error::Result;
use strata_core::conditions::{self, Set};
use strata_core::placement::NodeView;
use strata_core::{labels, view};

/// Reconciles one GPUPool: read the caches, build its status (pure), write it.
pub async fn reconcile(pool: Arc<GPUPool>, ctx: Arc<Context>) -> Result<Action> {
    reconcile::run(
        pool,
        ctx,
        |pool, ctx| async move { phases(&pool, &ctx).await },
    )
    .await
}

fn why_unschedulable(n: &NodeView, pool: &GPUPool) -> Option<String> {
    if !n.ready {
        return Some("NotReady".into());
    }
    if n.unschedulable {
        return Some("Cordoned".into());
    }
    let v = view::pool_view(pool);
    let untolerated = n
        .taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !v.tolerations.iter().any(|tol| tol.tolerates(t)));
    untolerated.map(|t| {
        format!(
            "Taint {}={}:{} not tolerated",
            t.key,
            t.value.clone().unwrap_or_default(),
            t.effect
        )
    })
}

/// The status of a pool from the views of its nodes and the pods placed on it (pure).
pub fn pool_status(
    pool: &GPUPool,
    nodes: &[NodeView],
    models: BTreeMap<(String, String), (i32, i32)>,
) -> GPUPoolStatus {
    let v = view::pool_view(pool);
    let resource = &pool.spec.gpu_resource_name;
    let mut status = GPUPoolStatus::default();
    for n in nodes.iter().filter(|n| v.selector.matches(&n.labels)) {
        let capacity = n.allocatable.get(resource).copied().unwrap_or(0);
        let allocated = n.used.get(resource).copied().unwrap_or(0);
        let reason = why_unschedulable(n, pool);
        status.node_count += 1;
        if reason.is_none() {
            status.gpu_capacity += capacity as i32;
            status.gpu_free += (capacity - allocated).max(0) as i32;
        }
        status.gpu_allocated += allocated as i32;
        status.nodes.push(PoolNodeStatus {
            name: n.name.clone(),
            gpu_product: n.labels.get("nvidia.com/gpu.product").cloned(),
            gpu_capacity: capacity as i32,
            gpu_allocated: allocated as i32,
            schedulable: reason.is_none(),
            reason,
        });
    }
    status.models = models
        .into_iter()
        .map(|((namespace, name), (replicas, gpus))| PoolModelStatus {
            model: ObjectRef { namespace, name },
            replicas,
            gpus,
        })
        .collect();
    status
}

async fn phases(pool: &GPUPool, ctx: &Context) -> Result<Action> {
    let name = pool.name_any();
    let nodes = ctx.nodes.state();
    let views = view::node_views(
        nodes.iter().map(|n| n.as_ref()),
        ctx.gpu_pods.state().iter().map(|p| p.claim.clone()),
    );
    let pods = ctx.pods.state();
    let mut models: BTreeMap<(String, String), (i32, i32)> = BTreeMap::new();
    for p in pods
        .iter()
        .filter(|p| view::pod_holds_resources(p) && p.metadata.deletion_timestamp.is_none())
    {
        let l = p.labels();
        if l.get(labels::POOL) != Some(&name)
            || l.get(labels::MANAGED_BY).map(String::as_str) != Some(labels::MANAGER)
        {
            continue;
        }
        let (Some(model), Some(ns)) = (l.get(labels::MODEL), p.namespace()) else {
            continue;
        };
        let e = models.entry((ns, model.clone())).or_default();
        e.0 += 1;
        e.1 += view::pod_gpu_requests(p).values().sum::<i64>() as i32;
    }
    let mut status = pool_status(pool, &views, models);
    let schedulable = status.nodes.iter().filter(|n| n.schedulable).count();
    let ready = if status.node_count == 0 {
        Set::new(
            "Ready",
            false,
            "NoNodes",
            "no node matches the nodeSelector",
        )
    } else if schedulable == 0 || status.gpu_capacity == 0 {
        Set::new(
            "Ready",
            false,
            "NoSchedulableNodes",
            format!(
                "{} node(s) match, none can take replicas",
                status.node_count
            ),
        )
    } else {
        Set::new(
            "Ready",
            true,
            "NodesAvailable",
            format!(
                "{schedulable} schedulable node(s), {} of {} GPUs free",
                status.gpu_free, status.gpu_capacity
            ),
        )
    };
    let existing = pool
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    status.observed_generation = pool.metadata.generation;
    status.conditions = conditions::merge(
        &existing,
        &[ready],
        pool.metadata.generation,
        &Time(Timestamp::now()),
    );
    // powerWatts and energyJoules belong to the energy accountant (its own
    // field manager) and are left out here.
    reconcile::write_status(ctx, pool, &status).await?;
    Ok(Action::requeue(ctx.config.resync))
}
