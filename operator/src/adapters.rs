//! Which replicas carry an adapter, pure: all ready replicas of the Model, or
//! `replicas` of them; the replicas that already carry it keep it (no
//! churn); new carriers are those with the fewest adapters, within the
//! Model's maximum per replica, skipping replicas where loading it kept
//! failing; extra carriers give it up, the busiest first.

use std::collections::BTreeSet;

/// One replica of the Model as the planner sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replica {
    /// Its pod.
    pub pod: String,
    /// Ready to serve.
    pub ready: bool,
    /// Adapters it carries (Adapter names, from its labels).
    pub adapters: BTreeSet<String>,
}

/// What to do for one Adapter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Replicas that should carry it.
    pub desired: i32,
    /// Load it on these.
    pub load: Vec<String>,
    /// Unload it from these.
    pub unload: Vec<String>,
    /// Replicas that should take it but have no room (maximum per replica).
    pub short: i32,
}

/// Plans one Adapter (`name`) over the Model's replicas.
pub fn plan(
    name: &str,
    want: Option<i32>,
    max_per_replica: i32,
    replicas: &[Replica],
    avoid: &BTreeSet<String>,
) -> Plan {
    let ready: Vec<&Replica> = replicas.iter().filter(|r| r.ready).collect();
    let desired = want.map_or(ready.len(), |n| (n.max(0) as usize).min(ready.len()));
    let mut carriers: Vec<&Replica> = ready
        .iter()
        .copied()
        .filter(|r| r.adapters.contains(name))
        .collect();
    let mut plan = Plan {
        desired: desired as i32,
        ..Plan::default()
    };
    if carriers.len() > desired {
        carriers.sort_by(|a, b| {
            b.adapters
                .len()
                .cmp(&a.adapters.len())
                .then(a.pod.cmp(&b.pod))
        });
        plan.unload = carriers[..carriers.len() - desired]
            .iter()
            .map(|r| r.pod.clone())
            .collect();
        return plan;
    }
    let need = desired - carriers.len();
    let mut candidates: Vec<&Replica> = ready
        .iter()
        .copied()
        .filter(|r| {
            !r.adapters.contains(name)
                && !avoid.contains(&r.pod)
                && (r.adapters.len() as i32) < max_per_replica
        })
        .collect();
    candidates.sort_by(|a, b| {
        a.adapters
            .len()
            .cmp(&b.adapters.len())
            .then(a.pod.cmp(&b.pod))
    });
    plan.load = candidates
        .iter()
        .take(need)
        .map(|r| r.pod.clone())
        .collect();
    plan.short = (need - plan.load.len()) as i32;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(pod: &str, ready: bool, adapters: &[&str]) -> Replica {
        Replica {
            pod: pod.into(),
            ready,
            adapters: adapters.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn all_ready_replicas_by_default() {
        let reps = [r("a", true, &[]), r("b", true, &["x"]), r("c", false, &[])];
        let p = plan("x", None, 4, &reps, &BTreeSet::new());
        assert_eq!(p.desired, 2, "not-ready replicas are not counted");
        assert_eq!(p.load, ["a"]);
        assert!(p.unload.is_empty());
    }

    #[test]
    fn n_replicas_fewest_adapters_first_within_the_maximum() {
        let reps = [
            r("a", true, &["p", "q"]),
            r("b", true, &["p"]),
            r("c", true, &[]),
            r("d", true, &["p", "q", "s"]),
        ];
        let p = plan("x", Some(2), 3, &reps, &BTreeSet::new());
        assert_eq!(p.load, ["c", "b"]);
        // Three wanted, but d is full: a is the third.
        let p = plan("x", Some(4), 3, &reps, &BTreeSet::new());
        assert_eq!(p.load, ["c", "b", "a"]);
        assert_eq!(p.short, 1, "d has no room");
    }

    #[test]
    fn carriers_keep_it_and_extras_give_it_up_busiest_first() {
        let reps = [
            r("a", true, &["x"]),
            r("b", true, &["x", "y", "z"]),
            r("c", true, &["x", "y"]),
        ];
        let p = plan("x", Some(3), 4, &reps, &BTreeSet::new());
        assert!(p.load.is_empty() && p.unload.is_empty());
        let p = plan("x", Some(1), 4, &reps, &BTreeSet::new());
        assert_eq!(p.unload, ["b", "c"]);
    }

    #[test]
    fn failing_replicas_are_skipped_for_another() {
        let reps = [r("a", true, &[]), r("b", true, &["y"])];
        let avoid = BTreeSet::from(["a".to_string()]);
        let p = plan("x", Some(1), 4, &reps, &avoid);
        assert_eq!(p.load, ["b"]);
    }
}
