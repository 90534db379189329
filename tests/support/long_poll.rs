//! A long poll held by one instance for a job running on another (issue #7 item 3): the scenario,
//! written once for every store, and a store wrapper that counts reads, to tell a poll woken by
//! the store's change stream from one that reads the store over and over.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::{Method, Request, StatusCode};
use tokio::sync::Notify;
use tower::ServiceExt;
use tower_fhir_async::store::{Cancellations, Changes, Created};
use tower_fhir_async::{AsyncLayer, JobId, JobOutcome, JobRecord, JobStore, StoreError};

/// A store that counts `get` calls and delegates everything, its streams included.
#[derive(Clone)]
pub(crate) struct Counted<S> {
    pub(crate) inner: S,
    pub(crate) gets: Arc<AtomicUsize>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            gets: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl<S: JobStore> JobStore for Counted<S> {
    fn create(&self, record: JobRecord) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.create(record)
    }
    fn create_once(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send {
        self.inner.create_once(record, key, now)
    }
    fn get(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<JobRecord>, StoreError>> + Send {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(id, now)
    }
    fn start(
        &self,
        id: &JobId,
        instance: &str,
        lease_until: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.inner.start(id, instance, lease_until)
    }
    fn finish(
        &self,
        id: &JobId,
        outcome: JobOutcome,
        finished_at: SystemTime,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.inner.finish(id, outcome, finished_at, expires_at)
    }
    fn cancel(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.inner.cancel(id, now)
    }
    fn set_progress(
        &self,
        id: &JobId,
        progress: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.set_progress(id, progress)
    }
    fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send {
        self.inner.renew_leases(instance, ids, lease_until)
    }
    fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send {
        self.inner
            .fail_lapsed(now, unstarted_before, outcome, expires_at)
    }
    fn sweep(&self, now: SystemTime) -> impl Future<Output = Result<usize, StoreError>> + Send {
        self.inner.sweep(now)
    }
    fn cancellations(
        &self,
    ) -> impl Future<Output = Result<Option<Cancellations>, StoreError>> + Send {
        self.inner.cancellations()
    }
    fn changes(&self) -> impl Future<Output = Result<Option<Changes>, StoreError>> + Send {
        self.inner.changes()
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

/// Issue #7 item 3: instance B holds a long poll (`Prefer: wait=30`) of a job running on A; when
/// A's job ends, B answers `200` at once, woken by the store's change stream — B read the store
/// only a few times meanwhile, where reading it every 250 ms would have taken a dozen reads.
pub(crate) async fn long_poll_wakes_across_instances<S, F>(store: F)
where
    S: JobStore + Clone,
    F: Fn() -> S,
{
    let gate = Arc::new(Notify::new());
    let a = gated_app(build("a", store()), gate.clone());
    let counted = Counted::new(store());
    let gets = counted.gets.clone();
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
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = gets.load(Ordering::SeqCst);
    let held = {
        let b = b.clone();
        let path = path.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (status, _) = call(&b, Method::GET, &path, Some("wait=30")).await;
            (status, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !held.is_finished(),
        "the long poll answered before the job changed"
    );
    gate.notify_one();
    let (status, took) = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("the long poll answered within 20 s of the job's end")
        .expect("the poll task");
    assert_eq!(status, StatusCode::OK, "the completed job's Bundle");
    let reads = gets.load(Ordering::SeqCst) - before;
    eprintln!("long poll across instances: answered after {took:?}, {reads} store reads");
    assert!(
        took < Duration::from_secs(8),
        "woken by the job's end (3 s), not by the 30 s wait: {took:?}"
    );
    assert!(
        reads <= 4,
        "woken by pushed changes, not by reading the store every 250 ms: {reads} reads"
    );
}
