//! Leader election on a coordination.k8s.io Lease: one instance reconciles,
//! the others stand by and take over when the holder stops renewing.

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
}

impl Elector {
    /// A new elector.
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
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

    /// Tries once to acquire or renew. Ok(true): we are the leader now.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
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

    /// Gives the lease up (on graceful shutdown), so a standby takes over at once.
    pub async fn release(&self) {
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

    /// Renews until renewal has failed for a whole lease duration; returns
    /// when leadership is lost.
    pub async fn hold(&self) {
        let every = self.config.duration / 3;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("the lease was taken by another instance");
                    return;
                }
                Err(e) => tracing::warn!("renewing the lease: {e}"),
            }
            if last_ok.elapsed() >= self.config.duration {
                tracing::error!("could not renew the lease for {:?}", self.config.duration);
                return;
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
    fn takes_free_expired_or_own_leases_only() {
        let now = Timestamp::from_second(10_000).expect("ts");
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&spec("a", 1)), "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&spec("b", 5)), "a", now), Decision::Wait);
        assert_eq!(decide(Some(&spec("b", 20)), "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&spec("", 1)), "a", now), Decision::Acquire);
    }
}
