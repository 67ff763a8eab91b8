//! A replica's load, as the sidecar reports it on the head of every answer
//! it forwards and the gateway reads it (and removes it before the answer
//! reaches the client).
//!
//! `strata-replica-load: in-flight=5; kv=0.431`: the requests the sidecar
//! holds at that moment (the answered one included), from every client,
//! and the engine's KV-cache use as last scraped (left out while unknown).
//! The gateway's own in-flight counts see only its own requests; this is
//! what the others (other gateway replicas, clients of the Service) add.
//! Riding on answers costs no connection, no poll and no credential; it is
//! as fresh as the replica's last answer to this gateway.

/// The header's name.
pub const HEADER: &str = "strata-replica-load";

/// Largest value [`ReplicaLoad::parse`] reads.
const MAX_VALUE_BYTES: usize = 128;

/// Largest in-flight count taken from a report (anything above is read as
/// this: a replica holds at most its concurrency limit).
pub const MAX_IN_FLIGHT: u32 = 1 << 20;

/// What a replica reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaLoad {
    /// Requests the replica holds.
    pub in_flight: u32,
    /// Its engine's KV-cache use, 0..=1.
    pub kv_usage: Option<f64>,
}

impl ReplicaLoad {
    /// The header's value.
    pub fn encode(&self) -> String {
        match self.kv_usage {
            Some(kv) if kv.is_finite() => {
                format!("in-flight={}; kv={:.3}", self.in_flight, kv.clamp(0.0, 1.0))
            }
            _ => format!("in-flight={}", self.in_flight),
        }
    }

    /// Reads a value; `None` when it is not one [`Self::encode`] could have
    /// written (too long, no `in-flight`, a number out of range). Unknown
    /// members are skipped, so a newer sidecar can add some.
    pub fn parse(value: &str) -> Option<Self> {
        if value.len() > MAX_VALUE_BYTES {
            return None;
        }
        let mut in_flight = None;
        let mut kv_usage = None;
        for member in value.split(';') {
            let Some((key, v)) = member.trim().split_once('=') else {
                continue;
            };
            match key.trim() {
                "in-flight" => in_flight = Some(v.trim().parse::<u32>().ok()?.min(MAX_IN_FLIGHT)),
                "kv" => {
                    let kv = v.trim().parse::<f64>().ok()?;
                    if !(0.0..=1.0).contains(&kv) {
                        return None;
                    }
                    kv_usage = Some(kv);
                }
                _ => {}
            }
        }
        Some(Self {
            in_flight: in_flight?,
            kv_usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for load in [
            ReplicaLoad {
                in_flight: 0,
                kv_usage: None,
            },
            ReplicaLoad {
                in_flight: 17,
                kv_usage: Some(0.25),
            },
            ReplicaLoad {
                in_flight: 3,
                kv_usage: Some(1.0),
            },
        ] {
            assert_eq!(ReplicaLoad::parse(&load.encode()), Some(load));
        }
        // Unknown or out-of-range KV use is left out, clamped or refused.
        let nan = ReplicaLoad {
            in_flight: 2,
            kv_usage: Some(f64::NAN),
        };
        assert_eq!(nan.encode(), "in-flight=2");
        let over = ReplicaLoad {
            in_flight: 2,
            kv_usage: Some(1.5),
        };
        assert_eq!(over.encode(), "in-flight=2; kv=1.000");
    }

    #[test]
    fn refuses_what_a_sidecar_would_not_write() {
        for bad in [
            "",
            "kv=0.5",
            "in-flight=-1",
            "in-flight=many",
            "in-flight=3; kv=2",
            "in-flight=3; kv=-0.1",
            "in-flight=3; kv=NaN",
        ] {
            assert_eq!(ReplicaLoad::parse(bad), None, "{bad:?}");
        }
        assert_eq!(ReplicaLoad::parse(&"x".repeat(200)), None);
        // Unknown members are skipped; huge counts are capped.
        assert_eq!(
            ReplicaLoad::parse("in-flight=4; queue=9; kv=0.5"),
            Some(ReplicaLoad {
                in_flight: 4,
                kv_usage: Some(0.5)
            })
        );
        assert_eq!(
            ReplicaLoad::parse("in-flight=4294967295").map(|l| l.in_flight),
            Some(MAX_IN_FLIGHT)
        );
    }
}
