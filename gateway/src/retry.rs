//! Whether a failed attempt is tried again on another replica, pure.
//!
//! Only while nothing has reached the client, and only when the replica
//! cannot have started the work: the connection was refused or failed
//! before the request went out, or the replica answered 502/503 while it
//! is going away (no longer among the ready replicas, e.g. draining). Any
//! other answer, 502/503 from a replica that stays, or a failure after the
//! request was sent, goes to the client as it is: a POST to an engine is
//! not idempotent.

use http::StatusCode;

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No connection to the replica (refused, unreachable, timed out).
    Connect,
    /// The replica answered with this status (its head, nothing sent on).
    Answered(StatusCode),
    /// The exchange failed after the request went out.
    Failed,
}

/// Whether to try another replica after `outcome`, having made `attempts`
/// attempts (this one included) of at most `1 + retries`; `going` says
/// whether the replica has left the ready set since it was picked.
pub fn again(outcome: Outcome, attempts: usize, retries: usize, going: bool) -> bool {
    if attempts > retries {
        return false;
    }
    match outcome {
        Outcome::Connect => true,
        Outcome::Answered(s) => {
            going && matches!(s, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE)
        }
        Outcome::Failed => false,
    }
}

/// Whether to wait (briefly, bounded) for the view to say if the replica
/// is going before deciding: a 502, or a 503 without `Retry-After`, from a
/// replica the view still lists, which would be tried again were it going.
/// A deleted pod's node stops its engine about when this gateway's watch
/// learns of the deletion, so the sidecar can answer "engine unreachable"
/// before the view drops the replica. A 503 with `Retry-After` is a live
/// replica shedding load: passed on at once.
pub fn settle(
    outcome: Outcome,
    retry_after: bool,
    attempts: usize,
    retries: usize,
    going: bool,
) -> bool {
    let status_settles = match outcome {
        Outcome::Answered(StatusCode::BAD_GATEWAY) => true,
        Outcome::Answered(StatusCode::SERVICE_UNAVAILABLE) => !retry_after,
        _ => false,
    };
    status_settles && !going && again(outcome, attempts, retries, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_502_from_a_replica_still_listed_waits_for_the_view() {
        let bad = Outcome::Answered(StatusCode::BAD_GATEWAY);
        let gone = Outcome::Answered(StatusCode::SERVICE_UNAVAILABLE);
        assert!(settle(bad, false, 1, 2, false), "502, still listed");
        assert!(settle(gone, false, 1, 2, false), "503 without Retry-After");
        assert!(
            !settle(gone, true, 1, 2, false),
            "503 shedding load: at once"
        );
        assert!(!settle(bad, false, 1, 2, true), "already going: no wait");
        assert!(!settle(bad, false, 3, 2, false), "no retry left: no wait");
        assert!(!settle(bad, false, 1, 0, false), "retries off: no wait");
        for other in [
            Outcome::Connect,
            Outcome::Failed,
            Outcome::Answered(StatusCode::OK),
            Outcome::Answered(StatusCode::INTERNAL_SERVER_ERROR),
            Outcome::Answered(StatusCode::TOO_MANY_REQUESTS),
        ] {
            assert!(!settle(other, false, 1, 2, false), "{other:?}");
        }
    }

    #[test]
    fn retried_only_where_the_replica_cannot_have_started() {
        for (outcome, going, want) in [
            (Outcome::Connect, false, true),
            (Outcome::Connect, true, true),
            (
                Outcome::Answered(StatusCode::SERVICE_UNAVAILABLE),
                true,
                true,
            ),
            (Outcome::Answered(StatusCode::BAD_GATEWAY), true, true),
            (
                Outcome::Answered(StatusCode::SERVICE_UNAVAILABLE),
                false,
                false,
            ),
            (Outcome::Answered(StatusCode::OK), true, false),
            (
                Outcome::Answered(StatusCode::TOO_MANY_REQUESTS),
                true,
                false,
            ),
            (
                Outcome::Answered(StatusCode::INTERNAL_SERVER_ERROR),
                true,
                false,
            ),
            (Outcome::Failed, true, false),
        ] {
            assert_eq!(
                again(outcome, 1, 2, going),
                want,
                "{outcome:?} going={going}"
            );
        }
        assert!(again(Outcome::Connect, 2, 2, false), "the second retry");
        assert!(!again(Outcome::Connect, 3, 2, false), "no third");
        assert!(!again(Outcome::Connect, 1, 0, false), "retries off");
    }
}
