//! The asynchronous bulk data pattern: choosing it at kick-off ([`select`]: SEL-3…6, BULK-1…3),
//! running the export into NDJSON files ([`export`]), keeping and serving the files
//! ([`files`]: BULK-13…15, CANCEL-5, EXPIRE-2), describing them in a manifest ([`manifest`]:
//! BULK-8, BULK-9), and the answers about bulk jobs the other routes give ([`status`]: BULK-1,
//! BULK-6). Its settings are in [`config`].
//!
//! Without the `bulk` feature only [`status`] is compiled (a shared store may hold bulk jobs
//! of other instances), and `off` stands in for the rest under the same names: no request is
//! a bulk one.

#[cfg(feature = "bulk")]
mod config;
#[cfg(feature = "bulk")]
pub(crate) mod export;
#[cfg(feature = "bulk")]
pub(crate) mod files;
#[cfg(feature = "bulk")]
mod line;
#[cfg(feature = "bulk")]
mod linked;
#[cfg(feature = "bulk")]
mod manifest;
#[cfg(not(feature = "bulk"))]
mod off;
#[cfg(feature = "bulk")]
mod select;
pub(crate) mod status;

#[cfg(feature = "bulk")]
pub(crate) use config::{BulkConfig, BulkSettings};
#[cfg(feature = "bulk")]
pub use linked::UpstreamFiles;
#[cfg(feature = "bulk")]
pub use manifest::ManifestFormat;
#[cfg(not(feature = "bulk"))]
pub(crate) use off::{
    BulkConfig, BulkSettings, export, files, inner_request, is_operation_request, may_be_bulk,
    select,
};
#[cfg(feature = "bulk")]
pub(crate) use select::{inner_request, is_operation_request, may_be_bulk, select};
pub(crate) use status::prefer_required;
