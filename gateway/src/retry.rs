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

#[cfg(test)]
mod tests {
    use super::*;

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
