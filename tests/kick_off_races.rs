//! Kick-offs that race the client going away, or shutdown (KICK-9: at most once; issue item 11).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_fhir_async::{AsyncLayer, MemoryStore, RequestBody};

/// A body that yields nothing until `open` fires, then one chunk.
struct GatedBody {
    open: oneshot::Receiver<()>,
    sent: bool,
}

impl Body for GatedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.open).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => {
                self.sent = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{}")))))
            }
        }
    }
}

fn counting_inner<B: Send + 'static>(
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<RequestBody<B>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |_: Request<RequestBody<B>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}")))) }
    })
}

// KICK-9: a kick-off dropped before it answered (client gone, outer timeout) leaves no job, and
// the work never runs, so the client's retry cannot make it happen twice.
#[tokio::test(flavor = "current_thread")]
async fn kick_9_dropped_kick_off_leaves_no_job_and_runs_nothing() {
    let store = MemoryStore::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = AsyncLayer::builder(store.clone())
        .base_url("http://fhir.test/fhir")
        .build();
    let mut service = layer.layer(counting_inner::<Full<Bytes>>(calls.clone()));
    let kick_off = Request::post("/fhir/Observation")
        .header("prefer", "respond-async")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let future = service.ready().await.unwrap().call(kick_off);
    // One poll: the body is buffered and the job handed to its task, which has not run yet on
    // this single-threaded runtime; then the caller gives up.
    assert!(
        future.now_or_never().is_none(),
        "the kick-off cannot answer before its job is recorded"
    );
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(store.len(), 0, "no job record is left behind");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the inner service was never called"
    );
}

// Issue item 11: a kick-off still reading its body when shutdown begins is refused with 503 and
// leaves nothing behind; shutdown does not wait for it.
#[tokio::test]
async fn shutdown_refuses_a_kick_off_that_was_buffering_its_body() {
    let store = MemoryStore::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = AsyncLayer::builder(store.clone())
        .base_url("http://fhir.test/fhir")
        .build();
    let shutdown = layer.shutdown_handle();
    let service = layer.layer(counting_inner::<GatedBody>(calls.clone()));
    let (open, gate) = oneshot::channel();
    let kick_off = Request::post("/fhir/Observation")
        .header("prefer", "respond-async")
        .body(GatedBody {
            open: gate,
            sent: false,
        })
        .unwrap();
    let pending = tokio::spawn(service.oneshot(kick_off));
    tokio::task::yield_now().await;

    let report = tokio::time::timeout(
        Duration::from_secs(10),
        shutdown.shutdown(Duration::from_secs(1)),
    )
    .await
    .expect("shutdown does not wait for a kick-off that has not started a job");
    assert_eq!((report.finished, report.stopped), (0, 0));
    open.send(()).unwrap();
    let response = pending.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let outcome: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(outcome["issue"][0]["code"], "transient");
    assert_eq!(store.len(), 0, "nothing was recorded");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing ran");
}
