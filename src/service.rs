//! [`AsyncService`]: classify each request, pass it through, or hand it to the layer's own code.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::BoxError;
use crate::body::{OwnBody, RequestBody, ResponseBody};
use crate::bulk;
use crate::capability;
use crate::config::{BulkWithoutPrefer, RequestHead};
use crate::future::ResponseFuture;
use crate::kickoff::kick_off;
use crate::prefer::{self, AsyncPreferences};
use crate::routes::{self, OwnRoute, Routed};
use crate::state::Shared;

/// The service [`AsyncLayer`](crate::AsyncLayer) makes: the FHIR service `S` with the
/// asynchronous request patterns added.
///
/// It is always ready: status and cancel requests never involve `S`, so they must not wait for
/// it. Each passed-through request drives its own clone of `S` to readiness (as axum's `Router`
/// does), and each job waits for `S` in the background. Backpressure from `S` therefore delays
/// requests rather than refusing them; put load shedding or a concurrency limit *inside* the
/// layer to bound jobs, and a rate limit *outside* it to bound requests.
///
/// With `UpstreamFiles::Link` (feature `bulk`), a file request under the route prefix for a job
/// the layer does not hold goes to `S` like any other request (it is the upstream's own file),
/// and the `DELETE` of a linked export sends `S` a `DELETE` of the upstream's job in the
/// background.
pub struct AsyncService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> AsyncService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for AsyncService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for AsyncService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

// The bounds are spelled out rather than written `S: Inner<ReqB>`: a crate-private trait in a
// public impl would show in the docs as a name users cannot look up (and trips `private_bounds`).
impl<S, ReqB, ResB> Service<Request<ReqB>> for AsyncService<S>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, Request<RequestBody<ReqB>>>;

    /// Always ready. Status and cancel requests never use the inner service, so they must not
    /// wait for it (a cancel would otherwise wait for the very job it stops, behind a concurrency
    /// limit); passed-through requests and jobs wait for the inner service's readiness themselves.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let config = &self.shared.config;
        // SEL-7: the layer's own routes are answered here and never reach the inner service
        // (but for a linked export's files, below). The path is parsed here, once; the routes
        // take the parsed route.
        if let Some(route) = OwnRoute::of(config, request.uri().path()) {
            let shared = self.shared.clone();
            // `UpstreamFiles::Link`: a file path may be the upstream's (mapped onto the public
            // base), and a `DELETE` may release an upstream's job; both need the inner service.
            if routes::hands_off(config, &route, request.method()) {
                let inner = self.inner.clone();
                let (parts, body) = request.into_parts();
                return ResponseFuture::routed(Box::pin(async move {
                    match routes::hand_off(shared, route, parts).await {
                        Routed::Answer(response) => Ok(response),
                        Routed::Release(response, upstream) => {
                            upstream.delete(inner);
                            Ok(response)
                        }
                        Routed::PassThrough(parts) => Err((
                            inner,
                            Request::from_parts(parts, RequestBody::streaming(body)),
                        )),
                    }
                }));
            }
            let (parts, _body) = request.into_parts();
            return ResponseFuture::own(Box::pin(routes::handle(shared, route, parts)));
        }

        let mut preferences = if prefer::mentions_respond_async(request.headers()) {
            AsyncPreferences::from_headers(request.headers())
        } else {
            AsyncPreferences::default()
        };
        // BULK-1: a bulk operation is asynchronous only; without `respond-async` it is either
        // run as if it had been sent, or refused (`bulk_without_prefer`). Never streamed.
        if !preferences.respond_async && bulk::is_operation_request(&config.bulk, request.uri()) {
            match config.bulk_without_prefer {
                BulkWithoutPrefer::RunAsync => preferences.respond_async = true,
                BulkWithoutPrefer::Refuse => {
                    let response = bulk::prefer_required(request.uri());
                    return ResponseFuture::own(Box::pin(
                        async move { response.map(OwnBody::from) },
                    ));
                }
            }
        }
        let is_get_or_head = matches!(*request.method(), Method::GET | Method::HEAD);
        let mut vary = false;
        if preferences.respond_async || is_get_or_head {
            let head = RequestHead {
                method: request.method(),
                uri: request.uri(),
                headers: request.headers(),
                extensions: request.extensions(),
            };
            let eligible = config.is_eligible(&head);
            if preferences.respond_async && eligible {
                // The job gets its own clone and waits for its readiness in the background.
                let inner = self.inner.clone();
                let shared = self.shared.clone();
                return ResponseFuture::own(Box::pin(async move {
                    kick_off(shared, inner, request, preferences)
                        .await
                        .map(OwnBody::from)
                }));
            }
            vary = is_get_or_head && eligible;
        }

        let mut request = request;
        if preferences.respond_async {
            // Ineligible, so processed synchronously (SEL-1); still, the inner service must not
            // see `respond-async`, or a second asynchronous layer could stack (SEL-7).
            prefer::strip_async_preferences(request.headers_mut());
        }
        // CAP-4: off by default, and then one flag test; the one request it takes is boxed.
        if capability::is_declared(config, is_get_or_head, request.uri().path()) {
            let inner = self.inner.clone();
            let shared = self.shared.clone();
            let request = request.map(RequestBody::streaming);
            return ResponseFuture::capability(Box::pin(capability::declare(
                shared, inner, request, vary,
            )));
        }
        // `self.inner` was never driven to readiness (see `poll_ready`): the future drives a clone.
        ResponseFuture::pass_through(
            self.inner.clone(),
            request.map(RequestBody::streaming),
            vary,
        )
    }
}
