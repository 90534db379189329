//! `POST [base]` with a `batch` Bundle: each entry is run as its own interaction, independently
//! (a failed entry does not stop the others), and the answers come back as a `batch-response`.

use http::StatusCode;
use serde_json::{Map, Value, json};

use crate::instant;
use crate::interaction::{self, Ctx, resource_type};
use crate::query;
use crate::response::FhirResponse;

/// Runs a batch Bundle. Anything but a `batch` Bundle is a 400.
pub(crate) fn process(ctx: &Ctx<'_>, bundle: Value) -> FhirResponse {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return FhirResponse::error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "POST to the base takes a Bundle of type batch; to create a resource POST it to /{type}",
        );
    }
    match bundle.get("type").and_then(Value::as_str) {
        Some("batch") => {}
        Some("transaction") => {
            return FhirResponse::error(
                StatusCode::BAD_REQUEST,
                "not-supported",
                "transaction Bundles are not supported; send type batch (entries then succeed or fail one by one)",
            );
        }
        other => {
            return FhirResponse::error(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("Bundle.type is {other:?}; this endpoint takes a batch Bundle"),
            );
        }
    }
    let entries = bundle.get("entry").and_then(Value::as_array);
    let responses: Vec<Value> = entries
        .into_iter()
        .flatten()
        .map(|entry| render(ctx, run(ctx, entry)))
        .collect();
    let mut out = Map::new();
    out.insert("resourceType".into(), json!("Bundle"));
    out.insert("type".into(), json!("batch-response"));
    // FHIR JSON has no empty arrays.
    if !responses.is_empty() {
        out.insert("entry".into(), Value::Array(responses));
    }
    FhirResponse::json(StatusCode::OK, Value::Object(out))
}

/// Runs one entry's `request`.
fn run(ctx: &Ctx<'_>, entry: &Value) -> FhirResponse {
    let request = &entry["request"];
    let (Some(method), Some(url)) = (request["method"].as_str(), request["url"].as_str()) else {
        return bad_entry("the entry has no request.method and request.url".into());
    };
    let Some(relative) = relative_url(ctx.base, url) else {
        return bad_entry(format!(
            "request.url {url:?} is not under this server's base {}",
            ctx.base
        ));
    };
    let (path, query) = relative.split_once('?').unwrap_or((relative, ""));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let Some(type_name) = segments.first() else {
        return bad_entry("request.url names no resource type".into());
    };
    let kind = match resource_type(type_name) {
        Ok(kind) => kind,
        Err(err) => return err,
    };
    let resource = || entry.get("resource").cloned();
    match (method, &segments[1..]) {
        ("GET", []) => interaction::search(ctx, kind, &query::parse(query)),
        ("POST", ["_search"]) => interaction::search(ctx, kind, &query::parse(query)),
        ("GET", [id]) => interaction::read(ctx, kind, id),
        ("GET", [id, "_history", version]) => interaction::vread(ctx, kind, id, version),
        ("POST", []) => match resource() {
            Some(resource) => interaction::create(ctx, kind, resource),
            None => bad_entry("a POST entry needs a resource".into()),
        },
        ("PUT", [id]) => match resource() {
            Some(resource) => {
                interaction::update(ctx, kind, id, resource, request["ifMatch"].as_str())
            }
            None => bad_entry("a PUT entry needs a resource".into()),
        },
        ("DELETE", [id]) => interaction::delete(ctx, kind, id),
        _ => FhirResponse::error(
            StatusCode::BAD_REQUEST,
            "not-supported",
            format!(
                "{method} {url} is not supported in a batch; entries may read, vread, search, create, update or delete"
            ),
        ),
    }
}

/// `Patient/1`, `/fhir/Patient/1` and `{base}/Patient/1` are all accepted; other absolute URLs
/// are not ours.
fn relative_url<'u>(base: &str, url: &'u str) -> Option<&'u str> {
    if let Some(rest) = url.strip_prefix(base) {
        return Some(rest.trim_start_matches('/'));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return None;
    }
    let base_path = base
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or("");
    let url = match url.strip_prefix(base_path) {
        Some(rest) if !base_path.is_empty() && rest.starts_with(['/', '?']) => rest,
        _ => url,
    };
    Some(url.trim_start_matches('/'))
}

fn bad_entry(diagnostics: String) -> FhirResponse {
    FhirResponse::error(StatusCode::BAD_REQUEST, "invalid", diagnostics)
}

/// Turns an interaction's answer into a `batch-response` entry.
fn render(ctx: &Ctx<'_>, answer: FhirResponse) -> Value {
    let status = answer.status;
    let mut response = Map::new();
    response.insert(
        "status".into(),
        json!(format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or_default()
        )),
    );
    if let Some(location) = &answer.location {
        response.insert("location".into(), json!(location));
    }
    if let Some(etag) = answer.etag() {
        response.insert("etag".into(), json!(etag));
    }
    if let Some(modified) = answer.last_modified() {
        response.insert("lastModified".into(), json!(instant::format(modified)));
    }
    let mut entry = Map::new();
    if let Some(body) = answer.into_body_json() {
        let is_outcome = body["resourceType"] == "OperationOutcome";
        if is_outcome || status.is_client_error() || status.is_server_error() {
            response.insert("outcome".into(), body);
        } else {
            if let (Some(kind), Some(id)) = (body["resourceType"].as_str(), body["id"].as_str()) {
                entry.insert("fullUrl".into(), json!(format!("{}/{kind}/{id}", ctx.base)));
            }
            entry.insert("resource".into(), body);
        }
    }
    entry.insert("response".into(), Value::Object(response));
    Value::Object(entry)
}
