//! Rollout and replica plan: which pods to delete and how many to create so
//! that a Model converges to its desired replicas on the current template,
//! with surge (a new replica Ready before an old one goes) within the
//! rollout policy. Pure.

use std::collections::BTreeMap;

/// A pod of the Model, as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Pod name.
    pub name: String,
    /// Pool label.
    pub pool: String,
    /// Template-hash label.
    pub hash: String,
    /// Ready condition True.
    pub ready: bool,
    /// Pod phase (Pending, Running, Succeeded, Failed).
    pub phase: String,
    /// Being deleted.
    pub terminating: bool,
    /// Being deleted without grace (`deletionGracePeriodSeconds` 0): the
    /// API server removes it without a kubelet, so deleting it again would
    /// change nothing.
    pub forced: bool,
    /// Node it is bound or pinned to.
    pub node: Option<String>,
    /// Its node no longer exists.
    pub node_gone: bool,
    /// Its node has not been Ready for this many seconds.
    pub node_not_ready_for: Option<u64>,
    /// The scheduler reported it Unschedulable for at least this many seconds.
    pub unschedulable_for: Option<u64>,
    /// Age in seconds.
    pub age: u64,
}

/// What the Model wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Desired replicas.
    pub replicas: usize,
    /// Current template hash per pool in the Model's preference list.
    pub hashes: BTreeMap<String, String>,
    /// Pool order (index in spec.pools): later pools are fallbacks, removed first.
    pub pool_rank: BTreeMap<String, usize>,
    /// Extra replicas allowed during a rollout.
    pub max_surge: usize,
    /// Replicas that may be missing during a rollout.
    pub max_unavailable: usize,
    /// Seconds a pod may stay Unschedulable before it is re-planned.
    pub unschedulable_grace: u64,
    /// Seconds a replica's node may stay NotReady before the replica is
    /// placed elsewhere.
    pub node_lost_grace: u64,
}

/// Why a pod is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// It failed (or finished).
    Failed,
    /// Its node is gone.
    NodeGone,
    /// It was being deleted when its node went: no kubelet will confirm
    /// the deletion, so it is deleted again without grace (else it stays
    /// Terminating until the pod garbage collector's 40-s quarantine).
    Stranded,
    /// Its node has not been Ready for longer than the grace period.
    NodeNotReady,
    /// The scheduler could not bind it; place it elsewhere.
    Unschedulable,
    /// It runs an old template and its replacement is ready.
    Outdated,
    /// There are more replicas than desired.
    ScaleDown,
}

impl DeleteReason {
    /// Whether the pod is deleted without grace (`gracePeriodSeconds: 0`):
    /// no kubelet will confirm the deletion of a pod on a vanished node.
    pub fn without_grace(self) -> bool {
        matches!(self, Self::NodeGone | Self::Stranded)
    }

    /// Event reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "ReplicaFailed",
            Self::NodeGone => "NodeGone",
            Self::Stranded => "Stranded",
            Self::NodeNotReady => "NodeNotReady",
            Self::Unschedulable => "Unschedulable",
            Self::Outdated => "Replaced",
            Self::ScaleDown => "ScaledDown",
        }
    }
}

/// The plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Pods to delete, with the reason.
    pub delete: Vec<(String, DeleteReason)>,
    /// New replicas to place.
    pub create: usize,
    /// Nodes the scheduler refused (avoid them when placing).
    pub avoid_nodes: Vec<String>,
    /// Live replicas on the current template.
    pub updated: usize,
    /// Ready replicas after the deletes.
    pub ready: usize,
    /// True while old-template replicas remain.
    pub rolling: bool,
}

impl Target {
    fn current(&self, r: &Replica) -> bool {
        self.hashes.get(&r.pool) == Some(&r.hash)
    }
}

/// Computes the plan for one reconcile.
pub fn plan(replicas: &[Replica], target: &Target) -> Plan {
    let mut out = Plan::default();
    let mut live: Vec<&Replica> = Vec::new();
    for r in replicas {
        if r.terminating {
            if r.node_gone && !r.forced {
                out.delete.push((r.name.clone(), DeleteReason::Stranded));
            }
            continue;
        }
        if r.phase == "Failed" || r.phase == "Succeeded" {
            out.delete.push((r.name.clone(), DeleteReason::Failed));
        } else if r.node_gone {
            out.delete.push((r.name.clone(), DeleteReason::NodeGone));
        } else if r
            .node_not_ready_for
            .is_some_and(|s| s >= target.node_lost_grace)
        {
            out.delete
                .push((r.name.clone(), DeleteReason::NodeNotReady));
        } else if r
            .unschedulable_for
            .is_some_and(|s| s >= target.unschedulable_grace)
        {
            out.delete
                .push((r.name.clone(), DeleteReason::Unschedulable));
            if let Some(n) = &r.node {
                out.avoid_nodes.push(n.clone());
            }
        } else {
            live.push(r);
        }
    }
    let desired = target.replicas;
    let (updated, outdated): (Vec<&Replica>, Vec<&Replica>) =
        live.iter().partition(|r| target.current(r));
    let mut ready = live.iter().filter(|r| r.ready).count();
    // Never plan a moment without a ready replica while one is desired: the
    // floor is 1 even when maxUnavailable allows less, and a rollout that
    // could then never progress (maxSurge 0) surges one replica anyway.
    let floor = usize::from(desired > 0);
    let min_available = desired.saturating_sub(target.max_unavailable).max(floor);
    let max_surge =
        if target.max_surge == 0 && desired.saturating_sub(target.max_unavailable) < floor {
            1
        } else {
            target.max_surge
        };

    // Old-template replicas: unready ones go at once; ready ones while enough
    // replicas stay ready.
    let mut outdated = outdated;
    outdated.sort_by_key(|r| (r.ready, std::cmp::Reverse(r.age)));
    let mut remaining_live = live.len();
    let mut kept_outdated = 0;
    for r in &outdated {
        if !r.ready || ready > min_available {
            out.delete.push((r.name.clone(), DeleteReason::Outdated));
            remaining_live -= 1;
            if r.ready {
                ready -= 1;
            }
        } else {
            kept_outdated += 1;
        }
    }

    // Too many current replicas: remove unready, then fallback pools, then the youngest.
    let mut updated_count = updated.len();
    if updated_count > desired {
        let mut extra: Vec<&&Replica> = updated.iter().collect();
        extra.sort_by_key(|r| {
            (
                r.ready,
                std::cmp::Reverse(target.pool_rank.get(&r.pool).copied().unwrap_or(usize::MAX)),
                r.age,
            )
        });
        for r in extra.into_iter().take(updated_count - desired) {
            out.delete.push((r.name.clone(), DeleteReason::ScaleDown));
            remaining_live -= 1;
            if r.ready {
                ready -= 1;
            }
        }
        updated_count = desired;
    }

    // New replicas: up to desired on the current template, within the surge.
    let room = (desired + max_surge).saturating_sub(remaining_live);
    out.create = desired.saturating_sub(updated_count).min(room);
    out.updated = updated_count;
    out.ready = ready;
    out.rolling = kept_outdated > 0;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, hash: &str, ready: bool) -> Replica {
        Replica {
            name: name.into(),
            pool: "h100".into(),
            hash: hash.into(),
            ready,
            phase: "Running".into(),
            terminating: false,
            forced: false,
            node: Some("h100-0".into()),
            node_gone: false,
            node_not_ready_for: None,
            unschedulable_for: None,
            age: 100,
        }
    }

    fn target(replicas: usize, surge: usize, unavailable: usize) -> Target {
        Target {
            replicas,
            hashes: BTreeMap::from([
                ("h100".to_string(), "new".to_string()),
                ("l4".to_string(), "new-l4".to_string()),
            ]),
            pool_rank: BTreeMap::from([("h100".to_string(), 0), ("l4".to_string(), 1)]),
            max_surge: surge,
            max_unavailable: unavailable,
            unschedulable_grace: 30,
            node_lost_grace: 30,
        }
    }

    fn deleted(p: &Plan) -> Vec<(&str, DeleteReason)> {
        p.delete.iter().map(|(n, r)| (n.as_str(), *r)).collect()
    }

    #[test]
    fn scales_up_from_nothing() {
        let p = plan(&[], &target(3, 1, 0));
        assert_eq!(p.create, 3);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn surge_rollout_keeps_a_ready_replica_at_every_step() {
        let t = target(1, 1, 0);
        // Step 1: old ready -> create one new, delete nothing.
        let p = plan(&[r("old", "old", true)], &t);
        assert_eq!((p.create, deleted(&p)), (1, vec![]));
        // Step 2: the new one is not ready yet -> wait.
        let p = plan(&[r("old", "old", true), r("new", "new", false)], &t);
        assert_eq!((p.create, deleted(&p)), (0, vec![]));
        assert!(p.rolling);
        // Step 3: the new one is ready -> the old one goes.
        let p = plan(&[r("old", "old", true), r("new", "new", true)], &t);
        assert_eq!(
            (p.create, deleted(&p)),
            (0, vec![("old", DeleteReason::Outdated)])
        );
        assert_eq!(p.ready, 1);
    }

    #[test]
    fn rollout_without_surge_uses_the_unavailable_budget() {
        let t = target(2, 0, 1);
        let p = plan(&[r("a", "old", true), r("b", "old", true)], &t);
        assert_eq!(deleted(&p), vec![("a", DeleteReason::Outdated)]);
        assert_eq!(p.create, 1);
    }

    #[test]
    fn one_replica_without_surge_still_never_drops_to_zero_ready() {
        let t = target(1, 0, 1);
        let p = plan(&[r("old", "old", true)], &t);
        assert_eq!(
            (p.create, deleted(&p)),
            (1, vec![]),
            "surges one instead of deleting the only ready replica"
        );
        let p = plan(&[r("old", "old", true), r("new", "new", true)], &t);
        assert_eq!(deleted(&p), vec![("old", DeleteReason::Outdated)]);
    }

    #[test]
    fn unready_outdated_replicas_go_first_and_at_once() {
        let t = target(2, 1, 0);
        let p = plan(
            &[
                r("a", "old", false),
                r("b", "old", true),
                r("c", "new", true),
            ],
            &t,
        );
        assert_eq!(deleted(&p), vec![("a", DeleteReason::Outdated)]);
        assert_eq!(
            p.create, 1,
            "one more current replica, within desired + surge"
        );
    }

    #[test]
    fn failed_gone_and_unschedulable_replicas_are_replaced() {
        let t = target(3, 1, 0);
        let mut failed = r("f", "new", false);
        failed.phase = "Failed".into();
        let mut gone = r("g", "new", true);
        gone.node_gone = true;
        let mut stuck = r("s", "new", false);
        stuck.unschedulable_for = Some(45);
        stuck.node = Some("h100-1".into());
        let mut fresh = r("p", "new", false);
        fresh.unschedulable_for = Some(5);
        let p = plan(&[failed, gone, stuck, fresh], &t);
        assert_eq!(
            deleted(&p),
            vec![
                ("f", DeleteReason::Failed),
                ("g", DeleteReason::NodeGone),
                ("s", DeleteReason::Unschedulable)
            ]
        );
        assert_eq!(p.avoid_nodes, vec!["h100-1".to_string()]);
        assert_eq!(p.create, 2, "the pending one still counts");
    }

    #[test]
    fn a_replica_being_deleted_whose_node_went_is_deleted_again_and_counts_for_nothing() {
        let t = target(1, 1, 0);
        let mut old = r("old", "old", true);
        old.terminating = true;
        old.node_gone = true;
        let mut leaving = r("leaving", "old", false);
        leaving.terminating = true;
        let mut forced = r("forced", "old", false);
        forced.terminating = true;
        forced.node_gone = true;
        forced.forced = true;
        let p = plan(&[old, leaving, forced, r("new", "new", true)], &t);
        assert_eq!(
            deleted(&p),
            vec![("old", DeleteReason::Stranded)],
            "only the one whose node is gone and deleted with grace; the \
             other's kubelet confirms it, the server removes the forced one"
        );
        assert_eq!(p.create, 0, "its replacement is there already");
        assert_eq!((p.updated, p.ready), (1, 1));
    }

    #[test]
    fn replicas_on_a_node_not_ready_past_the_grace_are_placed_elsewhere() {
        let t = target(2, 1, 0);
        let mut lost = r("lost", "new", false);
        lost.node_not_ready_for = Some(31);
        let mut blip = r("blip", "new", true);
        blip.node_not_ready_for = Some(10);
        let p = plan(&[lost, blip], &t);
        assert_eq!(deleted(&p), vec![("lost", DeleteReason::NodeNotReady)]);
        assert_eq!(p.create, 1, "replaced; the one within the grace stays");
    }

    #[test]
    fn scale_down_removes_unready_then_fallback_pools_then_youngest() {
        let t = target(1, 1, 0);
        let mut on_l4 = r("l4", "new-l4", true);
        on_l4.pool = "l4".into();
        let mut young = r("young", "new", true);
        young.age = 5;
        let p = plan(
            &[r("old-h100", "new", true), on_l4.clone(), young.clone()],
            &t,
        );
        assert_eq!(
            deleted(&p),
            vec![
                ("l4", DeleteReason::ScaleDown),
                ("young", DeleteReason::ScaleDown)
            ]
        );
        let p = plan(&[r("a", "new", true), r("b", "new", false)], &t);
        assert_eq!(deleted(&p), vec![("b", DeleteReason::ScaleDown)]);
        assert_eq!(p.create, 0);
    }

    #[test]
    fn scale_to_zero_deletes_everything() {
        let p = plan(
            &[r("a", "new", true), r("b", "old", true)],
            &target(0, 1, 0),
        );
        assert_eq!(p.delete.len(), 2);
        assert_eq!(p.create, 0);
    }

    #[test]
    fn terminating_pods_are_ignored() {
        let mut t = r("t", "new", true);
        t.terminating = true;
        let p = plan(&[t], &target(1, 1, 0));
        assert_eq!(p.create, 1);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn a_removed_pool_counts_as_outdated() {
        let mut a = r("a", "x", true);
        a.pool = "a100".into();
        let p = plan(&[a], &target(1, 1, 0));
        assert_eq!(p.create, 1, "surge a replacement first");
        assert!(p.delete.is_empty());
    }
}
