//! A long poll held by one instance for a job running on another (issue #7 item 3): the scenario,
//! written once for every store, and a store wrapper that counts reads, to tell a poll woken by
//! the store's change stream from one that reads the store over and over.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode};
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_fhir_async::store::{Changes, DelegateStore};
use tower_fhir_async::{AsyncLayer, JobId, JobRecord, JobStore, StoreError};

/// A store that counts reads and the changes its stream delivers, and passes everything on.
///
/// Once [`hold_reads`](Self::hold_reads) is set, a read waits until the change stream has
/// delivered something: a poll woken by the stream reads at once, while a read for any other
/// reason (a periodic re-read) hangs until the layer's `store_timeout` gives up on it.
#[derive(Clone)]
pub(crate) struct Counted<S> {
    pub(crate) inner: S,
    pub(crate) gets: Arc<AtomicUsize>,
    /// Notified after each read.
    pub(crate) read: Arc<Notify>,
    /// How many changes the store's streams delivered.
    pub(crate) delivered: Arc<AtomicUsize>,
    /// Notified after each delivered change, and after each subscription.
    pub(crate) news: Arc<Notify>,
    /// How many change streams the store handed out.
    pub(crate) subscriptions: Arc<AtomicUsize>,
    pub(crate) hold_reads: Arc<AtomicBool>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            gets: Arc::new(AtomicUsize::new(0)),
            read: Arc::new(Notify::new()),
            delivered: Arc::new(AtomicUsize::new(0)),
            news: Arc::new(Notify::new()),
            subscriptions: Arc::new(AtomicUsize::new(0)),
            hold_reads: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<S: JobStore> DelegateStore for Counted<S> {
    type Inner = S;

    fn inner(&self) -> &S {
        &self.inner
    }

    async fn get(&self, id: &JobId, now: SystemTime) -> Result<Option<JobRecord>, StoreError> {
        if self.hold_reads.load(Ordering::SeqCst) {
            until(&self.news, || self.delivered.load(Ordering::SeqCst) > 0).await;
        }
        let record = self.inner.get(id, now).await;
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.read.notify_waiters();
        record
    }

    async fn changes(&self) -> Result<Option<Changes>, StoreError> {
        let Some(stream) = self.inner.changes().await? else {
            return Ok(None);
        };
        let (delivered, news) = (self.delivered.clone(), self.news.clone());
        let counted = stream.inspect(move |_| {
            delivered.fetch_add(1, Ordering::SeqCst);
            news.notify_waiters();
        });
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
        self.news.notify_waiters();
        Ok(Some(Box::pin(counted)))
    }
}

/// Waits, without a deadline of its own, until `done` holds, checking each time `notify` fires.
async fn until(notify: &Notify, done: impl Fn() -> bool) {
    loop {
        let notified = notify.notified();
        if done() {
            return;
        }
        notified.await;
    }
}

fn build<T: JobStore>(name: &str, store: T) -> AsyncLayer {
    AsyncLayer::builder(store)
        .base_url("http://fhir.test/fhir")
        .instance_id(format!("{name}-{}", JobId::new()))
        .max_wait(Duration::from_secs(30))
        .build()
}

/// A router whose `$gated` waits until `gate` is notified, then answers.
fn gated_app(layer: AsyncLayer, gate: Arc<Notify>) -> Router {
    Router::new()
        .route(
            "/fhir/$gated",
            post(move || {
                let gate = gate.clone();
                async move {
                    gate.notified().await;
                    Ok::<_, Infallible>("{\"resourceType\":\"Parameters\"}")
                }
            }),
        )
        .layer(layer)
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    prefer: Option<&str>,
) -> (StatusCode, String) {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "fhir.test");
    if let Some(prefer) = prefer {
        request = request.header("prefer", prefer);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).expect("a request"))
        .await
        .expect("an answer");
    let status = response.status();
    let location = response
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, location)
}

/// How long a long poll that relies on pushed changes waits before reading the store anyway
/// (the layer's backstop for lost notices).
const BACKSTOP: Duration = Duration::from_secs(5);

/// Issue #7 item 3, STATUS-3: instance B holds a long poll (`Prefer: wait=30`) of a job running on
/// A; when A's job ends, B answers `200`, woken by the store's change stream.
///
/// B's reads after the poll's first wait for the stream to deliver something, so a poll that
/// reads for any other reason (the backstop, or every 250 ms without a stream) hangs until
/// `store_timeout` and answers `503`: with a stream that never yields, this fails. With
/// `paused` time (a `MemoryStore`), the answer must also come before the backstop, which tells
/// a poll woken by the news from one that merely read the store later.
pub(crate) async fn long_poll_wakes_across_instances<S, F>(store: F, paused: bool)
where
    S: JobStore + Clone,
    F: Fn() -> S,
{
    let gate = Arc::new(Notify::new());
    let a = gated_app(build("a", store()), gate.clone());
    let counted = Counted::new(store());
    let b_store = counted.clone();
    let b = gated_app(build("b", counted), Arc::new(Notify::new()));

    let (status, location) = call(&a, Method::POST, "/fhir/$gated", Some("respond-async")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let path = location
        .strip_prefix("http://fhir.test")
        .expect("a status URL under the base")
        .to_owned();
    // A plain poll through B starts B's watcher, which subscribes to the store's changes.
    let (status, _) = call(&b, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let subscribing = until(&b_store.news, || {
        b_store.subscriptions.load(Ordering::SeqCst) > 0
    });
    tokio::time::timeout(Duration::from_secs(20), subscribing)
        .await
        .expect("B subscribes to the store's changes");
    // Nothing changed yet: whatever the stream delivered so far is not this job's end.
    let delivered_before = b_store.delivered.load(Ordering::SeqCst);
    assert_eq!(delivered_before, 0, "no change was announced yet");

    let before = b_store.gets.load(Ordering::SeqCst);
    let held = {
        let b = b.clone();
        let path = path.clone();
        tokio::spawn(async move { call(&b, Method::GET, &path, Some("wait=30")).await.0 })
    };
    // The poll has read the job (still running) and waits; only then does the job end.
    let reading = until(&b_store.read, || {
        b_store.gets.load(Ordering::SeqCst) > before
    });
    tokio::time::timeout(Duration::from_secs(20), reading)
        .await
        .expect("B's long poll reads the job");
    b_store.hold_reads.store(true, Ordering::SeqCst);
    assert!(
        !held.is_finished(),
        "the long poll answered before the job changed"
    );
    let released = tokio::time::Instant::now();
    gate.notify_one();
    let status = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("the long poll answers")
        .expect("the poll task");
    let waited = released.elapsed();
    let reads = b_store.gets.load(Ordering::SeqCst) - before;
    assert_eq!(
        status,
        StatusCode::OK,
        "woken by the job's end through the change stream ({reads} store reads)"
    );
    assert!(
        reads <= 3,
        "woken by pushed changes, not by reading the store over and over: {reads} reads"
    );
    if paused {
        assert!(
            waited < BACKSTOP,
            "answered on the news, not at the backstop read: {waited:?} of paused time"
        );
    }
}
