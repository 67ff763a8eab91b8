//! Reading a body with bounds on size, time and, across all requests of a
//! process, memory: a body larger than its cap is refused as soon as its
//! `Content-Length` says so or its bytes pass the cap; a body that takes
//! longer than its deadline is refused; and every byte held is drawn from a
//! shared [`ByteBudget`], so a thousand concurrent large bodies wait their
//! turn (the caller answers "busy") instead of exhausting memory.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget's unit: permits are KiB.
const UNIT: usize = 1024;

/// Memory shared by every body a process holds at once.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    sem: Arc<Semaphore>,
    total: usize,
}

/// Bytes drawn from a budget; they return to it when dropped.
#[derive(Debug, Default)]
pub struct Held {
    permit: Option<OwnedSemaphorePermit>,
}

impl Held {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits() * UNIT)
    }

    /// Adds `other`'s bytes to these.
    pub fn absorb(&mut self, other: Held) {
        match (&mut self.permit, other.permit) {
            (Some(p), Some(o)) => p.merge(o),
            (None, Some(o)) => self.permit = Some(o),
            (_, None) => {}
        }
    }
}

impl ByteBudget {
    /// A budget of `bytes` (rounded up to whole KiB).
    pub fn new(bytes: usize) -> Self {
        let units = bytes.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            sem: Arc::new(Semaphore::new(units)),
            total: units * UNIT,
        }
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes not held by anyone now.
    pub fn available(&self) -> usize {
        self.sem.available_permits() * UNIT
    }

    /// Takes `bytes` now, or None when the budget does not have them.
    pub fn try_take(&self, bytes: usize) -> Option<Held> {
        if bytes == 0 {
            return Some(Held::default());
        }
        let units = u32::try_from(bytes.div_ceil(UNIT)).ok()?;
        self.sem
            .clone()
            .try_acquire_many_owned(units)
            .ok()
            .map(|p| Held { permit: Some(p) })
    }
}

/// Bounds of one body read.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body accepted.
    pub max_bytes: usize,
    /// Time allowed to receive the whole body.
    pub timeout: Duration,
}

/// Why a body was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// Larger than the cap.
    #[error("the body is larger than {limit} bytes")]
    TooLarge {
        /// The cap.
        limit: usize,
    },
    /// Not received within the deadline.
    #[error("the body was not received within {0:?}")]
    Timeout(Duration),
    /// The shared budget cannot hold it now.
    #[error("too many large bodies in flight; retry shortly")]
    Busy,
    /// The peer's stream failed.
    #[error("reading the body: {0}")]
    Read(String),
}

impl BodyError {
    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Timeout(_) => "body_timeout",
            Self::Busy => "busy",
            Self::Read(_) => "read_error",
        }
    }
}

/// Reads a whole body within `limits`, drawing what it holds from `budget`
/// (None: no shared budget). `declared` is the `Content-Length`, if any. The
/// bytes come back with what they hold of the budget; drop both together.
pub async fn read<B>(
    body: B,
    declared: Option<u64>,
    limits: BodyLimits,
    budget: Option<&ByteBudget>,
) -> Result<(Bytes, Held), BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let max = limits.max_bytes;
    if let Some(n) = declared
        && n > max as u64
    {
        return Err(BodyError::TooLarge { limit: max });
    }
    let take = |bytes: usize| -> Result<Held, BodyError> {
        match budget {
            Some(b) => b.try_take(bytes).ok_or(BodyError::Busy),
            None => Ok(Held::default()),
        }
    };
    let exchange = async {
        // A declared length is reserved at once (and allocated once).
        let first = declared.map_or(0, |n| n as usize);
        let mut held = take(first)?;
        let mut buf = BytesMut::with_capacity(first);
        let mut body = pin!(body);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() + data.len() > max {
                return Err(BodyError::TooLarge { limit: max });
            }
            buf.extend_from_slice(&data);
            if budget.is_some() && buf.capacity() > held.bytes() {
                held.absorb(take(buf.capacity() - held.bytes())?);
            }
        }
        Ok((buf.freeze(), held))
    };
    tokio::time::timeout(limits.timeout, exchange)
        .await
        .map_err(|_| BodyError::Timeout(limits.timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn limits(max: usize) -> BodyLimits {
        BodyLimits {
            max_bytes: max,
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn a_declared_length_over_the_cap_is_refused_unread() {
        let body = Full::new(Bytes::from(vec![0u8; 10]));
        let r = read(body, Some(1 << 30), limits(100), None).await;
        assert_eq!(r.map(|_| ()), Err(BodyError::TooLarge { limit: 100 }));
    }

    #[tokio::test]
    async fn an_undeclared_body_is_cut_at_the_cap() {
        let chunks = (0..100).map(|_| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![1u8; 64])))
        });
        let body = StreamBody::new(futures::stream::iter(chunks));
        let r = read(body, None, limits(1000), None).await;
        assert_eq!(r.map(|_| ()), Err(BodyError::TooLarge { limit: 1000 }));
    }

    #[tokio::test]
    async fn the_budget_is_shared_and_returned() {
        let budget = ByteBudget::new(8 * 1024);
        let a = read(
            Full::new(Bytes::from(vec![0u8; 6000])),
            Some(6000),
            limits(10_000),
            Some(&budget),
        )
        .await
        .expect("fits");
        assert_eq!(budget.available(), 2 * 1024);
        let b = read(
            Full::new(Bytes::from(vec![0u8; 6000])),
            Some(6000),
            limits(10_000),
            Some(&budget),
        )
        .await;
        assert_eq!(b.map(|_| ()), Err(BodyError::Busy));
        drop(a);
        assert_eq!(budget.available(), 8 * 1024);
    }

    #[tokio::test]
    async fn a_slow_body_times_out() {
        let body = StreamBody::new(futures::stream::pending::<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >());
        let r = read(
            body,
            None,
            BodyLimits {
                max_bytes: 10,
                timeout: Duration::from_millis(50),
            },
            None,
        )
        .await;
        assert!(matches!(r, Err(BodyError::Timeout(_))));
    }
}
