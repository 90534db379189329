//! The bulk pattern's settings: as the builder collects them ([`BulkSettings`]) and as the
//! layer keeps them once checked ([`BulkConfig`]).

use std::fmt;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path;

use crate::bulk::linked::UpstreamFiles;
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
    /// What becomes of the files of an export the wrapped service runs itself.
    pub(crate) upstream_files: UpstreamFiles,
}

impl BulkConfig {
    /// Whether exports the wrapped service runs itself are linked, not copied: then file
    /// requests under the route prefix for jobs the layer does not hold go to the wrapped
    /// service, and a `DELETE` of a linked export deletes the upstream's job too.
    pub(crate) fn links_upstream_files(&self) -> bool {
        self.upstream_files == UpstreamFiles::Link
    }

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
            .field("upstream_files", &self.upstream_files)
            .finish_non_exhaustive()
    }
}

/// The bulk settings of [`AsyncLayerBuilder`](crate::AsyncLayerBuilder), as set; see its
/// setters for what each means and its default.
pub(crate) struct BulkSettings {
    pub(crate) enabled: bool,
    pub(crate) operations: Vec<String>,
    pub(crate) file_store: Option<Arc<dyn ObjectStore>>,
    pub(crate) file_prefix: String,
    pub(crate) max_file_size: u64,
    pub(crate) max_file_resources: u64,
    pub(crate) file_part_size: usize,
    pub(crate) max_open_files: usize,
    pub(crate) manifest_format: ManifestFormat,
    pub(crate) requires_access_token: bool,
    pub(crate) upstream_files: UpstreamFiles,
}

impl Default for BulkSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            operations: vec!["$export".to_owned()],
            file_store: None,
            file_prefix: "fhir-async".to_owned(),
            max_file_size: 64 * 1024 * 1024,
            max_file_resources: 100_000,
            file_part_size: 5 * 1024 * 1024,
            max_open_files: 4,
            manifest_format: ManifestFormat::Stu2,
            requires_access_token: true,
            upstream_files: UpstreamFiles::Copy,
        }
    }
}

/// The smallest part of a multipart upload S3 accepts (all but the last part of a file).
const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

impl BulkSettings {
    /// Checks the settings; the error names the setting that is wrong.
    pub(crate) fn check(self) -> Result<BulkConfig, String> {
        for (name, value) in [
            ("max_file_size", self.max_file_size),
            ("max_file_resources", self.max_file_resources),
            ("file_part_size", self.file_part_size as u64),
            ("max_open_files", self.max_open_files as u64),
        ] {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.file_part_size < MIN_PART_SIZE {
            return Err(format!(
                "file_part_size must be at least 5 MiB ({MIN_PART_SIZE} bytes), not {}: S3 and \
                 S3-compatible stores refuse smaller parts of a multipart upload (a file larger \
                 than one part would fail when completed)",
                self.file_part_size
            ));
        }
        let prefix = Path::parse(self.file_prefix.trim_matches('/'))
            .ok()
            .filter(|prefix| prefix.parts().count() > 0)
            .ok_or_else(|| {
                format!(
                    "file_prefix must be a non-empty object store path, not {:?}",
                    self.file_prefix
                )
            })?;
        Ok(BulkConfig {
            enabled: self.enabled,
            operations: self.operations,
            files: self
                .file_store
                .unwrap_or_else(|| Arc::new(object_store::memory::InMemory::new())),
            prefix,
            max_file_size: self.max_file_size,
            max_file_resources: self.max_file_resources,
            part_size: self.file_part_size,
            open_files: self.max_open_files,
            manifest: self.manifest_format,
            requires_access_token: self.requires_access_token,
            upstream_files: self.upstream_files,
        })
    }
}
