//! The RESTful interactions (read, vread, create, update, delete, search) as plain functions
//! from request parts to a `FhirResponse`, so the HTTP handlers and `batch` share one
//! implementation.

use http::StatusCode;
use serde_json::Value;
use std::sync::Arc;

use crate::db::{Db, ResourceType, Stored, valid_id};
use crate::prefer::{Preferences, Return};
use crate::response::{FhirResponse, outcome};
use crate::search;

/// What every interaction needs besides its own parameters.
pub(crate) struct Ctx<'a> {
    pub(crate) db: &'a Db,
    /// The absolute FHIR base for `Location` and Bundle links.
    pub(crate) base: &'a str,
    pub(crate) prefs: Preferences,
}

/// Resolves a type name from the URL; unknown types are a 404, as for any unknown path.
pub(crate) fn resource_type(name: &str) -> Result<ResourceType, FhirResponse> {
    ResourceType::parse(name).ok_or_else(|| {
        let known: Vec<&str> = ResourceType::ALL.iter().map(|t| t.as_str()).collect();
        FhirResponse::error(
            StatusCode::NOT_FOUND,
            "not-found",
            format!(
                "unknown resource type {name:?}; this server has {}",
                known.join(", ")
            ),
        )
    })
}

fn not_found(kind: ResourceType, id: &str) -> FhirResponse {
    let diagnostics = if id.starts_with('$') {
        format!("operation {id} is not supported on {}", kind.as_str())
    } else {
        format!("no {} with id {id:?}", kind.as_str())
    };
    FhirResponse::error(StatusCode::NOT_FOUND, "not-found", diagnostics)
}

pub(crate) fn read(ctx: &Ctx<'_>, kind: ResourceType, id: &str) -> FhirResponse {
    match ctx.db.get(kind, id) {
        Some(stored) => FhirResponse::resource(StatusCode::OK, stored),
        None => not_found(kind, id),
    }
}

/// Only the current version is kept; older ones answer 404 saying so.
pub(crate) fn vread(ctx: &Ctx<'_>, kind: ResourceType, id: &str, version: &str) -> FhirResponse {
    let Some(stored) = ctx.db.get(kind, id) else {
        return not_found(kind, id);
    };
    if version == stored.version.to_string() {
        return FhirResponse::resource(StatusCode::OK, stored);
    }
    FhirResponse::error(
        StatusCode::NOT_FOUND,
        "not-found",
        format!(
            "{} has no version {version:?}: this server keeps only the current version, {}",
            stored.reference(),
            stored.version
        ),
    )
}

pub(crate) fn create(ctx: &Ctx<'_>, kind: ResourceType, body: Value) -> FhirResponse {
    if let Err(err) = check_type(kind, &body) {
        return err;
    }
    let stored = ctx.db.create(kind, body);
    written(ctx, StatusCode::CREATED, stored, "created")
}

/// `if_match` is the raw `If-Match` header, if any.
pub(crate) fn update(
    ctx: &Ctx<'_>,
    kind: ResourceType,
    id: &str,
    body: Value,
    if_match: Option<&str>,
) -> FhirResponse {
    if let Err(err) = check_type(kind, &body) {
        return err;
    }
    if !valid_id(id) {
        return FhirResponse::error(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{id:?} is not a valid FHIR id (1-64 of A-Z, a-z, 0-9, '-', '.')"),
        );
    }
    match body.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return FhirResponse::error(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("the body's id {body_id:?} does not match the URL's id {id:?}"),
            );
        }
        None => {
            return FhirResponse::error(
                StatusCode::BAD_REQUEST,
                "required",
                format!("the body has no id; an update must carry \"id\": {id:?}"),
            );
        }
    }
    let wanted = match if_match.map(parse_etag) {
        None => None,
        Some(Some(version)) => Some(version),
        Some(None) => {
            return FhirResponse::error(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!(
                    "If-Match {:?} is not a version ETag; send e.g. W/\"3\"",
                    if_match.unwrap_or_default()
                ),
            );
        }
    };
    match ctx.db.put(kind, id, body, wanted) {
        Ok((stored, true)) => written(ctx, StatusCode::CREATED, stored, "created"),
        Ok((stored, false)) => written(ctx, StatusCode::OK, stored, "updated"),
        Err(conflict) => FhirResponse::error(
            StatusCode::PRECONDITION_FAILED,
            "conflict",
            match conflict.current {
                Some(v) => format!(
                    "{}/{id} is at version {v}, not the one If-Match names; read it again",
                    kind.as_str()
                ),
                None => format!(
                    "{}/{id} does not exist, so If-Match cannot match",
                    kind.as_str()
                ),
            },
        ),
    }
}

/// Idempotent, as FHIR allows: deleting what is already gone is a success too, so a retried
/// DELETE (or a replayed async one) does not turn into an error.
pub(crate) fn delete(ctx: &Ctx<'_>, kind: ResourceType, id: &str) -> FhirResponse {
    ctx.db.delete(kind, id);
    FhirResponse::empty(StatusCode::NO_CONTENT)
}

pub(crate) fn search(
    ctx: &Ctx<'_>,
    kind: ResourceType,
    params: &[(String, String)],
) -> FhirResponse {
    match search::parse(kind, params, ctx.prefs.handling) {
        Ok(search) => FhirResponse::json(StatusCode::OK, search::run(ctx.db, &search, ctx.base)),
        Err(err) => err,
    }
}

/// Parses a request body as a JSON resource. `content_type` is the raw header; JSON flavours
/// only, since this server speaks no XML.
pub(crate) fn parse_body(content_type: Option<&str>, body: &[u8]) -> Result<Value, FhirResponse> {
    if let Some(content_type) = content_type {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/fhir+json")
            && !essence.eq_ignore_ascii_case("application/json")
        {
            return Err(FhirResponse::error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                format!(
                    "Content-Type {content_type:?} is not supported; send application/fhir+json"
                ),
            ));
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(FhirResponse::error(
            StatusCode::BAD_REQUEST,
            "required",
            "the request body is empty; send a JSON resource",
        ));
    }
    serde_json::from_slice(body).map_err(|err| {
        FhirResponse::error(
            StatusCode::BAD_REQUEST,
            "structure",
            format!("the request body is not valid JSON: {err}"),
        )
    })
}

fn check_type(kind: ResourceType, body: &Value) -> Result<(), FhirResponse> {
    match body.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == kind.as_str() => Ok(()),
        Some(t) => Err(FhirResponse::error(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "the body's resourceType is {t}, but the URL is for {}; send it to /{t} or fix resourceType",
                kind.as_str()
            ),
        )),
        None => Err(FhirResponse::error(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "the body is not a FHIR resource: it needs \"resourceType\": \"{}\"",
                kind.as_str()
            ),
        )),
    }
}

/// `W/"3"`, `"3"` or `3`.
fn parse_etag(raw: &str) -> Option<u64> {
    let raw = raw.trim();
    let raw = raw.strip_prefix("W/").unwrap_or(raw);
    raw.trim_matches('"').parse().ok()
}

/// The answer to a successful create or update, shaped by `Prefer: return=`.
fn written(ctx: &Ctx<'_>, status: StatusCode, stored: Arc<Stored>, verb: &str) -> FhirResponse {
    let location = format!(
        "{}/{}/_history/{}",
        ctx.base,
        stored.reference(),
        stored.version
    );
    let version = Some((stored.version, stored.updated));
    let message = format!("{verb} {} version {}", stored.reference(), stored.version);
    let mut response = match ctx.prefs.return_ {
        Return::Representation => FhirResponse::resource(status, stored),
        Return::Minimal => FhirResponse::empty(status),
        Return::OperationOutcome => {
            FhirResponse::json(status, outcome("information", "informational", &message))
        }
    };
    response.version = version;
    response.with_location(location)
}
