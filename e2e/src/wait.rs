//! Waiting on real conditions with a deadline (never a fixed sleep).

use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Polls `check` every `every` until it returns `Ok(true)`, an error, or
/// `timeout` passes. For conditions that have no watch (HTTP health
/// endpoints, TCP ports); objects in the API are awaited with watches.
pub async fn poll_until<F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                seconds: timeout.as_secs(),
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// Runs `fut` with a deadline, naming what timed out.
pub async fn within<T>(
    what: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: what.to_string(),
            seconds: timeout.as_secs(),
        }),
    }
}
