//! `--auth`: a stand-in for a real authorization layer. It sits outside the AsyncLayer, so
//! kick-offs, polls, cancels and file downloads are all authenticated, and it leaves the caller's
//! identity in the request extensions, where the layer and the handlers can see it.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};

use crate::response::FhirResponse;

/// The client id taken from `Authorization: Bearer <client-id>`. The demo trusts the token as
/// is; a real server would verify it and take the id from its claims. The AsyncLayer binds each
/// job to it (`caller_from_extension` in `main.rs`).
#[derive(Debug, Clone)]
pub(crate) struct CallerId(pub(crate) String);

/// Rejects requests without a bearer token: 401, OperationOutcome `login`,
/// `WWW-Authenticate: Bearer`.
pub(crate) async fn require_bearer(mut request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|token| !token.is_empty())
        .map(str::to_owned);
    match token {
        Some(token) => {
            request.extensions_mut().insert(CallerId(token));
            next.run(request).await
        }
        None => {
            let mut response = FhirResponse::error(
                StatusCode::UNAUTHORIZED,
                "login",
                "this server was started with --auth: send `Authorization: Bearer <client-id>`",
            )
            .into_response();
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}
