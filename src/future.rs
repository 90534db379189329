//! The response future: the inner service's call, unboxed, or the layer's own answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use http::header::VARY;
use http::{HeaderValue, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::{OwnBody, ResponseBody};

pub(crate) type OwnFuture = Pin<Box<dyn Future<Output = Response<OwnBody>> + Send>>;

/// The inner call for `GET [base]/metadata` when the layer declares itself in it (CAP-4): it can
/// fail with the inner service's error, and its body may be rewritten.
pub(crate) type CapabilityFuture<E> =
    Pin<Box<dyn Future<Output = Result<Response<OwnBody>, E>> + Send>>;

/// An own route that may pass the request on to the inner service after all (a linked export's
/// file, `UpstreamFiles::Link`): the layer's answer, or the service and the request to call it
/// with.
pub(crate) type RoutedFuture<S, R> =
    Pin<Box<dyn Future<Output = Result<Response<OwnBody>, (S, R)>> + Send>>;

pin_project! {
    /// The future of [`AsyncService`](crate::AsyncService).
    ///
    /// A passed-through request drives its own clone of the inner service to readiness, calls
    /// it, and polls the inner future in place, unboxed. Only the layer's own work (kick-off,
    /// status, cancel, a CapabilityStatement it declares itself in, a linked export's file
    /// request) is boxed.
    pub struct ResponseFuture<S, R>
    where
        S: Service<R>,
    {
        #[pin]
        kind: Kind<S, R>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, R>
    where
        S: Service<R>,
    {
        // Waiting for the inner service to be ready; `request` is taken when it is called.
        Waiting {
            service: S,
            request: Option<R>,
            // Add `Vary: Prefer` (PREFER-11).
            vary: bool,
        },
        Called {
            #[pin]
            fut: S::Future,
            vary: bool,
        },
        // The inner service refused to become ready.
        Failed {
            error: Option<S::Error>,
        },
        Own {
            fut: OwnFuture,
        },
        Capability {
            fut: CapabilityFuture<S::Error>,
        },
        Routed {
            fut: RoutedFuture<S, R>,
        },
    }
}

impl<S: Service<R>, R> ResponseFuture<S, R> {
    /// Passes `request` to `service`, a clone of the inner service that was never driven to
    /// readiness. Most services are ready at once (axum's `Router` always is): they are asked
    /// here and called at once, so the request is not moved into this future and out again.
    /// One that is not ready is asked again by the future with the task's waker (a service
    /// must wake the waker of its latest `poll_ready`), so the no-op waker used here is never
    /// the one it relies on.
    pub(crate) fn pass_through(mut service: S, request: R, vary: bool) -> Self {
        let kind = match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Kind::Called {
                fut: service.call(request),
                vary,
            },
            Poll::Ready(Err(error)) => Kind::Failed { error: Some(error) },
            Poll::Pending => Kind::Waiting {
                service,
                request: Some(request),
                vary,
            },
        };
        Self { kind }
    }

    pub(crate) fn own(fut: OwnFuture) -> Self {
        Self {
            kind: Kind::Own { fut },
        }
    }

    pub(crate) fn capability(fut: CapabilityFuture<S::Error>) -> Self {
        Self {
            kind: Kind::Capability { fut },
        }
    }

    pub(crate) fn routed(fut: RoutedFuture<S, R>) -> Self {
        Self {
            kind: Kind::Routed { fut },
        }
    }
}

impl<S, R, B> Future for ResponseFuture<S, R>
where
    S: Service<R, Response = Response<B>>,
{
    type Output = Result<Response<ResponseBody<B>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        loop {
            match kind.as_mut().project() {
                KindProj::Waiting {
                    service,
                    request,
                    vary,
                } => {
                    ready!(service.poll_ready(cx))?;
                    let Some(request) = request.take() else {
                        panic!("ResponseFuture polled after it completed");
                    };
                    let fut = service.call(request);
                    let vary = *vary;
                    kind.set(Kind::Called { fut, vary });
                }
                KindProj::Called { fut, vary } => {
                    let mut response = ready!(fut.poll(cx))?;
                    if *vary {
                        add_vary_prefer(response.headers_mut());
                    }
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                KindProj::Failed { error } => match error.take() {
                    Some(error) => return Poll::Ready(Err(error)),
                    None => panic!("ResponseFuture polled after it completed"),
                },
                KindProj::Own { fut } => {
                    return Poll::Ready(Ok(ready!(fut.as_mut().poll(cx)).map(ResponseBody::own)));
                }
                KindProj::Capability { fut } => {
                    let response = ready!(fut.as_mut().poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::own)));
                }
                KindProj::Routed { fut } => match ready!(fut.as_mut().poll(cx)) {
                    Ok(response) => return Poll::Ready(Ok(response.map(ResponseBody::own))),
                    // Passed on: from here on an ordinary pass-through.
                    Err((service, request)) => kind.set(Kind::Waiting {
                        service,
                        request: Some(request),
                        vary: false,
                    }),
                },
            }
        }
    }
}

/// Made at compile time: `from_static` at run time checks every byte.
const PREFER_VALUE: HeaderValue = HeaderValue::from_static("Prefer");

/// Merges `Prefer` into `Vary` unless it is already named (or `*` is).
pub(crate) fn add_vary_prefer(headers: &mut http::HeaderMap) {
    // One lookup of the name: on every eligible GET, most often there is no `Vary` yet.
    match headers.entry(VARY) {
        http::header::Entry::Vacant(slot) => {
            slot.insert(PREFER_VALUE);
        }
        http::header::Entry::Occupied(mut slot) => {
            let named = slot.iter().any(|value| {
                value.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|n| n.trim() == "*" || n.trim().eq_ignore_ascii_case("prefer"))
                })
            });
            if !named {
                slot.append(PREFER_VALUE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use bytes::Bytes;
    use http::Request;
    use http_body_util::Empty;

    use super::*;

    type Mock = tower_test::mock::Mock<Request<()>, Response<Empty<Bytes>>>;

    // A passed-through request reaches a service that is not ready at once when it becomes ready
    // (the future asks again with the task's waker), and a readiness error is the call's error.
    #[tokio::test]
    async fn pass_through_waits_for_readiness_and_reports_its_error() {
        let (service, mut handle): (Mock, _) = tower_test::mock::pair();
        handle.allow(0);
        let mut future = Box::pin(ResponseFuture::pass_through(
            service,
            Request::new(()),
            true,
        ));
        let pending = poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx).is_pending())).await;
        assert!(pending, "not ready: the request waits");
        handle.allow(1);
        let answer = tokio::spawn(future);
        let (_, respond) = handle.next_request().await.expect("the request arrives");
        respond.send_response(Response::new(Empty::new()));
        let response = answer.await.expect("no panic").expect("an answer");
        assert_eq!(response.headers()[VARY], "Prefer");

        let (service, mut handle): (Mock, _) = tower_test::mock::pair();
        handle.send_error("not available");
        let result = ResponseFuture::pass_through(service, Request::new(()), false).await;
        let error = result.err().expect("the readiness error");
        assert_eq!(error.to_string(), "not available");
    }

    // PREFER-11: `Vary: Prefer` is merged, never duplicated, never overwrites.
    #[test]
    fn prefer_11_vary_is_merged() {
        let mut headers = http::HeaderMap::new();
        add_vary_prefer(&mut headers);
        assert_eq!(headers.get_all(VARY).iter().collect::<Vec<_>>(), ["Prefer"]);
        add_vary_prefer(&mut headers);
        assert_eq!(headers.get_all(VARY).iter().count(), 1);

        let mut headers = http::HeaderMap::new();
        headers.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        add_vary_prefer(&mut headers);
        assert_eq!(
            headers.get_all(VARY).iter().collect::<Vec<_>>(),
            ["Accept-Encoding", "Prefer"]
        );

        let mut headers = http::HeaderMap::new();
        headers.insert(VARY, HeaderValue::from_static("accept, PREFER"));
        add_vary_prefer(&mut headers);
        assert_eq!(headers.get_all(VARY).iter().count(), 1);

        let mut headers = http::HeaderMap::new();
        headers.insert(VARY, HeaderValue::from_static("*"));
        add_vary_prefer(&mut headers);
        assert_eq!(headers.get_all(VARY).iter().collect::<Vec<_>>(), ["*"]);
    }
}
