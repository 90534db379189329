//! Running a bulk job: the kick-off request through the wrapped service, its NDJSON body split
//! line by line, or its search Bundles paged through `next` links, into NDJSON files per
//! resource type; then the manifest (BULK-5…10).

use std::borrow::Cow;
use std::hash::BuildHasher;
use std::pin::pin;

use bytes::Bytes;
use http::header::{self, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::BoxError;
use crate::body::RequestBody;
use crate::bulk::files::{FileSet, is_resource_type};
use crate::bulk::line;
use crate::bulk::linked::{self, UpstreamFiles};
use crate::bulk::manifest::{FileEntry, ManifestHead, manifest};
use crate::bulk::select::ExportParams;
use crate::clock::Clock;
use crate::config::Config;
use crate::context::JobShared;
use crate::encoding;
use crate::follow;
use crate::inner::{Inner, call};
use crate::job::{JobOutcome, StoredResponse};
use crate::media;
use crate::origins::Origins;
use crate::outcome::synthesized;
use crate::outcome::{IssueCode, operation_outcome};

/// How often (in resources) progress is reported.
const PROGRESS_EVERY: u64 = 1000;

/// What a bulk job needs besides its request.
#[derive(Debug, Clone)]
pub(crate) struct ExportSpec {
    pub(crate) params: ExportParams,
    /// The job's status URL, the base of its file URLs.
    pub(crate) status_url: String,
    /// The kick-off's full URL, for the manifest's `request`.
    pub(crate) request_url: String,
    /// The public FHIR base URL the job was started under; `next` links under it are followed.
    pub(crate) public_base: String,
}

/// Runs one export to its outcome: the manifest (`200`, `application/json`, BULK-8), or a
/// failure as status + OperationOutcome (BULK-6).
pub(crate) async fn execute<S, ReqB>(
    layer: &Config,
    clock: Clock,
    job: &JobShared,
    spec: ExportSpec,
    inner: S,
    request: Request<RequestBody<ReqB>>,
) -> JobOutcome
where
    S: Inner<ReqB>,
    ReqB: Send + 'static,
{
    let config = &layer.bulk;
    // BULK-9: the time the query runs; the wrapped service answers from here on.
    let transaction_time = clock.now();
    let mut export = Export {
        files: FileSet::new(config, &job.id, &spec.params),
        job,
        line_limit: layer.result_limit,
        total: None,
        reported: 0,
        upstream_files: config.upstream_files,
    };
    let origins = Origins::new(layer, &spec.public_base);
    let ran = match export.run(inner, request, &origins).await {
        Ok(ran) => ran,
        Err(failure) => return JobOutcome::Failed(failure),
    };
    let Export { files, .. } = export;
    let entries: Vec<FileEntry> = match files.finish().await {
        Ok(entries) => entries,
        Err(error) => return JobOutcome::Failed(write_failed(&error)),
    };
    if let Ran::Linked(manifest) = ran {
        // Nothing was written: the upstream's manifest is the result.
        return JobOutcome::Completed(manifest);
    }
    let head = ManifestHead {
        transaction_time,
        request: &spec.request_url,
        status_url: &spec.status_url,
        requires_access_token: config.requires_access_token,
    };
    JobOutcome::Completed(StoredResponse {
        status: StatusCode::OK,
        headers: vec![(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        )],
        body: manifest(config.manifest, &head, &entries),
    })
}

struct Export<'a> {
    files: FileSet,
    job: &'a JobShared,
    /// The longest line, and the largest Bundle page, read.
    line_limit: usize,
    /// `Bundle.total` of the first page, when given.
    total: Option<u64>,
    /// Resources written when progress was last reported.
    reported: u64,
    /// What becomes of the files of an export the wrapped service runs itself.
    upstream_files: UpstreamFiles,
}

/// How an export ended well.
enum Ran {
    /// Its files are written: the manifest lists them.
    Files,
    /// The wrapped service ran it itself, and its manifest is the result (`UpstreamFiles::Link`).
    Linked(StoredResponse),
}

/// How the wrapped service's answer is read.
enum Format {
    Ndjson,
    Json,
}

impl Export<'_> {
    /// Pages through the result. `Err` fails the whole job; problems after the first page are
    /// written to the error file instead (partial success, BULK-7).
    async fn run<S, ReqB>(
        &mut self,
        mut inner: S,
        request: Request<RequestBody<ReqB>>,
        origins: &Origins<'_>,
    ) -> Result<Ran, StoredResponse>
    where
        S: Inner<ReqB>,
        ReqB: Send + 'static,
    {
        // Later pages are GETs with the kick-off's headers (its credentials) and extensions.
        let mut headers = request.headers().clone();
        headers.remove(header::CONTENT_TYPE);
        headers.remove(header::CONTENT_LENGTH);
        let extensions = request.extensions().clone();
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|a| a.to_string()));

        let first = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned());
        let mut next = Some(request);
        let mut page = 0u64;
        // Hashes of the `next` links followed (a page count's worth of `u64`s).
        let mut followed = std::collections::HashSet::new();
        let hasher = std::hash::RandomState::new();
        followed.extend(first.map(|first| hasher.hash_one(first)));
        while let Some(request) = next.take() {
            page += 1;
            let target = request.uri().path().to_owned();
            let response = match call(&mut inner, request).await {
                Ok(response) => response,
                Err(error) => {
                    let why = format!(
                        "The FHIR server could not process page {page} of the export: {error}"
                    );
                    return self
                        .page_failed(page, StatusCode::BAD_GATEWAY, IssueCode::Exception, &why)
                        .await
                        .map(|()| Ran::Files);
                }
            };
            // GATEWAY-5: a wrapped service that runs the export itself (`202` + `Content-Location`)
            // is followed to its manifest, and its files are copied in, or its manifest adopted.
            if page == 1 {
                match follow::Native::of(&response, &headers, &extensions, origins) {
                    None => {}
                    Some(Ok(native)) if self.upstream_files == UpstreamFiles::Link => {
                        drop(response);
                        return self
                            .link_native(native, inner, origins)
                            .await
                            .map(Ran::Linked);
                    }
                    Some(Ok(native)) => {
                        drop(response);
                        let followed = self
                            .adopt_native(
                                native,
                                inner,
                                origins,
                                host.as_deref(),
                                &headers,
                                &extensions,
                            )
                            .await;
                        self.report();
                        return followed.map(|()| Ran::Files);
                    }
                    Some(Err(why)) => {
                        return Err(synthesized(
                            StatusCode::BAD_GATEWAY,
                            IssueCode::Exception,
                            &why,
                        ));
                    }
                }
            }
            // GATEWAY-4: a compressed page is read as what it encodes.
            let (mut head, body) = response.into_parts();
            let response = match encoding::decoded(&mut head.headers, body) {
                Ok(body) => Response::from_parts(head, body),
                Err(why) => {
                    let why = format!("Page {page} of the export cannot be read: {why}.");
                    return self
                        .page_failed(page, StatusCode::BAD_GATEWAY, IssueCode::NotSupported, &why)
                        .await
                        .map(|()| Ran::Files);
                }
            };
            let status = response.status();
            if page == 1 {
                self.job.set_head(status);
            }
            if !status.is_success() {
                if page == 1 {
                    return Err(upstream_failure(response, self.line_limit).await);
                }
                let why = format!(
                    "Page {page} of the export ({target}) failed with status {status}; the export stops there."
                );
                return self
                    .page_failed(page, status, IssueCode::for_status(status), &why)
                    .await
                    .map(|()| Ran::Files);
            }
            let format = match response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
            {
                None => Format::Json,
                Some(value) => match media::essence(value).as_str() {
                    ndjson if media::is_ndjson(ndjson) => Format::Ndjson,
                    json if media::is_json(json) => Format::Json,
                    other => {
                        let why = format!(
                            "Page {page} of the export is {other}, neither NDJSON nor a FHIR JSON Bundle; it cannot be \
                             exported."
                        );
                        return self
                            .page_failed(
                                page,
                                StatusCode::BAD_GATEWAY,
                                IssueCode::NotSupported,
                                &why,
                            )
                            .await
                            .map(|()| Ran::Files);
                    }
                },
            };
            let link = match format {
                Format::Ndjson => {
                    self.lines(response.into_body()).await?;
                    None
                }
                Format::Json => self.bundle(page, response.into_body()).await?,
            };
            let Some(link) = link else { break };
            match origins.inner_uri(&link, host.as_deref()) {
                // Links that lead back to a page already read would go round forever.
                Ok(uri) if !followed.insert(hasher.hash_one(uri.to_string())) => {
                    self.error(&format!(
                        "Page {page} links back to a page already read; the export stops there."
                    ))
                    .await?;
                }
                Ok(uri) => {
                    let mut request = Request::new(RequestBody::buffered(Bytes::new()));
                    *request.method_mut() = Method::GET;
                    *request.uri_mut() = uri;
                    *request.headers_mut() = headers.clone();
                    *request.extensions_mut() = extensions.clone();
                    next = Some(request);
                }
                Err(why) => {
                    self.error(&format!("The next page after page {page} cannot be fetched: {why}; the export stops there."))
                        .await?;
                }
            }
        }
        self.report();
        Ok(Ran::Files)
    }

    /// Follows the wrapped service's own asynchronous export to its manifest (polling its
    /// status URL, cancelling it if this job is cancelled) and copies every file it lists, output
    /// and error, into this export's files, as NDJSON pages (GATEWAY-5).
    async fn adopt_native<S, ReqB>(
        &mut self,
        native: follow::Native,
        mut inner: S,
        origins: &Origins<'_>,
        host: Option<&str>,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<(), StoredResponse>
    where
        S: Inner<ReqB>,
        ReqB: Send + 'static,
    {
        let (_, body) = self.native_manifest(&native, &mut inner).await?;
        let manifest: NativeManifest = serde_json::from_slice(&body).map_err(|error| {
            synthesized(
                StatusCode::BAD_GATEWAY,
                IssueCode::Exception,
                &format!("The FHIR server's export completed without a readable manifest: {error}"),
            )
        })?;
        for file in manifest.output.iter().chain(&manifest.error) {
            let uri = match origins.inner_uri(&file.url, host) {
                Ok(uri) => uri,
                Err(why) => {
                    self.error(&format!(
                        "A file of the FHIR server's export cannot be fetched: {why}; it is left out."
                    ))
                    .await?;
                    continue;
                }
            };
            let mut request = Request::new(RequestBody::buffered(Bytes::new()));
            *request.uri_mut() = uri;
            *request.headers_mut() = headers.clone();
            request.headers_mut().insert(
                header::ACCEPT,
                http::HeaderValue::from_static("application/fhir+ndjson"),
            );
            *request.extensions_mut() = extensions.clone();
            let response = match call(&mut inner, request).await {
                Ok(response) if response.status().is_success() => response,
                Ok(response) => {
                    let status = response.status();
                    self.error(&format!(
                        "A file of the FHIR server's export ({}) answered {status}; it is left out.",
                        file.kind
                    ))
                    .await?;
                    continue;
                }
                Err(error) => {
                    self.error(&format!(
                        "A file of the FHIR server's export ({}) could not be fetched: {error}; it is left out.",
                        file.kind
                    ))
                    .await?;
                    continue;
                }
            };
            let (mut head, body) = response.into_parts();
            match encoding::decoded(&mut head.headers, body) {
                Ok(body) => self.lines(body).await?,
                Err(why) => {
                    self.error(&format!(
                        "A file of the FHIR server's export cannot be read: {why}."
                    ))
                    .await?
                }
            }
        }
        Ok(())
    }

    /// Follows the wrapped service's own asynchronous export to its manifest (polling its
    /// status URL, cancelling it if this job is cancelled) and adopts that manifest as the job's
    /// result, once checked; nothing is copied (`UpstreamFiles::Link`, GATEWAY-5).
    async fn link_native<S, ReqB>(
        &mut self,
        native: follow::Native,
        mut inner: S,
        origins: &Origins<'_>,
    ) -> Result<StoredResponse, StoredResponse>
    where
        S: Inner<ReqB>,
        ReqB: Send + 'static,
    {
        let (headers, body) = self.native_manifest(&native, &mut inner).await?;
        linked::adopt(body, origins, native.status(), headers.get(header::EXPIRES))
    }

    /// Polls the wrapped service's own export to its end (sending it a `DELETE` if this job is
    /// dropped meanwhile) and reads its final answer whole: the manifest's headers and body, or
    /// the job's failure.
    async fn native_manifest<S, ReqB>(
        &mut self,
        native: &follow::Native,
        inner: &mut S,
    ) -> Result<(http::HeaderMap, Bytes), StoredResponse>
    where
        S: Inner<ReqB>,
        ReqB: Send + 'static,
    {
        let cancel = native.cancel_on_drop(inner.clone());
        let last = native.poll(inner, self.job).await.map_err(|error| {
            synthesized(
                StatusCode::BAD_GATEWAY,
                IssueCode::Exception,
                &format!("Following the FHIR server's own export failed: {error}"),
            )
        })?;
        cancel.disarm();
        self.job.set_head(last.status());
        if !last.status().is_success() {
            return Err(upstream_failure(last, self.line_limit).await);
        }
        let (mut head, body) = last.into_parts();
        let body = encoding::decoded(&mut head.headers, body)
            .map_err(|why| synthesized(StatusCode::BAD_GATEWAY, IssueCode::NotSupported, &why))?;
        match Limited::new(body, self.line_limit).collect().await {
            Ok(collected) => Ok((head.headers, collected.to_bytes())),
            Err(error) => Err(synthesized(
                StatusCode::BAD_GATEWAY,
                IssueCode::Exception,
                &format!("The FHIR server's export manifest could not be read: {error}"),
            )),
        }
    }

    /// A page that could not be read: the whole job fails on the first page, later pages
    /// become an error entry (BULK-6, BULK-7).
    async fn page_failed(
        &mut self,
        page: u64,
        status: StatusCode,
        code: IssueCode,
        why: &str,
    ) -> Result<(), StoredResponse> {
        if page == 1 {
            Err(synthesized(status, code, why))
        } else {
            self.error(why).await
        }
    }

    /// Splits an NDJSON body into resources, line by line, never holding more than one line.
    /// Lines inside a frame are read where they are; only a line split across frames is copied.
    async fn lines<B>(&mut self, body: B) -> Result<(), StoredResponse>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        /// A line buffer larger than this is given back after use.
        const KEEP: usize = 1 << 20;
        let mut body = pin!(body);
        // The start of a line whose end has not arrived yet.
        let mut partial: Vec<u8> = Vec::new();
        let mut line = 0u64;
        // Inside a line longer than the limit: its bytes are dropped up to its end.
        let mut skipping = false;
        loop {
            // The body's error need not be `Send`: it is converted before anything else waits.
            let next = body
                .frame()
                .await
                .map(|r| r.map_err(Into::<BoxError>::into));
            let frame = match next {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    let why =
                        format!("The export's NDJSON stream broke off after {line} lines: {error}");
                    return self.error(&why).await;
                }
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let mut rest: &[u8] = &data;
            while let Some(at) = memchr::memchr(b'\n', rest) {
                let head = &rest[..at];
                rest = &rest[at + 1..];
                line += 1;
                if std::mem::take(&mut skipping) {
                    continue;
                }
                if partial.len() + head.len() > self.line_limit {
                    partial.clear();
                    self.too_long(line).await?;
                } else if partial.is_empty() {
                    self.resource_line(line, head).await?;
                } else {
                    partial.extend_from_slice(head);
                    let whole = std::mem::take(&mut partial);
                    self.resource_line(line, &whole).await?;
                    if whole.capacity() <= KEEP {
                        partial = whole;
                        partial.clear();
                    }
                }
            }
            if skipping {
                continue;
            }
            if partial.len() + rest.len() > self.line_limit {
                partial = Vec::new();
                skipping = true;
                self.too_long(line + 1).await?;
                continue;
            }
            partial.extend_from_slice(rest);
        }
        if !partial.is_empty() && !skipping {
            self.resource_line(line + 1, &partial).await?;
        }
        Ok(())
    }

    async fn too_long(&mut self, line: u64) -> Result<(), StoredResponse> {
        let why = format!(
            "Line {line} of the export is longer than {} bytes and was left out.",
            self.line_limit
        );
        self.error(&why).await
    }

    /// One NDJSON line: a resource for its type's file, an OperationOutcome for the error file,
    /// or an error entry if it is not a resource.
    async fn resource_line(&mut self, number: u64, line: &[u8]) -> Result<(), StoredResponse> {
        // An export whose input is always ready must still let other tasks run, and notice a
        // cancel: a cooperative yield every so many lines.
        tokio::task::coop::consume_budget().await;
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        // The scanner accepts well-formed resources; anything else is read by serde_json,
        // whose message says what is wrong.
        if let Some(resource_type) = line::resource_type(line) {
            return self.resource(resource_type, line).await;
        }
        match serde_json::from_slice::<ResourceType<'_>>(line) {
            Ok(head) => self.resource(&head.resource_type, line).await,
            Err(error) => {
                self.error(&format!(
                    "Line {number} of the export is not a FHIR resource in JSON: {error}"
                ))
                .await
            }
        }
    }

    /// A JSON page: a searchset Bundle's entries (and its `next` link), or one resource.
    async fn bundle<B>(&mut self, page: u64, body: B) -> Result<Option<String>, StoredResponse>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let body = match Limited::new(body, self.line_limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<LengthLimitError>() => {
                let why = format!(
                    "Page {page} of the export is larger than {} bytes; ask for smaller pages (_count).",
                    self.line_limit
                );
                self.page_failed(
                    page,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    IssueCode::TooCostly,
                    &why,
                )
                .await?;
                return Ok(None);
            }
            Err(error) => {
                let why = format!("Reading page {page} of the export failed: {error}");
                self.page_failed(page, StatusCode::BAD_GATEWAY, IssueCode::Exception, &why)
                    .await?;
                return Ok(None);
            }
        };
        if body.trim_ascii().is_empty() {
            // No content: nothing to export.
            return Ok(None);
        }
        let head = match serde_json::from_slice::<PageHead<'_>>(&body) {
            Ok(head) => head,
            Err(error) => {
                let why =
                    format!("Page {page} of the export is not a FHIR resource in JSON: {error}");
                self.page_failed(page, StatusCode::BAD_GATEWAY, IssueCode::Processing, &why)
                    .await?;
                return Ok(None);
            }
        };
        let is_searchset = head.resource_type == "Bundle"
            && head.kind.is_some_and(|kind| kind.get() == r#""searchset""#);
        if !is_searchset {
            // Any other answer is one resource.
            self.resource(&head.resource_type, &compact(&body)).await?;
            return Ok(None);
        }
        let bundle: Searchset<'_> = match serde_json::from_slice(&body) {
            Ok(bundle) => bundle,
            Err(error) => {
                let why =
                    format!("Page {page} of the export is not a valid searchset Bundle: {error}");
                self.page_failed(page, StatusCode::BAD_GATEWAY, IssueCode::Processing, &why)
                    .await?;
                return Ok(None);
            }
        };
        if page == 1 {
            self.total = bundle.total;
        }
        for entry in &bundle.entry {
            let Some(resource) = entry.resource else {
                continue;
            };
            let line = compact(resource.get().as_bytes());
            match serde_json::from_slice::<ResourceType<'_>>(&line) {
                Ok(head)
                    if entry.search.as_ref().and_then(|s| s.mode.as_deref()) == Some("outcome") =>
                {
                    let _ = head;
                    self.outcome(&line).await?;
                }
                Ok(head) => self.resource(&head.resource_type, &line).await?,
                Err(error) => {
                    self.error(&format!(
                        "An entry on page {page} is not a FHIR resource: {error}"
                    ))
                    .await?;
                }
            }
        }
        Ok(bundle
            .link
            .into_iter()
            .find(|link| link.relation == "next")
            .map(|link| link.url.into_owned()))
    }

    /// Writes one resource to its type's file; OperationOutcomes go to the error file.
    async fn resource(&mut self, resource_type: &str, line: &[u8]) -> Result<(), StoredResponse> {
        if resource_type == "OperationOutcome" {
            return self.outcome(line).await;
        }
        if !is_resource_type(resource_type) {
            let shown: String = resource_type.chars().take(64).collect();
            return self
                .error(&format!(
                    "A resource has the invalid resourceType {shown:?} and was left out."
                ))
                .await;
        }
        self.files
            .write(resource_type, line)
            .await
            .map_err(|error| write_failed(&error))?;
        self.progress();
        Ok(())
    }

    /// An OperationOutcome from the wrapped service, for the error file (BULK-7, BULK-9).
    async fn outcome(&mut self, line: &[u8]) -> Result<(), StoredResponse> {
        let severity = serde_json::from_slice::<Outcome<'_>>(line)
            .ok()
            .and_then(|outcome| outcome.worst())
            .unwrap_or(Cow::Borrowed("error"));
        self.files
            .write_error(&severity, line)
            .await
            .map_err(|error| write_failed(&error))
    }

    /// A problem of the layer's own, as an OperationOutcome line in the error file.
    async fn error(&mut self, diagnostics: &str) -> Result<(), StoredResponse> {
        tracing::debug!(
            diagnostics,
            "bulk export problem recorded in its error file"
        );
        let outcome = operation_outcome(IssueCode::Processing, diagnostics).to_string();
        self.files
            .write_error("error", outcome.as_bytes())
            .await
            .map_err(|error| write_failed(&error))
    }

    fn progress(&mut self) {
        let written = self.files.written();
        if written >= self.reported + PROGRESS_EVERY {
            self.report();
        }
    }

    /// `X-Progress`: a percentage when the total is known (`Bundle.total`), else a count.
    fn report(&mut self) {
        let written = self.files.written();
        self.reported = written;
        let text = match self.total {
            Some(total) if total > 0 => {
                let percent = (written.saturating_mul(100) / total).min(100);
                format!("{percent}% complete ({written} of {total} resources)")
            }
            // Never a leading number that is not a percentage: clients read one as a percentage.
            _ => format!("exported {written} resources"),
        };
        self.job.set_progress(&text);
    }
}

/// BULK-6: the first page failed; the job fails with the wrapped service's status and its
/// OperationOutcome, or one written here when it sent none.
async fn upstream_failure<B>(response: Response<B>, limit: usize) -> StoredResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let status = response.status();
    let status = if status.is_client_error() || status.is_server_error() {
        status
    } else {
        StatusCode::BAD_GATEWAY
    };
    let is_json = media::header_is_json(response.headers().get(CONTENT_TYPE));
    if is_json {
        if let Ok(collected) = Limited::new(response.into_body(), limit).collect().await {
            let body = collected.to_bytes();
            if serde_json::from_slice::<ResourceType<'_>>(&body)
                .is_ok_and(|head| head.resource_type == "OperationOutcome")
            {
                return StoredResponse {
                    status,
                    headers: vec![(CONTENT_TYPE, crate::outcome::FHIR_JSON)],
                    body,
                };
            }
        }
    }
    synthesized(
        status,
        IssueCode::for_status(status),
        &format!("The export failed: the FHIR server answered {status}."),
    )
}

fn write_failed(error: &BoxError) -> StoredResponse {
    tracing::warn!(%error, "writing a bulk export's files failed");
    synthesized(
        StatusCode::INTERNAL_SERVER_ERROR,
        IssueCode::Processing,
        &format!("The export's files could not be written: {error}"),
    )
}

/// JSON without whitespace outside strings: a pretty-printed resource as one NDJSON line.
fn compact(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            out.push(byte);
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else if !matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            if byte == b'"' {
                in_string = true;
            }
            out.push(byte);
        }
    }
    out
}

/// The part of a wrapped service's own bulk manifest the layer reads (BULK-12).
#[derive(Deserialize)]
struct NativeManifest {
    #[serde(default)]
    output: Vec<NativeFile>,
    #[serde(default)]
    error: Vec<NativeFile>,
}

#[derive(Deserialize)]
struct NativeFile {
    #[serde(rename = "type", default)]
    kind: String,
    url: String,
}

/// The field read of every resource. Nothing else: a resource's own `type` (Encounter.type,
/// a list of CodeableConcepts) is none of the export's business.
#[derive(Deserialize)]
struct ResourceType<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Cow<'a, str>,
}

/// The fields read of a JSON page: a Bundle's `type` is a code; any other resource's `type`
/// is whatever that resource says it is.
#[derive(Deserialize)]
struct PageHead<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Cow<'a, str>,
    #[serde(rename = "type", default, borrow)]
    kind: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Searchset<'a> {
    #[serde(default)]
    total: Option<u64>,
    #[serde(default, borrow)]
    link: Vec<Link<'a>>,
    #[serde(default, borrow)]
    entry: Vec<Entry<'a>>,
}

#[derive(Deserialize)]
struct Link<'a> {
    #[serde(borrow)]
    relation: Cow<'a, str>,
    #[serde(borrow)]
    url: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(default, borrow)]
    resource: Option<&'a RawValue>,
    #[serde(default, borrow)]
    search: Option<Search<'a>>,
}

#[derive(Deserialize)]
struct Search<'a> {
    #[serde(default, borrow)]
    mode: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Outcome<'a> {
    #[serde(default, borrow)]
    issue: Vec<Issue<'a>>,
}

#[derive(Deserialize)]
struct Issue<'a> {
    #[serde(default, borrow)]
    severity: Option<Cow<'a, str>>,
}

impl<'a> Outcome<'a> {
    /// The most severe issue's severity.
    fn worst(self) -> Option<Cow<'a, str>> {
        let rank = |s: &str| match s {
            "fatal" => 4,
            "error" => 3,
            "warning" => 2,
            "information" => 1,
            _ => 0,
        };
        self.issue
            .into_iter()
            .filter_map(|issue| issue.severity)
            .filter(|s| rank(s) > 0)
            .max_by_key(|s| rank(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_keeps_strings_and_drops_layout() {
        let pretty = b"{\n  \"resourceType\": \"Patient\",\n  \"name\": [ { \"text\": \"A \\\" b\\n c\" } ]\n}";
        assert_eq!(
            String::from_utf8(compact(pretty)).unwrap(),
            r#"{"resourceType":"Patient","name":[{"text":"A \" b\n c"}]}"#
        );
    }

    #[test]
    fn worst_severity() {
        let outcome: Outcome<'_> = serde_json::from_str(
            r#"{"resourceType":"OperationOutcome","issue":[{"severity":"warning"},{"severity":"fatal"},{"severity":"error"}]}"#,
        )
        .unwrap();
        assert_eq!(outcome.worst().as_deref(), Some("fatal"));
    }
}
