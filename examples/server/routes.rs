//! The URL layout and the thin HTTP handlers for the RESTful interactions. Every route is a full
//! `/fhir/...` path (no `Router::nest`), so the AsyncLayer, wrapped around this router, sees
//! each request with its original path.
//!
//! Routing order does not matter to axum; precedence does: static segments beat captures, so
//! `/fhir/Patient/$export` is the export operation, not a read of Patient `$export`.

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::routing::{get, post};
use http::header::{CONTENT_TYPE, IF_MATCH};
use http::{HeaderMap, Method, StatusCode, Uri};

use crate::app::SharedApp;
use crate::extract::{FhirBody, FhirPath};
use crate::interaction::{self, parse_body, resource_type};
use crate::response::FhirResponse;
use crate::{batch, capability, export, query, reindex};

pub(crate) fn router(app: SharedApp) -> Router {
    Router::new()
        .route("/fhir", post(batch))
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/$export", get(export::system).post(export::system))
        .route("/fhir/$reindex", post(reindex::reindex))
        .route(
            "/fhir/Patient/$export",
            get(export::patient).post(export::patient),
        )
        .route(
            "/fhir/Group/{id}/$export",
            get(export::group).post(export::group),
        )
        .route("/fhir/{type}", get(search).post(create))
        .route("/fhir/{type}/_search", post(search_form))
        .route("/fhir/{type}/{id}", get(read).put(update).delete(delete))
        .route("/fhir/{type}/{id}/_history/{version}", get(vread))
        // Must come after the routes: it applies to the routes already added.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(app)
}

async fn metadata(State(app): State<SharedApp>, headers: HeaderMap) -> FhirResponse {
    let base = app.base(&headers);
    FhirResponse::json(StatusCode::OK, capability::statement(&base, app.auth))
}

async fn read(
    State(app): State<SharedApp>,
    FhirPath((type_name, id)): FhirPath<(String, String)>,
    headers: HeaderMap,
) -> FhirResponse {
    let base = app.base(&headers);
    let ctx = app.ctx(&base, &headers);
    match resource_type(&type_name) {
        Ok(kind) => interaction::read(&ctx, kind, &id),
        Err(err) => err,
    }
}

async fn vread(
    State(app): State<SharedApp>,
    FhirPath((type_name, id, version)): FhirPath<(String, String, String)>,
    headers: HeaderMap,
) -> FhirResponse {
    let base = app.base(&headers);
    let ctx = app.ctx(&base, &headers);
    match resource_type(&type_name) {
        Ok(kind) => interaction::vread(&ctx, kind, &id, &version),
        Err(err) => err,
    }
}

async fn create(
    State(app): State<SharedApp>,
    FhirPath(type_name): FhirPath<String>,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> FhirResponse {
    let base = app.base(&headers);
    let ctx = app.ctx(&base, &headers);
    let resource = resource_type(&type_name)
        .and_then(|kind| Ok((kind, parse_body(content_type(&headers), &body)?)));
    match resource {
        Ok((kind, resource)) => interaction::create(&ctx, kind, resource),
        Err(err) => err,
    }
}

async fn update(
    State(app): State<SharedApp>,
    FhirPath((type_name, id)): FhirPath<(String, String)>,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> FhirResponse {
    let base = app.base(&headers);
    let ctx = app.ctx(&base, &headers);
    let resource = resource_type(&type_name)
        .and_then(|kind| Ok((kind, parse_body(content_type(&headers), &body)?)));
    let if_match = headers.get(IF_MATCH).and_then(|v| v.to_str().ok());
    match resource {
        Ok((kind, resource)) => interaction::update(&ctx, kind, &id, resource, if_match),
        Err(err) => err,
    }
}

async fn delete(
    State(app): State<SharedApp>,
    FhirPath((type_name, id)): FhirPath<(String, String)>,
    headers: HeaderMap,
) -> FhirResponse {
    let base = app.base(&headers);
    let ctx = app.ctx(&base, &headers);
    match resource_type(&type_name) {
        Ok(kind) => interaction::delete(&ctx, kind, &id),
        Err(err) => err,
    }
}

/// `GET [base]/{type}?params`
async fn search(
    State(app): State<SharedApp>,
    FhirPath(type_name): FhirPath<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> FhirResponse {
    let base = app.base(&headers);
    let ctx = app.ctx(&base, &headers);
    let params = raw.as_deref().map(query::parse).unwrap_or_default();
    match resource_type(&type_name) {
        Ok(kind) => interaction::search(&ctx, kind, &params),
        Err(err) => err,
    }
}

/// `POST [base]/{type}/_search` with a form body; query parameters count too.
async fn search_form(
    State(app): State<SharedApp>,
    FhirPath(type_name): FhirPath<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> FhirResponse {
    let base = app.base(&headers);
    let ctx = app.ctx(&base, &headers);
    let kind = match resource_type(&type_name) {
        Ok(kind) => kind,
        Err(err) => return err,
    };
    let mut params = raw.as_deref().map(query::parse).unwrap_or_default();
    if !body.is_empty() {
        let is_form = content_type(&headers).is_some_and(|ct| {
            ct.split(';').next().is_some_and(|e| {
                e.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
        if !is_form {
            return FhirResponse::error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                "POST _search takes an application/x-www-form-urlencoded body",
            );
        }
        params.extend(query::parse(&String::from_utf8_lossy(&body)));
    }
    interaction::search(&ctx, kind, &params)
}

/// `POST [base]` with a batch Bundle.
async fn batch(
    State(app): State<SharedApp>,
    headers: HeaderMap,
    FhirBody(body): FhirBody,
) -> FhirResponse {
    let base = app.base(&headers);
    let ctx = app.ctx(&base, &headers);
    match parse_body(content_type(&headers), &body) {
        Ok(bundle) => batch::process(&ctx, bundle),
        Err(err) => err,
    }
}

async fn not_found(uri: Uri) -> FhirResponse {
    FhirResponse::error(
        StatusCode::NOT_FOUND,
        "not-found",
        format!(
            "nothing at {}; the FHIR base is /fhir (see /fhir/metadata)",
            uri.path()
        ),
    )
}

/// axum still adds the `Allow` header to this answer.
async fn method_not_allowed(method: Method, uri: Uri) -> FhirResponse {
    FhirResponse::error(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        format!("{method} is not supported on {}", uri.path()),
    )
}

/// The raw `Content-Type`; a non-text value is passed on as such so it is reported, not ignored.
fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"))
}
