//! The state every handler shares: the database, the settings, and how the public base URL is
//! worked out for a request.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use http::header::HOST;

use crate::db::Db;
use crate::interaction::Ctx;
use crate::prefer;

pub(crate) type SharedApp = Arc<App>;

pub(crate) struct App {
    pub(crate) db: Db,
    /// `--base-url`, when given: then links never depend on what `Host` a client sent.
    pub(crate) public_base: Option<String>,
    /// `http://{bound address}/fhir`, for requests without a usable `Host`.
    pub(crate) fallback_base: String,
    pub(crate) auth: bool,
    pub(crate) reindex_duration: Duration,
}

impl App {
    /// The absolute FHIR base for links in answers to this request: `--base-url`, else
    /// `http://{Host}/fhir`.
    pub(crate) fn base(&self, headers: &HeaderMap) -> String {
        if let Some(base) = &self.public_base {
            return base.clone();
        }
        let host = headers.get(HOST).and_then(|h| h.to_str().ok());
        match host {
            // Only plain `host[:port]` makes it into links, so a crafted Host cannot inject a path.
            Some(host)
                if !host.is_empty()
                    && host.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                    }) =>
            {
                format!("http://{host}/fhir")
            }
            _ => self.fallback_base.clone(),
        }
    }

    /// The interaction context for a request; `base` must outlive it.
    pub(crate) fn ctx<'a>(&'a self, base: &'a str, headers: &HeaderMap) -> Ctx<'a> {
        Ctx {
            db: &self.db,
            base,
            prefs: prefer::read(headers),
        }
    }
}
