//! The completion manifest of a bulk job (BULK-8, BULK-9), in the form the layer is set to.

use bytes::Bytes;
use serde_json::{Map, Value};

/// The NDJSON media type of every file (BULK-2, BULK-13).
pub(crate) const NDJSON: &str = "application/fhir+ndjson";

/// One file of a finished export, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileEntry {
    /// The file's name under the job (`Patient-1.ndjson`, `errors-1.ndjson`).
    pub(crate) name: String,
    /// The resource type of every line; `OperationOutcome` for error files.
    pub(crate) resource_type: String,
    /// Lines (resources) in the file.
    pub(crate) count: u64,
    /// Bytes in the file.
    pub(crate) size: u64,
    /// Whether this is an error file (BULK-7).
    pub(crate) error: bool,
    /// Lines per issue severity, for error files (BD4 `countSeverity`).
    pub(crate) severities: Vec<(String, u64)>,
}

/// Which form of the bulk data manifest a completed export is described in (BULK-9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ManifestFormat {
    /// The form of FHIR R5 and Bulk Data STU2/STU3, which every published client reads:
    /// `transactionTime`, `request`, `requiresAccessToken`, `output[]` (`type`, `url`, `count`)
    /// and `error[]`.
    #[default]
    Stu2,
    /// The Bulk Data STU4 ballot's `BulkDataManifest`: `manifestType`, `outputFormat`,
    /// `fileSize` per file, and `outcome[]` (with `countSeverity`) instead of `error[]`; no
    /// `request`.
    Stu4Ballot,
}

/// What the manifest says about the export besides its files.
pub(crate) struct ManifestHead<'a> {
    pub(crate) transaction_time: std::time::SystemTime,
    /// The kick-off's full URL (BULK-9 `request`).
    pub(crate) request: &'a str,
    /// The job's status URL; file URLs are `{status_url}/file/{name}`.
    pub(crate) status_url: &'a str,
    pub(crate) requires_access_token: bool,
}

/// BULK-9: the manifest, in the configured form.
pub(crate) fn manifest(
    format: ManifestFormat,
    head: &ManifestHead<'_>,
    files: &[FileEntry],
) -> Bytes {
    let url = |file: &FileEntry| format!("{}/file/{}", head.status_url, file.name);
    let mut manifest = Map::new();
    let (output, errors): (Vec<&FileEntry>, Vec<&FileEntry>) = files.iter().partition(|f| !f.error);
    match format {
        ManifestFormat::Stu2 => {
            manifest.insert(
                "transactionTime".into(),
                instant_millis(head.transaction_time).into(),
            );
            manifest.insert("request".into(), head.request.into());
            manifest.insert(
                "requiresAccessToken".into(),
                head.requires_access_token.into(),
            );
            let item = |file: &&FileEntry| serde_json::json!({ "type": file.resource_type, "url": url(file), "count": file.count });
            manifest.insert("output".into(), output.iter().map(item).collect());
            manifest.insert("error".into(), errors.iter().map(item).collect());
        }
        ManifestFormat::Stu4Ballot => {
            manifest.insert(
                "manifestType".into(),
                "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest".into(),
            );
            manifest.insert(
                "transactionTime".into(),
                instant_millis(head.transaction_time).into(),
            );
            manifest.insert(
                "requiresAccessToken".into(),
                head.requires_access_token.into(),
            );
            manifest.insert("outputFormat".into(), NDJSON.into());
            let output_items = output.iter().map(|file| {
                serde_json::json!({
                    "type": file.resource_type, "url": url(file), "count": file.count, "fileSize": file.size,
                })
            });
            manifest.insert("output".into(), output_items.collect());
            let outcome_items = errors.iter().map(|file| {
                let severities: Vec<Value> = file
                    .severities
                    .iter()
                    .map(|(code, count)| serde_json::json!({ "code": code, "count": count }))
                    .collect();
                serde_json::json!({
                    "url": url(file), "count": file.count, "fileSize": file.size, "countSeverity": severities,
                })
            });
            manifest.insert("outcome".into(), outcome_items.collect());
        }
    }
    Bytes::from(Value::Object(manifest).to_string())
}

/// A FHIR `instant` with milliseconds, UTC.
fn instant_millis(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<FileEntry> {
        vec![
            FileEntry {
                name: "Patient-1.ndjson".into(),
                resource_type: "Patient".into(),
                count: 3,
                size: 300,
                error: false,
                severities: vec![],
            },
            FileEntry {
                name: "errors-1.ndjson".into(),
                resource_type: "OperationOutcome".into(),
                count: 1,
                size: 120,
                error: true,
                severities: vec![("error".into(), 1)],
            },
        ]
    }

    // BULK-9: both manifest forms, with absolute file URLs and no `resourceType`.
    #[test]
    fn bulk_9_manifest_forms() {
        let head = ManifestHead {
            transaction_time: std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(1_772_441_998_123),
            request: "https://x.org/fhir/$export",
            status_url: "https://x.org/fhir/_async/abc",
            requires_access_token: true,
        };
        let stu2: Value =
            serde_json::from_slice(&manifest(ManifestFormat::Stu2, &head, &files())).unwrap();
        assert_eq!(stu2["transactionTime"], "2026-03-02T08:59:58.123Z");
        assert_eq!(stu2["request"], "https://x.org/fhir/$export");
        assert_eq!(stu2["requiresAccessToken"], true);
        assert_eq!(
            stu2["output"][0]["url"],
            "https://x.org/fhir/_async/abc/file/Patient-1.ndjson"
        );
        assert_eq!(stu2["output"][0]["type"], "Patient");
        assert_eq!(stu2["output"][0]["count"], 3);
        assert_eq!(stu2["error"][0]["type"], "OperationOutcome");
        assert!(stu2.get("resourceType").is_none());

        let stu4: Value =
            serde_json::from_slice(&manifest(ManifestFormat::Stu4Ballot, &head, &files())).unwrap();
        assert!(stu4.get("request").is_none());
        assert!(stu4.get("error").is_none());
        assert_eq!(stu4["outputFormat"], NDJSON);
        assert_eq!(stu4["output"][0]["fileSize"], 300);
        assert_eq!(stu4["outcome"][0]["countSeverity"][0]["code"], "error");
    }
}
