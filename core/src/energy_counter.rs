//! Readings of the NVML total-energy counter (millijoules since the driver
//! loaded, per GPU) turned into joule increments, reset-safe. Shared by
//! everything that meters GPUs from NVML: the node agent (every GPU of its
//! node) and the sidecar's opt-in NVML sampler.
//!
//! Rules, per device (keyed by its UUID):
//! - the first reading is the baseline (0 J): energy used before the reader
//!   started is not counted, so a reader that restarts does not count the
//!   whole counter again;
//! - a reading at or above the previous one: the difference;
//! - a reading below the previous one is a counter reset (a driver reload,
//!   a GPU reset): what the counter shows now was used since the reset, and
//!   it is counted; what was used between the previous reading and the
//!   reset is lost (no reading saw it).

use std::collections::BTreeMap;

/// Turns readings of a monotonic millijoule counter into joule increments,
/// surviving resets (the counter restarts from zero on a driver reload).
#[derive(Debug, Default, Clone)]
pub struct EnergyAccumulator {
    last_mj: BTreeMap<String, u64>,
}

/// One reading's contribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnergyDelta {
    /// Joules used since the previous reading.
    pub joules: f64,
    /// The counter went backwards (a reset).
    pub reset: bool,
}

impl EnergyAccumulator {
    /// The increment for a new reading of `uuid`'s counter. The first
    /// reading is the baseline (0 J): energy used before the reader ran is
    /// not counted.
    pub fn update(&mut self, uuid: &str, counter_mj: u64) -> EnergyDelta {
        let delta = match self.last_mj.get(uuid) {
            None => EnergyDelta {
                joules: 0.0,
                reset: false,
            },
            Some(prev) if counter_mj >= *prev => EnergyDelta {
                joules: (counter_mj - prev) as f64 / 1000.0,
                reset: false,
            },
            // Reset: what the counter shows now was used since the reset.
            Some(_) => EnergyDelta {
                joules: counter_mj as f64 / 1000.0,
                reset: true,
            },
        };
        self.last_mj.insert(uuid.to_string(), counter_mj);
        delta
    }

    /// Forgets a device (gone from the node): its next reading is a new
    /// baseline.
    pub fn forget(&mut self, uuid: &str) {
        self.last_mj.remove(uuid);
    }

    /// Whether a device has a baseline.
    pub fn knows(&self, uuid: &str) -> bool {
        self.last_mj.contains_key(uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_survives_counter_resets_without_double_counting() {
        let mut acc = EnergyAccumulator::default();
        assert_eq!(acc.update("g", 5_000_000).joules, 0.0, "baseline");
        assert_eq!(acc.update("g", 5_001_500).joules, 1.5);
        let r = acc.update("g", 400);
        assert!(r.reset);
        assert_eq!(r.joules, 0.4);
        assert_eq!(acc.update("g", 1_400).joules, 1.0);
        assert_eq!(acc.update("other", 9).joules, 0.0, "per device");
    }

    #[test]
    fn a_forgotten_device_starts_a_new_baseline() {
        let mut acc = EnergyAccumulator::default();
        acc.update("g", 1_000);
        assert!(acc.knows("g"));
        acc.forget("g");
        assert!(!acc.knows("g"));
        assert_eq!(acc.update("g", 9_000).joules, 0.0);
        assert_eq!(acc.update("g", 9_000).joules, 0.0, "unchanged");
    }
}
