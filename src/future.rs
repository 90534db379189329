//! The response future: the inner service's future, unboxed, or the layer's own answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::VARY;
use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use crate::body::ResponseBody;

pub(crate) type OwnFuture = Pin<Box<dyn Future<Output = Response<Bytes>> + Send>>;

pin_project! {
    /// The future of [`AsyncService`](crate::AsyncService).
    ///
    /// A passed-through request polls the inner future in place, unboxed; only the layer's own
    /// work (kick-off, status, cancel) is boxed.
    #[project = ResponseFutureProj]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner {
            #[pin]
            fut: F,
            // Add `Vary: Prefer` (PREFER-11).
            vary: bool,
        },
        Own {
            fut: OwnFuture,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(fut: F, vary: bool) -> Self {
        Self {
            kind: Kind::Inner { fut, vary },
        }
    }

    pub(crate) fn own(fut: OwnFuture) -> Self {
        Self {
            kind: Kind::Own { fut },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { fut, vary } => {
                let mut response = ready!(fut.poll(cx))?;
                if *vary {
                    add_vary_prefer(response.headers_mut());
                }
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Own { fut } => {
                Poll::Ready(Ok(ready!(fut.as_mut().poll(cx)).map(ResponseBody::full)))
            }
        }
    }
}

/// Merges `Prefer` into `Vary` unless it is already named (or `*` is).
pub(crate) fn add_vary_prefer(headers: &mut http::HeaderMap) {
    let named = headers.get_all(VARY).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|n| n.trim() == "*" || n.trim().eq_ignore_ascii_case("prefer"))
        })
    });
    if !named {
        headers.append(VARY, HeaderValue::from_static("Prefer"));
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
