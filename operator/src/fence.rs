//! The write fence: with leader election, every write the controllers, the
//! error reporter and the energy accountant send to the API server passes
//! through a layer of the kube client that refuses it unless this instance
//! holds a lease it renewed recently enough: until the start of its last
//! successful renewal plus the renew deadline (2/3 of the lease). A standby
//! may take the lease only a full lease after that renewal started, so the
//! old leader's writes stop a third of a lease before anyone else's can
//! begin, whatever it was doing: a reconcile halfway through, a process that
//! was paused (SIGSTOP) and resumed after its lease expired (the monotonic
//! clock has moved on, so the fence is closed the moment it runs again), a
//! renewal stuck on a stalled API server.
//!
//! Reads pass (a standby keeps its caches warm). The elector writes the
//! Lease through its own, unfenced client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

/// Error of a fenced write.
#[derive(Debug, thiserror::Error)]
#[error(
    "not written: this operator instance does not hold a current leader lease (writes are fenced until it renews)"
)]
pub struct NotLeading;

/// Whether writes may go out now; cloned into the client layer and the
/// elector.
#[derive(Debug, Clone)]
pub struct Fence {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Without leader election the fence is always open.
    elected: bool,
    base: Instant,
    /// Open until `base` + this many nanoseconds (0: closed).
    until_nanos: AtomicU64,
}

impl Fence {
    /// Always open: no leader election (one replica).
    pub fn open() -> Self {
        Self::new(false)
    }

    /// Closed until [`Fence::open_until`] is called by the elector.
    pub fn elected() -> Self {
        Self::new(true)
    }

    fn new(elected: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                elected,
                base: Instant::now(),
                until_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Opens the fence until `deadline` (never moves it back).
    pub fn open_until(&self, deadline: Instant) {
        let nanos = deadline
            .saturating_duration_since(self.inner.base)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64;
        self.inner.until_nanos.fetch_max(nanos, Ordering::SeqCst);
    }

    /// Closes the fence for good (leadership lost or given up).
    pub fn close(&self) {
        self.inner.until_nanos.store(0, Ordering::SeqCst);
    }

    /// Whether a write may go out at `now`.
    pub fn is_open_at(&self, now: Instant) -> bool {
        if !self.inner.elected {
            return true;
        }
        let until = self.inner.until_nanos.load(Ordering::SeqCst);
        until > 0 && (now.saturating_duration_since(self.inner.base).as_nanos() as u64) < until
    }

    /// Whether a write may go out now.
    pub fn is_open(&self) -> bool {
        self.is_open_at(Instant::now())
    }
}

/// Whether a request changes something.
fn writes(method: &http::Method) -> bool {
    !matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    )
}

/// The tower layer of the fenced client.
#[derive(Debug, Clone)]
pub struct FenceLayer(pub Fence);

impl<S> tower::Layer<S> for FenceLayer {
    type Service = Fenced<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Fenced {
            inner,
            fence: self.0.clone(),
        }
    }
}

/// A client service whose writes pass only while the fence is open.
#[derive(Debug, Clone)]
pub struct Fenced<S> {
    inner: S,
    fence: Fence,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<http::Request<B>> for Fenced<S>
where
    S: tower::Service<http::Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if writes(req.method()) && !self.fence.is_open() {
            tracing::debug!(method = %req.method(), uri = %req.uri(), "write fenced: not leading");
            return Box::pin(std::future::ready(Err(NotLeading.into())));
        }
        let fut = self.inner.call(req);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tower::{Layer, Service};

    #[test]
    fn the_fence_opens_until_the_deadline_and_closes_for_good() {
        let f = Fence::elected();
        let now = Instant::now();
        assert!(!f.is_open_at(now), "closed before the first lease");
        f.open_until(now + Duration::from_secs(4));
        assert!(f.is_open_at(now + Duration::from_secs(3)));
        assert!(
            !f.is_open_at(now + Duration::from_secs(4)),
            "closed at the deadline (a process resumed after a pause finds it closed)"
        );
        f.open_until(now + Duration::from_secs(2));
        assert!(
            f.is_open_at(now + Duration::from_secs(3)),
            "a late renewal answer never moves the deadline back"
        );
        f.close();
        assert!(!f.is_open_at(now));
        assert!(Fence::open().is_open(), "no election: always open");
    }

    /// A service that answers every request with its method.
    #[derive(Clone)]
    struct Echo;
    impl Service<http::Request<()>> for Echo {
        type Response = String;
        type Error = BoxError;
        type Future = std::future::Ready<Result<String, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            std::future::ready(Ok(req.method().to_string()))
        }
    }

    #[tokio::test]
    async fn writes_are_refused_while_closed_and_reads_pass() {
        let fence = Fence::elected();
        let mut svc = FenceLayer(fence.clone()).layer(Echo);
        let req = |m: http::Method| {
            http::Request::builder()
                .method(m)
                .uri("/api/v1/namespaces/x/pods")
                .body(())
                .expect("request")
        };
        assert_eq!(
            svc.call(req(http::Method::GET))
                .await
                .expect("a read passes"),
            "GET"
        );
        for m in [
            http::Method::POST,
            http::Method::PUT,
            http::Method::PATCH,
            http::Method::DELETE,
        ] {
            let err = svc.call(req(m.clone())).await.expect_err("fenced");
            assert!(err.to_string().contains("leader lease"), "{m}: {err}");
        }
        fence.open_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(
            svc.call(req(http::Method::PATCH)).await.expect("open"),
            "PATCH"
        );
    }
}
