//! A Model's status from what one reconcile saw and did: the replicas now
//! (their placement), the counts, and the conditions a person reads in
//! `kubectl describe model`:
//!
//! | condition   | reasons |
//! |-------------|---------|
//! | Ready       | AllReplicasReady, PartiallyReady, NoReplicaReady, ScaledToZero |
//! | Progressing | RolloutComplete, RollingOut, Scaling, ProgressDeadlineExceeded (False) |
//! | Degraded    | SecretNotFound, Unplaceable, ServiceConflict, InferencePoolUnavailable, InferencePoolConflict, ReplicaFailures, AsExpected (False) |
//! | ReconcileError | the error's category (Forbidden, Invalid, Conflict, Api, ...), ReconcileSucceeded (False) |
//!
//! ReconcileError is written by the operator's error reporter (its own
//! field manager) from [`reconcile_error`]; the others by the Model
//! controller from [`model_conditions`].

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use strata_crds::model::{ModelAdapterStatus, ReplicaPlacement};

use crate::conditions::Set;
use crate::rollout::Replica;
use crate::{labels, view};

/// The type of the condition the error reporter sets.
pub const RECONCILE_ERROR: &str = "ReconcileError";

/// What a Model reconcile saw and did, for its conditions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The Model's name.
    pub name: String,
    /// Replicas wanted.
    pub desired: i32,
    /// Replicas that exist now (not being deleted), after this reconcile.
    pub replicas: i32,
    /// Of those, ready.
    pub ready: i32,
    /// Of those, on the current template.
    pub updated: i32,
    /// Old-template replicas remain.
    pub rolling: bool,
    /// This reconcile deleted replicas.
    pub deleted: usize,
    /// Failed replicas this reconcile replaced.
    pub failures: usize,
    /// Why replicas could not be placed, if some could not.
    pub unplaced: Option<String>,
    /// A Service of the Model's name exists that the Model does not own.
    pub service_conflict: bool,
    /// Why the InferencePool the Model asks for is not there, if it is not.
    pub inference_pool: Option<crate::inference_pool::Problem>,
    /// A Secret the replicas need is missing (no replica is created until
    /// it exists): its description.
    pub missing_secret: Option<String>,
    /// None of the GPUPools the Model lists exists.
    pub no_pool: bool,
    /// This reconcile created or deleted replicas.
    pub acted: bool,
    /// A replica on the current template is not ready past the deadline.
    pub stalled: bool,
    /// spec.rollout.progressDeadline, as written.
    pub progress_deadline: String,
}

impl Facts {
    /// The Model has what it wants: nothing to create, delete or roll.
    pub fn converged(&self) -> bool {
        !self.rolling
            && self.updated == self.desired
            && self.replicas == self.desired
            && self.ready >= self.desired
            && self.deleted == 0
    }
}

/// How soon a Model is looked at again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Converging: again in seconds.
    Busy,
    /// Blocked on something only a person (or another object) can change:
    /// a missing Secret, no GPUPool at all. Their changes wake the Model
    /// too (GPUPools are watched); the slow look catches the rest without
    /// a storm when many Models are blocked.
    Waiting,
    /// Converged: at the resync interval.
    Settled,
}

impl Facts {
    /// How soon to look again. Pure.
    pub fn pace(&self) -> Pace {
        if self.missing_secret.is_some() || self.no_pool {
            Pace::Waiting
        } else if self.acted || self.rolling || self.unplaced.is_some() || self.ready < self.desired
        {
            Pace::Busy
        } else if self.inference_pool.is_some() {
            // The extension's CRDs, once installed, wake nobody: the slow
            // look finds them.
            Pace::Waiting
        } else {
            Pace::Settled
        }
    }
}

/// Ready, Progressing and Degraded, in that order. Pure.
pub fn model_conditions(f: &Facts) -> [Set; 3] {
    let (desired, ready) = (f.desired, f.ready);
    let ready_cond = if desired == 0 {
        Set::new(
            "Ready",
            true,
            "ScaledToZero",
            "the Model has no replicas by request",
        )
    } else if ready >= desired {
        Set::new(
            "Ready",
            true,
            "AllReplicasReady",
            format!("{ready} of {desired} replicas ready"),
        )
    } else if ready > 0 {
        Set::new(
            "Ready",
            false,
            "PartiallyReady",
            format!("{ready} of {desired} replicas ready"),
        )
    } else {
        Set::new(
            "Ready",
            false,
            "NoReplicaReady",
            format!("0 of {desired} replicas ready"),
        )
    };
    let progressing = if f.stalled {
        Set::new(
            "Progressing",
            false,
            "ProgressDeadlineExceeded",
            format!(
                "a replica on the current template has not become ready within {}",
                f.progress_deadline
            ),
        )
    } else if f.converged() {
        Set::new(
            "Progressing",
            true,
            "RolloutComplete",
            format!("{desired} replica(s) on the current template"),
        )
    } else if f.rolling || f.updated < f.replicas {
        Set::new(
            "Progressing",
            true,
            "RollingOut",
            format!(
                "{} of {desired} replicas on the current template",
                f.updated
            ),
        )
    } else {
        Set::new(
            "Progressing",
            true,
            "Scaling",
            format!("{} replica(s), converging to {desired}", f.replicas),
        )
    };
    let degraded = if let Some(what) = &f.missing_secret {
        Set::new(
            "Degraded",
            true,
            "SecretNotFound",
            format!("{what} does not exist: no replica is created until it does"),
        )
    } else if let Some(msg) = &f.unplaced {
        Set::new("Degraded", true, "Unplaceable", msg.clone())
    } else if f.service_conflict {
        Set::new(
            "Degraded",
            true,
            "ServiceConflict",
            format!(
                "a Service named {} exists and is not owned by this Model; Strata leaves it alone",
                f.name
            ),
        )
    } else if let Some(problem) = &f.inference_pool {
        Set::new("Degraded", true, problem.reason(), problem.message(&f.name))
    } else if f.failures > 0 {
        Set::new(
            "Degraded",
            true,
            "ReplicaFailures",
            format!("{} replica(s) failed and were replaced", f.failures),
        )
    } else {
        Set::new("Degraded", false, "AsExpected", "no problems")
    };
    [ready_cond, progressing, degraded]
}

/// The error reporter's condition: True with the error's reason and message
/// after a failed reconcile, False after a success. Pure.
pub fn reconcile_error(failure: Option<(&str, &str)>) -> Set {
    match failure {
        Some((reason, message)) => Set::new(RECONCILE_ERROR, true, reason, message),
        None => Set::new(
            RECONCILE_ERROR,
            false,
            "ReconcileSucceeded",
            "the last reconcile succeeded",
        ),
    }
}

/// Whether a replica on the current template (`hashes`: pool to hash) has
/// stayed unready longer than `deadline`. Pure.
pub fn stalled(
    replicas: &[Replica],
    hashes: &BTreeMap<String, String>,
    deadline: Duration,
) -> bool {
    replicas.iter().any(|r| {
        !r.terminating
            && !r.ready
            && hashes.get(&r.pool) == Some(&r.hash)
            && Duration::from_secs(r.age) > deadline
    })
}

/// status.placement: one entry per replica pod, sorted by pod name. Pure.
pub fn placement<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<ReplicaPlacement> {
    let mut out: Vec<ReplicaPlacement> = pods
        .into_iter()
        .map(|p| {
            let l = p.metadata.labels.clone().unwrap_or_default();
            ReplicaPlacement {
                pod: p.metadata.name.clone().unwrap_or_default(),
                node: view::pod_node(p).unwrap_or_default(),
                pool: l.get(labels::POOL).cloned().unwrap_or_default(),
                gpus: view::pod_gpu_requests(p).values().sum::<i64>() as i32,
                ready: view::pod_ready(p),
                template_hash: l.get(labels::TEMPLATE_HASH).cloned(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

/// Adapters carried by the Model's replicas, from the replicas' adapter
/// labels (pods being deleted do not count). Pure.
pub fn adapters<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<ModelAdapterStatus> {
    let mut counts: BTreeMap<String, i32> = BTreeMap::new();
    for p in pods
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        for (k, v) in p.metadata.labels.iter().flatten() {
            if let Some(name) = k.strip_prefix(labels::ADAPTER_PREFIX)
                && v == labels::ADAPTER_LOADED
            {
                *counts.entry(name.to_string()).or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .map(|(name, replicas)| ModelAdapterStatus { name, replicas })
        .collect()
}

/// Whether a Model waits for GPU capacity: its status says a replica could
/// not be placed (Degraded, Unplaceable) or it has fewer replicas than it
/// wants. Only such a Model can go on when capacity is freed in its pools;
/// for the others a pool's status write changes nothing.
pub fn waits_for_capacity(m: &strata_crds::Model) -> bool {
    let Some(s) = m.status.as_ref() else {
        // Never reconciled yet: its own watch event wakes it.
        return false;
    };
    let unplaceable = s
        .conditions
        .iter()
        .any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "Unplaceable");
    let wanted = s.desired_replicas.or(m.spec.replicas).unwrap_or(0);
    unplaceable || s.replicas < wanted
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_models_short_of_replicas_wait_for_capacity() {
        use strata_crds::Model;
        let model = |status: serde_json::Value| -> Model {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "strata.ai/v1alpha1", "kind": "Model",
                "metadata": {"name": "m", "namespace": "ns"},
                "spec": {"source": {"uri": "hf://a/b"}, "engine": {"type": "vLLM"},
                         "pools": [{"name": "h100"}], "replicas": 2, "minReplicas": 1, "maxReplicas": 4},
                "status": status,
            }))
            .expect("model")
        };
        let converged = model(serde_json::json!({"replicas": 2, "desiredReplicas": 2}));
        assert!(!super::waits_for_capacity(&converged));
        let short = model(serde_json::json!({"replicas": 1, "desiredReplicas": 2}));
        assert!(super::waits_for_capacity(&short));
        let unplaceable = model(serde_json::json!({"replicas": 2, "desiredReplicas": 2,
            "conditions": [{"type": "Degraded", "status": "True", "reason": "Unplaceable",
                            "message": "h100: no node has 2 free", "lastTransitionTime": "2026-12-03T00:00:00Z"}]}));
        assert!(super::waits_for_capacity(&unplaceable));
        let mut fresh = converged.clone();
        fresh.status = None;
        assert!(!super::waits_for_capacity(&fresh));
        // Without a decision yet, spec.replicas is what it wants.
        let manual = model(serde_json::json!({"replicas": 1}));
        assert!(super::waits_for_capacity(&manual));
    }

    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn facts(desired: i32, replicas: i32, ready: i32, updated: i32) -> Facts {
        Facts {
            name: "llama".into(),
            desired,
            replicas,
            ready,
            updated,
            progress_deadline: "15m".into(),
            ..Facts::default()
        }
    }

    /// (situation, facts, expected (type, status, reason) of Ready,
    /// Progressing, Degraded).
    #[test]
    fn the_conditions_a_model_gets_for_each_situation() {
        type Want = [(&'static str, bool, &'static str); 3];
        let cases: Vec<(&str, Facts, Want)> = vec![
            (
                "all replicas ready on the current template",
                facts(2, 2, 2, 2),
                [
                    ("Ready", true, "AllReplicasReady"),
                    ("Progressing", true, "RolloutComplete"),
                    ("Degraded", false, "AsExpected"),
                ],
            ),
            (
                "one of two ready, scaling up",
                facts(2, 2, 1, 2),
                [
                    ("Ready", false, "PartiallyReady"),
                    ("Progressing", true, "Scaling"),
                    ("Degraded", false, "AsExpected"),
                ],
            ),
            (
                "nothing ready yet",
                facts(1, 1, 0, 1),
                [
                    ("Ready", false, "NoReplicaReady"),
                    ("Progressing", true, "Scaling"),
                    ("Degraded", false, "AsExpected"),
                ],
            ),
            (
                "scaled to zero",
                facts(0, 0, 0, 0),
                [
                    ("Ready", true, "ScaledToZero"),
                    ("Progressing", true, "RolloutComplete"),
                    ("Degraded", false, "AsExpected"),
                ],
            ),
            (
                "rolling out a new template",
                Facts {
                    rolling: true,
                    ..facts(2, 3, 2, 1)
                },
                [
                    ("Ready", true, "AllReplicasReady"),
                    ("Progressing", true, "RollingOut"),
                    ("Degraded", false, "AsExpected"),
                ],
            ),
            (
                "a new replica never became ready",
                Facts {
                    stalled: true,
                    ..facts(2, 2, 1, 2)
                },
                [
                    ("Ready", false, "PartiallyReady"),
                    ("Progressing", false, "ProgressDeadlineExceeded"),
                    ("Degraded", false, "AsExpected"),
                ],
            ),
            (
                "no room on any pool",
                Facts {
                    unplaced: Some(
                        "1 replica(s) cannot be placed: pool a: no node has 8 free GPUs".into(),
                    ),
                    ..facts(2, 1, 1, 1)
                },
                [
                    ("Ready", false, "PartiallyReady"),
                    ("Progressing", true, "Scaling"),
                    ("Degraded", true, "Unplaceable"),
                ],
            ),
            (
                "a foreign Service has the Model's name",
                Facts {
                    service_conflict: true,
                    ..facts(1, 1, 1, 1)
                },
                [
                    ("Ready", true, "AllReplicasReady"),
                    ("Progressing", true, "RolloutComplete"),
                    ("Degraded", true, "ServiceConflict"),
                ],
            ),
            (
                "the InferencePool's CRD is not installed",
                Facts {
                    inference_pool: Some(crate::inference_pool::Problem::NotInstalled),
                    ..facts(1, 1, 1, 1)
                },
                [
                    ("Ready", true, "AllReplicasReady"),
                    ("Progressing", true, "RolloutComplete"),
                    ("Degraded", true, "InferencePoolUnavailable"),
                ],
            ),
            (
                "a foreign InferencePool has the Model's name",
                Facts {
                    inference_pool: Some(crate::inference_pool::Problem::Conflict),
                    ..facts(1, 1, 1, 1)
                },
                [
                    ("Ready", true, "AllReplicasReady"),
                    ("Progressing", true, "RolloutComplete"),
                    ("Degraded", true, "InferencePoolConflict"),
                ],
            ),
            (
                "a failed replica was replaced",
                Facts {
                    failures: 1,
                    deleted: 1,
                    ..facts(2, 2, 1, 2)
                },
                [
                    ("Ready", false, "PartiallyReady"),
                    ("Progressing", true, "Scaling"),
                    ("Degraded", true, "ReplicaFailures"),
                ],
            ),
            (
                "the source's credentials Secret is missing",
                Facts {
                    missing_secret: Some(
                        "the Secret hf-token (spec.source.credentialsSecretRef)".into(),
                    ),
                    ..facts(1, 0, 0, 0)
                },
                [
                    ("Ready", false, "NoReplicaReady"),
                    ("Progressing", true, "Scaling"),
                    ("Degraded", true, "SecretNotFound"),
                ],
            ),
            (
                "unplaceable wins over a Service conflict",
                Facts {
                    unplaced: Some("none of the GPUPools [\"gone\"] exists".into()),
                    service_conflict: true,
                    ..facts(1, 0, 0, 0)
                },
                [
                    ("Ready", false, "NoReplicaReady"),
                    ("Progressing", true, "Scaling"),
                    ("Degraded", true, "Unplaceable"),
                ],
            ),
        ];
        for (situation, f, want) in cases {
            let got = model_conditions(&f);
            let got: Vec<(&str, bool, &str)> = got
                .iter()
                .map(|s| (s.type_, s.status, s.reason.as_str()))
                .collect();
            assert_eq!(got, want, "{situation}");
        }
        let msg = model_conditions(&Facts {
            service_conflict: true,
            ..facts(1, 1, 1, 1)
        })[2]
            .message
            .clone();
        assert!(msg.contains("llama"), "{msg}");
        let msg = model_conditions(&Facts {
            stalled: true,
            ..facts(1, 1, 0, 1)
        })[1]
            .message
            .clone();
        assert!(msg.contains("15m"), "{msg}");
    }

    #[test]
    fn blocked_models_are_looked_at_slowly_and_converging_ones_soon() {
        assert_eq!(facts(2, 2, 2, 2).pace(), Pace::Settled);
        assert_eq!(facts(2, 2, 1, 2).pace(), Pace::Busy, "not all ready");
        let acted = Facts {
            acted: true,
            ..facts(2, 2, 2, 2)
        };
        assert_eq!(acted.pace(), Pace::Busy);
        let unplaced = Facts {
            unplaced: Some("no room".into()),
            ..facts(2, 1, 1, 1)
        };
        assert_eq!(unplaced.pace(), Pace::Busy, "GPUs may free up any moment");
        let no_pool = Facts {
            unplaced: Some("none exists".into()),
            no_pool: true,
            ..facts(2, 0, 0, 0)
        };
        assert_eq!(no_pool.pace(), Pace::Waiting);
        let no_secret = Facts {
            missing_secret: Some("the Secret x".into()),
            ..facts(1, 0, 0, 0)
        };
        assert_eq!(no_secret.pace(), Pace::Waiting);
        let no_crd = Facts {
            inference_pool: Some(crate::inference_pool::Problem::NotInstalled),
            ..facts(2, 2, 2, 2)
        };
        assert_eq!(no_crd.pace(), Pace::Waiting, "the CRDs wake nobody");
        let no_crd_scaling = Facts {
            inference_pool: Some(crate::inference_pool::Problem::NotInstalled),
            ..facts(2, 2, 1, 2)
        };
        assert_eq!(no_crd_scaling.pace(), Pace::Busy);
    }

    #[test]
    fn the_reconcile_error_condition_carries_the_api_servers_words() {
        let s = reconcile_error(Some((
            "Forbidden",
            "creating a replica of Model m on node n: exceeded quota: gpus",
        )));
        assert_eq!(
            (s.type_, s.status, s.reason.as_str()),
            (RECONCILE_ERROR, true, "Forbidden")
        );
        assert!(s.message.contains("exceeded quota"));
        let s = reconcile_error(None);
        assert_eq!((s.status, s.reason.as_str()), (false, "ReconcileSucceeded"));
    }

    fn replica(pool: &str, hash: &str, ready: bool, age: u64) -> Replica {
        Replica {
            name: format!("r-{pool}-{age}"),
            pool: pool.into(),
            hash: hash.into(),
            ready,
            phase: "Running".into(),
            terminating: false,
            forced: false,
            node: Some("n".into()),
            node_gone: false,
            node_not_ready_for: None,
            unschedulable_for: None,
            age,
        }
    }

    #[test]
    fn only_a_current_replica_past_the_deadline_stalls_a_rollout() {
        let hashes = BTreeMap::from([("a".to_string(), "h2".to_string())]);
        let deadline = Duration::from_secs(600);
        assert!(stalled(
            &[replica("a", "h2", false, 601)],
            &hashes,
            deadline
        ));
        assert!(!stalled(
            &[replica("a", "h2", false, 599)],
            &hashes,
            deadline
        ));
        assert!(
            !stalled(&[replica("a", "h1", false, 9999)], &hashes, deadline),
            "old template"
        );
        assert!(
            !stalled(&[replica("a", "h2", true, 9999)], &hashes, deadline),
            "ready"
        );
        let mut t = replica("a", "h2", false, 9999);
        t.terminating = true;
        assert!(!stalled(&[t], &hashes, deadline), "terminating");
    }

    fn pod(name: &str, labels: &[(&str, &str)], deleting: bool) -> Pod {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels.iter().copied().collect::<BTreeMap<_, _>>()},
            "spec": {"nodeName": "gpu-0", "containers": [{"name": "engine", "resources": {"requests": {"nvidia.com/gpu": "2"}}}]},
        }))
        .expect("pod");
        if deleting {
            p.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        }
        p
    }

    #[test]
    fn the_adapters_a_model_carries_come_from_its_replicas_labels() {
        let pods = [
            pod(
                "a",
                &[
                    ("adapter.strata.ai/sql", "loaded"),
                    ("adapter.strata.ai/poet", "loaded"),
                ],
                false,
            ),
            pod(
                "b",
                &[
                    ("adapter.strata.ai/sql", "loaded"),
                    ("strata.ai/model", "m"),
                ],
                false,
            ),
            pod("c", &[("adapter.strata.ai/sql", "loaded")], true),
            pod("d", &[("adapter.strata.ai/poet", "pending")], false),
        ];
        let got: Vec<(String, i32)> = adapters(&pods)
            .into_iter()
            .map(|a| (a.name, a.replicas))
            .collect();
        assert_eq!(got, [("poet".to_string(), 1), ("sql".to_string(), 2)]);
    }

    #[test]
    fn placement_lists_each_replica_sorted_with_its_gpus() {
        let pods = [
            pod(
                "z",
                &[("strata.ai/pool", "a"), ("strata.ai/template-hash", "h")],
                false,
            ),
            pod("b", &[("strata.ai/pool", "b")], false),
        ];
        let got = placement(&pods);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].pod, "b");
        assert_eq!(
            (got[1].pool.as_str(), got[1].gpus, got[1].node.as_str()),
            ("a", 2, "gpu-0")
        );
        assert_eq!(got[1].template_hash.as_deref(), Some("h"));
        assert!(!got[1].ready);
    }
}
