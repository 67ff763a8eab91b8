//! What replicas report about their load, pure: the sidecar's
//! [`strata_net::load`] header on each answer becomes the requests the
//! replica holds beyond this gateway's own (other gateway replicas, clients
//! of the Service) and its KV-cache use, trusted for a while
//! ([`Settings::signal_ttl`](crate::proxy::Settings::signal_ttl)) and then
//! forgotten, since an idle replica does not report.

use std::time::Duration;

use strata_net::load::ReplicaLoad;

/// The last report of one replica.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reported {
    /// Requests it held that this gateway had not sent.
    pub others: u32,
    /// Its KV-cache use.
    pub kv_usage: Option<f64>,
}

impl Reported {
    /// A report read while this gateway had `ours` requests in flight to
    /// the replica (the answered one included, as in the report).
    pub fn new(load: ReplicaLoad, ours: u32) -> Self {
        Self {
            others: load.in_flight.saturating_sub(ours),
            kv_usage: load.kv_usage,
        }
    }

    /// What the pick uses, `(waiting, kv_usage)`: the report if it is
    /// younger than `ttl`, else nothing known (0, 0); a `ttl` of 0 turns
    /// reports off.
    pub fn current(report: Option<&(Self, Duration)>, ttl: Duration) -> (u32, f64) {
        match report {
            Some((r, age)) if *age < ttl => (r.others, r.kv_usage.unwrap_or(0.0)),
            _ => (0, 0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn others_are_what_the_replica_holds_beyond_ours() {
        let r = Reported::new(
            ReplicaLoad {
                in_flight: 7,
                kv_usage: Some(0.5),
            },
            3,
        );
        assert_eq!(r.others, 4);
        // Ours counted before the replica saw them: never negative.
        let r = Reported::new(
            ReplicaLoad {
                in_flight: 1,
                kv_usage: None,
            },
            3,
        );
        assert_eq!(r.others, 0);
    }

    #[test]
    fn old_reports_are_forgotten() {
        let ttl = Duration::from_secs(3);
        let r = Reported {
            others: 5,
            kv_usage: Some(0.9),
        };
        assert_eq!(
            Reported::current(Some(&(r, Duration::from_secs(1))), ttl),
            (5, 0.9)
        );
        assert_eq!(
            Reported::current(Some(&(r, Duration::from_secs(3))), ttl),
            (0, 0.0)
        );
        assert_eq!(
            Reported::current(Some(&(r, Duration::ZERO)), Duration::ZERO),
            (0, 0.0)
        );
        assert_eq!(Reported::current(None, ttl), (0, 0.0));
        let unknown_kv = Reported {
            others: 2,
            kv_usage: None,
        };
        assert_eq!(
            Reported::current(Some(&(unknown_kv, Duration::ZERO)), ttl),
            (2, 0.0)
        );
    }
}
