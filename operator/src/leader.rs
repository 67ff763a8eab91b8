//! Leader election on a coordination.k8s.io Lease: one instance reconciles,
//! the others stand by and take over when the holder stops renewing.
//!
//! With a safety margin: a standby may take the lease `duration` after the
//! holder's last renewal started; the holder gives up (and the process
//! exits, stopping every controller) once `renew deadline` = 2/3 of the
//! duration has passed since its last successful renewal started, and
//! every lease call is cut at 1/5 of the duration, so a stalled API server
//! cannot keep the holder waiting past its deadline. The holder stops
//! writing a third of a lease before anyone else may start: its writes go
//! through a fenced client ([`crate::fence`]) that refuses them once the
//! renew deadline has passed, even before this loop notices.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace (the operator's).
    pub namespace: String,
    /// This instance's identity (its pod name).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
}

impl LeaseConfig {
    /// How long after its last successful renewal (started) the holder
    /// gives up: 2/3 of the lease.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// The longest a single lease call may take.
    pub fn call_timeout(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }

    /// How often the holder renews.
    pub fn renew_every(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }
}

/// What the holder check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// We hold (or may take) the lease.
    Acquire,
    /// Someone else holds a live lease.
    Wait,
}

/// Pure decision: may `identity` take or renew the lease at `now`?
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return Decision::Acquire;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match spec.renew_time.as_ref() {
        Some(MicroTime(renewed)) if *renewed + SignedDuration::from_secs(duration) > now => {
            Decision::Wait
        }
        _ => Decision::Acquire,
    }
}

/// An elector for one lease.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    fence: crate::fence::Fence,
}

impl Elector {
    /// A new elector. `client` must not be fenced (it writes the Lease);
    /// `fence` is opened while the lease is held (until the start of the
    /// last successful renewal plus the renew deadline) and closed when it
    /// is lost or given up.
    pub fn new(client: Client, config: LeaseConfig, fence: crate::fence::Fence) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            fence,
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.duration.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Tries once to acquire or renew, within the call timeout. Ok(true):
    /// we are the leader now. A call cut short is an error (not leading).
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        self.try_acquire_within(self.config.call_timeout()).await
    }

    /// [`Self::try_acquire`] within `limit`.
    async fn try_acquire_within(&self, limit: Duration) -> Result<bool, kube::Error> {
        let started = std::time::Instant::now();
        let res = match tokio::time::timeout(limit, self.try_acquire_unbounded()).await {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service(
                format!("the lease call took longer than {limit:?}").into(),
            )),
        };
        if matches!(res, Ok(true)) {
            // The renewTime written is at or after `started`: a standby may
            // take over a full lease after it, writes stop 1/3 before.
            self.fence
                .open_until(started + self.config.renew_deadline());
        }
        res
    }

    async fn try_acquire_unbounded(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        match self.api.get_opt(&self.config.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                if decide(lease.spec.as_ref(), &self.config.identity, now) == Decision::Wait {
                    return Ok(false);
                }
                let old = lease.spec.clone().unwrap_or_default();
                let ours = old.holder_identity.as_deref() == Some(self.config.identity.as_str());
                let transitions = old.lease_transitions.unwrap_or(0) + i32::from(!ours);
                lease.spec =
                    Some(self.spec(now, if ours { old.acquire_time } else { None }, transitions));
                // The resourceVersion in metadata makes this a compare-and-swap.
                match self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Gives the lease up (on graceful shutdown), so a standby takes over
    /// at once; bounded by the call timeout (a stalled API server cannot
    /// hold up the exit).
    pub async fn release(&self) {
        self.fence.close();
        let limit = self.config.call_timeout();
        if tokio::time::timeout(limit, self.release_unbounded())
            .await
            .is_err()
        {
            tracing::warn!("releasing the lease took longer than {limit:?}; leaving it to expire");
        }
    }

    async fn release_unbounded(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.config.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            if let Err(e) = self
                .api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
            {
                tracing::warn!("releasing the lease: {e}");
            }
        }
    }

    /// Waits until this instance is the leader.
    pub async fn acquire(&self) {
        let retry = self.config.duration / 5;
        loop {
            match self.try_acquire().await {
                Ok(true) => return,
                Ok(false) => tracing::debug!("another instance leads; standing by"),
                Err(e) => tracing::warn!("leader election: {e}"),
            }
            tokio::time::sleep(retry.max(Duration::from_millis(500))).await;
        }
    }

    /// Renews until it cannot: returns when another instance took the
    /// lease, or when no renewal has succeeded within the renew deadline
    /// (counted from the start of the last successful one, which is the
    /// renewTime the standbys see). The caller must stop acting at once.
    pub async fn hold(&self) {
        let deadline_after = self.config.renew_deadline();
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every()).await;
            let started = tokio::time::Instant::now();
            let deadline = last_ok + deadline_after;
            if started >= deadline {
                self.fence.close();
                tracing::error!("could not renew the lease within {deadline_after:?}");
                return;
            }
            // A renewal may take until the deadline: an API server slow
            // under load answers in more than a call timeout, and cutting
            // every call short would lose a lease it would have kept (the
            // fence counts from the start of the call, so a slow success
            // is as safe as a fast one). No call outlives the deadline.
            let remaining = deadline.saturating_duration_since(started);
            match tokio::time::timeout_at(deadline, self.try_acquire_within(remaining)).await {
                Ok(Ok(true)) => last_ok = started,
                Ok(Ok(false)) => {
                    self.fence.close();
                    tracing::error!("the lease was taken by another instance");
                    return;
                }
                Ok(Err(e)) => tracing::warn!("renewing the lease: {e}"),
                Err(_) => {
                    self.fence.close();
                    tracing::error!("could not renew the lease within {deadline_after:?}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64) -> LeaseSpec {
        let now = Timestamp::from_second(10_000).expect("ts");
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn the_holder_gives_up_well_before_a_standby_may_take_over() {
        let c = LeaseConfig {
            name: "l".into(),
            namespace: "n".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        };
        assert_eq!(c.renew_deadline(), Duration::from_secs(10));
        assert_eq!(c.call_timeout(), Duration::from_secs(3));
        // The last renewal plus a call cut at its timeout still ends inside
        // the lease, with a margin.
        assert!(c.renew_deadline() + c.call_timeout() < c.duration);
        assert!(
            c.renew_every() * 2 < c.renew_deadline(),
            "two tries per deadline"
        );
    }

    #[test]
    fn takes_free_expired_or_own_leases_only() {
        let now = Timestamp::from_second(10_000).expect("ts");
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&spec("a", 1)), "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&spec("b", 5)), "a", now), Decision::Wait);
        assert_eq!(decide(Some(&spec("b", 20)), "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&spec("", 1)), "a", now), Decision::Acquire);
    }
}
