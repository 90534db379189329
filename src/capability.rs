//! Declaring the layer in the wrapped server's CapabilityStatement (CAP-1, CAP-4): with
//! [`declare_async`](crate::AsyncLayerBuilder::declare_async), the answer to
//! `GET [base]/metadata` gets the `synchronicity-control` extension (`either`) on every
//! interaction and operation the layer would make asynchronous.
//!
//! The statement is edited in place, by splicing text into the original bytes, rather than parsed
//! into a `serde_json::Value` and written out again: this crate's `serde_json` has no
//! `preserve_order` (turning it on would change the maps of every other JSON the crate and its
//! users' code handle), so a round trip would sort every object's keys and reformat numbers and
//! whitespace. Splicing leaves every byte the layer does not add where it was. A statement that
//! cannot be read passes through unchanged.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use http::{Extensions, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::BoxError;
use crate::body::{OwnBody, RequestBody};
use crate::config::{Config, RequestHead};
use crate::future::add_vary_prefer;
use crate::inner::{BytesBody, Inner};
use crate::media;
use crate::state::Shared;

/// The extension's URL (EXT).
const SYNCHRONICITY_CONTROL: &str = "http://hl7.org/fhir/StructureDefinition/synchronicity-control";

/// The extension the layer adds: `valueUri`, because the extension's value is typed `uri`
/// (AMB-27); `either`, because without `respond-async` the request still runs synchronously.
const EITHER: &str = r#"{"url":"http://hl7.org/fhir/StructureDefinition/synchronicity-control","valueUri":"either"}"#;

/// The largest CapabilityStatement read for rewriting; a larger one passes through unchanged.
const MAX_STATEMENT: usize = 8 * 1024 * 1024;

/// Headers that describe the exact bytes of a representation, wrong once it is rewritten.
const DIGESTS: [&str; 4] = ["content-md5", "digest", "content-digest", "repr-digest"];

/// Whether a request is for the CapabilityStatement the layer declares itself in. Checked on
/// every passed-through request, so it is a flag and one comparison.
#[inline]
pub(crate) fn is_declared(config: &Config, is_get_or_head: bool, path: &str) -> bool {
    config.declare_async && is_get_or_head && path == config.metadata_path
}

/// Calls the inner service with `GET`/`HEAD [base]/metadata` and declares the layer in its
/// answer. The inner service's error is returned as it is; everything else about the answer is
/// kept but the body (and the headers that describe it).
pub(crate) async fn declare<S, ReqB>(
    shared: Arc<Shared>,
    mut inner: S,
    request: Request<RequestBody<ReqB>>,
    vary: bool,
) -> Result<Response<OwnBody>, S::Error>
where
    S: Inner<ReqB>,
{
    let is_head = request.method() == Method::HEAD;
    poll_fn(|cx| inner.poll_ready(cx)).await?;
    let response = inner.call(request).await?;
    let (mut parts, body) = response.into_parts();
    if vary {
        add_vary_prefer(&mut parts.headers);
    }
    let body = Box::pin(body);
    if !may_rewrite(parts.status, &parts.headers, body.size_hint()) {
        return Ok(Response::from_parts(parts, Replay::rest(body)));
    }
    let bytes = match read_bounded(body).await {
        Ok(bytes) => bytes,
        Err(replay) => return Ok(Response::from_parts(parts, replay)),
    };
    if is_head && bytes.is_empty() {
        // A `HEAD` answered without the body: the `GET` would answer other bytes, whose length
        // and validators are not known here; every other header stays. (A `HEAD` answered with
        // the body, as axum's handlers do before axum drops it, is rewritten like a `GET`.)
        forget_representation(&mut parts.headers);
        return Ok(Response::from_parts(parts, OwnBody::Full(bytes)));
    }
    let rewritten = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| rewrite(text, |target| is_asynchronous(&shared.config, target)));
    let Some(rewritten) = rewritten else {
        return Ok(Response::from_parts(parts, OwnBody::Full(bytes)));
    };
    forget_representation(&mut parts.headers);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
    Ok(Response::from_parts(
        parts,
        OwnBody::Full(Bytes::from(rewritten)),
    ))
}

/// Whether an answer may be a JSON CapabilityStatement worth reading: `200`, not compressed,
/// JSON or of no declared type, and not known to be over the limit.
fn may_rewrite(status: StatusCode, headers: &HeaderMap, size: SizeHint) -> bool {
    let identity = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .all(|coding| coding.as_bytes().eq_ignore_ascii_case(b"identity"));
    let json =
        headers.get(CONTENT_TYPE).is_none() || media::header_is_json(headers.get(CONTENT_TYPE));
    let declared_length = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    status == StatusCode::OK
        && identity
        && json
        && declared_length.max(size.lower()) <= MAX_STATEMENT as u64
}

/// Removes the headers that describe the original bytes: their length, their `ETag` (a
/// conditional request with it would be answered for the original), their digests.
fn forget_representation(headers: &mut HeaderMap) {
    headers.remove(CONTENT_LENGTH);
    headers.remove(ETAG);
    for name in DIGESTS {
        headers.remove(name);
    }
}

/// The whole body, or, when it is over the limit, ends with trailers or fails, a body that
/// replays what was read and then the rest, unchanged.
async fn read_bounded<B: BytesBody>(mut body: Pin<Box<B>>) -> Result<Bytes, OwnBody> {
    let mut chunks = Vec::new();
    let mut length = 0;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    length += data.len();
                    chunks.push(Ok(Frame::data(data)));
                    if length > MAX_STATEMENT {
                        return Err(Replay::body(chunks, Some(body)));
                    }
                }
                Err(trailers) => {
                    chunks.push(Ok(trailers));
                    return Err(Replay::body(chunks, Some(body)));
                }
            },
            Some(Err(error)) => {
                chunks.push(Err(error.into()));
                return Err(Replay::body(chunks, None::<Pin<Box<B>>>));
            }
        }
    }
    let mut whole = BytesMut::with_capacity(length);
    for chunk in chunks.into_iter().flatten() {
        if let Ok(data) = chunk.into_data() {
            whole.extend_from_slice(&data);
        }
    }
    Ok(whole.freeze())
}

pin_project! {
    /// The frames already read from a body, then the rest of it.
    struct Replay<B> {
        read: VecDeque<Result<Frame<Bytes>, BoxError>>,
        #[pin]
        rest: Option<B>,
    }
}

impl<B: BytesBody> Replay<B> {
    fn body(read: Vec<Result<Frame<Bytes>, BoxError>>, rest: Option<B>) -> OwnBody {
        let replay = Self {
            read: read.into(),
            rest,
        };
        OwnBody::Stream(replay.boxed_unsync())
    }

    /// A body not read at all.
    fn rest(body: B) -> OwnBody {
        Self::body(Vec::new(), Some(body))
    }
}

impl<B> Body for Replay<B>
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
        let this = self.project();
        if let Some(frame) = this.read.pop_front() {
            return Poll::Ready(Some(frame));
        }
        match this.rest.as_pin_mut() {
            Some(rest) => rest.poll_frame(cx).map_err(Into::into),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .read
            .iter()
            .filter_map(|frame| frame.as_ref().ok()?.data_ref())
            .map(|data| data.len() as u64)
            .sum();
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(read));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement<'a> {
    resource_type: String,
    #[serde(default, borrow)]
    rest: Vec<Rest<'a>>,
}

#[derive(Deserialize)]
struct Rest<'a> {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default, borrow)]
    resource: Vec<Resource<'a>>,
    #[serde(default, borrow)]
    operation: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Resource<'a> {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default, borrow)]
    interaction: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    operation: Vec<&'a RawValue>,
}

/// An `interaction` or `operation` entry: the parts the layer reads.
#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    name: Option<String>,
    // Present (even as `null`, which FHIR forbids) or absent: the layer must not add a second
    // `extension` member next to one it cannot read.
    #[serde(default, borrow, deserialize_with = "present")]
    extension: Option<&'a RawValue>,
}

fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Extension {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    value_uri: Option<String>,
}

/// What a capability entry describes, to ask the eligibility predicate about.
enum Target<'a> {
    /// `rest.resource.interaction`.
    Interaction { kind: &'a str, code: &'a str },
    /// `rest.resource.operation`.
    TypeOperation { kind: &'a str, name: &'a str },
    /// `rest.operation`.
    SystemOperation { name: &'a str },
}

/// A replacement of `text[start..end]`.
struct Edit {
    start: usize,
    end: usize,
    with: String,
}

/// The statement with the extension declared on every entry `is_async` accepts; `None` when it is not a JSON CapabilityStatement the layer can read, or
/// nothing changes.
fn rewrite(text: &str, is_async: impl Fn(Option<Target<'_>>) -> bool) -> Option<String> {
    let statement: Statement<'_> = serde_json::from_str(text).ok()?;
    if statement.resource_type != "CapabilityStatement" {
        return None;
    }
    let mut edits = Vec::new();
    for rest in &statement.rest {
        // The extension declares what a server does; a `client` entry describes what the server
        // itself calls.
        if rest.mode.as_deref() != Some("server") {
            continue;
        }
        for resource in &rest.resource {
            let kind = resource.kind.as_deref();
            for raw in &resource.interaction {
                let entry = read_entry(raw)?;
                let target = kind
                    .zip(entry.code.as_deref())
                    .map(|(kind, code)| Target::Interaction { kind, code });
                if is_async(target) {
                    declare_on(text, raw, &entry, &mut edits)?;
                }
            }
            for raw in &resource.operation {
                let entry = read_entry(raw)?;
                let target = kind
                    .zip(entry.name.as_deref())
                    .map(|(kind, name)| Target::TypeOperation { kind, name });
                if is_async(target) {
                    declare_on(text, raw, &entry, &mut edits)?;
                }
            }
        }
        for raw in &rest.operation {
            let entry = read_entry(raw)?;
            let target = entry
                .name
                .as_deref()
                .map(|name| Target::SystemOperation { name });
            if is_async(target) {
                declare_on(text, raw, &entry, &mut edits)?;
            }
        }
    }
    apply(text, edits)
}

fn read_entry<'a>(raw: &'a RawValue) -> Option<Entry<'a>> {
    serde_json::from_str(raw.get()).ok()
}

/// Whether the layer would make the entry's requests asynchronous: the eligibility predicate,
/// asked about a representative request. Without a predicate every request but `metadata` is
/// eligible, also the ones no request can be built for (an interaction code of a later release).
fn is_asynchronous(config: &Config, target: Option<Target<'_>>) -> bool {
    if config.eligible.is_none() {
        return true;
    }
    let Some((method, path)) = target.and_then(|target| representative(&config.base_path, target))
    else {
        return false;
    };
    let Ok(uri) = path.parse::<Uri>() else {
        return false;
    };
    let (headers, extensions) = (HeaderMap::new(), Extensions::new());
    config.is_eligible(&RequestHead {
        method: &method,
        uri: &uri,
        headers: &headers,
        extensions: &extensions,
    })
}

/// The method and path of a request the entry stands for.
fn representative(base: &str, target: Target<'_>) -> Option<(Method, String)> {
    Some(match target {
        Target::Interaction { kind, code } => {
            let (method, suffix) = match code {
                "read" => (Method::GET, "/x"),
                "vread" => (Method::GET, "/x/_history/1"),
                "update" | "update-conditional" => (Method::PUT, "/x"),
                "patch" | "patch-conditional" => (Method::PATCH, "/x"),
                "delete" | "delete-conditional-single" | "delete-conditional-multiple" => {
                    (Method::DELETE, "/x")
                }
                "delete-history" => (Method::DELETE, "/x/_history"),
                "delete-history-version" => (Method::DELETE, "/x/_history/1"),
                "history-instance" => (Method::GET, "/x/_history"),
                "history-type" => (Method::GET, "/_history"),
                "create" | "create-conditional" => (Method::POST, ""),
                "search-type" => (Method::GET, ""),
                _ => return None,
            };
            (method, format!("{base}/{kind}{suffix}"))
        }
        Target::TypeOperation { kind, name } => {
            let name = name.strip_prefix('$').unwrap_or(name);
            (Method::POST, format!("{base}/{kind}/${name}"))
        }
        Target::SystemOperation { name } => {
            let name = name.strip_prefix('$').unwrap_or(name);
            (Method::POST, format!("{base}/${name}"))
        }
    })
}

/// The edits that give the entry `raw` exactly one `synchronicity-control` extension, `either`;
/// `None` when the entry cannot be edited (not an object, `extension` not an array).
fn declare_on(text: &str, raw: &RawValue, entry: &Entry<'_>, edits: &mut Vec<Edit>) -> Option<()> {
    let object = raw.get();
    let start = offset_in(text, object)?;
    if !object.starts_with('{') {
        return None;
    }
    let Some(extension) = entry.extension else {
        // A new first member, followed by the whitespace that preceded the old first member, so
        // a pretty-printed statement stays pretty.
        let inner = &object[1..];
        let space = &inner[..inner.len() - inner.trim_start().len()];
        let at = start + 1 + space.len();
        let with = if inner.trim_start().starts_with('}') {
            format!(r#""extension":[{EITHER}]"#)
        } else {
            format!(r#""extension":[{EITHER}],{space}"#)
        };
        edits.push(Edit {
            start: at,
            end: at,
            with,
        });
        return Some(());
    };
    let array = extension.get();
    let array_start = offset_in(text, array)?;
    let items: Vec<&RawValue> = serde_json::from_str(array).ok()?;
    let mut declared = false;
    let mut previous_end = None;
    for item in &items {
        let item_start = offset_in(text, item.get())?;
        let item_end = item_start + item.get().len();
        let parsed: Option<Extension> = serde_json::from_str(item.get()).ok();
        let is_control = parsed
            .as_ref()
            .is_some_and(|e| e.url.as_deref() == Some(SYNCHRONICITY_CONTROL));
        if is_control {
            if !declared {
                // Already `either`: left as it is, byte for byte.
                let either = parsed.is_some_and(|e| e.value_uri.as_deref() == Some("either"));
                if !either {
                    edits.push(Edit {
                        start: item_start,
                        end: item_end,
                        with: EITHER.to_owned(),
                    });
                }
                declared = true;
            } else if let Some(previous_end) = previous_end {
                // A second one (0..1 allows none): removed with the separator before it.
                edits.push(Edit {
                    start: previous_end,
                    end: item_end,
                    with: String::new(),
                });
            }
        }
        previous_end = Some(item_end);
    }
    if declared {
        return Some(());
    }
    match items.as_slice() {
        [] => edits.push(Edit {
            start: array_start,
            end: array_start + array.len(),
            with: format!("[{EITHER}]"),
        }),
        [.., last] => {
            // Appended with the separator the array already uses.
            let separator = match items.as_slice() {
                [.., before, last] => {
                    let from = offset_in(text, before.get())? + before.get().len();
                    text.get(from..offset_in(text, last.get())?)?.to_owned()
                }
                _ => {
                    let inner = &array[1..];
                    format!(",{}", &inner[..inner.len() - inner.trim_start().len()])
                }
            };
            let at = offset_in(text, last.get())? + last.get().len();
            edits.push(Edit {
                start: at,
                end: at,
                with: format!("{separator}{EITHER}"),
            });
        }
    }
    Some(())
}

/// Where `part`, a slice of `text`, starts in it.
fn offset_in(text: &str, part: &str) -> Option<usize> {
    let start = part.as_ptr().addr().checked_sub(text.as_ptr().addr())?;
    let end = start.checked_add(part.len())?;
    (end <= text.len()).then_some(start)
}

/// `text` with the edits made; `None` when there are none.
fn apply(text: &str, mut edits: Vec<Edit>) -> Option<String> {
    if edits.is_empty() {
        return None;
    }
    edits.sort_by_key(|edit| (edit.start, edit.end));
    let added: usize = edits.iter().map(|edit| edit.with.len()).sum();
    let mut out = String::with_capacity(text.len() + added);
    let mut at = 0;
    for edit in edits {
        // Entries never overlap; a statement that made them would be passed on unchanged.
        out.push_str(text.get(at..edit.start)?);
        out.push_str(&edit.with);
        at = edit.end;
    }
    out.push_str(text.get(at..)?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // CAP-1, CAP-4: members are added where the entries are, in the style around them; an
    // existing `synchronicity-control` is replaced and a second one removed.
    #[test]
    fn cap_4_splices_without_touching_other_bytes() {
        let text = "{\"resourceType\":\"CapabilityStatement\",\"rest\":[{\"mode\":\"server\",\
            \"resource\":[{\"type\":\"Patient\",\"interaction\":[{\"code\":\"read\"},\
            { \"code\": \"create\", \"extension\": [] },\
            {\"extension\":[{\"url\":\"a\"},\n  {\"url\":\"b\"}],\"code\":\"update\"}]}],\
            \"operation\":[{\"name\":\"reindex\",\"extension\":[{\"url\":\"http://hl7.org/fhir/StructureDefinition/synchronicity-control\",\"valueUri\":\"asynchronous\"},\
            {\"url\":\"http://hl7.org/fhir/StructureDefinition/synchronicity-control\",\"valueUri\":\"synchronous\"}]}]}]}";
        let added: Extension = serde_json::from_str(EITHER).unwrap();
        assert_eq!(added.url.as_deref(), Some(SYNCHRONICITY_CONTROL));
        assert_eq!(added.value_uri.as_deref(), Some("either"));
        let out = rewrite(text, |_| true).expect("rewritten");
        let expected = format!(
            "{{\"resourceType\":\"CapabilityStatement\",\"rest\":[{{\"mode\":\"server\",\
            \"resource\":[{{\"type\":\"Patient\",\"interaction\":[{{\"extension\":[{EITHER}],\"code\":\"read\"}},\
            {{ \"code\": \"create\", \"extension\": [{EITHER}] }},\
            {{\"extension\":[{{\"url\":\"a\"}},\n  {{\"url\":\"b\"}},\n  {EITHER}],\"code\":\"update\"}}]}}],\
            \"operation\":[{{\"name\":\"reindex\",\"extension\":[{EITHER}]}}]}}]}}"
        );
        assert_eq!(out, expected);
    }

    fn declare_all(text: &str) -> Option<String> {
        rewrite(text, |_| true)
    }

    // CAP-4: what cannot be read, or needs nothing, is left alone (`None`: the original bytes).
    #[test]
    fn cap_4_unreadable_or_complete_statements_are_left_alone() {
        let control = r#"{"url":"http://hl7.org/fhir/StructureDefinition/synchronicity-control","valueUri":"either"}"#;
        for text in [
            "",
            "{",
            "[]",
            r#"{"resourceType":"Patient","rest":[{"mode":"server","operation":[{"name":"x"}]}]}"#,
            r#"{"rest":[{"mode":"server","operation":[{"name":"x"}]}]}"#,
            r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server","operation":[{"name":"x"}]}]} x"#,
            // `extension` twice, or not an array: no safe place for the declaration.
            r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server","operation":[{"name":"x","extension":[],"extension":[]}]}]}"#,
            r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server","operation":[{"name":"x","extension":{}}]}]}"#,
            r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server","operation":[{"name":"x","extension":null}]}]}"#,
            r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server","operation":["x"]}]}"#,
            r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server","resource":null}]}"#,
            // Nothing of a server to declare.
            r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"client","operation":[{"name":"x"}]}]}"#,
            r#"{"resourceType":"CapabilityStatement","rest":[{"operation":[{"name":"x"}]}]}"#,
            r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server","interaction":[{"code":"batch"}]}]}"#,
        ] {
            assert_eq!(declare_all(text), None, "{text}");
        }
        // Already declared `either`: byte for byte.
        let declared = format!(
            r#"{{"resourceType":"CapabilityStatement","rest":[{{"mode":"server","operation":[{{"name":"x","extension":[ {control} ]}}]}}]}}"#
        );
        assert_eq!(declare_all(&declared), None);
    }

    // CAP-4: an empty entry object still gets its declaration.
    #[test]
    fn cap_4_empty_entries() {
        let text = r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server","operation":[{},{ }]}]}"#;
        let out = declare_all(text).expect("rewritten");
        assert_eq!(
            out,
            format!(
                r#"{{"resourceType":"CapabilityStatement","rest":[{{"mode":"server","operation":[{{"extension":[{EITHER}]}},{{ "extension":[{EITHER}]}}]}}]}}"#
            )
        );
    }

    // CAP-4: the request each entry stands for, as the eligibility predicate sees it.
    #[test]
    fn cap_4_representative_requests() {
        let interaction = |code| {
            representative(
                "/fhir",
                Target::Interaction {
                    kind: "Patient",
                    code,
                },
            )
        };
        for (code, method, path) in [
            ("read", Method::GET, "/fhir/Patient/x"),
            ("vread", Method::GET, "/fhir/Patient/x/_history/1"),
            ("update", Method::PUT, "/fhir/Patient/x"),
            ("patch", Method::PATCH, "/fhir/Patient/x"),
            ("delete", Method::DELETE, "/fhir/Patient/x"),
            ("history-instance", Method::GET, "/fhir/Patient/x/_history"),
            ("history-type", Method::GET, "/fhir/Patient/_history"),
            ("create", Method::POST, "/fhir/Patient"),
            ("search-type", Method::GET, "/fhir/Patient"),
        ] {
            assert_eq!(interaction(code), Some((method, path.to_owned())), "{code}");
        }
        assert_eq!(interaction("teleport"), None);
        assert_eq!(
            representative(
                "",
                Target::TypeOperation {
                    kind: "Patient",
                    name: "everything"
                }
            ),
            Some((Method::POST, "/Patient/$everything".to_owned()))
        );
        assert_eq!(
            representative("/fhir", Target::SystemOperation { name: "$export" }),
            Some((Method::POST, "/fhir/$export".to_owned()))
        );
    }

    // CAP-4: only a `200` JSON (or untyped), uncompressed answer within the limit is read.
    #[test]
    fn cap_4_only_plain_json_statements_are_read() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, HeaderValue::from_str(value).unwrap());
            }
            map
        };
        let small = SizeHint::with_exact(100);
        let json = [("content-type", "application/fhir+json; charset=utf-8")];
        assert!(may_rewrite(StatusCode::OK, &headers(&json), small));
        assert!(may_rewrite(
            StatusCode::OK,
            &headers(&[("content-type", "application/json")]),
            small
        ));
        assert!(may_rewrite(StatusCode::OK, &headers(&[]), SizeHint::new()));
        assert!(may_rewrite(
            StatusCode::OK,
            &headers(&[("content-encoding", "identity")]),
            small
        ));
        assert!(!may_rewrite(
            StatusCode::NOT_MODIFIED,
            &headers(&json),
            small
        ));
        assert!(!may_rewrite(
            StatusCode::INTERNAL_SERVER_ERROR,
            &headers(&json),
            small
        ));
        assert!(!may_rewrite(
            StatusCode::OK,
            &headers(&[("content-type", "application/fhir+xml")]),
            small
        ));
        assert!(!may_rewrite(
            StatusCode::OK,
            &headers(&[("content-encoding", "gzip")]),
            small
        ));
        let large = SizeHint::with_exact(MAX_STATEMENT as u64 + 1);
        assert!(!may_rewrite(StatusCode::OK, &headers(&json), large));
        let declared_large = (MAX_STATEMENT + 1).to_string();
        assert!(!may_rewrite(
            StatusCode::OK,
            &headers(&[("content-length", &declared_large)]),
            SizeHint::new()
        ));
    }
}
