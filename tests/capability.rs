//! Declaring asynchronous support in the wrapped server's CapabilityStatement over a real socket
//! (CAP-1, CAP-4; §3.7, §7 scenario 27): the rewritten statement compared field by field, in
//! order, with the original.

mod support;

use std::convert::Infallible;
use std::fmt;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{Method, StatusCode};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use support::{Reply, TestClient};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, MemoryStore};

const CONTROL: &str = "http://hl7.org/fhir/StructureDefinition/synchronicity-control";

/// A statement in FHIR's key order (not alphabetical), pretty-printed, with bytes a parse and
/// re-serialization would change: `1.50`, a `\u00e9` escape, an array on one line.
const STATEMENT: &str = r#"{
  "resourceType": "CapabilityStatement",
  "id": "example",
  "extension": [ { "url": "http://example.org/fhir/StructureDefinition/weight", "valueDecimal": 1.50 } ],
  "status": "active",
  "date": "2024-01-01",
  "publisher": "Caf\u00e9 Health",
  "kind": "instance",
  "fhirVersion": "4.0.1",
  "format": [ "json", "xml" ],
  "rest": [
    {
      "mode": "server",
      "security": { "cors": true },
      "resource": [
        {
          "type": "Patient",
          "profile": "http://hl7.org/fhir/StructureDefinition/Patient",
          "interaction": [
            { "code": "read" },
            {
              "code": "vread",
              "documentation": "by version"
            },
            { "code": "update" },
            { "code": "delete" },
            { "code": "history-instance" },
            { "code": "create" },
            { "code": "search-type" }
          ],
          "versioning": "versioned",
          "searchParam": [ { "name": "name", "type": "string" } ],
          "operation": [
            { "name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything" }
          ]
        },
        {
          "type": "Observation",
          "interaction": [
            { "extension": [ { "url": "http://example.org/other", "valueString": "kept" } ], "code": "create" },
            {
              "code": "search-type",
              "extension": [
                { "url": "http://example.org/other", "valueBoolean": false },
                { "url": "http://hl7.org/fhir/StructureDefinition/synchronicity-control", "valueUri": "synchronous" }
              ]
            },
            { "code": "patch", "extension": [] }
          ]
        }
      ],
      "interaction": [ { "code": "transaction" }, { "code": "batch" } ],
      "operation": [
        {
          "name": "reindex",
          "definition": "https://example.org/fhir/OperationDefinition/reindex",
          "extension": [ { "url": "http://hl7.org/fhir/StructureDefinition/synchronicity-control", "valueUri": "asynchronous" } ]
        },
        { "name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export" }
      ]
    },
    {
      "mode": "client",
      "resource": [ { "type": "Patient", "interaction": [ { "code": "read" } ] } ],
      "operation": [ { "name": "reindex", "definition": "https://example.org/fhir/OperationDefinition/reindex" } ]
    }
  ]
}"#;

/// What the wrapped server answers to `GET /fhir/metadata`.
#[derive(Clone)]
struct Metadata {
    body: Bytes,
    content_type: Option<&'static str>,
}

impl Metadata {
    fn json(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            content_type: Some("application/fhir+json"),
        }
    }

    fn response(&self) -> Response {
        let mut response = Response::builder()
            .header("etag", "W/\"7\"")
            .header("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")
            .header("x-custom", "kept")
            .header("cache-control", "max-age=60");
        if let Some(content_type) = self.content_type {
            response = response.header("content-type", content_type);
        }
        response.body(Body::from(self.body.clone())).unwrap()
    }
}

/// The wrapped server: `metadata`, and a route that answers the same statement elsewhere.
fn fhir_routes(metadata: Metadata) -> Router {
    let other = metadata.clone();
    Router::new()
        .route(
            "/fhir/metadata",
            get(move || {
                let metadata = metadata.clone();
                async move { metadata.response() }
            }),
        )
        .route(
            "/fhir/Basic/cap",
            get(move || {
                let other = other.clone();
                async move { other.response() }
            })
            .post(|| async { "posted" }),
        )
}

fn builder() -> AsyncLayerBuilder {
    AsyncLayer::builder(MemoryStore::default()).base_path("/fhir")
}

/// Serves `fhir_routes(metadata)` with `Router::layer(layer)`; the base URL.
async fn serve(metadata: Metadata, layer: AsyncLayer) -> String {
    let addr = support::serve(fhir_routes(metadata).layer(layer)).await;
    format!("http://{addr}/fhir")
}

// ---- JSON with its key order: serde_json's `Value` (no `preserve_order`) sorts keys. ----

/// A JSON value whose objects keep their members in document order.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Scalar(Value),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct JsonVisitor;

        impl<'de> Visitor<'de> for JsonVisitor {
            type Value = Json;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Scalar(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Scalar(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Scalar(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
                Ok(Json::Scalar(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::Scalar(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Scalar(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Json::Object(members))
            }
        }

        deserializer.deserialize_any(JsonVisitor)
    }
}

impl Json {
    fn parse(bytes: &[u8]) -> Self {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Json::Scalar(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    fn items(&self, key: &str) -> &[Json] {
        match self.get(key) {
            Some(Json::Array(items)) => items,
            _ => &[],
        }
    }

    fn members_mut(&mut self) -> &mut Vec<(String, Json)> {
        match self {
            Json::Object(members) => members,
            other => panic!("not an object: {other:?}"),
        }
    }

    /// Item `index` of the array member `key`.
    fn at_mut(&mut self, key: &str, index: usize) -> &mut Json {
        match self.members_mut().iter_mut().find(|(k, _)| k == key) {
            Some((_, Json::Array(items))) => &mut items[index],
            other => panic!("{key} is not an array: {other:?}"),
        }
    }

    fn is_control(&self) -> bool {
        self.str("url") == Some(CONTROL)
    }
}

/// The extension the layer declares, as a tree.
fn either() -> Json {
    Json::Object(vec![
        ("url".to_owned(), Json::Scalar(CONTROL.into())),
        ("valueUri".to_owned(), Json::Scalar("either".into())),
    ])
}

/// Where an entry sits: `rest.resource.interaction` (`Some(type)`, code) or an operation.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place<'a> {
    Interaction(&'a str, &'a str),
    TypeOperation(&'a str, &'a str),
    SystemOperation(&'a str),
}

/// `original` as the layer should declare it: every entry `marked` accepts in a `server` rest
/// has exactly one `synchronicity-control`, `either`, where the first one was, else appended to
/// its `extension`, else in a new `extension` member before the others; nothing else changes.
fn declared(original: &Json, marked: impl Fn(Place<'_>) -> bool) -> Json {
    let mut expected = original.clone();
    for (r, rest) in original.items("rest").iter().enumerate() {
        if rest.str("mode") != Some("server") {
            continue;
        }
        for (i, resource) in rest.items("resource").iter().enumerate() {
            let kind = resource.str("type").unwrap();
            for (j, entry) in resource.items("interaction").iter().enumerate() {
                if marked(Place::Interaction(kind, entry.str("code").unwrap())) {
                    declare_on(
                        expected
                            .at_mut("rest", r)
                            .at_mut("resource", i)
                            .at_mut("interaction", j),
                    );
                }
            }
            for (j, entry) in resource.items("operation").iter().enumerate() {
                if marked(Place::TypeOperation(kind, entry.str("name").unwrap())) {
                    declare_on(
                        expected
                            .at_mut("rest", r)
                            .at_mut("resource", i)
                            .at_mut("operation", j),
                    );
                }
            }
        }
        for (j, entry) in rest.items("operation").iter().enumerate() {
            if marked(Place::SystemOperation(entry.str("name").unwrap())) {
                declare_on(expected.at_mut("rest", r).at_mut("operation", j));
            }
        }
    }
    expected
}

fn declare_on(entry: &mut Json) {
    let members = entry.members_mut();
    match members.iter_mut().find(|(k, _)| k == "extension") {
        Some((_, Json::Array(extensions))) => match extensions.iter().position(Json::is_control) {
            Some(first) => {
                extensions[first] = either();
                let mut index = 0;
                extensions.retain(|e| {
                    index += 1;
                    index - 1 == first || !e.is_control()
                });
            }
            None => extensions.push(either()),
        },
        Some(other) => panic!("extension is not an array: {other:?}"),
        None => members.insert(0, ("extension".to_owned(), Json::Array(vec![either()]))),
    }
}

/// Every `synchronicity-control` extension in a `server` rest of `statement`, by place.
fn controls(statement: &Json) -> Vec<(String, Vec<Json>)> {
    let mut found = Vec::new();
    let mut collect = |name: String, entry: &Json| {
        let controls: Vec<Json> = entry
            .items("extension")
            .iter()
            .filter(|e| e.is_control())
            .cloned()
            .collect();
        found.push((name, controls));
    };
    for rest in statement.items("rest") {
        if rest.str("mode") != Some("server") {
            continue;
        }
        for resource in rest.items("resource") {
            let kind = resource.str("type").unwrap();
            for entry in resource.items("interaction") {
                collect(format!("{kind} {}", entry.str("code").unwrap()), entry);
            }
            for entry in resource.items("operation") {
                collect(format!("{kind} ${}", entry.str("name").unwrap()), entry);
            }
        }
        for entry in rest.items("operation") {
            collect(format!("${}", entry.str("name").unwrap()), entry);
        }
    }
    found
}

fn assert_unchanged(reply: &Reply, original: &[u8]) {
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body,
        original,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("etag"), "W/\"7\"");
    assert_eq!(reply.header("content-length"), original.len().to_string());
    assert_eq!(reply.header("x-custom"), "kept");
}

// CAP-4: off by default; the statement is passed on byte for byte, headers included.
#[tokio::test]
async fn cap_4_off_by_default_metadata_is_byte_identical() {
    let base = serve(Metadata::json(STATEMENT), builder().build()).await;
    let reply = TestClient::default().get(&format!("{base}/metadata")).await;
    assert_unchanged(&reply, STATEMENT.as_bytes());
    assert_eq!(reply.header("content-type"), "application/fhir+json");
}

// CAP-1, CAP-4: every interaction and operation of the server gets exactly one
// `synchronicity-control` (`valueUri`, `either`); every other field of the statement, in
// order, is the original's; only the headers naming the old bytes change.
#[tokio::test]
async fn cap_1_cap_4_every_interaction_and_operation_declares_either() {
    let base = serve(
        Metadata::json(STATEMENT),
        builder().declare_async(true).build(),
    )
    .await;
    let reply = TestClient::default().get(&format!("{base}/metadata")).await;
    assert_eq!(reply.status, StatusCode::OK);

    let original = Json::parse(STATEMENT.as_bytes());
    let rewritten = Json::parse(&reply.body);
    assert_eq!(rewritten, declared(&original, |_| true));
    let controls = controls(&rewritten);
    assert_eq!(controls.len(), 13, "{controls:?}");
    for (place, found) in &controls {
        assert_eq!(found, &[either()], "{place}");
    }
    // The client side and the system interactions are not the layer's to declare.
    assert_eq!(rewritten.items("rest")[1], original.items("rest")[1]);
    assert_eq!(
        rewritten.items("rest")[0].get("interaction"),
        original.items("rest")[0].get("interaction")
    );

    // Untouched bytes stay as they were: a re-serialization would change these.
    let text = std::str::from_utf8(&reply.body).unwrap();
    for verbatim in [
        r#""valueDecimal": 1.50 }"#,
        r#""publisher": "Caf\u00e9 Health","#,
        "{\n  \"resourceType\": \"CapabilityStatement\",\n  \"id\": \"example\",",
        r#""format": [ "json", "xml" ],"#,
    ] {
        assert!(text.contains(verbatim), "{verbatim:?} lost in {text}");
    }
    // One line more: the pretty-printed `vread` entry's new member has a line of its own.
    assert_eq!(
        text.lines().count(),
        STATEMENT.lines().count() + 1,
        "{text}"
    );
    // Added members follow the style around them: a pretty-printed entry stays pretty.
    let added = format!(r#""extension":[{{"url":"{CONTROL}","valueUri":"either"}}]"#);
    let vread = format!(
        "{{\n              {added},\n              \"code\": \"vread\",\n              \"documentation\""
    );
    assert!(text.contains(&vread), "{vread:?} not in {text}");
    assert!(
        text.contains(&format!("{{ {added}, \"code\": \"read\" }}")),
        "{text}"
    );

    // Headers: the new length, no validator of the old bytes, everything else kept.
    assert_eq!(reply.header("content-length"), reply.body.len().to_string());
    assert!(reply.headers.get("etag").is_none(), "{:?}", reply.headers);
    assert_eq!(reply.header("content-type"), "application/fhir+json");
    assert_eq!(
        reply.header("last-modified"),
        "Mon, 01 Jan 2024 00:00:00 GMT"
    );
    assert_eq!(reply.header("x-custom"), "kept");
    assert_eq!(reply.header("cache-control"), "max-age=60");
}

// CAP-4: `respond-async` on metadata (never eligible by default) still answers synchronously,
// declared; a statement without a content type, and one asked for with `_format=json`, too.
#[tokio::test]
async fn cap_4_synchronous_metadata_with_respond_async_is_declared() {
    let untyped = Metadata {
        body: Bytes::from_static(STATEMENT.as_bytes()),
        content_type: None,
    };
    for metadata in [Metadata::json(STATEMENT), untyped] {
        let base = serve(metadata, builder().declare_async(true).build()).await;
        let client = TestClient::default();
        let expected = declared(&Json::parse(STATEMENT.as_bytes()), |_| true);
        let reply = client
            .send(
                Method::GET,
                &format!("{base}/metadata"),
                &[("prefer", "respond-async")],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(Json::parse(&reply.body), expected);
        let reply = client.get(&format!("{base}/metadata?_format=json")).await;
        assert_eq!(Json::parse(&reply.body), expected);
    }
}

// CAP-1, CAP-4: with an `eligible` predicate, only the entries whose representative request it
// accepts are declared; an existing declaration of the others stays as the server wrote it.
#[tokio::test]
async fn cap_4_custom_predicate_marks_only_what_it_allows() {
    // Writes and operations, but nothing on Patient.
    let layer = builder()
        .declare_async(true)
        .eligible(|head| {
            head.method != Method::GET && !head.uri.path().starts_with("/fhir/Patient")
        })
        .build();
    let base = serve(Metadata::json(STATEMENT), layer).await;
    let reply = TestClient::default().get(&format!("{base}/metadata")).await;
    assert_eq!(reply.status, StatusCode::OK);

    let rewritten = Json::parse(&reply.body);
    let expected = declared(&Json::parse(STATEMENT.as_bytes()), |place| {
        matches!(
            place,
            Place::Interaction("Observation", "create" | "patch")
                | Place::SystemOperation("reindex" | "export")
        )
    });
    assert_eq!(rewritten, expected);
    let synchronous = Json::Object(vec![
        ("url".to_owned(), Json::Scalar(CONTROL.into())),
        ("valueUri".to_owned(), Json::Scalar("synchronous".into())),
    ]);
    let marked: Vec<_> = controls(&rewritten)
        .into_iter()
        .filter(|(_, found)| !found.is_empty())
        .collect();
    assert_eq!(
        marked,
        [
            ("Observation create".to_owned(), vec![either()]),
            ("Observation search-type".to_owned(), vec![synchronous]),
            ("Observation patch".to_owned(), vec![either()]),
            ("$reindex".to_owned(), vec![either()]),
            ("$export".to_owned(), vec![either()]),
        ]
    );

    // A predicate that allows nothing leaves the statement byte for byte.
    let layer = builder().declare_async(true).eligible(|_| false).build();
    let base = serve(Metadata::json(STATEMENT), layer).await;
    let reply = TestClient::default().get(&format!("{base}/metadata")).await;
    assert_unchanged(&reply, STATEMENT.as_bytes());
}

// CAP-4: whatever the layer cannot read as a JSON CapabilityStatement passes through unchanged,
// headers included.
#[tokio::test]
async fn cap_4_unreadable_statements_pass_unchanged() {
    let xml = r#"<CapabilityStatement xmlns="http://hl7.org/fhir"><status value="active"/></CapabilityStatement>"#;
    let cases = [
        Metadata::json(&STATEMENT[..STATEMENT.len() / 2]),
        Metadata::json(format!("{STATEMENT} trailing")),
        Metadata::json(STATEMENT.replace("CapabilityStatement", "OperationOutcome")),
        Metadata::json(STATEMENT.replace(r#""extension": []"#, r#""extension": {}"#)),
        Metadata::json(r#"{"resourceType":"CapabilityStatement","rest":[{"mode":"server"}]}"#),
        Metadata::json(b"\xff\xfe{}".as_slice()),
        Metadata {
            body: Bytes::from_static(xml.as_bytes()),
            content_type: Some("application/fhir+xml"),
        },
        Metadata {
            body: Bytes::from_static(STATEMENT.as_bytes()),
            content_type: Some("text/plain"),
        },
        Metadata {
            body: Bytes::from_static(xml.as_bytes()),
            content_type: None,
        },
    ];
    for metadata in cases {
        let original = metadata.body.clone();
        let base = serve(metadata, builder().declare_async(true).build()).await;
        let reply = TestClient::default().get(&format!("{base}/metadata")).await;
        assert_unchanged(&reply, &original);
    }
}

// CAP-4: a statement too large to read (8 MiB) passes unchanged, whether its length is
// declared or it streams in chunks: the bytes read are replayed, then the rest.
#[tokio::test]
async fn cap_4_oversized_statement_passes_unchanged() {
    let padding = "x".repeat(9 * 1024 * 1024);
    let large = STATEMENT.replacen(
        r#""status": "active","#,
        &format!(r#""status": "active", "text": "{padding}","#),
        1,
    );
    let large = Bytes::from(large);
    let base = serve(
        Metadata::json(large.clone()),
        builder().declare_async(true).build(),
    )
    .await;
    let reply = TestClient::default().get(&format!("{base}/metadata")).await;
    assert_unchanged(&reply, &large);

    let chunks: Vec<Result<Bytes, Infallible>> = large
        .chunks(64 * 1024)
        .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
        .collect();
    let app = Router::new()
        .route(
            "/fhir/metadata",
            get(move || {
                let chunks = chunks.clone();
                async move {
                    Response::builder()
                        .header("content-type", "application/fhir+json")
                        .header("etag", "W/\"7\"")
                        .body(Body::from_stream(futures_util::stream::iter(chunks)))
                        .unwrap()
                }
            }),
        )
        .layer(builder().declare_async(true).build());
    let addr = support::serve(app).await;
    let reply = TestClient::default()
        .get(&format!("http://{addr}/fhir/metadata"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, large);
    assert_eq!(reply.header("etag"), "W/\"7\"");
}

// CAP-4: `HEAD` works: with `Router::layer` the layer sees the handler's body (axum drops it
// later) and the length is the declared statement's; around the whole Router it sees an empty
// body, and drops the length and `ETag` that the declared `GET` would not match.
#[tokio::test]
async fn cap_4_head_metadata() {
    let client = TestClient::default();
    let base = serve(
        Metadata::json(STATEMENT),
        builder().declare_async(true).build(),
    )
    .await;
    let declared_get = client.get(&format!("{base}/metadata")).await;
    let head = client
        .send(Method::HEAD, &format!("{base}/metadata"), &[], "")
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        declared_get.body.len().to_string()
    );
    assert!(head.headers.get("etag").is_none(), "{:?}", head.headers);
    assert_eq!(head.header("x-custom"), "kept");
    assert_eq!(head.header("content-type"), "application/fhir+json");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = ServiceBuilder::new()
        .layer(builder().declare_async(true).build())
        .service(fhir_routes(Metadata::json(STATEMENT)));
    let app = Router::new().fallback_service(service);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let base = format!("http://{addr}/fhir");
    let get = client.get(&format!("{base}/metadata")).await;
    assert_eq!(get.body, declared_get.body);
    let head = client
        .send(Method::HEAD, &format!("{base}/metadata"), &[], "")
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert!(head.headers.get("etag").is_none(), "{:?}", head.headers);
    assert_ne!(
        head.headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(STATEMENT.len().to_string().as_str()),
        "{:?}",
        head.headers
    );
    assert_eq!(head.header("x-custom"), "kept");
}

// CAP-4: only `GET`/`HEAD [base]/metadata` is read; any other request passes through as it
// was, even one answering a CapabilityStatement.
#[tokio::test]
async fn cap_4_other_requests_are_unaffected() {
    let base = serve(
        Metadata::json(STATEMENT),
        builder().declare_async(true).build(),
    )
    .await;
    let client = TestClient::default();
    let reply = client.get(&format!("{base}/Basic/cap")).await;
    assert_unchanged(&reply, STATEMENT.as_bytes());
    let reply = client
        .send(Method::POST, &format!("{base}/Basic/cap"), &[], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "posted");
    let reply = client.get(&format!("{base}/metadata/x")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);

    // `POST [base]/metadata` is not the statement (axum answers 405 for the GET-only route).
    let reply = client
        .send(Method::POST, &format!("{base}/metadata"), &[], "")
        .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(reply.body.is_empty());

    // A statement under another base path is not this layer's.
    let app = Router::new()
        .route(
            "/metadata",
            get(|| async { Metadata::json(STATEMENT).response() }),
        )
        .route("/fhir/$reindex", post(|| async { "{}" }))
        .layer(builder().declare_async(true).build());
    let addr = support::serve(app).await;
    let reply = client.get(&format!("http://{addr}/metadata")).await;
    assert_unchanged(&reply, STATEMENT.as_bytes());
}
