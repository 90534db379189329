//! The bulk pattern's settings, fixed when the layer is built.

use std::fmt;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path;

use crate::bulk::manifest::ManifestFormat;

/// The bulk pattern's configuration, fixed at build time.
pub(crate) struct BulkConfig {
    pub(crate) enabled: bool,
    /// Operation names (last path segment, e.g. `$export`) that take the bulk pattern even
    /// without `_outputFormat`.
    pub(crate) operations: Vec<String>,
    pub(crate) files: Arc<dyn ObjectStore>,
    /// Where in `files` the layer keeps its files: `{prefix}/{job id}/{file name}`.
    pub(crate) prefix: Path,
    pub(crate) max_file_size: u64,
    pub(crate) max_file_resources: u64,
    pub(crate) part_size: usize,
    pub(crate) open_files: usize,
    pub(crate) manifest: ManifestFormat,
    pub(crate) requires_access_token: bool,
}

impl BulkConfig {
    /// The folder of one job's files.
    pub(crate) fn job_dir(&self, id: &crate::JobId) -> Path {
        self.prefix.clone().join(id.to_string())
    }
}

impl fmt::Debug for BulkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkConfig")
            .field("enabled", &self.enabled)
            .field("operations", &self.operations)
            .field("files", &format_args!("{}", self.files))
            .field("prefix", &self.prefix.as_ref())
            .field("max_file_size", &self.max_file_size)
            .field("max_file_resources", &self.max_file_resources)
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}
