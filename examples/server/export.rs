//! Bulk `$export` at system, Patient and Group level, answered synchronously as one streaming
//! `application/fhir+ndjson` body. The AsyncLayer turns it into the bulk pattern (files and a
//! manifest) when a client sends `Prefer: respond-async`; this handler never needs to know.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use serde_json::Value;

use crate::app::SharedApp;
use crate::db::{Db, ResourceType, Stored};
use crate::extract::{FhirBody, FhirPath};
use crate::instant::{self, Millis};
use crate::interaction::parse_body;
use crate::prefer::{self, Handling};
use crate::query;
use crate::response::FhirResponse;
use crate::search::{self, Criterion};

const NDJSON: &str = "application/fhir+ndjson";

/// Resources serialised per body chunk: big enough for few syscalls, small enough that memory
/// stays flat however many resources match.
const CHUNK: usize = 256;

/// Which resources an export starts from.
enum Level {
    System,
    Patient,
    Group(String),
}

/// `GET|POST [base]/$export`
pub(crate) async fn system(
    State(app): State<SharedApp>,
    method: Method,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    FhirBody(body): FhirBody,
) -> Response {
    export(&app, Level::System, &method, &headers, raw, &body)
}

/// `GET|POST [base]/Patient/$export`
pub(crate) async fn patient(
    State(app): State<SharedApp>,
    method: Method,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    FhirBody(body): FhirBody,
) -> Response {
    export(&app, Level::Patient, &method, &headers, raw, &body)
}

/// `GET|POST [base]/Group/{id}/$export`
pub(crate) async fn group(
    State(app): State<SharedApp>,
    FhirPath(id): FhirPath<String>,
    method: Method,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    FhirBody(body): FhirBody,
) -> Response {
    export(&app, Level::Group(id), &method, &headers, raw, &body)
}

fn export(
    app: &SharedApp,
    level: Level,
    method: &Method,
    headers: &HeaderMap,
    raw_query: Option<String>,
    body: &Bytes,
) -> Response {
    let handling = prefer::read(headers).handling;
    let snapshot = params(method, headers, raw_query, body)
        .and_then(|params| ExportRequest::parse(&level, &params, handling))
        .and_then(|request| request.snapshot(&app.db, &level));
    match snapshot {
        Ok(snapshot) => stream(snapshot),
        Err(err) => err.into_response(),
    }
}

/// The kick-off parameters: the query, plus a `Parameters` body on POST. Clients send that body
/// as `application/json` as often as `application/fhir+json`, and some POST no body at all.
fn params(
    method: &Method,
    headers: &HeaderMap,
    raw_query: Option<String>,
    body: &Bytes,
) -> Result<Vec<(String, String)>, FhirResponse> {
    let mut params = raw_query.as_deref().map(query::parse).unwrap_or_default();
    if *method != Method::POST || body.iter().all(u8::is_ascii_whitespace) {
        return Ok(params);
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let body = parse_body(content_type, body)?;
    if body["resourceType"] != "Parameters" {
        return Err(FhirResponse::error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "a POST $export body must be a Parameters resource (or empty, with the parameters in the query)",
        ));
    }
    for parameter in body["parameter"].as_array().into_iter().flatten() {
        let Some(name) = parameter["name"].as_str() else {
            continue;
        };
        if let Some(value) = parameter_value(parameter) {
            params.push((name.to_owned(), value));
        }
    }
    Ok(params)
}

/// The `value[x]` of a `Parameters.parameter`, as the string a query would carry.
fn parameter_value(parameter: &Value) -> Option<String> {
    let object = parameter.as_object()?;
    object.iter().find_map(|(key, value)| {
        if !key.starts_with("value") {
            return None;
        }
        match value {
            Value::String(s) => Some(s.clone()),
            Value::Bool(_) | Value::Number(_) => Some(value.to_string()),
            // valueReference
            Value::Object(o) => o
                .get("reference")
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        }
    })
}

/// A validated export request.
struct ExportRequest {
    types: Vec<ResourceType>,
    since: Option<Millis>,
    /// Per type, alternative filters (OR); each filter is a list of criteria (AND).
    type_filters: BTreeMap<ResourceType, Vec<Vec<Criterion>>>,
    /// The `patient` parameter: only these patients' data.
    patients: Option<HashSet<String>>,
}

impl ExportRequest {
    fn parse(
        level: &Level,
        params: &[(String, String)],
        handling: Handling,
    ) -> Result<Self, FhirResponse> {
        let allowed: Vec<ResourceType> = match level {
            Level::System => ResourceType::ALL.to_vec(),
            Level::Patient | Level::Group(_) => ResourceType::ALL
                .into_iter()
                .filter(|t| t.in_patient_compartment())
                .collect(),
        };
        let mut request = ExportRequest {
            types: Vec::new(),
            since: None,
            type_filters: BTreeMap::new(),
            patients: None,
        };
        let mut unsupported = Vec::new();
        for (name, value) in params {
            match name.as_str() {
                "_type" => {
                    for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                        let kind = export_type(t, &allowed, level)?;
                        if !request.types.contains(&kind) {
                            request.types.push(kind);
                        }
                    }
                }
                "_since" => {
                    request.since = Some(instant::parse(value).ok_or_else(|| {
                        bad(format!(
                            "_since={value:?} is not a FHIR instant; write e.g. 2024-06-01T00:00:00Z"
                        ))
                    })?);
                }
                "_typeFilter" => {
                    for filter in split_type_filters(value) {
                        let (kind, criteria) = type_filter(filter, &allowed, level, handling)?;
                        request.type_filters.entry(kind).or_default().push(criteria);
                    }
                }
                "_outputFormat" => {
                    // An unescaped `+` in a query arrives as a space; the AsyncLayer accepts
                    // `application/fhir ndjson` as NDJSON, so the export it runs must too.
                    let format = value.trim().replace(' ', "+").to_ascii_lowercase();
                    if !matches!(
                        format.as_str(),
                        "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                    ) {
                        return Err(bad(format!(
                            "_outputFormat={value:?} is not supported; use application/fhir+ndjson"
                        )));
                    }
                }
                "patient" if !matches!(level, Level::System) => {
                    let ids = value
                        .split(',')
                        .map(|r| search::patient_reference(r.trim()))
                        .filter_map(|r| r.strip_prefix("Patient/").map(str::to_owned));
                    request
                        .patients
                        .get_or_insert_with(HashSet::new)
                        .extend(ids);
                }
                // Known to bulk-data clients but not implemented here.
                _ => unsupported.push(name.clone()),
            }
        }
        if handling == Handling::Strict && !unsupported.is_empty() {
            return Err(FhirResponse::error(
                StatusCode::BAD_REQUEST,
                "not-supported",
                format!(
                    "unsupported $export parameter(s): {}; supported: _type, _since, _typeFilter, \
                     _outputFormat{}. Send `Prefer: handling=lenient` to have others ignored",
                    unsupported.join(", "),
                    if matches!(level, Level::System) {
                        ""
                    } else {
                        ", patient"
                    },
                ),
            ));
        }
        if request.types.is_empty() {
            request.types = allowed;
        }
        Ok(request)
    }

    /// Collects the matching resources now (`Arc`s only, type by type in id order), so the
    /// stream is a consistent snapshot and holds no lock while the client reads.
    fn snapshot(&self, db: &Db, level: &Level) -> Result<Vec<Arc<Stored>>, FhirResponse> {
        let mut compartment: Option<HashSet<String>> = match level {
            Level::System | Level::Patient => None,
            Level::Group(id) => Some(group_members(db, id)?),
        };
        if let Some(patients) = &self.patients {
            compartment = Some(match compartment {
                Some(members) => members.intersection(patients).cloned().collect(),
                None => patients.clone(),
            });
        }
        let patient_level = !matches!(level, Level::System);
        let mut out = Vec::new();
        for &kind in &self.types {
            let filters = self.type_filters.get(&kind);
            out.extend(db.scan(kind, |s| {
                // "Changed after _since"; `>=` so a resource written in the same millisecond
                // is exported twice rather than never.
                self.since.is_none_or(|since| s.updated >= since)
                    && (!patient_level || s.patient_id().is_some())
                    && compartment
                        .as_ref()
                        .is_none_or(|ids| s.patient_id().is_some_and(|p| ids.contains(p)))
                    && filters.is_none_or(|alternatives| {
                        alternatives.iter().any(|c| search::matches_all(c, s))
                    })
            }));
        }
        Ok(out)
    }
}

fn bad(diagnostics: String) -> FhirResponse {
    FhirResponse::error(StatusCode::BAD_REQUEST, "invalid", diagnostics)
}

fn export_type(
    name: &str,
    allowed: &[ResourceType],
    level: &Level,
) -> Result<ResourceType, FhirResponse> {
    let known: Vec<&str> = allowed.iter().map(|t| t.as_str()).collect();
    match ResourceType::parse(name) {
        Some(kind) if allowed.contains(&kind) => Ok(kind),
        Some(_) => Err(bad(format!(
            "{name} is not in the Patient compartment, so a {} export cannot return it; types here: {}",
            if matches!(level, Level::Group(_)) {
                "Group"
            } else {
                "Patient"
            },
            known.join(", ")
        ))),
        None => Err(bad(format!(
            "unknown resource type {name:?} in _type; this server exports {}",
            known.join(", ")
        ))),
    }
}

/// Splits a `_typeFilter` value into its filters. Separating commas are followed by the next
/// filter's `Type?`; commas inside a filter should arrive as `%2C`, but some clients send them
/// already decoded, so a comma not followed by `Type?` stays inside the filter.
fn split_type_filters(value: &str) -> Vec<&str> {
    let mut filters = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        let next = &value[i + 1..];
        let starts_filter = next
            .split_once('?')
            .is_some_and(|(kind, _)| ResourceType::parse(kind.trim()).is_some());
        if starts_filter {
            filters.push(&value[start..i]);
            start = i + 1;
        }
    }
    filters.push(&value[start..]);
    filters
        .into_iter()
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect()
}

/// Parses one `Type?param=value&...` filter with the search parameters of `Type`.
fn type_filter(
    filter: &str,
    allowed: &[ResourceType],
    level: &Level,
    handling: Handling,
) -> Result<(ResourceType, Vec<Criterion>), FhirResponse> {
    let Some((name, query)) = filter.split_once('?') else {
        return Err(bad(format!(
            "_typeFilter {filter:?} is not of the form Type?param=value, e.g. Observation?code=8867-4"
        )));
    };
    let kind = export_type(name.trim(), allowed, level)?;
    let (criteria, _) = search::parse_criteria(kind, &query::parse(query), handling)?;
    Ok((kind, criteria))
}

/// The patient ids a Group names in `member[].entity.reference`; 404 for an unknown Group.
fn group_members(db: &Db, id: &str) -> Result<HashSet<String>, FhirResponse> {
    let group = db.get(ResourceType::Group, id).ok_or_else(|| {
        FhirResponse::error(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no Group with id {id:?}; GET /Group lists the groups"),
        )
    })?;
    let members = group.resource["member"].as_array().into_iter().flatten();
    Ok(members
        .filter_map(|m| m["entity"]["reference"].as_str())
        .map(search::patient_reference)
        .filter_map(|r| r.strip_prefix("Patient/").map(str::to_owned))
        .collect())
}

/// One resource per line, serialised chunk by chunk as the client reads.
fn stream(snapshot: Vec<Arc<Stored>>) -> Response {
    let chunks = futures_util::stream::iter(snapshot)
        .chunks(CHUNK)
        .map(|batch| {
            let mut buf = Vec::with_capacity(batch.len() * 512);
            for stored in &batch {
                // Writing a `Value` into a `Vec` cannot fail.
                if serde_json::to_writer(&mut buf, &stored.resource).is_ok() {
                    buf.push(b'\n');
                }
            }
            Ok::<_, Infallible>(Bytes::from(buf))
        });
    let mut response = Response::new(Body::from_stream(chunks));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    response
}
