//! Type-level search: the parameters each type supports, matching, and paging into a
//! `searchset` Bundle. `$export`'s `_typeFilter` reuses the same criteria.

use http::StatusCode;
use serde_json::{Value, json};

use crate::db::{Db, ResourceType, Stored};
use crate::prefer::Handling;
use crate::query::{self, Params};
use crate::response::FhirResponse;

pub(crate) const DEFAULT_COUNT: usize = 50;
pub(crate) const MAX_COUNT: usize = 1000;

/// A supported search parameter: name, FHIR search type, and what it matches. The
/// CapabilityStatement is built from this same table, so it never advertises what search
/// cannot do.
pub(crate) struct ParamSpec {
    pub(crate) name: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) documentation: &'static str,
}

const ID: ParamSpec = ParamSpec {
    name: "_id",
    kind: "token",
    documentation: "Logical id; comma-separated for any of several",
};
const PATIENT_PARAMS: &[ParamSpec] = &[
    ID,
    ParamSpec {
        name: "name",
        kind: "string",
        documentation: "Starts with (case-insensitive) any family or given name; :exact and :contains supported",
    },
    ParamSpec {
        name: "gender",
        kind: "token",
        documentation: "male | female | other | unknown",
    },
];
const CLINICAL_PARAMS: &[ParamSpec] = &[
    ID,
    ParamSpec {
        name: "patient",
        kind: "reference",
        documentation: "The subject patient: `p-1`, `Patient/p-1` or an absolute URL",
    },
    ParamSpec {
        name: "subject",
        kind: "reference",
        documentation: "Same as patient",
    },
    ParamSpec {
        name: "code",
        kind: "token",
        documentation: "`code`, `system|code`, `|code` or `system|`",
    },
];

pub(crate) fn params(kind: ResourceType) -> &'static [ParamSpec] {
    match kind {
        ResourceType::Patient => PATIENT_PARAMS,
        ResourceType::Observation | ResourceType::Condition => CLINICAL_PARAMS,
        ResourceType::Group => std::slice::from_ref(&ID),
    }
}

/// One parsed search parameter; a resource must satisfy all of them (AND), and one of each
/// parameter's comma-separated values (OR).
#[derive(Debug)]
pub(crate) enum Criterion {
    Id(Vec<String>),
    Name(NameMatch, Vec<String>),
    Gender(Vec<String>),
    /// Normalised to `Patient/{id}`.
    Patient(Vec<String>),
    Code(Vec<(Option<String>, Option<String>)>),
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum NameMatch {
    StartsWith,
    Exact,
    Contains,
}

/// A parsed type-level search.
#[derive(Debug)]
pub(crate) struct Search {
    pub(crate) kind: ResourceType,
    pub(crate) criteria: Vec<Criterion>,
    pub(crate) count: usize,
    pub(crate) offset: usize,
    /// The parameters that took effect, echoed in the `self` and `next` links.
    applied: Params,
}

/// Parses search parameters for `kind`. Unknown parameters are skipped under
/// `handling=lenient` and rejected with a 400 under `handling=strict`; malformed values of known
/// parameters are always rejected.
pub(crate) fn parse(
    kind: ResourceType,
    params: &[(String, String)],
    handling: Handling,
) -> Result<Search, FhirResponse> {
    let mut count = DEFAULT_COUNT;
    let mut offset = 0;
    let mut rest = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "_count" => count = number(name, value)?.min(MAX_COUNT),
            "_offset" => offset = number(name, value)?,
            // JSON is all we speak; `_pretty` only changes whitespace.
            "_format" | "_pretty" => {}
            _ => rest.push((name.clone(), value.clone())),
        }
    }
    let (criteria, applied) = parse_criteria(kind, &rest, handling)?;
    Ok(Search {
        kind,
        criteria,
        count,
        offset,
        applied,
    })
}

/// Parses the filtering parameters only (no paging): the form `_typeFilter` queries take.
pub(crate) fn parse_criteria(
    kind: ResourceType,
    params: &[(String, String)],
    handling: Handling,
) -> Result<(Vec<Criterion>, Params), FhirResponse> {
    let mut criteria = Vec::new();
    let mut applied = Vec::new();
    let mut unknown = Vec::new();
    for (name, value) in params {
        let (base, modifier) = match name.split_once(':') {
            Some((base, modifier)) => (base, Some(modifier)),
            None => (name.as_str(), None),
        };
        let values: Vec<String> = value
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect();
        let criterion = match (kind, base, modifier) {
            // FHIR: a parameter with an empty value is ignored.
            _ if values.is_empty() => continue,
            (_, "_id", None) => Criterion::Id(values),
            (ResourceType::Patient, "name", modifier) => {
                let how = match modifier {
                    None => NameMatch::StartsWith,
                    Some("exact") => NameMatch::Exact,
                    Some("contains") => NameMatch::Contains,
                    Some(_) => {
                        unknown.push(name.clone());
                        continue;
                    }
                };
                let values = match how {
                    NameMatch::Exact => values,
                    _ => values.iter().map(|v| v.to_lowercase()).collect(),
                };
                Criterion::Name(how, values)
            }
            (ResourceType::Patient, "gender", None) => Criterion::Gender(values),
            (
                ResourceType::Observation | ResourceType::Condition,
                "patient" | "subject",
                None | Some("Patient"),
            ) => Criterion::Patient(values.iter().map(|v| patient_reference(v)).collect()),
            (ResourceType::Observation | ResourceType::Condition, "code", None) => {
                Criterion::Code(values.iter().map(|v| token(v)).collect())
            }
            _ => {
                unknown.push(name.clone());
                continue;
            }
        };
        criteria.push(criterion);
        applied.push((name.clone(), value.clone()));
    }
    if handling == Handling::Strict && !unknown.is_empty() {
        let supported: Vec<&str> = params_of(kind);
        return Err(FhirResponse::error(
            StatusCode::BAD_REQUEST,
            "not-supported",
            format!(
                "unknown search parameter(s) for {}: {}; supported: {}, _count, _offset. \
                 Remove them, or send `Prefer: handling=lenient` to have them ignored",
                kind.as_str(),
                unknown.join(", "),
                supported.join(", "),
            ),
        ));
    }
    Ok((criteria, applied))
}

fn params_of(kind: ResourceType) -> Vec<&'static str> {
    params(kind).iter().map(|p| p.name).collect()
}

fn number(name: &str, value: &str) -> Result<usize, FhirResponse> {
    value.trim().parse().map_err(|_| {
        FhirResponse::error(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{name}={value:?} is not a non-negative whole number"),
        )
    })
}

/// `p-1`, `Patient/p-1` and `http://host/fhir/Patient/p-1` all name the same patient.
pub(crate) fn patient_reference(value: &str) -> String {
    let mut segments = value.trim_end_matches('/').rsplit('/');
    let id = segments.next().unwrap_or_default();
    match segments.next() {
        Some(kind) => format!("{kind}/{id}"),
        None => format!("Patient/{id}"),
    }
}

fn token(value: &str) -> (Option<String>, Option<String>) {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    match value.split_once('|') {
        // `|code` means "no system", which we treat as "any system": the data always has one.
        Some((system, code)) => (non_empty(system), non_empty(code)),
        None => (None, non_empty(value)),
    }
}

impl Criterion {
    pub(crate) fn matches(&self, stored: &Stored) -> bool {
        let r = &stored.resource;
        match self {
            Criterion::Id(ids) => ids.contains(&stored.id),
            Criterion::Name(how, values) => {
                let names = r["name"].as_array().into_iter().flatten().flat_map(|n| {
                    let given = n["given"].as_array().into_iter().flatten();
                    [&n["family"], &n["text"]]
                        .into_iter()
                        .chain(given)
                        .filter_map(Value::as_str)
                });
                let names: Vec<&str> = names.collect();
                values.iter().any(|v| {
                    names.iter().any(|name| match how {
                        NameMatch::Exact => name == v,
                        NameMatch::StartsWith => name.to_lowercase().starts_with(v.as_str()),
                        NameMatch::Contains => name.to_lowercase().contains(v.as_str()),
                    })
                })
            }
            Criterion::Gender(values) => r["gender"]
                .as_str()
                .is_some_and(|g| values.iter().any(|v| v == g)),
            Criterion::Patient(refs) => r["subject"]["reference"]
                .as_str()
                .is_some_and(|s| refs.iter().any(|v| v == s)),
            Criterion::Code(tokens) => {
                let codings = r["code"]["coding"].as_array();
                codings.into_iter().flatten().any(|coding| {
                    tokens.iter().any(|(system, code)| {
                        system.as_deref().is_none_or(|s| coding["system"] == s)
                            && code.as_deref().is_none_or(|c| coding["code"] == c)
                    })
                })
            }
        }
    }
}

pub(crate) fn matches_all(criteria: &[Criterion], stored: &Stored) -> bool {
    criteria.iter().all(|c| c.matches(stored))
}

/// Runs a search and renders one page as a `searchset` Bundle with absolute links under `base`.
pub(crate) fn run(db: &Db, search: &Search, base: &str) -> Value {
    let matches = db.scan(search.kind, |s| matches_all(&search.criteria, s));
    let total = matches.len();
    let page = matches.iter().skip(search.offset).take(search.count);
    let entries: Vec<Value> = page
        .map(|s| {
            json!({
                "fullUrl": format!("{base}/{}", s.reference()),
                "resource": s.resource,
                "search": { "mode": "match" },
            })
        })
        .collect();
    let mut links =
        vec![json!({ "relation": "self", "url": page_url(search, base, search.offset) })];
    let next = search.offset.saturating_add(search.count);
    if search.count > 0 && next < total {
        links.push(json!({ "relation": "next", "url": page_url(search, base, next) }));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
    });
    // FHIR JSON has no empty arrays.
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    bundle
}

fn page_url(search: &Search, base: &str, offset: usize) -> String {
    let mut pairs = search.applied.clone();
    pairs.push(("_count".into(), search.count.to_string()));
    if offset > 0 {
        pairs.push(("_offset".into(), offset.to_string()));
    }
    format!("{base}/{}?{}", search.kind.as_str(), query::encode(&pairs))
}
