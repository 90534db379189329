//! The end of a bulk job over a real socket (CANCEL, EXPIRE as they apply to bulk jobs): DELETE
//! of a running and of a completed export, and expiry; the job's files leave the file store.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use http::StatusCode;
use support::bulk::{
    channel_body, fetch, fhir_routes, items, manifest_of, ndjson, patients, start,
    start_with_files, stored,
};
use support::{assert_not_found, within};
use tokio::sync::mpsc;
use tower_fhir_async::object_store::local::LocalFileSystem;

// ---------------------------------------------------------------------------------------------
// 7. Cancel.

// CANCEL-1, CANCEL-2, CANCEL-3, CANCEL-5, CANCEL-6, CANCEL-7, STATUS-4, BULK-13: while an export
// streams (its NDJSON producer under the test's control), the status is 202 with `X-Progress`
// counting resources (not starting with a number, which clients read as a percentage) and its already-written files are not served (not complete); DELETE → 202;
// the producer sees its stream dropped; every file of the job leaves the store; status, file
// and a second DELETE → 404 + OperationOutcome.
#[tokio::test]
async fn cancel_6_delete_stops_a_running_export_and_removes_its_files() {
    let (lines_tx, lines_rx) = mpsc::channel::<Bytes>(4);
    let lines_rx = Arc::new(Mutex::new(Some(lines_rx)));
    let routes = Router::new().route(
        "/fhir/Patient/$export",
        get(move || {
            let lines = lines_rx.lock().unwrap().take().expect("one export");
            async move { ndjson(channel_body(lines)) }
        }),
    );
    let server = start(routes, |b| b.max_file_resources(100)).await;
    let status_url = server.export("/Patient/$export").await;
    lines_tx
        .send(Bytes::from(patients(1050, "cancelled")))
        .await
        .expect("the export reads");

    let mut progress = String::new();
    for _ in 0..500 {
        let reply = server.client.get(&status_url).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "the stream is still open: {reply:?}"
        );
        if let Some(value) = reply.headers.get("x-progress") {
            progress = value.to_str().unwrap().to_owned();
            if progress == "exported 1000 resources" && server.stored(&status_url).await.len() >= 10
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(progress, "exported 1000 resources");
    let written = server.stored(&status_url).await;
    assert!(written.contains_key("Patient-1.ndjson"), "{written:?}");
    let file_url = format!("{status_url}/file/Patient-1.ndjson");
    assert_not_found(
        &server.client.get(&file_url).await,
        "a file of a running job",
    );

    let cancelled = server.client.delete(&status_url).await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");
    within(
        "the export's NDJSON stream being dropped",
        lines_tx.closed(),
    )
    .await;
    server
        .wait_until_no_files(&status_url, "after DELETE of a running export")
        .await;
    assert_eq!(server.jobs.len(), 0);
    assert_not_found(&server.client.get(&status_url).await, "status after DELETE");
    assert_not_found(&server.client.get(&file_url).await, "file after DELETE");
    assert_not_found(&server.client.delete(&status_url).await, "second DELETE");
    // Nothing shows up once pending tasks have run either (a late upload of the stopped export).
    tokio::task::yield_now().await;
    assert!(stored(&*server.files, None).await.is_empty());
}

/// Reports, when dropped, how many lines its stream had produced.
struct Produced {
    count: usize,
    report: Option<tokio::sync::oneshot::Sender<usize>>,
}

impl Drop for Produced {
    fn drop(&mut self) {
        if let Some(report) = self.report.take() {
            let _ = report.send(self.count);
        }
    }
}

// CANCEL-6: an export whose NDJSON source is always ready (an in-process server streaming from
// memory, files in memory) is still stopped by DELETE. The stream produces `LINES` lines at once,
// then waits forever, so the job cannot finish by itself: a cancel that works drops the stream
// before its last line; one that waits for the export to yield drops it only there.
// Multi-thread runtime, so the DELETE is served while the export runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_6_delete_stops_an_always_ready_export() {
    const LINES: usize = 300_000;
    let (report_tx, report) = tokio::sync::oneshot::channel();
    let report_tx = Arc::new(Mutex::new(Some(report_tx)));
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let produced = Produced {
                count: 0,
                report: report_tx.lock().unwrap().take(),
            };
            async move {
                let lines = futures_util::stream::unfold(produced, |mut produced| async move {
                    if produced.count == LINES {
                        std::future::pending::<()>().await;
                    }
                    produced.count += 1;
                    let line = format!(
                        "{{\"resourceType\":\"Patient\",\"id\":\"p{}\"}}\n",
                        produced.count
                    );
                    Some((Ok::<_, Infallible>(Bytes::from(line)), produced))
                });
                ndjson(Body::from_stream(lines))
            }
        }),
    );
    let server = start(routes, |b| b).await;
    let status_url = server.export("/$export").await;
    let mut running = None;
    for _ in 0..500 {
        let reply = server.client.get(&status_url).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "the export never ends by itself"
        );
        if reply.headers.contains_key("x-progress") {
            running = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let running = running.expect("the export reports progress");
    let cancelled = server.client.delete(&status_url).await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");
    let produced = within("the export's stream being dropped", report)
        .await
        .expect("reported");
    assert!(
        produced < LINES,
        "DELETE (sent at {:?}) did not stop the export: its stream was dropped only when it \
         stopped being ready, after all {produced} lines",
        running.header("x-progress")
    );
    server
        .wait_until_no_files(&status_url, "after DELETE")
        .await;
}

/// A fresh folder under the system's temporary folder, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tower-fhir-async-{name}-{}-{}",
            std::process::id(),
            tower_fhir_async::JobId::new()
        ));
        std::fs::create_dir_all(&path).expect("a temporary folder");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// CANCEL-5, CANCEL-6, CANCEL-7 with a file store on disk (`LocalFileSystem`, whose `delete` of
// an object that is already gone is an error, unlike `InMemory`'s): DELETE of a running export
// that has written many files leaves none of them behind, with no sweeper running. On the
// multi-thread runtime servers use, where the job's own clean-up and the DELETE's run at once;
// repeated, because how the two interleave varies from run to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_5_running_export_on_local_file_system_leaves_no_files() {
    const ROUNDS: usize = 20;
    let dir = TempDir::new("cancel");
    let files = LocalFileSystem::new_with_prefix(&dir.0).expect("the folder exists");
    let exports: Arc<Mutex<Vec<mpsc::Receiver<Bytes>>>> = Arc::default();
    let routes = Router::new().route(
        "/fhir/$export",
        get({
            let exports = exports.clone();
            move || {
                let lines = exports.lock().unwrap().pop().expect("an export's lines");
                async move { ndjson(channel_body(lines)) }
            }
        }),
    );
    let server = start_with_files(routes, Arc::new(files), |b| b.max_file_resources(1)).await;
    for round in 1..=ROUNDS {
        let (lines_tx, lines_rx) = mpsc::channel::<Bytes>(4);
        exports.lock().unwrap().push(lines_rx);
        let status_url = server.export("/$export").await;
        lines_tx
            .send(Bytes::from(patients(200, "on-disk")))
            .await
            .expect("the export reads");
        // Every line but the last is a closed file of its own; the last is not uploaded yet.
        for _ in 0..400 {
            if server.stored(&status_url).await.len() >= 199 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(server.stored(&status_url).await.len(), 199, "round {round}");

        assert_eq!(
            server.client.delete(&status_url).await.status,
            StatusCode::ACCEPTED,
            "round {round}"
        );
        within(
            "the export's NDJSON stream being dropped",
            lines_tx.closed(),
        )
        .await;
        let mut left = BTreeMap::new();
        for _ in 0..80 {
            left = server.stored(&status_url).await;
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            left.is_empty(),
            "round {round} of {ROUNDS}: {} of the cancelled export's 199 files left behind: {:?}",
            left.len(),
            left.keys().take(5).collect::<Vec<_>>()
        );
        assert_not_found(&server.client.get(&status_url).await, "status after DELETE");
    }
}

// CANCEL-5, CANCEL-7: DELETE after completion ("client has finished downloading") removes the
// job and its files. The export wrote one file per type (Patient, Observation), each served
// (`200`, its one line) and in the file store before the DELETE, so the test cannot pass on an
// export that wrote nothing; afterwards every file URL answers 404 + OperationOutcome and the
// file store holds nothing of the job.
#[tokio::test]
async fn cancel_5_delete_after_completion_removes_the_files() {
    let server = start(fhir_routes(), |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let output = fetch(&server.client, &manifest, "output").await;
    let mut written: Vec<(&str, usize)> = output
        .iter()
        .map(|file| (file.kind.as_str(), file.lines.len()))
        .collect();
    written.sort_unstable();
    assert_eq!(
        written,
        [("Observation", 1), ("Patient", 1)],
        "the export wrote a file per type: {manifest}"
    );
    let stored_before = server.stored(&status_url).await;
    let names: Vec<&str> = output.iter().map(|file| file.name.as_str()).collect();
    assert_eq!(
        stored_before.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut names = names.clone();
            names.sort_unstable();
            names
        },
        "the manifest's files are in the file store"
    );
    assert!(
        stored_before.values().all(|size| *size > 0),
        "{stored_before:?}"
    );

    assert_eq!(
        server.client.delete(&status_url).await.status,
        StatusCode::ACCEPTED
    );
    server
        .wait_until_no_files(&status_url, "after DELETE")
        .await;
    for item in items(&manifest, "output") {
        assert_not_found(
            &server.client.get(item["url"].as_str().unwrap()).await,
            "file after DELETE",
        );
    }
    assert_not_found(&server.client.get(&status_url).await, "status after DELETE");
    assert!(stored(&*server.files, None).await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// 8. Expiry.

// EXPIRE-2, EXPIRE-3, BULK-8: files are served until the manifest's `Expires`; afterwards the
// status and file URLs answer 404 + OperationOutcome and the sweeper removes the files from the
// store (and the job from the job store). Paused time, 60 s retention: the "before" checks run
// unconditionally a second before the job's end plus its retention, the "after" ones a second
// after; the layer's clock is tokio's, so no machine is too slow for either.
#[tokio::test(start_paused = true)]
async fn expire_2_expire_3_expired_export_and_its_files_are_gone() {
    const RETENTION: Duration = Duration::from_secs(60);
    // The layer's clock: the wall clock when it was built, plus tokio's (paused) time since.
    let (wall_start, started) = (SystemTime::now(), tokio::time::Instant::now());
    let server = start(fhir_routes(), |b| b.retention(RETENTION)).await;
    let sweeper = tokio::spawn(server.layer.sweeper(Duration::from_millis(50)));
    let status_url = server.export("/$export").await;
    let done = server.finished(&status_url).await;
    let finished_at = tokio::time::Instant::now();
    let manifest = manifest_of(&done, &status_url);
    let expires =
        httpdate::parse_http_date(done.header("expires")).expect("Expires is an HTTP date");
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    // `Expires` is the end of the retention: the job's end (at most `finished_at`) + 60 s, to
    // the second of an HTTP date.
    let end_of_retention = wall_start + (finished_at - started) + RETENTION;
    let off = expires
        .duration_since(end_of_retention)
        .unwrap_or_else(|early| early.duration());
    assert!(
        off <= Duration::from_secs(2),
        "Expires {expires:?} is not the end of the retention {end_of_retention:?}"
    );
    assert!(!items(&manifest, "output").is_empty(), "{manifest}");

    // A second before the retention ends (counted from when the completion was seen, which is
    // after the job ended): still there.
    tokio::time::sleep_until(finished_at + RETENTION - Duration::from_secs(1)).await;
    let before = server.client.get(&file_url).await;
    assert_eq!(
        before.status,
        StatusCode::OK,
        "served before Expires: {before:?}"
    );
    assert_eq!(server.client.get(&status_url).await.status, StatusCode::OK);
    assert!(
        !server.stored(&status_url).await.is_empty(),
        "the sweeper keeps a live job's files"
    );

    // A second after it: gone, whatever the sweeper has done yet (EXPIRE-3 filters on read).
    tokio::time::sleep_until(finished_at + RETENTION + Duration::from_secs(1)).await;
    assert_not_found(&server.client.get(&status_url).await, "status after expiry");
    assert_not_found(&server.client.get(&file_url).await, "file after expiry");
    server
        .wait_until_no_files(&status_url, "the sweeper after expiry")
        .await;
    for _ in 0..400 {
        if server.jobs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(server.jobs.is_empty(), "the sweeper reclaims the record");
    sweeper.abort();
}
