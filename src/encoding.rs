//! Reading an inner response whatever its `Content-Encoding`: the layer asks the wrapped service
//! for `identity` when it replays a job's request, and decodes `gzip`, `deflate` and `br` when
//! the service compresses anyway (a compression layer inside this one, a proxy, an upstream
//! that ignores the ask). Decoding is streamed, so the layer's size limits apply to the
//! decoded bytes: a small compressed body cannot expand past them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder};
use bytes::Bytes;
use futures_core::Stream;
use futures_util::TryStreamExt;
use futures_util::stream::MapErr;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyDataStream;
use pin_project_lite::pin_project;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::BoxError;

/// Asks the wrapped service for an uncompressed answer: a job's response is kept, wrapped in a
/// Bundle or split into NDJSON lines, none of which can be done to compressed bytes. Whatever
/// the client finally receives may still be compressed by a layer outside this one.
pub(crate) fn ask_for_identity(headers: &mut HeaderMap) {
    headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
}

/// The encoded bytes of a body, as a reader for a decoder.
type Encoded<B> =
    StreamReader<MapErr<BodyDataStream<B>, fn(<B as Body>::Error) -> io::Error>, Bytes>;

fn io_error<E: Into<BoxError>>(error: E) -> io::Error {
    io::Error::other(error.into())
}

pin_project! {
    /// A body as the layer reads it: decoded, streamed.
    #[project = DecodingProjection]
    pub(crate) enum Decoding<B: Body> {
        Plain { #[pin] body: B },
        Gzip { #[pin] decoded: ReaderStream<GzipDecoder<Encoded<B>>> },
        Deflate { #[pin] decoded: ReaderStream<ZlibDecoder<Encoded<B>>> },
        Brotli { #[pin] decoded: ReaderStream<BrotliDecoder<Encoded<B>>> },
    }
}

/// `body` decoded according to `headers`' `Content-Encoding`, which is removed (with the
/// `Content-Length` of the encoded bytes). An encoding the layer cannot decode is an error
/// that names it.
pub(crate) fn decoded<B>(headers: &mut HeaderMap, body: B) -> Result<Decoding<B>, String>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let Some(value) = headers.get(CONTENT_ENCODING) else {
        return Ok(Decoding::Plain { body });
    };
    let coding = value
        .to_str()
        .map(|v| v.trim().to_ascii_lowercase())
        .map_err(|_| "the response's Content-Encoding is not readable text".to_owned())?;
    if coding.is_empty() || coding == "identity" {
        headers.remove(CONTENT_ENCODING);
        return Ok(Decoding::Plain { body });
    }
    let to_io: fn(B::Error) -> io::Error = io_error::<B::Error>;
    let encoded = StreamReader::new(BodyDataStream::new(body).map_err(to_io));
    let decoding = match coding.as_str() {
        "gzip" | "x-gzip" => Decoding::Gzip {
            decoded: ReaderStream::new(GzipDecoder::new(encoded)),
        },
        // HTTP's `deflate` is the zlib format (RFC 9110 §8.4.1.2).
        "deflate" => Decoding::Deflate {
            decoded: ReaderStream::new(ZlibDecoder::new(encoded)),
        },
        "br" => Decoding::Brotli {
            decoded: ReaderStream::new(BrotliDecoder::new(encoded)),
        },
        other => {
            return Err(format!(
                "the response is encoded as {other:?}, which this server cannot decode (it asked for \
                 identity, and decodes gzip, deflate and br)"
            ));
        }
    };
    headers.remove(CONTENT_ENCODING);
    headers.remove(CONTENT_LENGTH);
    Ok(decoding)
}

/// The next decoded chunk as a frame.
fn frame(
    next: Poll<Option<io::Result<Bytes>>>,
    coding: &str,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    next.map(|chunk| {
        chunk.map(|chunk| {
            chunk.map(Frame::data).map_err(|error| {
                BoxError::from(format!("decoding the {coding} response failed: {error}"))
            })
        })
    })
}

impl<B> Body for Decoding<B>
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
        match self.project() {
            DecodingProjection::Plain { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(Into::into))),
            DecodingProjection::Gzip { decoded } => frame(decoded.poll_next(cx), "gzip"),
            DecodingProjection::Deflate { decoded } => frame(decoded.poll_next(cx), "deflate"),
            DecodingProjection::Brotli { decoded } => frame(decoded.poll_next(cx), "br"),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Plain { body } => body.is_end_stream(),
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Plain { body } => body.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZlibEncoder};
    use http_body_util::{BodyExt, Full};
    use tokio::io::AsyncReadExt;

    use super::*;

    const TEXT: &str = r#"{"resourceType":"Bundle","type":"searchset","total":2}"#;

    async fn encode(coding: &str) -> Vec<u8> {
        let mut out = Vec::new();
        match coding {
            "gzip" => {
                GzipEncoder::new(TEXT.as_bytes())
                    .read_to_end(&mut out)
                    .await
            }
            "deflate" => {
                ZlibEncoder::new(TEXT.as_bytes())
                    .read_to_end(&mut out)
                    .await
            }
            "br" => {
                BrotliEncoder::new(TEXT.as_bytes())
                    .read_to_end(&mut out)
                    .await
            }
            _ => unreachable!("a coding of this test"),
        }
        .unwrap();
        out
    }

    async fn read(coding: Option<&str>, body: Vec<u8>) -> (HeaderMap, Result<Bytes, String>) {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let Some(coding) = coding {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_str(coding).unwrap());
        }
        let result = match decoded(&mut headers, Full::new(Bytes::from(body))) {
            Ok(body) => body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| e.to_string()),
            Err(why) => Err(why),
        };
        (headers, result)
    }

    // GATEWAY-4: gzip, deflate and br answers are read as the JSON they encode, and the
    // encoding's headers go with the encoding.
    #[tokio::test]
    async fn compressed_answers_are_decoded() {
        for coding in ["gzip", "deflate", "br"] {
            let (headers, body) = read(Some(coding), encode(coding).await).await;
            assert_eq!(body.as_deref(), Ok(TEXT.as_bytes()), "{coding}");
            assert!(!headers.contains_key(CONTENT_ENCODING), "{coding}");
            assert!(!headers.contains_key(CONTENT_LENGTH), "{coding}");
        }
    }

    // GATEWAY-4: an uncompressed answer passes untouched, its length kept.
    #[tokio::test]
    async fn identity_passes_through() {
        for coding in [None, Some("identity")] {
            let (headers, body) = read(coding, TEXT.into()).await;
            assert_eq!(body.as_deref(), Ok(TEXT.as_bytes()));
            assert!(headers.contains_key(CONTENT_LENGTH));
        }
    }

    // GATEWAY-4: an unknown coding, or bytes that are not what they claim, are a clear error.
    #[tokio::test]
    async fn unknown_or_broken_encodings_are_errors() {
        let (_, body) = read(Some("zstd"), b"whatever".to_vec()).await;
        assert!(body.unwrap_err().contains("\"zstd\""));
        let (_, body) = read(Some("gzip"), TEXT.into()).await;
        assert!(
            body.unwrap_err()
                .contains("decoding the gzip response failed")
        );
    }
}
