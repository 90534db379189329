//! The asynchronous bulk data pattern: choosing it at kick-off ([`select`]: SEL-3…6, BULK-1…3),
//! running the export into NDJSON files ([`export`]), keeping and serving the files
//! ([`files`]: BULK-13…15, CANCEL-5, EXPIRE-2), describing them in a manifest ([`manifest`]:
//! BULK-8, BULK-9), and the answers about bulk jobs the other routes give ([`status`]: BULK-1,
//! BULK-6). Its settings are in [`config`].

mod config;
pub(crate) mod export;
pub(crate) mod files;
mod manifest;
mod select;
pub(crate) mod status;

pub(crate) use config::BulkConfig;
pub use manifest::ManifestFormat;
pub(crate) use select::{inner_request, is_operation_request, may_be_bulk, select};
pub(crate) use status::prefer_required;
