//! What the routes' unit tests start from: a layer's shared state over a `MemoryStore`, request
//! heads under the route prefix, jobs recorded in given states, and answers read back.

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::body::OwnBody;
use crate::job::{JobId, JobKind, JobRecord, JobState, StoredResponse};
use crate::state::Shared;
use crate::{AsyncLayer, AsyncLayerBuilder, MemoryStore};

/// A well-formed job id.
pub(super) const ID: &str = "0123456789abcdef0123456789abcdef";

/// The shared state of a layer with base URL `https://fhir.example.org/fhir`, set up further by
/// `configure`.
pub(super) fn shared(
    configure: impl FnOnce(AsyncLayerBuilder) -> AsyncLayerBuilder,
) -> Arc<Shared> {
    let builder =
        AsyncLayer::builder(MemoryStore::default()).base_url("https://fhir.example.org/fhir");
    configure(builder)
        .assemble()
        .expect("the test layer is valid")
}

/// The head of a `method` request for `/fhir/_async/{rest}`.
pub(super) fn parts(method: Method, rest: &str) -> Parts {
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = format!("/fhir/_async/{rest}")
        .parse()
        .expect("a valid path");
    request.headers_mut().insert(
        http::header::HOST,
        HeaderValue::from_static("fhir.example.org"),
    );
    request.into_parts().0
}

/// The test job, in `state`, created now.
pub(super) fn record(shared: &Shared, kind: JobKind, state: JobState) -> JobRecord {
    let id = JobId::parse(ID).expect("ID is well-formed");
    let now = shared.runner.clock.now();
    let mut record = JobRecord::new(id, kind, "POST", "/fhir/$reindex", now);
    if state.is_finished() {
        record.finished_at = Some(now);
        record.expires_at = Some(now + std::time::Duration::from_secs(3600));
    }
    record.state = state;
    record
}

/// Records `record` in the layer's store.
pub(super) async fn put(shared: &Shared, record: JobRecord) {
    shared
        .runner
        .store
        .create(record)
        .await
        .expect("the memory store takes the record");
}

/// A finished interaction's response: `status`, a FHIR JSON body.
pub(super) fn stored(status: StatusCode, body: &'static str) -> StoredResponse {
    StoredResponse {
        status,
        headers: vec![(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        )],
        body: Bytes::from_static(body.as_bytes()),
    }
}

/// The whole body of an own answer.
pub(super) async fn bytes(response: Response<OwnBody>) -> Bytes {
    match response.into_body() {
        OwnBody::Full(body) => body,
        OwnBody::Stream(body) => body.collect().await.expect("the body reads").to_bytes(),
    }
}

/// The body of an own answer, as JSON.
pub(super) async fn json(response: Response<OwnBody>) -> serde_json::Value {
    serde_json::from_slice(&bytes(response).await).expect("the body is JSON")
}
