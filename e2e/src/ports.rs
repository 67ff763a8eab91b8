//! Ports on 127.0.0.1 for processes the tests and benchmarks start, which
//! bind them later.
//!
//! A port the kernel hands out for `bind(127.0.0.1:0)` comes from its
//! ephemeral range (`net.ipv4.ip_local_port_range`), the same range every
//! outgoing connection on the machine takes its local port from: between
//! the port's release and the child binding it, any connection (a kube
//! client's, a load generator's, another test's) may take it, and the child
//! fails with "address already in use" (the clean-clone CI of 58d4d00 lost
//! Prometheus's port that way). So ports are chosen below that range, where
//! only an explicit bind can take one, from a random start per process (so
//! that test binaries running side by side do not try the same ports in the
//! same order), each checked bindable before it is handed out.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out: above the well-known and most registered
/// services' ports.
const LOWEST: u16 = 10_000;
/// Used when the ephemeral range cannot be read (Linux's default start).
const DEFAULT_EPHEMERAL_START: u16 = 32_768;
/// How many candidates one call tries before it gives up.
const TRIES: u32 = 512;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A port on 127.0.0.1 below the kernel's ephemeral range that nothing was
/// bound to when it was checked.
pub fn free_port() -> io::Result<u16> {
    let (low, high) = candidates(ephemeral_start());
    let span = u32::from(high - low);
    let start = start(span);
    let ports = (0..TRIES).map(|_| {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        low + offset as u16
    });
    first_bindable(ports)
}

/// The first of `ports` that 127.0.0.1 can bind now.
fn first_bindable(ports: impl Iterator<Item = u16>) -> io::Result<u16> {
    let mut last = None;
    for port in ports {
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(_) => return Ok(port),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no port tried")))
}

/// The ports to choose from: `[LOWEST, ephemeral start)`, or, on a machine
/// whose ephemeral range starts too low to leave room below it, the 4,096
/// ports above `LOWEST` (shared with outgoing connections there).
fn candidates(ephemeral_start: u16) -> (u16, u16) {
    if ephemeral_start >= LOWEST + 1_024 {
        (LOWEST, ephemeral_start)
    } else {
        (LOWEST, LOWEST + 4_096)
    }
}

/// The first number of the kernel's ephemeral port range.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| parse_range_start(&s))
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

fn parse_range_start(s: &str) -> Option<u16> {
    s.split_whitespace().next()?.parse().ok()
}

/// This process's random start, drawn once.
fn start(span: u32) -> u32 {
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        let r = RandomState::new().hash_one(std::process::id());
        (r % u64::from(span.max(1))) as u32
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_is_read_from_the_kernels_format() {
        assert_eq!(parse_range_start("32768\t60999\n"), Some(32_768));
        assert_eq!(parse_range_start("1024 65535"), Some(1_024));
        assert_eq!(parse_range_start(""), None);
    }

    #[test]
    fn ports_are_below_the_ephemeral_range_when_there_is_room() {
        assert_eq!(candidates(32_768), (10_000, 32_768));
        // No room below: a fixed block above LOWEST.
        assert_eq!(candidates(1_024), (10_000, 14_096));
    }

    #[test]
    fn a_port_handed_out_is_bindable_and_below_the_range() {
        let port = free_port().expect("a port");
        let (low, high) = candidates(ephemeral_start());
        assert!((low..high).contains(&port), "{port} not in {low}..{high}");
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bindable");
    }

    #[test]
    fn a_port_bound_by_someone_is_not_handed_out() {
        let taken = free_port().expect("a port");
        let _held = TcpListener::bind((Ipv4Addr::LOCALHOST, taken)).expect("bind");
        let other = free_port().expect("a port");
        assert_eq!(first_bindable([taken, other].into_iter()).ok(), Some(other));
        assert!(first_bindable([taken].into_iter()).is_err());
    }
}
