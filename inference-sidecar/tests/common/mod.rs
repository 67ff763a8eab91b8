//! Helpers shared by the sidecar's integration tests.

use std::time::{Duration, Instant};

/// Waits until `f` holds, checking every 20 ms; fails the test after 10 s.
pub async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
