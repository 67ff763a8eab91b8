//! One error reporter for the Model and Adapter controllers: a reconcile
//! that fails is visible on the object itself, not only in the operator's
//! log. `kubectl describe` shows a Warning Event with the error (the API
//! server's own words for a refused write: quota, Pod Security, a webhook)
//! and the condition `ReconcileError` True with the same message; the next
//! success sets it False. Retries back off exponentially, from 5 s to 5
//! minutes. The condition is written with its own field manager, so it
//! never fights the controllers' status writes (conditions are a map keyed
//! by type).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use serde_json::json;

use super::Context;
use super::reconcile::{Reconciled, apply_status, publish};
use crate::error::Error;
use strata_core::conditions::{self, Set};

/// The condition type.
pub const CONDITION: &str = "ReconcileError";
/// Field manager of the condition.
const FIELD_MANAGER: &str = "strata-errors";
/// Longest Event note (the API server's limit is 1 KiB).
pub const MAX_NOTE: usize = 1000;

/// Delay before the next try after `failures` failures in a row: 5 s,
/// doubling, at most 5 minutes. Pure.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(10);
    Duration::from_secs((5u64 << exp).min(300))
}

/// The CamelCase reason of an error's category.
pub fn reason(err: &Error) -> String {
    err.metric_label()
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// A message cut to `max` bytes on a character boundary.
pub fn cut(message: &str, max: usize) -> String {
    if message.len() <= max {
        return message.to_string();
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

/// Whether the object shows the condition True now.
fn showing(existing: &[Condition]) -> bool {
    existing
        .iter()
        .any(|c| c.type_ == CONDITION && c.status == "True")
}

async fn apply_condition<K: Reconciled>(ctx: &Context, obj: &K, set: Set) {
    let now = Time(Timestamp::now());
    let cond = conditions::merge(obj.conditions(), &[set], obj.meta().generation, &now);
    if let Err(e) = apply_status(&ctx.client, obj, FIELD_MANAGER, json!({"conditions": cond})).await
    {
        tracing::debug!(name = %obj.name_any(), "setting {CONDITION}: {e}");
    }
}

pub fn key_of<K: Reconciled>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::CONTROLLER,
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Reports a reconcile's outcome on the object: on failure a Warning Event
/// and `ReconcileError` True (counting the failures in a row for the
/// backoff); on success, `ReconcileError` False if it showed True.
pub async fn report<K: Reconciled>(ctx: &Context, obj: &K, outcome: Result<(), &Error>) {
    let key = key_of(obj);
    match outcome {
        Ok(()) => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&key);
            }
            if showing(obj.conditions()) {
                let set = Set::new(
                    CONDITION,
                    false,
                    "ReconcileSucceeded",
                    "the last reconcile succeeded",
                );
                apply_condition(ctx, obj, set).await;
            }
        }
        Err(err) => {
            if let Ok(mut f) = ctx.failures.lock() {
                *f.entry(key.clone()).or_default() += 1;
            }
            let message = cut(&err.to_string(), MAX_NOTE);
            publish(
                ctx,
                obj,
                EventType::Warning,
                &reason(err),
                "Reconcile",
                message.clone(),
            )
            .await;
            apply_condition(ctx, obj, Set::new(CONDITION, true, reason(err), message)).await;
        }
    }
}

/// The delay before retrying a failed object.
pub fn retry_after<K: Reconciled>(ctx: &Context, obj: &K) -> Duration {
    let key = key_of(obj);
    let n = ctx
        .failures
        .lock()
        .map(|f| f.get(&key).copied().unwrap_or(1))
        .unwrap_or(1);
    backoff(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_5s_to_5min() {
        let got: Vec<u64> = (0..10).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(got, [5, 5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX).as_secs(), 300);
    }

    #[test]
    fn reasons_and_messages_for_people() {
        assert_eq!(reason(&Error::MissingKey("uid")), "Internal");
        let long = "é".repeat(600);
        let c = cut(&long, MAX_NOTE);
        assert!(c.len() <= MAX_NOTE + 3 && c.ends_with("..."));
        assert_eq!(cut("short", MAX_NOTE), "short");
    }
}
