//! Request and response bodies: the caller's stream, or bytes the layer holds.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use pin_project_lite::pin_project;

use crate::BoxError;

pin_project! {
    /// The body of a request the inner service receives.
    ///
    /// Passed-through requests carry the caller's body as it streams in; a job's replayed
    /// request carries the body the layer buffered at kick-off. axum's `Router` and most
    /// services accept any body type, so this is invisible to them.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        // The caller's body, streaming (pass-through).
        Streaming {
            #[pin]
            body: B,
        },
        // A body held in memory (a job's replayed request).
        Buffered {
            data: Option<Bytes>,
        },
    }
}

impl<B> RequestBody<B> {
    /// Wraps a streaming body.
    pub fn streaming(body: B) -> Self {
        Self {
            kind: RequestKind::Streaming { body },
        }
    }

    /// A body of the given bytes.
    pub fn buffered(data: Bytes) -> Self {
        Self {
            kind: RequestKind::Buffered {
                data: Some(data).filter(|d| !d.is_empty()),
            },
        }
    }

    /// Whether this is a body the layer holds in memory (a job's replayed request) rather than
    /// the caller's stream (a passed-through request).
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, RequestKind::Buffered { .. })
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Streaming { body } => body.poll_frame(cx),
            RequestKindProj::Buffered { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Streaming { body } => body.is_end_stream(),
            RequestKind::Buffered { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Streaming { body } => body.size_hint(),
            RequestKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// A streamed body the layer serves itself (a bulk data file).
pub(crate) type StreamBody = UnsyncBoxBody<Bytes, BoxError>;

pin_project! {
    /// The body of a response from the layer: the inner service's, or the layer's own.
    ///
    /// Its error is a [`BoxError`]: the inner body's error, or a failure reading a bulk data
    /// file while it streams.
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        // The inner service's body, untouched (pass-through).
        Inner {
            #[pin]
            body: B,
        },
        // A body the layer wrote (status, completion, errors).
        Full {
            data: Option<Bytes>,
        },
        // A file the layer streams from its file store.
        Stream {
            #[pin]
            body: StreamBody,
        },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body, as the layer does for every passed-through response
    /// (for a service around the layer that must answer in the layer's body type).
    pub fn inner(body: B) -> Self {
        Self {
            kind: ResponseKind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: ResponseKind::Full {
                data: Some(data).filter(|d| !d.is_empty()),
            },
        }
    }

    pub(crate) fn own(body: OwnBody) -> Self {
        match body {
            OwnBody::Full(data) => Self::full(data),
            OwnBody::Stream(body) => Self {
                kind: ResponseKind::Stream { body },
            },
        }
    }
}

/// The body of one of the layer's own answers.
pub(crate) enum OwnBody {
    Full(Bytes),
    Stream(StreamBody),
}

impl From<Bytes> for OwnBody {
    fn from(data: Bytes) -> Self {
        Self::Full(data)
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseKindProj::Stream { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Full { data } => data.is_none(),
            ResponseKind::Stream { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Stream { body } => body.size_hint(),
        }
    }
}
