//! A job's NDJSON files in the object store: writing them with bounded memory while an export
//! runs, serving them (BULK-13…15), and removing them (CANCEL-5, EXPIRE-2).

use std::collections::HashMap;
use std::sync::Arc;

use async_compression::tokio::bufread::GzipEncoder;
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, VARY,
};
use http::{HeaderMap, HeaderValue, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::BoxError;
use crate::body::OwnBody;
use crate::bulk::config::BulkConfig;
use crate::bulk::manifest::{FileEntry, NDJSON};
use crate::bulk::select::ExportParams;
use crate::job::JobId;
use crate::media;
use crate::outcome::NO_STORE;

/// Lines are gathered into chunks of this size before they go to an object store writer, so a
/// writer holds a few large buffers rather than a buffer per line.
const STAGE: usize = 64 * 1024;

/// Parts of one file in flight to the object store at once, besides the one being filled.
const PARTS_IN_FLIGHT: usize = 1;

/// The name under which a file's lines are grouped: a resource type, or the error files.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Group {
    Type(String),
    Errors,
}

impl Group {
    /// Whether this is the group of `resource_type` (`None`: the error files), without
    /// allocating.
    fn is(&self, resource_type: Option<&str>) -> bool {
        match (self, resource_type) {
            (Self::Type(name), Some(other)) => name == other,
            (Self::Errors, None) => true,
            _ => false,
        }
    }
}

struct OpenFile {
    group: Group,
    entry: FileEntry,
    writer: BufWriter,
    staged: BytesMut,
}

/// The files of one running export. At most `open_files` files are open at once (the least
/// recently written is closed to make room), each buffering at most one part plus
/// [`PARTS_IN_FLIGHT`] part in flight, so memory stays bounded whatever the export's size.
///
/// Dropped before [`finish`](Self::finish) (a cancelled, failed or stopped export), it aborts
/// its uploads and removes every file it wrote, in the background.
pub(crate) struct FileSet {
    store: Arc<dyn ObjectStore>,
    dir: Path,
    max_bytes: u64,
    max_count: u64,
    part_size: usize,
    open_files: usize,
    open: Vec<OpenFile>,
    closed: Vec<FileEntry>,
    numbers: HashMap<Group, u32>,
    /// Resources written, error lines not counted.
    written: u64,
    finished: bool,
}

impl FileSet {
    pub(crate) fn new(config: &BulkConfig, id: &JobId, params: &ExportParams) -> Self {
        // BULK-3: never above the client's maximum; files are filled to the maximum, so the
        // client's minimum holds except for the last file of a type.
        let max_bytes = params
            .max_file_size
            .map_or(config.max_file_size, |max| max.min(config.max_file_size));
        Self {
            store: config.files.clone(),
            dir: config.job_dir(id),
            max_bytes,
            max_count: config.max_file_resources,
            part_size: config.part_size,
            open_files: config.open_files,
            open: Vec::new(),
            closed: Vec::new(),
            numbers: HashMap::new(),
            written: 0,
            finished: false,
        }
    }

    /// Appends one resource (one line, without its newline) to a file of `resource_type`.
    pub(crate) async fn write(&mut self, resource_type: &str, line: &[u8]) -> Result<(), BoxError> {
        self.append(Some(resource_type), line, None).await?;
        self.written += 1;
        Ok(())
    }

    /// Appends one OperationOutcome (one line) to the error files, counted under `severity`.
    pub(crate) async fn write_error(
        &mut self,
        severity: &str,
        line: &[u8],
    ) -> Result<(), BoxError> {
        self.append(None, line, Some(severity)).await
    }

    /// Resources written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Appends a line to the open file of `resource_type` (`None`: the error files).
    async fn append(
        &mut self,
        resource_type: Option<&str>,
        line: &[u8],
        severity: Option<&str>,
    ) -> Result<(), BoxError> {
        let length = line.len() as u64 + 1;
        let mut index = self.open.iter().position(|f| f.group.is(resource_type));
        if let Some(i) = index {
            let entry = &self.open[i].entry;
            // BULK-3: a resource that does not fit starts the next file; one larger than the
            // maximum gets a file of its own (an allowed deviation).
            if entry.count > 0
                && (entry.size + length > self.max_bytes || entry.count >= self.max_count)
            {
                let file = self.open.remove(i);
                self.close(file).await?;
                index = None;
            }
        }
        let i = match index {
            Some(i) => i,
            None => {
                if self.open.len() >= self.open_files {
                    let file = self.open.remove(0);
                    self.close(file).await?;
                }
                let group =
                    resource_type.map_or(Group::Errors, |name| Group::Type(name.to_owned()));
                let file = self.create(group);
                self.open.push(file);
                self.open.len() - 1
            }
        };
        // Least recently written first: move this file to the end.
        if i + 1 != self.open.len() {
            let file = self.open.remove(i);
            self.open.push(file);
        }
        let Some(file) = self.open.last_mut() else {
            return Ok(());
        };
        if !file.staged.is_empty() && file.staged.len() + line.len() + 1 > STAGE {
            // Chunks of a fixed size: a frozen chunk keeps its whole allocation, so it must
            // not be one grown by doubling.
            let chunk = std::mem::replace(&mut file.staged, BytesMut::with_capacity(STAGE));
            file.writer.put(chunk.freeze()).await?;
        }
        file.staged.extend_from_slice(line);
        file.staged.extend_from_slice(b"\n");
        file.entry.count += 1;
        file.entry.size += length;
        if let Some(severity) = severity {
            match file
                .entry
                .severities
                .iter_mut()
                .find(|(code, _)| code == severity)
            {
                Some((_, count)) => *count += 1,
                None => file.entry.severities.push((severity.to_owned(), 1)),
            }
        }
        Ok(())
    }

    fn create(&mut self, group: Group) -> OpenFile {
        let number = self.numbers.entry(group.clone()).or_insert(0);
        *number += 1;
        let (name, resource_type, error) = match &group {
            Group::Type(name) => (format!("{name}-{number}.ndjson"), name.clone(), false),
            Group::Errors => (
                format!("errors-{number}.ndjson"),
                "OperationOutcome".to_owned(),
                true,
            ),
        };
        let path = self.dir.clone().join(name.as_str());
        let writer = BufWriter::with_capacity(self.store.clone(), path, self.part_size)
            .with_max_concurrency(PARTS_IN_FLIGHT);
        OpenFile {
            group,
            entry: FileEntry {
                name,
                resource_type,
                count: 0,
                size: 0,
                error,
                severities: Vec::new(),
            },
            writer,
            staged: BytesMut::with_capacity(STAGE),
        }
    }

    async fn close(&mut self, mut file: OpenFile) -> Result<(), BoxError> {
        if !file.staged.is_empty() {
            file.writer.put(file.staged.split().freeze()).await?;
        }
        file.writer.shutdown().await?;
        self.closed.push(file.entry);
        Ok(())
    }

    /// Closes every file; the export's files, ordered by type and number, errors last.
    pub(crate) async fn finish(mut self) -> Result<Vec<FileEntry>, BoxError> {
        while let Some(file) = self.open.pop() {
            self.close(file).await?;
        }
        self.finished = true;
        let mut files = std::mem::take(&mut self.closed);
        files.sort_by(|a, b| {
            (a.error, &a.resource_type, number_of(&a.name)).cmp(&(
                b.error,
                &b.resource_type,
                number_of(&b.name),
            ))
        });
        Ok(files)
    }
}

fn number_of(name: &str) -> u32 {
    name.rsplit('-')
        .next()
        .and_then(|n| n.strip_suffix(".ndjson"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl Drop for FileSet {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let open = std::mem::take(&mut self.open);
        let store = self.store.clone();
        let dir = self.dir.clone();
        runtime.spawn(async move {
            for mut file in open {
                if let Err(error) = file.writer.abort().await {
                    tracing::debug!(%error, "aborting an unfinished bulk data file failed");
                }
            }
            if let Err(error) = remove_dir(&*store, &dir).await {
                tracing::warn!(%error, "removing an unfinished export's files failed");
            }
        });
    }
}

/// Removes every object under `dir`. An object already gone (another cleanup got there first)
/// counts as removed; other failures do not stop the rest, and the last one is returned.
pub(crate) async fn remove_dir(store: &dyn ObjectStore, dir: &Path) -> Result<usize, BoxError> {
    let locations = store.list(Some(dir)).map_ok(|meta| meta.location).boxed();
    let mut results = store.delete_stream(locations);
    let mut removed = 0;
    let mut failure = None;
    while let Some(result) = results.next().await {
        match result {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => removed += 1,
            Err(error) => failure = Some(error),
        }
    }
    match failure {
        Some(error) => Err(error.into()),
        None => Ok(removed),
    }
}

/// Removes a job's files (CANCEL-5, EXPIRE-2); failures are logged, the sweeper retries.
pub(crate) async fn remove_job(config: &BulkConfig, id: &JobId) {
    match remove_dir(&*config.files, &config.job_dir(id)).await {
        Ok(0) => {}
        Ok(removed) => tracing::debug!(job.id = %id, removed, "removed a bulk job's files"),
        Err(error) => tracing::warn!(job.id = %id, %error, "removing a bulk job's files failed"),
    }
}

/// The job folders present in the file store (for the sweeper).
pub(crate) async fn job_dirs(config: &BulkConfig) -> Result<Vec<JobId>, BoxError> {
    let listing = config
        .files
        .list_with_delimiter(Some(&config.prefix))
        .await?;
    Ok(listing
        .common_prefixes
        .iter()
        .filter_map(|dir| dir.filename().and_then(JobId::parse))
        .collect())
}

/// Whether `name` can be the name of a file this layer wrote: `{ResourceType}-{n}.ndjson` or
/// `errors-{n}.ndjson`. Anything else (`..`, slashes, encodings) never reaches the store.
pub(crate) fn is_file_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".ndjson") else {
        return false;
    };
    let Some((group, number)) = stem.rsplit_once('-') else {
        return false;
    };
    let number_ok = !number.is_empty()
        && number.len() <= 9
        && number.bytes().all(|b| b.is_ascii_digit())
        && !number.starts_with('0');
    number_ok && (group == "errors" || is_resource_type(group))
}

/// A FHIR resource type name: an upper-case ASCII letter, then up to 63 ASCII letters.
pub(crate) fn is_resource_type(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_uppercase()
        && bytes.iter().all(u8::is_ascii_alphabetic)
}

/// BULK-15: whether `Accept-Encoding` admits gzip (by name, or by `*`) with a non-zero quality.
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    for coding in headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let (name, quality) = media::weighted(coding);
        let Some(quality) = quality else { continue };
        match name.as_str() {
            "gzip" | "x-gzip" => gzip = Some(quality > 0.0),
            "*" => any = Some(quality > 0.0),
            _ => {}
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// Streams one file (BULK-13): `application/fhir+ndjson`, gzip when asked (BULK-15); `None`
/// when the file does not exist.
pub(crate) async fn serve(
    config: &BulkConfig,
    id: &JobId,
    name: &str,
    headers: &HeaderMap,
    head_only: bool,
) -> Result<Option<Response<OwnBody>>, BoxError> {
    let path = config.job_dir(id).join(name);
    let file = match config.files.get(&path).await {
        Ok(file) => file,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let size = file.meta.size;
    let gzip = accepts_gzip(headers);
    let mut response = Response::new(OwnBody::Full(Bytes::new()));
    let out = response.headers_mut();
    out.insert(CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    out.insert(CACHE_CONTROL, NO_STORE);
    out.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
    if gzip {
        out.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    } else {
        out.insert(CONTENT_LENGTH, HeaderValue::from(size));
    }
    if head_only {
        return Ok(Some(response));
    }
    let chunks = file.into_stream().map_err(std::io::Error::other);
    let body = if gzip {
        let encoded = ReaderStream::new(GzipEncoder::new(StreamReader::new(chunks)));
        StreamBody::new(encoded.map_ok(Frame::data).map_err(BoxError::from)).boxed_unsync()
    } else {
        StreamBody::new(chunks.map_ok(Frame::data).map_err(BoxError::from)).boxed_unsync()
    };
    *response.body_mut() = OwnBody::Stream(body);
    Ok(Some(response))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bulk::manifest::ManifestFormat;
    use object_store::memory::InMemory;

    fn config(
        store: Arc<InMemory>,
        max_bytes: u64,
        max_count: u64,
        open_files: usize,
    ) -> BulkConfig {
        BulkConfig {
            enabled: true,
            operations: vec!["$export".into()],
            files: store,
            prefix: Path::from("jobs"),
            max_file_size: max_bytes,
            max_file_resources: max_count,
            part_size: 5 << 20,
            open_files,
            manifest: ManifestFormat::Stu2,
            requires_access_token: true,
            upstream_files: crate::bulk::UpstreamFiles::Copy,
        }
    }

    async fn read(store: &InMemory, path: &str) -> String {
        let bytes = store
            .get(&Path::from(path))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    // BULK-3, BULK-9: files split at the size and count limits, one type per file, exact counts.
    #[tokio::test]
    async fn bulk_3_files_split_at_limits() {
        let store = Arc::new(InMemory::new());
        let id = JobId::new();
        let config = config(store.clone(), 40, 3, 4);
        let mut files = FileSet::new(&config, &id, &ExportParams::default());
        for i in 0..5 {
            files
                .write("Patient", format!(r#"{{"id":"{i}"}}"#).as_bytes())
                .await
                .unwrap();
        }
        files.write("Observation", b"{}").await.unwrap();
        files.write("Patient", &[b'x'; 100]).await.unwrap();
        files.write_error("warning", b"{}").await.unwrap();
        assert_eq!(files.written(), 7);
        let entries = files.finish().await.unwrap();
        let names: Vec<(&str, u64)> = entries.iter().map(|e| (e.name.as_str(), e.count)).collect();
        assert_eq!(
            names,
            [
                ("Observation-1.ndjson", 1),
                ("Patient-1.ndjson", 3),
                ("Patient-2.ndjson", 2),
                ("Patient-3.ndjson", 1),
                ("errors-1.ndjson", 1)
            ]
        );
        let dir = format!("jobs/{id}");
        assert_eq!(
            read(&store, &format!("{dir}/Patient-1.ndjson")).await,
            "{\"id\":\"0\"}\n{\"id\":\"1\"}\n{\"id\":\"2\"}\n"
        );
        assert_eq!(entries[3].size, 101);
        assert_eq!(entries[4].severities, [("warning".to_owned(), 1)]);
    }

    // BULK-3: the client's maximum lowers the server's, never raises it.
    #[tokio::test]
    async fn bulk_3_client_maximum() {
        let store = Arc::new(InMemory::new());
        let config = config(store, 1000, 1000, 4);
        let params = ExportParams {
            max_file_size: Some(10),
            min_file_size: None,
        };
        let mut files = FileSet::new(&config, &JobId::new(), &params);
        for _ in 0..3 {
            files.write("Patient", b"12345678").await.unwrap();
        }
        assert_eq!(files.finish().await.unwrap().len(), 3);
    }

    // Bounded memory: with more types than open files, the least recently written is closed.
    #[tokio::test]
    async fn at_most_open_files_are_open() {
        let store = Arc::new(InMemory::new());
        let config = config(store, 1 << 20, 1 << 20, 2);
        let mut files = FileSet::new(&config, &JobId::new(), &ExportParams::default());
        for kind in ["A", "B", "A", "C", "B"] {
            files.write(kind, b"{}").await.unwrap();
            assert!(files.open.len() <= 2);
        }
        let names: Vec<String> = files
            .finish()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(
            names,
            ["A-1.ndjson", "B-1.ndjson", "B-2.ndjson", "C-1.ndjson"]
        );
    }

    // CANCEL-5: an export dropped before it finished leaves no files behind.
    #[tokio::test]
    async fn cancel_5_dropped_export_removes_its_files() {
        let store = Arc::new(InMemory::new());
        let id = JobId::new();
        let config = config(store.clone(), 10, 1000, 4);
        let mut files = FileSet::new(&config, &id, &ExportParams::default());
        for _ in 0..5 {
            files.write("Patient", b"12345678").await.unwrap();
        }
        drop(files);
        for _ in 0..100 {
            tokio::task::yield_now().await;
            if store.list(None).next().await.is_none() {
                return;
            }
        }
        panic!("files of a dropped export were left behind");
    }

    // BULK-13, CANCEL-7: only names this layer writes are ever looked up.
    #[test]
    fn file_names_are_strict() {
        for ok in [
            "Patient-1.ndjson",
            "errors-12.ndjson",
            "MedicationRequest-999.ndjson",
        ] {
            assert!(is_file_name(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            "../x",
            "Patient-1.ndjson/..",
            "Patient-0.ndjson",
            "Patient-01.ndjson",
            "patient-1.ndjson",
            "Patient-.ndjson",
            "Patient-1.json",
            "Pat ient-1.ndjson",
            "Patient-1.ndjson%00",
            "Patient%2F-1.ndjson",
            "-1.ndjson",
            "Patient-1234567890.ndjson",
        ] {
            assert!(!is_file_name(bad), "{bad}");
        }
    }

    // BULK-15: gzip when named or covered by `*`, never with q=0.
    #[test]
    fn bulk_15_accept_encoding() {
        let check = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
            accepts_gzip(&headers)
        };
        assert!(check("gzip"));
        assert!(check("gzip, deflate, br, identity"));
        assert!(check("br;q=1.0, GZIP;q=0.5"));
        assert!(check("*"));
        assert!(!check("identity"));
        assert!(!check("gzip;q=0"));
        assert!(!check("*, gzip;q=0"));
        assert!(!check("br"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
