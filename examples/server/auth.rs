//! `--auth`: a stand-in for a real authorization layer. It sits outside the AsyncLayer, so
//! kick-offs, polls, cancels and file downloads are all authenticated, and it leaves the caller's
//! subject in the request extensions, where the layer and the handlers can see it.
//!
//! The demo accepts any bearer token and names its client after the token without keeping it:
//! the subject is `client-` and the first 16 hex digits of the token's SHA-256, so one token is
//! always one client, and the subject can be logged and stored without giving the token away
//! (SEC-10: jobs are bound to a principal, never to the credential). A real server verifies the
//! token and takes the subject from its claims (`sub`, `client_id`).

use std::fmt::Write as _;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use sha2::{Digest, Sha256};

use crate::response::FhirResponse;

/// The client's subject, derived from its bearer token by [`subject_of`]; not a secret. The
/// AsyncLayer binds each job to it (`caller_from_extension` in `main.rs`), and keeps only its
/// keyed digest.
#[derive(Debug, Clone)]
pub(crate) struct CallerId(pub(crate) String);

/// `client-` and the first 16 hex digits of SHA-256 of `token`: the same token always names the
/// same client, and the name reveals nothing of the token.
pub(crate) fn subject_of(token: &str) -> String {
    let hash = Sha256::digest(token.as_bytes());
    let mut subject = String::from("client-");
    for byte in &hash[..8] {
        // Writing to a String cannot fail.
        let _ = write!(subject, "{byte:02x}");
    }
    subject
}

/// Rejects requests without a bearer token: 401, OperationOutcome `login`,
/// `WWW-Authenticate: Bearer`.
pub(crate) async fn require_bearer(mut request: Request, next: Next) -> Response {
    let subject = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|token| !token.is_empty())
        .map(subject_of);
    match subject {
        Some(subject) => {
            request.extensions_mut().insert(CallerId(subject));
            next.run(request).await
        }
        None => {
            let mut response = FhirResponse::error(
                StatusCode::UNAUTHORIZED,
                "login",
                "this server was started with --auth: send `Authorization: Bearer <token>`",
            )
            .into_response();
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // SEC-10: one token is one client; different tokens are different clients; the subject
    // holds nothing of the token.
    #[test]
    fn sec_10_subjects_name_tokens_without_holding_them() {
        let alice = subject_of("alice-token-secret");
        assert_eq!(alice, subject_of("alice-token-secret"));
        assert_ne!(alice, subject_of("bob-token-secret"));
        assert_eq!(alice.len(), "client-".len() + 16);
        assert!(alice.starts_with("client-") && !alice.contains("secret"));
        // SHA-256("abc") starts with ba7816bf8f01cfea.
        assert_eq!(subject_of("abc"), "client-ba7816bf8f01cfea");
    }
}
