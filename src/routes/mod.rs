//! The layer's own routes under `{base}{status path}`: status (`GET`/`HEAD {id}`), cancel
//! (`DELETE {id}`), the result in redirect mode (`GET`/`HEAD {id}/result`) and bulk data files
//! (`GET`/`HEAD {id}/file/{name}`).
//!
//! The service parses the path once into an [`OwnRoute`]; [`handle`] dispatches it to its room
//! and gives a `HEAD` the headers of the `GET` answer without its body. Where exports the wrapped
//! service runs itself are linked (`UpstreamFiles::Link`), [`hand_off`] takes file paths and
//! `DELETE`s instead, and says what the wrapped service must do besides ([`Routed`]).

mod cancel;
mod file;
#[cfg(test)]
mod fixture;
mod lookup;
mod status;

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode};

use crate::audit::{self, Action};
use crate::body::OwnBody;
use crate::config::{Config, RequestHead};
use crate::follow::Native;
use crate::job::JobId;
use crate::outcome::{self, job_not_found};
use crate::state::Shared;
use crate::watcher;

/// A request path under the layer's route prefix, parsed once.
///
/// An id segment that is not a job id (malformed, empty, or a longer path such as `{id}/x`)
/// is kept as `None`: it gets the same `404` as an unknown job, without a store read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OwnRoute {
    /// The prefix itself, with or without a trailing slash: it names no job.
    Prefix,
    /// `/{id}`: a job's status URL (`GET`/`HEAD` status, `DELETE` cancel).
    Job { id: Option<JobId> },
    /// `/{id}/result`: the job's result in redirect mode (FUT-2).
    Result { id: Option<JobId> },
    /// `/{id}/file/{name}`: one of a bulk job's files (BULK-13). The name is checked against the
    /// names the layer writes before it reaches any store.
    File { id: Option<JobId>, name: String },
}

impl OwnRoute {
    /// The own route a request path names; `None` for a path outside the route prefix (a
    /// request for the wrapped service).
    pub(crate) fn of(config: &Config, path: &str) -> Option<Self> {
        config.own_route(path).map(Self::parse)
    }

    /// Parses the path after the route prefix (`""` or `/…`).
    fn parse(rest: &str) -> Self {
        let Some(rest) = rest.strip_prefix('/').filter(|r| !r.is_empty()) else {
            return Self::Prefix;
        };
        // `{id}/file/{name}` before `{id}/result`: a file route ending in `/result` is a file
        // route (and a name no job has).
        if let Some((id, tail)) = rest.split_once('/') {
            if let Some(name) = tail.strip_prefix("file/") {
                return Self::File {
                    id: JobId::parse(id),
                    name: name.to_owned(),
                };
            }
        }
        match rest.strip_suffix("/result") {
            Some(id) => Self::Result {
                id: JobId::parse(id),
            },
            None => Self::Job {
                id: JobId::parse(rest),
            },
        }
    }
}

/// Answers a request for one of the layer's own routes. A `HEAD` gets the headers of the `GET`
/// answer, with no body.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    route: OwnRoute,
    parts: Parts,
) -> Response<OwnBody> {
    // An instance that only answers polls must still notice jobs of lost instances.
    watcher::ensure(&shared);
    let is_file = matches!(route, OwnRoute::File { .. });
    let response = match route {
        OwnRoute::Prefix => outcome::no_job_named().map(OwnBody::from),
        OwnRoute::Job { id } => job(&shared, &parts, id).await.map(OwnBody::from),
        OwnRoute::Result { id } => status::result(&shared, &parts, id).await.map(OwnBody::from),
        OwnRoute::File { id, name } => file::file(&shared, &parts, id, &name).await,
    };
    head_answer(&parts.method, is_file, response)
}

/// What an own route leaves to the wrapped service where exports it runs itself are linked
/// (`UpstreamFiles::Link`): see [`hands_off`].
pub(crate) enum Routed {
    /// The layer's answer, as [`handle`] gives it.
    Answer(Response<OwnBody>),
    /// The layer's answer to the `DELETE` of a linked export, and the upstream's job to delete
    /// with it (CANCEL-5), through the wrapped service.
    Release(Response<OwnBody>, Native),
    /// A file path of no job the layer holds: the upstream's own file URL mapped onto the
    /// public base (an upstream with the same status path), for the wrapped service to answer.
    PassThrough(Parts),
}

/// Whether a request for `route` may need the wrapped service ([`hand_off`] rather than
/// [`handle`]): only where exports the wrapped service runs itself are linked, for a file path or
/// a job's `DELETE`.
pub(crate) fn hands_off(config: &Config, route: &OwnRoute, method: &Method) -> bool {
    config.bulk.links_upstream_files()
        && match route {
            OwnRoute::File { .. } => true,
            OwnRoute::Job { id: Some(_) } => *method == Method::DELETE,
            _ => false,
        }
}

/// [`handle`] for a request [`hands_off`] names: a file the layer does not hold is passed to the
/// wrapped service, and the `DELETE` of a linked export names the upstream's job to delete too.
pub(crate) async fn hand_off(shared: Arc<Shared>, route: OwnRoute, parts: Parts) -> Routed {
    match route {
        OwnRoute::File { id, name } => {
            watcher::ensure(&shared);
            match file::file_or_upstream(&shared, &parts, id, &name).await {
                Some(response) => Routed::Answer(head_answer(&parts.method, true, response)),
                None => Routed::PassThrough(parts),
            }
        }
        OwnRoute::Job { id: Some(id) } if parts.method == Method::DELETE => {
            watcher::ensure(&shared);
            let caller = shared.config.caller_of(&RequestHead::of(&parts));
            let (response, outcome, upstream) =
                cancel::cancel_linked(&shared, id, caller.as_deref(), &parts).await;
            audit::event(Action::Cancel, Some(id), caller.as_deref(), outcome);
            let response = response.map(OwnBody::from);
            match upstream {
                Some(upstream) => Routed::Release(response, upstream),
                None => Routed::Answer(response),
            }
        }
        route => Routed::Answer(handle(shared, route, parts).await),
    }
}

/// The answer as a `HEAD` gets it: without its body (its length kept), except a served file's,
/// which already has its headers (its length, or none when gzipped) and no body.
fn head_answer(
    method: &Method,
    is_file: bool,
    mut response: Response<OwnBody>,
) -> Response<OwnBody> {
    let served_file = is_file && response.status() == StatusCode::OK;
    if *method == Method::HEAD && !served_file {
        without_body(&mut response);
    }
    response
}

/// Drops a held body, keeping its length in `Content-Length`.
fn without_body(response: &mut Response<OwnBody>) {
    if let OwnBody::Full(body) = response.body_mut() {
        let length = body.len();
        *body = Bytes::new();
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
}

/// `/{id}`: the job's status (`GET`/`HEAD`) or its cancellation (`DELETE`); one audit event.
async fn job(shared: &Shared, parts: &Parts, id: Option<JobId>) -> Response<Bytes> {
    if !matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE) {
        return outcome::method_not_allowed(&parts.method, "a job status URL", "GET, HEAD, DELETE");
    }
    let action = if parts.method == Method::DELETE {
        Action::Cancel
    } else {
        Action::Status
    };
    let caller = shared.config.caller_of(&RequestHead::of(parts));
    // A malformed id, or anything below an id, never reaches the store.
    let Some(id) = id else {
        audit::event(action, None, caller.as_deref(), "malformed-id");
        return job_not_found();
    };
    let (response, outcome) = match action {
        Action::Cancel => cancel::cancel(shared, id, caller.as_deref()).await,
        _ => status::status(shared, id, parts, caller.as_deref()).await,
    };
    audit::event(action, Some(id), caller.as_deref(), outcome);
    response
}

#[cfg(test)]
mod tests {
    use http::header::{ALLOW, CONTENT_TYPE};

    use super::fixture::{self, ID};
    use super::*;

    fn parse(rest: &str) -> OwnRoute {
        OwnRoute::parse(rest)
    }

    fn id() -> Option<JobId> {
        JobId::parse(ID)
    }

    #[test]
    fn the_prefix_names_no_job() {
        assert_eq!(parse(""), OwnRoute::Prefix);
        assert_eq!(parse("/"), OwnRoute::Prefix);
    }

    #[test]
    fn a_job_id_is_parsed_once() {
        assert_eq!(parse(&format!("/{ID}")), OwnRoute::Job { id: id() });
        assert_eq!(
            parse(&format!("/{ID}/result")),
            OwnRoute::Result { id: id() }
        );
    }

    // STATUS-15: anything that is not exactly an id is a job nobody has.
    #[test]
    fn status_15_malformed_ids_and_trailing_slashes_are_no_id() {
        for rest in [
            "//",
            "/result",
            "//result",
            "/not-an-id",
            &format!("/{}", ID.to_uppercase()),
            &format!("/{ID}/"),
            &format!("/{ID}/x"),
            &format!("/{ID}x"),
        ] {
            assert!(
                matches!(
                    parse(rest),
                    OwnRoute::Job { id: None } | OwnRoute::Result { id: None }
                ),
                "{rest}: {:?}",
                parse(rest)
            );
        }
        assert_eq!(parse(&format!("/{ID}/result/")), OwnRoute::Job { id: None });
        assert_eq!(
            parse(&format!("/x/{ID}/result")),
            OwnRoute::Result { id: None }
        );
    }

    // BULK-13: `{id}/file/{name}`, the name as sent (it is checked before any store sees it).
    #[test]
    fn bulk_13_file_routes_keep_the_name() {
        assert_eq!(
            parse(&format!("/{ID}/file/Patient-1.ndjson")),
            OwnRoute::File {
                id: id(),
                name: "Patient-1.ndjson".into()
            }
        );
        assert_eq!(
            parse(&format!("/{ID}/file/")),
            OwnRoute::File {
                id: id(),
                name: String::new()
            }
        );
        assert_eq!(
            parse(&format!("/{ID}/file/../x/result")),
            OwnRoute::File {
                id: id(),
                name: "../x/result".into()
            }
        );
        assert_eq!(
            parse("/bad/file/Patient-1.ndjson"),
            OwnRoute::File {
                id: None,
                name: "Patient-1.ndjson".into()
            }
        );
        assert_eq!(parse(&format!("/{ID}/files/a")), OwnRoute::Job { id: None });
    }

    #[test]
    fn only_paths_under_the_prefix_are_own_routes() {
        let shared = fixture::shared(|b| b);
        let config = &shared.config;
        assert_eq!(
            OwnRoute::of(config, &format!("/fhir/_async/{ID}")),
            Some(OwnRoute::Job { id: id() })
        );
        assert_eq!(OwnRoute::of(config, "/fhir/_async"), Some(OwnRoute::Prefix));
        assert_eq!(OwnRoute::of(config, "/fhir/_asyncx"), None);
        assert_eq!(OwnRoute::of(config, "/fhir/Patient"), None);
    }

    #[tokio::test]
    async fn the_prefix_answers_404_with_an_outcome() {
        let shared = fixture::shared(|b| b);
        let response = handle(shared, OwnRoute::Prefix, fixture::parts(Method::GET, "")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/fhir+json");
        let body = fixture::json(response).await;
        assert_eq!(body["issue"][0]["code"], "not-found");
    }

    // STATUS-15, AMB-31: a method the status URL does not take is 405 + Allow, even for an id
    // nobody has.
    #[tokio::test]
    async fn status_15_other_methods_get_405_with_allow() {
        let shared = fixture::shared(|b| b);
        for id in [None, id()] {
            let parts = fixture::parts(Method::POST, ID);
            let response = handle(shared.clone(), OwnRoute::Job { id }, parts).await;
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(response.headers()[ALLOW], "GET, HEAD, DELETE");
        }
    }

    // CANCEL-3: a malformed id is the same 404 as an unknown one, for status and cancel alike.
    #[tokio::test]
    async fn cancel_3_malformed_ids_are_not_found() {
        let shared = fixture::shared(|b| b);
        for method in [Method::GET, Method::DELETE] {
            let parts = fixture::parts(method.clone(), "x");
            let response = handle(shared.clone(), OwnRoute::Job { id: None }, parts).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method}");
            let body = fixture::json(response).await;
            assert_eq!(body["issue"][0]["code"], "not-found");
        }
    }

    // GATEWAY-5, SEL-7: only where exports the wrapped service runs itself are linked may an own
    // route need the wrapped service: for a file path, or a job's DELETE.
    #[cfg(feature = "bulk")]
    #[test]
    fn gateway_5_only_linked_files_and_deletes_are_handed_off() {
        let file = OwnRoute::File {
            id: id(),
            name: "Patient-1.ndjson".into(),
        };
        let job = OwnRoute::Job { id: id() };
        let copying = fixture::shared(|b| b);
        let linking = fixture::shared(|b| b.upstream_export_files(crate::UpstreamFiles::Link));
        for method in [Method::GET, Method::DELETE] {
            assert!(!hands_off(&copying.config, &file, &method));
            assert!(!hands_off(&copying.config, &job, &method));
            assert!(hands_off(&linking.config, &file, &method));
        }
        assert!(hands_off(&linking.config, &job, &Method::DELETE));
        assert!(!hands_off(&linking.config, &job, &Method::GET));
        assert!(!hands_off(
            &linking.config,
            &OwnRoute::Job { id: None },
            &Method::DELETE
        ));
        assert!(!hands_off(
            &linking.config,
            &OwnRoute::Prefix,
            &Method::DELETE
        ));
    }

    // GATEWAY-5, BULK-13: linked, a file path of no job the layer holds (an unknown id, a
    // malformed one) is passed on, the request as it came; a job the layer holds answers itself.
    #[cfg(feature = "bulk")]
    #[tokio::test]
    async fn gateway_5_a_file_of_no_job_here_is_passed_on() {
        let shared = fixture::shared(|b| b.upstream_export_files(crate::UpstreamFiles::Link));
        let rest = format!("{ID}/file/Patient-1.ndjson");
        for id in [id(), None] {
            let route = OwnRoute::File {
                id,
                name: "Patient-1.ndjson".into(),
            };
            let parts = fixture::parts(Method::GET, &rest);
            match hand_off(shared.clone(), route, parts).await {
                Routed::PassThrough(parts) => {
                    assert_eq!(parts.uri.path(), format!("/fhir/_async/{rest}"));
                }
                _ => panic!("a file of no job here is passed on ({id:?})"),
            }
        }
        let record = fixture::record(
            &shared,
            crate::job::JobKind::Interaction,
            crate::job::JobState::Accepted,
        );
        fixture::put(&shared, record).await;
        let route = OwnRoute::File {
            id: id(),
            name: "Patient-1.ndjson".into(),
        };
        match hand_off(shared, route, fixture::parts(Method::GET, &rest)).await {
            Routed::Answer(response) => assert_eq!(response.status(), StatusCode::NOT_FOUND),
            _ => panic!("a job the layer holds is answered by the layer"),
        }
    }

    // A HEAD has the GET answer's headers and no body; its length stays in Content-Length.
    #[tokio::test]
    async fn head_keeps_the_length_and_drops_the_body() {
        let shared = fixture::shared(|b| b);
        let get = handle(
            shared.clone(),
            OwnRoute::Job { id: None },
            fixture::parts(Method::GET, "x"),
        )
        .await;
        let length = fixture::bytes(get).await.len();
        assert!(length > 0);
        let head = handle(
            shared,
            OwnRoute::Job { id: None },
            fixture::parts(Method::HEAD, "x"),
        )
        .await;
        assert_eq!(head.status(), StatusCode::NOT_FOUND);
        assert_eq!(head.headers()[CONTENT_LENGTH], length.to_string().as_str());
        assert!(fixture::bytes(head).await.is_empty());
    }
}
