//! Conditions in the metav1.Condition shape, merged so that
//! lastTransitionTime changes only when the status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A condition to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// Type (Ready, Progressing, Degraded).
    pub type_: &'static str,
    /// True, False or Unknown.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Message for people.
    pub message: String,
}

impl Set {
    /// A condition.
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Merges `desired` into `existing`: keeps lastTransitionTime when the status
/// is unchanged, sets it to `now` otherwise. Order follows `desired`.
pub fn merge(
    existing: &[Condition],
    desired: &[Set],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" }.to_string();
            let last = existing
                .iter()
                .find(|c| c.type_ == d.type_)
                .filter(|c| c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: d.type_.to_string(),
                status,
                reason: d.reason.clone(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time: last,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let t0 = Time(Timestamp::from_second(1_000).expect("ts"));
        let t1 = Time(Timestamp::from_second(2_000).expect("ts"));
        let first = merge(
            &[],
            &[Set::new("Ready", false, "Starting", "0 of 1 ready")],
            Some(1),
            &t0,
        );
        assert_eq!(first[0].last_transition_time, t0);
        let same = merge(
            &first,
            &[Set::new("Ready", false, "Starting", "still 0 of 1")],
            Some(2),
            &t1,
        );
        assert_eq!(
            same[0].last_transition_time, t0,
            "unchanged status keeps its time"
        );
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(
            &same,
            &[Set::new("Ready", true, "AllReplicasReady", "1 of 1")],
            Some(2),
            &t1,
        );
        assert_eq!(flipped[0].last_transition_time, t1);
        assert_eq!(flipped[0].status, "True");
    }
}
