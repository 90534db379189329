//! [`AsyncLayer`]: the entry. It assembles the parts; nothing inside the crate imports it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::builder::AsyncLayerBuilder;
use crate::bulk::files;
use crate::config::BuildError;
use crate::service::AsyncService;
use crate::shutdown::ShutdownHandle;
use crate::state::Shared;
use crate::store::{Bounded, JobStore};

/// Adds the FHIR asynchronous request patterns to the service it wraps.
///
/// A request with `Prefer: respond-async` that the layer finds eligible is recorded in the job
/// store, answered at once with `202 Accepted` and an absolute `Content-Location` status URL, and
/// replayed to the inner service in the background. The layer serves the status (`GET`/`HEAD`)
/// and cancel (`DELETE`) routes under `{base path}{status path}/` itself. Every other request
/// passes through untouched.
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_fhir_async::{AsyncLayer, MemoryStore};
///
/// # async fn fhir(_: http::Request<tower_fhir_async::RequestBody<String>>)
/// #     -> Result<http::Response<String>, std::convert::Infallible> { unimplemented!() }
/// let layer = AsyncLayer::builder(MemoryStore::default())
///     .base_url("https://fhir.example.org/fhir")
///     .retention(Duration::from_secs(24 * 3600))
///     .build();
/// let service = ServiceBuilder::new().layer(layer).service_fn(fhir);
/// # drop(service);
/// ```
#[derive(Clone)]
pub struct AsyncLayer {
    pub(crate) shared: Arc<Shared>,
}

impl AsyncLayer {
    /// Starts configuring a layer that keeps its jobs in `store`.
    pub fn builder<S: JobStore>(store: S) -> AsyncLayerBuilder {
        AsyncLayerBuilder::new(Box::new(move |limit| Arc::new(Bounded { store, limit })))
    }

    /// A layer with the default configuration, keeping its jobs in `store`.
    pub fn new<S: JobStore>(store: S) -> Self {
        Self::builder(store).build()
    }

    /// A handle to shut the layer down gracefully (see [`ShutdownHandle::shutdown`]).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle::new(self.shared.clone())
    }

    /// A task that deletes expired jobs from the store every `every`, to reclaim space, and the
    /// bulk data files of jobs that expired, failed or were cancelled (EXPIRE-2). Spawn it once;
    /// it runs until dropped or aborted. Expired jobs and their files are never served either
    /// way.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// # let layer = tower_fhir_async::AsyncLayer::new(tower_fhir_async::MemoryStore::default());
    /// let sweeper = tokio::spawn(layer.sweeper(std::time::Duration::from_secs(60)));
    /// # sweeper.abort();
    /// # }
    /// ```
    pub fn sweeper(&self, every: Duration) -> impl Future<Output = ()> + Send + 'static {
        let shared = self.shared.clone();
        let every = every.max(Duration::from_millis(1));
        async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let runner = &shared.runner;
                if let Some(polls) = &shared.polls {
                    polls.prune(tokio::time::Instant::now());
                }
                match runner.store.sweep(runner.clock.now()).await {
                    Ok(0) => {}
                    Ok(swept) => tracing::debug!(swept, "swept expired asynchronous jobs"),
                    Err(error) => {
                        tracing::warn!(%error, "sweeping expired asynchronous jobs failed")
                    }
                }
                sweep_files(&shared).await;
            }
        }
    }
}

/// Removes the file folders of bulk jobs that are gone (expired, cancelled) or failed; a
/// completed job keeps its files until it expires, a running one is still writing them.
async fn sweep_files(shared: &Shared) {
    let bulk = &shared.config.bulk;
    let ids = match files::job_dirs(bulk).await {
        Ok(ids) => ids,
        Err(error) => {
            tracing::warn!(%error, "listing bulk data files failed");
            return;
        }
    };
    let runner = &shared.runner;
    for id in ids {
        match runner.store.get(&id, runner.clock.now()).await {
            Ok(Some(record)) if !matches!(record.state, crate::JobState::Failed(_)) => {}
            Ok(_) => files::remove_job(bulk, &id).await,
            Err(error) => {
                tracing::warn!(%error, "reading a job while sweeping its files failed");
                return;
            }
        }
    }
}

impl AsyncLayerBuilder {
    /// Builds the layer.
    ///
    /// # Panics
    ///
    /// When the configuration is invalid; [`try_build`](Self::try_build) returns the error instead.
    pub fn build(self) -> AsyncLayer {
        match self.try_build() {
            Ok(layer) => layer,
            Err(error) => panic!("invalid AsyncLayer configuration: {error}"),
        }
    }

    /// Builds the layer, or says which setting is invalid.
    pub fn try_build(self) -> Result<AsyncLayer, BuildError> {
        self.assemble().map(|shared| AsyncLayer { shared })
    }
}

impl<S> Layer<S> for AsyncLayer {
    type Service = AsyncService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AsyncService::new(inner, self.shared.clone())
    }
}

impl fmt::Debug for AsyncLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}
