//! Client-side rate limiting of the operator's API requests, as every
//! Kubernetes controller has (client-go's `QPS`/`Burst`): a token bucket
//! that `burst` requests may drain at once and that refills at `qps` per
//! second. A request that finds it empty waits its turn (first come, first
//! served: each reserves the next token), so a burst of work — a thousand
//! Models applied at once, a re-list after an API-server restart — is
//! spread out instead of starving the API server. The Lease has its own
//! client, so renewals never wait behind the controllers' work.
//!
//! In front of it, [`Lanes`]: Model statuses and Events wait while the
//! client is busy, so that the writes that make replicas exist go first.
//!
//! [`Bucket`] is pure (time is passed in); [`RateLimitLayer`] is the tower
//! layer of the kube client, counting requests by verb and resource, the
//! time spent waiting, and how long the API server took to answer each
//! (until its response headers: what a create, patch or the start of a
//! watch costs as seen from here, beside the server's own
//! `apiserver_request_duration_seconds`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus::{Counter, HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// A token bucket: `burst` tokens, refilled at `qps` per second.
#[derive(Debug, Clone)]
pub struct Bucket {
    qps: f64,
    burst: f64,
    /// Tokens now (negative: reserved by requests that wait).
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket at `now`. `qps` at least 0.1 and `burst` at least 1.
    pub fn new(qps: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: qps.max(0.1),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token for a request made at `now`: how long it must wait
    /// before it goes (zero when a token is there).
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.qps)
        }
    }

    /// Whether a request made at `now` would go at once (a token is
    /// there), without taking it.
    pub fn free(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * self.qps).min(self.burst) >= 1.0
    }
}

/// The layer's shared state: the bucket and its counters.
#[derive(Debug, Clone)]
pub struct RateLimit {
    bucket: Arc<Mutex<Bucket>>,
    /// Requests sent and not yet answered (their response headers).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    requests: IntCounterVec,
    waited: Counter,
    duration: HistogramVec,
}

impl RateLimit {
    /// A limiter at `qps` with `burst`, and its metrics
    /// (`strata_kube_requests_total{verb,resource}`,
    /// `strata_kube_rate_limit_wait_seconds_total`,
    /// `strata_kube_request_duration_seconds{verb,resource}`), to register.
    pub fn new(qps: f64, burst: u32) -> Result<Self, prometheus::Error> {
        Ok(Self {
            bucket: Arc::new(Mutex::new(Bucket::new(qps, burst, now()))),
            in_flight: Arc::default(),
            requests: IntCounterVec::new(
                Opts::new(
                    "strata_kube_requests_total",
                    "Requests the operator sent to the API server, by HTTP method and resource (e.g. pods, models/status; the Lease's excluded).",
                ),
                &["verb", "resource"],
            )?,
            waited: Counter::new(
                "strata_kube_rate_limit_wait_seconds_total",
                "Time requests waited for the client-side rate limiter (--kube-api-qps, --kube-api-burst).",
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "strata_kube_request_duration_seconds",
                    "Time from sending a request to the API server until its response headers arrived (after the rate limiter; a watch until it started), by HTTP method and resource.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
                &["verb", "resource"],
            )?,
        })
    }

    /// Registers the metrics.
    pub fn register(&self, registry: &prometheus::Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.waited.clone()))?;
        registry.register(Box::new(self.duration.clone()))
    }

    fn take(&self) -> Duration {
        self.bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(now())
    }

    /// Whether the client is busy: a request made now would wait for the
    /// bucket (while requests queue for it, it is never free: each takes
    /// the next token as soon as the one before it has gone), or more than
    /// [`BUSY_IN_FLIGHT`] requests wait for the API server's answer (it is
    /// slow to answer: at 1,000 new Models on a small control plane, pod
    /// creates took it 1-2 s each while the bucket had tokens to spare).
    pub fn busy(&self) -> bool {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed) > BUSY_IN_FLIGHT
            || !self
                .bucket
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .free(now())
    }
}

/// Requests that can wait: a Model's status (coalesced while it waits: a
/// status computed meanwhile replaces it) and Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Status,
    /// After the statuses waiting.
    Event,
}

impl Lane {
    fn as_str(self) -> &'static str {
        match self {
            Lane::Status => "status",
            Lane::Event => "event",
        }
    }

    /// How long a request of the lane yields to the others, at most.
    pub fn at_most(self) -> Duration {
        match self {
            Lane::Status => Duration::from_secs(60),
            Lane::Event => Duration::from_secs(120),
        }
    }
}

/// How often the first request waiting in a lane looks at the bucket.
const LOOK_EVERY: Duration = Duration::from_millis(50);
/// Requests of the lanes on their way at once (in the client's queue or
/// answered): however many waited, they join the queue a few dozen at a
/// time. (At 8, the statuses of 1,000 new Models, sent once their pods
/// existed, went at about 70 a second on a loaded API server: 14 s of the
/// 24.6 s to all Ready.)
pub const LANES_IN_FLIGHT: usize = 32;

/// Lower-priority lanes in front of the client: a status write or an
/// Event waits while the client is busy ([`RateLimit::busy`]: requests
/// queue for the bucket or wait long for the API server: the pod creates,
/// Secrets and Services of a thousand new Models), so that the writes that
/// make replicas exist go first, for at most [`Lane::at_most`] (a minute
/// for a status, two for an Event); Events wait for the statuses too. A Model's status
/// that waits is replaced by newer ones meanwhile, so a busy operator
/// writes each Model's latest status once instead of every step on the
/// way (the API server's Priority and Fairness does the same between
/// clients; this is within one). Only the first request of each lane
/// looks at the bucket (every [`LOOK_EVERY`]); the rest wait behind it in
/// order.
#[derive(Clone)]
pub struct Lanes {
    limit: Option<RateLimit>,
    heads: Arc<[tokio::sync::Mutex<()>; 2]>,
    /// Statuses waiting for their turn.
    statuses: Arc<std::sync::atomic::AtomicUsize>,
    slots: Arc<tokio::sync::Semaphore>,
    /// `strata_kube_yield_seconds_total{lane}`.
    yielded: prometheus::CounterVec,
}

impl Lanes {
    /// Lanes in front of `limit` (None: no limit, nothing waits but the
    /// [`LANES_IN_FLIGHT`] bound), and their metric, to register.
    pub fn new(limit: Option<RateLimit>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            limit,
            heads: Arc::new([tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())]),
            statuses: Arc::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(LANES_IN_FLIGHT)),
            yielded: prometheus::CounterVec::new(
                Opts::new(
                    "strata_kube_yield_seconds_total",
                    "Time status writes and Events waited for the operator's other requests to go first (the rate limiter busy), by lane.",
                ),
                &["lane"],
            )?,
        })
    }

    /// Registers the metric.
    pub fn register(&self, registry: &prometheus::Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.yielded.clone()))
    }

    /// Whether the client is busy (see [`RateLimit::busy`]): work that
    /// can wait for a later round (the energy accountant's writes) skips
    /// this one.
    pub fn busy(&self) -> bool {
        self.limit.as_ref().is_some_and(RateLimit::busy)
    }

    /// Waits for a request of `lane`'s turn; it goes while the returned
    /// permit is held (keep it until the answer).
    pub async fn turn(&self, lane: Lane) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let start = tokio::time::Instant::now();
        let deadline = start + lane.at_most();
        let waiting = (lane == Lane::Status).then(|| Counted::new(&self.statuses));
        {
            let head = match lane {
                Lane::Status => &self.heads[0],
                Lane::Event => &self.heads[1],
            };
            let _first = head.lock().await;
            loop {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    break;
                }
                let busy = self.busy();
                let statuses_first = lane == Lane::Event
                    && self.statuses.load(std::sync::atomic::Ordering::Relaxed) > 0;
                if !busy && !statuses_first {
                    break;
                }
                tokio::time::sleep(LOOK_EVERY.min(deadline - now)).await;
            }
        }
        // (The semaphore is never closed.)
        let permit = self.slots.clone().acquire_owned().await.ok();
        drop(waiting);
        self.yielded
            .with_label_values(&[lane.as_str()])
            .inc_by(start.elapsed().as_secs_f64());
        permit
    }
}

/// Now, on tokio's clock (which a test may pause and advance).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Requests waiting for the API server's answer beyond which the client
/// counts as busy (see [`RateLimit::busy`]).
pub const BUSY_IN_FLIGHT: usize = 2 * LANES_IN_FLIGHT;

/// Counts one in `n` while it lives (a request in flight, a status
/// waiting for its turn).
struct Counted(Arc<std::sync::atomic::AtomicUsize>);

impl Counted {
    fn new(n: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(n.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The tower layer of the rate-limited client.
#[derive(Debug, Clone)]
pub struct RateLimitLayer(pub RateLimit);

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner,
            limit: self.0.clone(),
            state: Gate::Closed,
        }
    }
}

/// Where a service stands with the bucket.
#[derive(Debug)]
enum Gate {
    /// No token taken for the next call.
    Closed,
    /// A token taken; waiting until it may be used.
    Waiting(Pin<Box<tokio::time::Sleep>>),
    /// The next call may go.
    Open,
}

/// A client service that is ready only when the bucket lets the next
/// request go (the kube client's buffer calls it one request at a time, in
/// order).
#[derive(Debug)]
pub struct RateLimited<S> {
    inner: S,
    limit: RateLimit,
    state: Gate,
}

/// A copy shares the bucket and the counters and holds no token yet (a
/// retry's copy takes its own for each attempt).
impl<S: Clone> Clone for RateLimited<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limit: self.limit.clone(),
            state: Gate::Closed,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<http::Request<B>> for RateLimited<S>
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
        loop {
            match &mut self.state {
                Gate::Closed => {
                    let wait = self.limit.take();
                    if wait.is_zero() {
                        self.state = Gate::Open;
                    } else {
                        self.limit.waited.inc_by(wait.as_secs_f64());
                        self.state = Gate::Waiting(Box::pin(tokio::time::sleep(wait)));
                    }
                }
                Gate::Waiting(sleep) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.state = Gate::Open;
                }
                Gate::Open => return self.inner.poll_ready(cx).map_err(Into::into),
            }
        }
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.state = Gate::Closed;
        let labels = [req.method().as_str(), &resource_of(req.uri().path())];
        self.limit.requests.with_label_values(&labels).inc();
        let timer = self.limit.duration.with_label_values(&labels).start_timer();
        let in_flight = Counted::new(&self.limit.in_flight);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let answer = fut.await.map_err(Into::into);
            timer.observe_duration();
            drop(in_flight);
            answer
        })
    }
}

/// The resource (and subresource) a request's path names, as the API
/// server's `apiserver_request_total` does: `pods`, `models/status`,
/// `namespaces`; `discovery` for `/api`, `/apis`, `/version` and the
/// like. Pure.
pub fn resource_of(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest: &[&str] = match segments.first() {
        Some(&"api") if segments.len() > 2 => &segments[2..],
        Some(&"apis") if segments.len() > 3 => &segments[3..],
        _ => return "discovery".to_string(),
    };
    let rest = match rest {
        ["namespaces", _, more @ ..] if !more.is_empty() => more,
        _ => rest,
    };
    match rest {
        [resource, _, sub, ..] => format!("{resource}/{sub}"),
        [resource, ..] => (*resource).to_string(),
        [] => "discovery".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_names_its_resource_and_subresource() {
        for (path, want) in [
            ("/api/v1/namespaces/ns/pods", "pods"),
            ("/api/v1/namespaces/ns/pods/p-1", "pods"),
            ("/api/v1/namespaces/ns/pods/p-1/status", "pods/status"),
            ("/api/v1/pods", "pods"),
            ("/api/v1/nodes/n1", "nodes"),
            ("/api/v1/namespaces", "namespaces"),
            ("/api/v1/namespaces/ns", "namespaces"),
            (
                "/apis/strata.ai/v1alpha1/namespaces/ns/models/m/status",
                "models/status",
            ),
            (
                "/apis/strata.ai/v1alpha1/gpupools/h100/status",
                "gpupools/status",
            ),
            ("/apis/strata.ai/v1alpha1/models", "models"),
            ("/apis/events.k8s.io/v1/namespaces/ns/events", "events"),
            ("/api", "discovery"),
            ("/api/v1", "discovery"),
            ("/apis/strata.ai/v1alpha1", "discovery"),
            ("/version", "discovery"),
        ] {
            assert_eq!(resource_of(path), want, "{path}");
        }
    }

    #[test]
    fn a_burst_goes_at_once_then_requests_are_spaced_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 3, t0);
        for _ in 0..3 {
            assert_eq!(b.take(t0), Duration::ZERO);
        }
        // The 4th, 5th, 6th at the same instant wait 0.1, 0.2, 0.3 s.
        for i in 1..=3 {
            let w = b.take(t0).as_secs_f64();
            assert!((w - 0.1 * f64::from(i)).abs() < 1e-9, "{i}: {w}");
        }
        // After a quiet second the bucket is full again, not more.
        let t1 = t0 + Duration::from_secs(2);
        for _ in 0..3 {
            assert_eq!(b.take(t1), Duration::ZERO);
        }
        assert!(b.take(t1) > Duration::ZERO);
    }

    #[test]
    fn a_thousand_requests_at_once_take_the_time_the_rate_says() {
        let t0 = Instant::now();
        let mut b = Bucket::new(50.0, 100, t0);
        let last = (0..1000).map(|_| b.take(t0)).max().unwrap_or_default();
        // 100 go at once, 900 at 50/s: the last after 18 s.
        assert!((last.as_secs_f64() - 18.0).abs() < 1e-6, "{last:?}");
    }

    /// A service that answers every request at once.
    struct Echo;
    impl tower::Service<http::Request<()>> for Echo {
        type Response = ();
        type Error = BoxError;
        type Future = std::future::Ready<Result<(), BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_holds_requests_beyond_the_burst() {
        use tower::{Layer, Service, ServiceExt};
        let limit = RateLimit::new(10.0, 2).expect("limit");
        let mut svc = RateLimitLayer(limit.clone()).layer(Echo);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            svc.ready()
                .await
                .expect("ready")
                .call(
                    http::Request::builder()
                        .uri("/api/v1/namespaces/ns/pods")
                        .body(())
                        .expect("request"),
                )
                .await
                .expect("answer");
        }
        // 2 at once, 3 more at 10/s (the paused clock advances exactly).
        let took = start.elapsed().as_secs_f64();
        assert!((took - 0.3).abs() < 0.01, "{took}");
        assert_eq!(limit.requests.with_label_values(&["GET", "pods"]).get(), 5);
        assert_eq!(
            limit
                .duration
                .with_label_values(&["GET", "pods"])
                .get_sample_count(),
            5
        );
        assert!(
            (limit.waited.get() - 0.3).abs() < 0.01,
            "{}",
            limit.waited.get()
        );
    }

    /// Answers 429 to its first request and 200 after, counting calls; closes
    /// `fence` when it answers the first (a lease lost meanwhile).
    #[derive(Clone)]
    struct Busy {
        calls: Arc<std::sync::atomic::AtomicUsize>,
        fence: Option<crate::fence::Fence>,
    }
    impl tower::Service<http::Request<kube::client::Body>> for Busy {
        type Response = http::Response<()>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<http::Response<()>, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<kube::client::Body>) -> Self::Future {
            let first = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            if let Some(f) = self.fence.as_ref().filter(|_| first) {
                f.close();
            }
            let status = if first { 429 } else { 200 };
            std::future::ready(
                http::Response::builder()
                    .status(status)
                    .body(())
                    .map_err(Into::into),
            )
        }
    }

    fn create_pod() -> http::Request<kube::client::Body> {
        http::Request::post("/api/v1/namespaces/ns/pods")
            .body(kube::client::Body::from(b"{}".to_vec()))
            .expect("request")
    }

    /// Sends one pod create through the operator's client stack (main.rs
    /// `clients`: retry, then bucket, then fence) over `busy`.
    async fn create_pod_through(
        busy: Busy,
        fence: &crate::fence::Fence,
        limit: &RateLimit,
    ) -> Result<http::Response<()>, BoxError> {
        use tower::{Layer, Service, ServiceExt};
        let fenced = crate::fence::FenceLayer(fence.clone()).layer(busy);
        let limited = RateLimitLayer(limit.clone()).layer(fenced);
        let mut svc =
            tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry())
                .layer(limited);
        svc.ready().await?.call(create_pod()).await
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_of_a_retried_request_takes_a_token_and_is_counted() {
        let limit = RateLimit::new(10.0, 1).expect("limit");
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let busy = Busy {
            calls: calls.clone(),
            fence: None,
        };
        let answer = create_pod_through(busy, &crate::fence::Fence::open(), &limit)
            .await
            .expect("answer");
        assert_eq!(answer.status(), 200, "the 429 was retried");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(
            limit.requests.with_label_values(&["POST", "pods"]).get(),
            2,
            "both attempts counted"
        );
        assert!(
            limit.waited.get() > 0.0,
            "the retry waited for a token of the emptied bucket"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_retried_after_the_lease_was_lost_is_refused_by_the_fence() {
        let limit = RateLimit::new(10.0, 10).expect("limit");
        let fence = crate::fence::Fence::elected();
        fence.open_until(std::time::Instant::now() + Duration::from_secs(60));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let busy = Busy {
            calls: calls.clone(),
            fence: Some(fence.clone()),
        };
        let err = create_pod_through(busy, &fence, &limit)
            .await
            .expect_err("the retry is fenced");
        assert!(err.to_string().contains("leader lease"), "{err}");
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the retry was never sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn statuses_wait_for_a_busy_bucket_and_events_for_the_statuses() {
        let limit = RateLimit::new(10.0, 1).expect("limit");
        let lanes = Lanes::new(Some(limit.clone())).expect("lanes");
        let start = tokio::time::Instant::now();
        // A free bucket: a status goes at once.
        drop(lanes.turn(Lane::Status).await);
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Other requests keep the bucket busy for 1 s (one token every
        // 0.1 s, each taken as it comes, as the client's queue does).
        let busy = limit.clone();
        let others = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(busy.take()).await;
            }
        });
        tokio::task::yield_now().await;
        assert!(limit.busy());
        let (l1, l2) = (lanes.clone(), lanes.clone());
        let status = tokio::spawn(async move {
            let _turn = l1.turn(Lane::Status).await;
            let went = start.elapsed();
            // Held a while: the Event waits for it too.
            tokio::time::sleep(Duration::from_millis(500)).await;
            went
        });
        tokio::task::yield_now().await;
        let event = tokio::spawn(async move {
            drop(l2.turn(Lane::Event).await);
            start.elapsed()
        });
        let status_went = status.await.expect("status");
        let event_went = event.await.expect("event");
        others.await.expect("others");
        // The status went once the others had (about 1 s), not before.
        assert!(status_went >= Duration::from_millis(900), "{status_went:?}");
        assert!(status_went < Duration::from_millis(1200), "{status_went:?}");
        // The Event after the status had left its lane.
        assert!(event_went >= status_went, "{event_went:?} {status_went:?}");
        assert!(
            lanes.yielded.with_label_values(&["status"]).get() >= 0.9,
            "counted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_waits_for_a_busy_bucket_at_most_its_bound() {
        let limit = RateLimit::new(0.1, 1).expect("limit");
        let lanes = Lanes::new(Some(limit.clone())).expect("lanes");
        // One request takes the only token: the next would wait 10 s, and
        // one that waits keeps it busy for as long as the test runs.
        assert_eq!(limit.take(), Duration::ZERO);
        for _ in 0..10 {
            limit.take();
        }
        let start = tokio::time::Instant::now();
        drop(lanes.turn(Lane::Status).await);
        assert_eq!(start.elapsed(), Lane::Status.at_most());
        // Without a limit nothing waits.
        let free = Lanes::new(None).expect("lanes");
        let start = tokio::time::Instant::now();
        drop(free.turn(Lane::Event).await);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn nonsense_settings_are_bounded() {
        let t0 = Instant::now();
        let mut b = Bucket::new(0.0, 0, t0);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert!((b.take(t0).as_secs_f64() - 10.0).abs() < 1e-9);
    }
}
