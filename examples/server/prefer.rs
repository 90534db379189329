//! The `Prefer` preferences this server acts on (`return=`, `handling=`). `respond-async` is
//! not here on purpose: the AsyncLayer consumes it before a request reaches the server.

use http::HeaderMap;
use tower_fhir_async::prefer;

/// `Prefer: return=...` (FHIR RESTful API, "create/update").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Return {
    Minimal,
    #[default]
    Representation,
    OperationOutcome,
}

/// `Prefer: handling=...` (RFC 7240): what to do with search parameters we do not support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Handling {
    #[default]
    Lenient,
    Strict,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Preferences {
    pub(crate) return_: Return,
    pub(crate) handling: Handling,
}

/// Reads the `Prefer` lines with the layer's own RFC 7240 parser (several lines, quoting,
/// case); per RFC 7240 the first occurrence of a preference wins and unknown values are ignored.
pub(crate) fn read(headers: &HeaderMap) -> Preferences {
    let mut return_ = None;
    let mut handling = None;
    for preference in prefer::preferences(headers) {
        let value = preference.value();
        let value = value.as_deref();
        if preference.is("return") && return_.is_none() {
            return_ = match value {
                Some("minimal") => Some(Return::Minimal),
                Some("representation") => Some(Return::Representation),
                Some("OperationOutcome") => Some(Return::OperationOutcome),
                _ => None,
            };
        } else if preference.is("handling") && handling.is_none() {
            handling = match value {
                Some(v) if v.eq_ignore_ascii_case("strict") => Some(Handling::Strict),
                Some(v) if v.eq_ignore_ascii_case("lenient") => Some(Handling::Lenient),
                _ => None,
            };
        }
    }
    Preferences {
        return_: return_.unwrap_or_default(),
        handling: handling.unwrap_or_default(),
    }
}
