//! The bounds the layer puts on the service it wraps and on the bodies it moves, named once.
//!
//! Both traits have blanket implementations: nobody implements them; a function says
//! `S: Inner<ReqB>, ReqB: BytesBody` instead of repeating seven `where` lines.

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::BoxError;
use crate::body::RequestBody;

/// A body of [`Bytes`] whose errors can be boxed, and that can move into a spawned task: what
/// the caller sends and what the wrapped service answers with.
pub(crate) trait BytesBody:
    Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static
{
}

impl<B> BytesBody for B
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
}

/// The wrapped FHIR service as the layer uses it: it takes requests whose body is a
/// [`RequestBody<ReqB>`], answers with a [`BytesBody`], and it (and its futures) can move into a
/// spawned job.
pub(crate) trait Inner<ReqB>:
    Service<
        Request<RequestBody<ReqB>>,
        Response = Response<<Self as Inner<ReqB>>::ResBody>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
    /// The body of the wrapped service's responses.
    type ResBody: BytesBody;
}

impl<S, ReqB, ResB> Inner<ReqB> for S
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResB: BytesBody,
{
    type ResBody = ResB;
}

/// Waits for `inner` to be ready, then calls it with `request`; either error, boxed. Jobs call
/// the wrapped service this way: waiting for readiness is part of the job (a concurrency limit
/// around the service queues jobs, and a cancel stops a job that is still waiting).
pub(crate) async fn call<S, R, ResB>(inner: &mut S, request: R) -> Result<Response<ResB>, BoxError>
where
    S: Service<R, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| inner.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    inner.call(request).await.map_err(Into::into)
}
