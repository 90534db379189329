//! The response future: the inner service's call, unboxed, or the layer's own answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

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
    pub(crate) fn pass_through(service: S, request: R, vary: bool) -> Self {
        Self {
            kind: Kind::Waiting {
                service,
                request: Some(request),
                vary,
            },
        }
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

/// Merges `Prefer` into `Vary` unless it is already named (or `*` is).
pub(crate) fn add_vary_prefer(headers: &mut http::HeaderMap) {
    // One lookup of the name: on every eligible GET, most often there is no `Vary` yet.
    match headers.entry(VARY) {
        http::header::Entry::Vacant(slot) => {
            slot.insert(HeaderValue::from_static("Prefer"));
        }
        http::header::Entry::Occupied(mut slot) => {
            let named = slot.iter().any(|value| {
                value.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|n| n.trim() == "*" || n.trim().eq_ignore_ascii_case("prefer"))
                })
            });
            if !named {
                slot.append(HeaderValue::from_static("Prefer"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
