//! The bulk pattern compiled out (the `bulk` feature off): the names the request path uses,
//! answering that no request is a bulk one. `$export` and requests with `_outputFormat` are then
//! ordinary requests: passed through, or run as interaction jobs with `Prefer: respond-async`,
//! their parameters forwarded untouched. A bulk job recorded by an instance built with the
//! feature (in a shared store) still answers its status polls; this instance serves none of its
//! files.

use bytes::Bytes;
use http::Uri;
use http::request::Parts;

/// What a build without the bulk pattern keeps of its configuration.
#[derive(Debug)]
pub(crate) struct BulkConfig {
    /// Always `false`: no kick-off takes the bulk pattern.
    pub(crate) enabled: bool,
    /// Always `true`: a file request still passes the caller check before it is answered `404`.
    pub(crate) requires_access_token: bool,
}

/// The builder's bulk settings: there are none without the feature.
#[derive(Debug, Default)]
pub(crate) struct BulkSettings {}

impl BulkConfig {
    /// Always `false`: no export runs, so none is linked.
    pub(crate) fn links_upstream_files(&self) -> bool {
        false
    }
}

impl BulkSettings {
    /// Always succeeds: nothing to check.
    pub(crate) fn check(self) -> Result<BulkConfig, String> {
        Ok(BulkConfig {
            enabled: false,
            requires_access_token: true,
        })
    }
}

/// No value: without the feature no kick-off takes the bulk pattern, so no export is ever run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExportParams {
    never: Never,
}

/// No value: nothing refuses a kick-off for bulk reasons.
#[derive(Debug)]
pub(crate) struct Refusal {
    never: Never,
}

impl Refusal {
    pub(crate) fn response(&self) -> http::Response<Bytes> {
        match self.never {}
    }
}

/// Private, so that other modules do not see `ExportParams` and `Refusal` as empty and keep
/// their code paths for them as they are with the feature.
#[derive(Debug, Clone, Copy)]
enum Never {}

/// No request is a bulk operation.
pub(crate) fn is_operation_request(_config: &BulkConfig, _uri: &Uri) -> bool {
    false
}

/// No kick-off may take the bulk pattern.
pub(crate) fn may_be_bulk(_config: &BulkConfig, _uri: &Uri) -> bool {
    false
}

/// Every kick-off takes the interaction pattern, its `_outputFormat` (if any) left to the
/// wrapped service.
pub(crate) fn select(
    _config: &BulkConfig,
    _parts: &Parts,
    _body: &[u8],
) -> Result<Option<ExportParams>, Refusal> {
    Ok(None)
}

/// The request as it came: the layer claims no parameters of its own.
pub(crate) fn inner_request(_config: &BulkConfig, _parts: &mut Parts, body: Bytes) -> Bytes {
    body
}

/// Running an export: never, as there are no [`ExportParams`].
pub(crate) mod export {
    use http::{Request, Response};

    use super::ExportParams;
    use crate::body::RequestBody;
    use crate::clock::Clock;
    use crate::config::Config;
    use crate::context::JobShared;
    use crate::job::JobOutcome;

    /// What a bulk job would need besides its request; it cannot be made without the feature.
    #[derive(Debug, Clone)]
    #[expect(dead_code, reason = "read by the export, which this build leaves out")]
    pub(crate) struct ExportSpec {
        pub(crate) params: ExportParams,
        pub(crate) status_url: String,
        pub(crate) request_url: String,
        pub(crate) public_base: String,
    }

    /// Never called: an [`ExportSpec`] cannot exist.
    pub(crate) async fn execute<S, ReqB, ResB>(
        _layer: &Config,
        _clock: Clock,
        _job: &JobShared,
        spec: ExportSpec,
        _inner: S,
        _request: Request<RequestBody<ReqB>>,
    ) -> JobOutcome
    where
        S: tower_service::Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    {
        match spec.params.never {}
    }
}

/// Bulk data files: this build writes none, lists none and serves none.
pub(crate) mod files {
    use http::{HeaderMap, Response};

    use super::BulkConfig;
    use crate::BoxError;
    use crate::body::OwnBody;
    use crate::job::JobId;

    /// Nothing to remove: this build writes no files.
    pub(crate) async fn remove_job(_config: &BulkConfig, _id: &JobId) {}

    /// No job folders: this build has no file store.
    pub(crate) async fn job_dirs(_config: &BulkConfig) -> Result<Vec<JobId>, BoxError> {
        Ok(Vec::new())
    }

    /// No name is one of this build's files, so every file request is answered `404` before
    /// the job store is read.
    pub(crate) fn is_file_name(_name: &str) -> bool {
        false
    }

    /// No file exists.
    pub(crate) async fn serve(
        _config: &BulkConfig,
        _id: &JobId,
        _name: &str,
        _headers: &HeaderMap,
        _head_only: bool,
    ) -> Result<Option<Response<OwnBody>>, BoxError> {
        Ok(None)
    }
}
