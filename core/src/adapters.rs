//! Which replicas carry an adapter, pure: all ready replicas of the Model, or
//! `replicas` of them; the replicas that already carry it keep it (no
//! churn); new carriers are those with the fewest adapters, within the
//! Model's maximum per replica, skipping replicas where loading it kept
//! failing; extra carriers give it up, the busiest first.

use std::collections::BTreeSet;

use strata_crds::adapter::AdapterPhase;

use crate::conditions::Set;

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

/// How one reconcile of an Adapter went, for its status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Replicas that should carry it (the plan's).
    pub desired: i32,
    /// Replicas that carry it now.
    pub loaded: i32,
    /// Loads that failed this round, or are still backing off.
    pub failures: usize,
    /// The last failure, for people.
    pub last_error: String,
    /// Replicas short for lack of room.
    pub short: i32,
    /// The Model's adapters.maxPerReplica.
    pub max_per_replica: i32,
    /// The Adapter's Model.
    pub model: String,
}

/// The Adapter's phase, with a reason and a message, from one round. Pure.
pub fn phase(r: &Round) -> (AdapterPhase, &'static str, String) {
    if r.desired == 0 {
        (
            AdapterPhase::Pending,
            "NoReadyReplicas",
            format!("Model {} has no ready replica yet", r.model),
        )
    } else if r.loaded >= r.desired {
        (
            AdapterPhase::Ready,
            "Loaded",
            format!("loaded on {} of {} replica(s)", r.loaded, r.desired),
        )
    } else if r.failures > 0 && r.loaded == 0 {
        (AdapterPhase::Failed, "LoadFailed", r.last_error.clone())
    } else if r.failures > 0 {
        (AdapterPhase::Degraded, "LoadFailed", r.last_error.clone())
    } else if r.short > 0 {
        (
            AdapterPhase::Degraded,
            "NoRoom",
            format!(
                "{} replica(s) short: the others already carry adapters.maxPerReplica ({})",
                r.short, r.max_per_replica
            ),
        )
    } else {
        (
            AdapterPhase::Loading,
            "Loading",
            format!("loaded on {} of {} replica(s)", r.loaded, r.desired),
        )
    }
}

/// Ready and Degraded for a phase. Pure.
pub fn conditions(phase: &AdapterPhase, reason: &str, message: &str) -> [Set; 2] {
    let bad = matches!(phase, AdapterPhase::Degraded | AdapterPhase::Failed);
    [
        Set::new("Ready", *phase == AdapterPhase::Ready, reason, message),
        if bad {
            Set::new("Degraded", true, reason, message)
        } else {
            Set::new("Degraded", false, "AsExpected", "no problems")
        },
    ]
}

/// One entry of a sidecar's `GET /v1/adapters` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listed {
    /// Times it was loaded again after an engine restart.
    pub reloads: u32,
    /// When it last was (Unix seconds).
    pub last_reload_unix: Option<u64>,
}

/// Finds `served` in a sidecar's `GET /v1/adapters` answer: None if the
/// answer does not list it (or is not one). Pure.
pub fn listed(body: &str, served: &str) -> Option<Listed> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let entry = v
        .get("adapters")?
        .as_array()?
        .iter()
        .find(|x| x.get("name").and_then(|n| n.as_str()) == Some(served))?;
    Some(Listed {
        reloads: entry
            .get("reloads")
            .and_then(serde_json::Value::as_u64)
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        last_reload_unix: entry
            .get("lastReloadUnix")
            .and_then(serde_json::Value::as_u64),
    })
}

/// The Service of an Adapter: `<adapter>-lora` (Adapter names are at most
/// 58 characters, so it fits a Service name).
pub fn service_name(adapter: &str) -> String {
    let mut n = format!("{adapter}-lora");
    n.truncate(63);
    n.trim_end_matches('-').to_string()
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

    fn round(desired: i32, loaded: i32, failures: usize, short: i32) -> Round {
        Round {
            desired,
            loaded,
            failures,
            last_error: if failures > 0 {
                "loading on p: sidecar answered 502".into()
            } else {
                String::new()
            },
            short,
            max_per_replica: 4,
            model: "llama".into(),
        }
    }

    #[test]
    fn the_phase_an_adapter_gets_for_each_situation() {
        for (situation, r, want, reason) in [
            (
                "no ready replica",
                round(0, 0, 0, 0),
                AdapterPhase::Pending,
                "NoReadyReplicas",
            ),
            (
                "all loaded",
                round(2, 2, 0, 0),
                AdapterPhase::Ready,
                "Loaded",
            ),
            (
                "loading",
                round(2, 1, 0, 0),
                AdapterPhase::Loading,
                "Loading",
            ),
            (
                "every load failed",
                round(2, 0, 2, 0),
                AdapterPhase::Failed,
                "LoadFailed",
            ),
            (
                "some loads failed",
                round(2, 1, 1, 0),
                AdapterPhase::Degraded,
                "LoadFailed",
            ),
            (
                "no room",
                round(3, 2, 0, 1),
                AdapterPhase::Degraded,
                "NoRoom",
            ),
        ] {
            let (phase, got, message) = phase(&r);
            assert_eq!((phase, got), (want, reason), "{situation}");
            let [ready, degraded] = conditions(&phase, got, &message);
            assert_eq!(ready.status, phase == AdapterPhase::Ready, "{situation}");
            assert_eq!(
                degraded.status,
                matches!(phase, AdapterPhase::Degraded | AdapterPhase::Failed),
                "{situation}"
            );
        }
        assert!(phase(&round(2, 0, 2, 0)).2.contains("502"));
        assert!(phase(&round(3, 2, 0, 1)).2.contains("maxPerReplica (4)"));
    }

    #[test]
    fn a_sidecars_list_tells_whether_and_how_often_it_reloaded() {
        let body = r#"{"adapters":[{"name":"sql","source":"s"},{"name":"poet","source":"p","reloads":2,"lastReloadUnix":1700000000}]}"#;
        assert_eq!(listed(body, "sql"), Some(Listed::default()));
        assert_eq!(
            listed(body, "poet"),
            Some(Listed {
                reloads: 2,
                last_reload_unix: Some(1_700_000_000)
            })
        );
        assert_eq!(listed(body, "gone"), None);
        assert_eq!(listed("not json", "sql"), None);
        assert_eq!(listed(r#"{"adapters":{}}"#, "sql"), None);
    }

    #[test]
    fn adapter_services_fit_a_service_name() {
        assert_eq!(service_name("sql"), "sql-lora");
        assert!(service_name(&"a".repeat(70)).len() <= 63);
    }
}
