//! What every clone of the service shares: the configuration, the job runner, the quotas and
//! the poll throttle.

use std::sync::Arc;

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
}
