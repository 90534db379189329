//! What every clone of the service shares: the configuration, the job runner, the quotas and
//! the poll throttle.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::admission::Quotas;
use crate::config::Config;
use crate::runner::Runner;
use crate::throttle::PollThrottle;

/// What every clone of the service shares: configuration and the job runner.
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) runner: Arc<Runner>,
    pub(crate) quotas: Arc<Quotas>,
    pub(crate) polls: Option<PollThrottle>,
    /// Whether a kick-off outside the base path was reported (once per layer).
    pub(crate) outside_base_reported: AtomicBool,
}

impl Shared {
    /// Reports, once, a kick-off whose path is outside the base path: the layer then sees paths
    /// without the prefix its status URLs carry (it sits inside `Router::nest`, say), so those
    /// URLs will never reach it and every client polls a `404`.
    pub(crate) fn check_under_base(&self, path: &str) {
        let base = self.config.base_path.as_str();
        let under = path
            .strip_prefix(base)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if under || self.outside_base_reported.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(
            path,
            base_path = base,
            "a request was accepted to run asynchronously, but its path is outside the layer's \
             base path, so the status URL given to the client will not reach the layer (it \
             answers 404). The layer must see whole paths: put it around the router that holds \
             the full routes (Router::layer on the outermost router), not inside \
             Router::nest(prefix, inner.layer(..)) or as a route_layer; or fix base_url. \
             Reported once."
        );
    }
}
