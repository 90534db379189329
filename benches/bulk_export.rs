//! Bulk export at scale: `GET /fhir/$export` with `Prefer: respond-async` through `AsyncLayer`,
//! whose wrapped service streams `BULK_BENCH_MIB` MiB (default 1024) of generated NDJSON into a
//! `LocalFileSystem`. Reports MB/s against a baseline that writes the same stream straight to
//! files with tokio, and peak resident memory above the idle process (target: under 64 MiB).
//!
//! `cargo bench --bench bulk_export` (Linux: memory is read from `/proc/self`);
//! `BULK_BENCH_MIB=64 BULK_BENCH_ROUNDS=1 cargo bench --bench bulk_export` for a quick run. Each
//! round runs the generator alone, the baseline and the export; speeds are the best of the rounds.
//!
//! Each measurement runs in a child process of its own: an allocator keeps what a run freed, so a
//! second run in the same process would reuse those pages and show no growth.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT, CONTENT_LOCATION, CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use serde_json::Value;
use tokio::fs::File;
use tokio::io::{AsyncWriteExt, BufWriter};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_fhir_async::object_store::local::LocalFileSystem;
use tower_fhir_async::{AsyncLayer, MemoryStore, RequestBody, ResponseBody};

/// Size of the export in MiB.
const SIZE_VAR: &str = "BULK_BENCH_MIB";
/// How many times each run is repeated.
const ROUNDS_VAR: &str = "BULK_BENCH_ROUNDS";
/// Set in a child process: which measurement it runs.
const ROLE_VAR: &str = "BULK_BENCH_ROLE";

const MIB: u64 = 1024 * 1024;
/// The target of the issue: peak resident memory above the idle process.
const TARGET_MIB: f64 = 64.0;
/// Files are cut at this size, the layer's default `max_file_size`.
const FILE_BYTES: u64 = 64 * MIB;
/// Bytes per frame of the generated body; frames end mid-line, as reads from a socket do.
const FRAME: usize = 64 * 1024;
/// Resources of one type in a row; a server exports type by type, in pages.
const BLOCK: u64 = 1000;
const TYPES: [&str; 4] = ["Patient", "Observation", "Encounter", "Condition"];
/// The types of successive blocks: Observations are the most common. With four types and the
/// layer's default of four open files, every file stays open until it is full.
const CYCLE: [usize; 6] = [0, 1, 1, 2, 1, 3];
/// tokio's `File` hands every write to a blocking thread, so the baseline gathers 1 MiB first.
const BASELINE_BUFFER: usize = 1 << 20;
const POLL_EVERY: Duration = Duration::from_millis(20);
const HOST_NAME: &str = "fhir.example.org";

/// The body of the requests the wrapped FHIR server receives.
type ServerBody = RequestBody<Empty<Bytes>>;

fn main() -> ExitCode {
    let Some(mib) = positive(SIZE_VAR, 1024) else {
        return ExitCode::FAILURE;
    };
    match std::env::var(ROLE_VAR) {
        Ok(role) => child(&role, mib * MIB),
        Err(_) => match positive(ROUNDS_VAR, 3) {
            Some(rounds) => parent(mib, rounds),
            None => ExitCode::FAILURE,
        },
    }
}

/// The positive whole number in the environment variable `name`, else `default`.
fn positive(name: &str, default: u64) -> Option<u64> {
    let Ok(text) = std::env::var(name) else {
        return Some(default);
    };
    match text.trim().parse::<u64>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            eprintln!("{name}={text} is not a positive whole number; unset it or give one.");
            None
        }
    }
}

// ---- the report -------------------------------------------------------------------------------

/// What one child measured, from its `RESULT` line.
struct Run {
    bytes: f64,
    secs: f64,
    idle_kib: f64,
    peak_kib: f64,
    /// Whether the high-water mark was reset before the run.
    reset: bool,
    resources: u64,
    files: u64,
    largest: u64,
    workers: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.bytes / self.secs / 1e6
    }

    fn above_idle_mib(&self) -> f64 {
        (self.peak_kib - self.idle_kib) / 1024.0
    }
}

const ROLES: [&str; 3] = ["generator", "baseline", "layer"];

fn parent(mib: u64, rounds: u64) -> ExitCode {
    println!(
        "bulk export: {mib} MiB of NDJSON ({SIZE_VAR}), {rounds} rounds ({ROUNDS_VAR}), files in {}",
        std::env::temp_dir().display()
    );
    // Rounds interleave the runs, so that a change in load on the machine touches all of them.
    let mut runs: HashMap<&str, Vec<Run>> = HashMap::new();
    for _ in 0..rounds {
        for role in ROLES {
            match run_child(role) {
                Ok(run) => runs.entry(role).or_default().push(run),
                Err(why) => {
                    eprintln!("the {role} run failed: {why}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let (generator, baseline, layer) = (&runs["generator"], &runs["baseline"], &runs["layer"]);
    println!(
        "{:.0} MB (MB = 10^6 bytes), {} resources of {} types, {} worker threads",
        layer[0].bytes / 1e6,
        layer[0].resources,
        TYPES.len(),
        layer[0].workers,
    );
    println!();
    println!(
        "{:<7}{:>16}{:>16}{:>13}{:>8}{:>16}{:>13}",
        "round",
        "generator MB/s",
        "baseline MB/s",
        "layer MB/s",
        "ratio",
        "baseline peak",
        "layer peak"
    );
    let mut ratios = Vec::new();
    for (i, ((g, b), l)) in generator.iter().zip(baseline).zip(layer).enumerate() {
        let ratio = l.rate() / b.rate();
        ratios.push(ratio);
        println!(
            "{:<7}{:>16.1}{:>16.1}{:>13.1}{:>8.2}{:>12.1} MiB{:>9.1} MiB",
            i + 1,
            g.rate(),
            b.rate(),
            l.rate(),
            ratio,
            b.above_idle_mib(),
            l.above_idle_mib(),
        );
    }
    ratios.sort_by(f64::total_cmp);
    let best = |runs: &[Run]| runs.iter().map(Run::rate).fold(0.0, f64::max);
    let highest = |runs: &[Run]| runs.iter().map(Run::above_idle_mib).fold(0.0, f64::max);
    let idle = |runs: &[Run]| runs.iter().map(|r| r.idle_kib / 1024.0).fold(0.0, f64::max);
    println!();
    println!(
        "{:<24}{:>11}{:>27}{:>12}",
        "", "best MB/s", "highest peak above idle", "idle RSS"
    );
    println!("{:<24}{:>11.1}", "generator alone", best(generator));
    for (name, runs) in [
        ("baseline (tokio files)", baseline),
        ("AsyncLayer export", layer),
    ] {
        println!(
            "{:<24}{:>11.1}{:>23.1} MiB{:>8.1} MiB",
            name,
            best(runs),
            highest(runs),
            idle(runs),
        );
    }
    println!();
    println!(
        "layer / baseline: {:.2}x (best of each), {:.2}x (median of the rounds)",
        best(layer) / best(baseline),
        ratios[ratios.len() / 2],
    );
    println!(
        "files: layer {}, largest {:.1} MiB; baseline {}",
        layer[0].files,
        layer[0].largest as f64 / MIB as f64,
        baseline[0].files,
    );
    if baseline.iter().chain(layer).any(|run| !run.reset) {
        println!(
            "note: /proc/self/clear_refs could not be written; peaks are VmHWM since the process \
             started, setup included"
        );
    }
    let peak = highest(layer);
    let verdict = if peak < TARGET_MIB { "met" } else { "NOT met" };
    println!(
        "target: export peak RSS under {TARGET_MIB} MiB above idle: {verdict} ({peak:.1} MiB)"
    );
    ExitCode::SUCCESS
}

/// Runs this benchmark again as a child that measures `role`; its last stdout line is
/// `RESULT key=value …`.
fn run_child(role: &str) -> Result<Run, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    let output = Command::new(exe)
        .env(ROLE_VAR, role)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("starting a child process: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("it exited with {}: {stdout}", output.status));
    }
    let line = stdout
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("RESULT "))
        .ok_or_else(|| format!("it printed no RESULT line: {stdout}"))?;
    let pairs: HashMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .collect();
    let number = |key: &str| -> Result<f64, String> {
        pairs
            .get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("its RESULT line has no number {key}: {line}"))
    };
    Ok(Run {
        bytes: number("bytes")?,
        secs: number("secs")?,
        idle_kib: number("idle_kib")?,
        peak_kib: number("peak_kib")?,
        reset: pairs.get("reset") == Some(&"true"),
        resources: number("resources")? as u64,
        files: number("files")? as u64,
        largest: number("largest")? as u64,
        workers: number("workers")? as u64,
    })
}

// ---- one measurement, in a child --------------------------------------------------------------

fn child(role: &str, target: u64) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let workers = runtime.metrics().num_workers();
    let dir = match TempDir::new(role) {
        Ok(dir) => dir,
        Err(error) => {
            eprintln!("creating a folder under the temp dir failed: {error}");
            return ExitCode::FAILURE;
        }
    };
    let tally = Arc::new(Tally::default());
    let outcome = match role {
        "generator" => {
            let body = Ndjson::new(target, tally.clone());
            measure(|| runtime.block_on(drain(body)))
        }
        "baseline" => {
            let body = Ndjson::new(target, tally.clone());
            measure(|| runtime.block_on(write_straight(&dir.0, body)))
        }
        "layer" => {
            let service = runtime.block_on(async { layered(&dir.0, target, tally.clone()) });
            let service = match service {
                Ok(service) => service,
                Err(why) => {
                    eprintln!("{why}");
                    return ExitCode::FAILURE;
                }
            };
            // The manifest is checked after the clock and the memory are read.
            measure(|| runtime.block_on(export(service))).and_then(|(manifest, memory, secs)| {
                Ok((exported(&dir.0, &manifest)?, memory, secs))
            })
        }
        other => {
            eprintln!("{ROLE_VAR}={other} names no measurement.");
            return ExitCode::FAILURE;
        }
    };
    let (written, memory, secs) = match outcome {
        Ok(outcome) => outcome,
        Err(why) => {
            eprintln!("{role}: {why}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(why) = written.check(&tally) {
        eprintln!("{role}: {why}");
        return ExitCode::FAILURE;
    }
    let (files, largest) = if role == "generator" {
        (0, 0)
    } else {
        match files_in(&dir.0) {
            Ok(files) => files,
            Err(error) => {
                eprintln!("{role}: listing the written files failed: {error}");
                return ExitCode::FAILURE;
            }
        }
    };
    if role == "layer" && largest > FILE_BYTES {
        eprintln!("layer: a file of {largest} bytes is larger than the {FILE_BYTES} allowed");
        return ExitCode::FAILURE;
    }
    drop(runtime);
    println!(
        "RESULT bytes={} resources={} secs={secs} idle_kib={} peak_kib={} reset={} files={files} \
         largest={largest} workers={workers}",
        tally.bytes.load(Ordering::Relaxed),
        tally.total(),
        memory.idle_kib,
        memory.peak_kib,
        memory.reset,
    );
    ExitCode::SUCCESS
}

/// Resident memory around one run, from `/proc/self/status`.
struct Memory {
    idle_kib: u64,
    peak_kib: u64,
    /// Whether the high-water mark was reset to the idle size before the run.
    reset: bool,
}

/// Runs `run`, timing it and reading the resident memory before it and its peak.
fn measure<T>(run: impl FnOnce() -> Result<T, String>) -> Result<(T, Memory, f64), String> {
    let idle_kib = proc_status_kib("VmRSS")?;
    // Writing 5 resets VmHWM to the current resident size (Linux ≥ 4.0).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let start = Instant::now();
    let value = run()?;
    let secs = start.elapsed().as_secs_f64();
    let peak_kib = proc_status_kib("VmHWM")?;
    let memory = Memory {
        idle_kib,
        peak_kib,
        reset,
    };
    Ok((value, memory, secs))
}

fn proc_status_kib(field: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status failed (Linux only): {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse().ok())
        .ok_or_else(|| format!("/proc/self/status has no {field} line in kB"))
}

/// A folder under the temp dir, removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(role: &str) -> std::io::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "tower-fhir-async-bulk-bench-{role}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The files under `dir`, and the size of the largest.
fn files_in(dir: &Path) -> std::io::Result<(u64, u64)> {
    let (mut count, mut largest) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (c, l) = files_in(&entry.path())?;
            count += c;
            largest = largest.max(l);
        } else {
            count += 1;
            largest = largest.max(meta.len());
        }
    }
    Ok((count, largest))
}

/// What a run says it wrote, to compare with what was generated.
struct Written {
    counts: [u64; TYPES.len()],
    bytes: u64,
}

impl Written {
    fn check(&self, tally: &Tally) -> Result<(), String> {
        let generated: Vec<u64> = tally
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let bytes = tally.bytes.load(Ordering::Relaxed);
        if self.counts[..] != generated[..] || self.bytes != bytes {
            return Err(format!(
                "written {:?} resources of {TYPES:?} in {} bytes, but {generated:?} in {bytes} bytes \
                 were generated",
                self.counts, self.bytes
            ));
        }
        Ok(())
    }
}

// ---- the three runs ---------------------------------------------------------------------------

/// The generator alone: its bytes read and dropped.
async fn drain(body: Ndjson) -> Result<Written, String> {
    let mut body = body;
    let mut bytes = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        bytes += data.len() as u64;
    }
    let counts = body
        .tally
        .counts
        .each_ref()
        .map(|c| c.load(Ordering::Relaxed));
    Ok(Written { counts, bytes })
}

/// The baseline: the stream split into lines, each appended to its type's file with tokio, a
/// new file every [`FILE_BYTES`].
async fn write_straight(dir: &Path, body: Ndjson) -> Result<Written, String> {
    let mut files = TypeFiles {
        dir: dir.to_owned(),
        open: Vec::new(),
        written: Written {
            counts: [0; TYPES.len()],
            bytes: 0,
        },
    };
    let mut body = body;
    // The start of a line the previous frame cut off.
    let mut carry = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let mut rest = &data[..];
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(at + 1);
            if carry.is_empty() {
                files.line(line).await?;
            } else {
                carry.extend_from_slice(line);
                files.line(&carry).await?;
                carry.clear();
            }
            rest = after;
        }
        carry.extend_from_slice(rest);
    }
    if !carry.is_empty() {
        return Err("the stream ended inside a line".to_owned());
    }
    for mut file in files.open.drain(..) {
        file.writer.shutdown().await.map_err(|e| e.to_string())?;
    }
    Ok(files.written)
}

struct TypeFiles {
    dir: PathBuf,
    open: Vec<TypeFile>,
    written: Written,
}

struct TypeFile {
    kind: usize,
    number: u32,
    size: u64,
    writer: BufWriter<File>,
}

impl TypeFiles {
    /// Appends one line, its newline included.
    async fn line(&mut self, line: &[u8]) -> Result<(), String> {
        let kind = resource_type(line)
            .and_then(|name| TYPES.iter().position(|t| t.as_bytes() == name))
            .ok_or_else(|| "a line without a known resourceType".to_owned())?;
        let length = line.len() as u64;
        let i = match self.open.iter().position(|f| f.kind == kind) {
            Some(i) if self.open[i].size + length > FILE_BYTES => {
                let number = self.open[i].number + 1;
                let next = self.create(kind, number).await?;
                let full = std::mem::replace(&mut self.open[i], next);
                let mut writer = full.writer;
                writer.shutdown().await.map_err(|e| e.to_string())?;
                i
            }
            Some(i) => i,
            None => {
                let file = self.create(kind, 1).await?;
                self.open.push(file);
                self.open.len() - 1
            }
        };
        let file = &mut self.open[i];
        file.writer
            .write_all(line)
            .await
            .map_err(|e| e.to_string())?;
        file.size += length;
        self.written.counts[kind] += 1;
        self.written.bytes += length;
        Ok(())
    }

    async fn create(&self, kind: usize, number: u32) -> Result<TypeFile, String> {
        let path = self.dir.join(format!("{}-{number}.ndjson", TYPES[kind]));
        let file = File::create(&path)
            .await
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(TypeFile {
            kind,
            number,
            size: 0,
            writer: BufWriter::with_capacity(BASELINE_BUFFER, file),
        })
    }
}

/// The `resourceType` of a line the generator wrote: it always comes first.
fn resource_type(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(br#"{"resourceType":""#)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    Some(&rest[..end])
}

/// `AsyncLayer` writing into `dir`, around a FHIR server whose `$export` streams `target` bytes.
fn layered(
    dir: &Path,
    target: u64,
    tally: Arc<Tally>,
) -> Result<
    impl Service<Request<Empty<Bytes>>, Response = Response<ResponseBody<Ndjson>>, Error = Infallible>
    + Clone,
    String,
> {
    let files = LocalFileSystem::new_with_prefix(dir)
        .map_err(|e| format!("a LocalFileSystem in {}: {e}", dir.display()))?;
    let layer = AsyncLayer::builder(MemoryStore::default())
        .base_path("/fhir")
        .file_store(Arc::new(files))
        .build();
    let server = service_fn(move |request: Request<ServerBody>| {
        let found = request.uri().path() == "/fhir/$export";
        let (status, size) = if found {
            (StatusCode::OK, target)
        } else {
            (StatusCode::NOT_FOUND, 0)
        };
        let body = Ndjson::new(size, tally.clone());
        async move {
            let response = Response::builder()
                .status(status)
                .header(CONTENT_TYPE, "application/fhir+ndjson")
                .body(body);
            Ok::<_, Infallible>(response.expect("a valid response"))
        }
    });
    Ok(layer.layer(server))
}

/// The export through the layer: the kick-off, then polls until `200`; the manifest.
async fn export<S>(service: S) -> Result<String, String>
where
    S: Service<
            Request<Empty<Bytes>>,
            Response = Response<ResponseBody<Ndjson>>,
            Error = Infallible,
        > + Clone,
{
    let kickoff = Request::get("/fhir/$export")
        .header(HOST, HOST_NAME)
        .header(ACCEPT, "application/fhir+json")
        .header("prefer", "respond-async")
        .body(Empty::new())
        .expect("a valid request");
    let Ok(accepted) = service.clone().oneshot(kickoff).await;
    let status = accepted.status();
    let location = accepted
        .headers()
        .get(CONTENT_LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Uri>().ok());
    let Some(location) = location.filter(|_| status == StatusCode::ACCEPTED) else {
        let body = text(accepted.into_body()).await;
        return Err(format!(
            "the kick-off got {status} without a Content-Location: {body}"
        ));
    };
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let poll = Request::get(location.path())
            .header(HOST, HOST_NAME)
            .body(Empty::new())
            .expect("a valid request");
        let Ok(response) = service.clone().oneshot(poll).await;
        match response.status() {
            StatusCode::ACCEPTED => {}
            StatusCode::OK => return Ok(text(response.into_body()).await),
            other => {
                let body = text(response.into_body()).await;
                return Err(format!("polling {location} got {other}: {body}"));
            }
        }
    }
}

/// What the manifest says was exported: its counts, and the sizes of the files it names.
fn exported(dir: &Path, manifest: &str) -> Result<Written, String> {
    let manifest: Value =
        serde_json::from_str(manifest).map_err(|e| format!("the manifest is not JSON: {e}"))?;
    if manifest["error"].as_array().is_some_and(|e| !e.is_empty()) {
        return Err(format!("the manifest lists errors: {}", manifest["error"]));
    }
    let mut written = Written {
        counts: [0; TYPES.len()],
        bytes: 0,
    };
    for output in manifest["output"].as_array().into_iter().flatten() {
        let kind = output["type"]
            .as_str()
            .and_then(|t| TYPES.iter().position(|known| *known == t))
            .ok_or_else(|| format!("an output of an unknown type: {output}"))?;
        let count = output["count"]
            .as_u64()
            .ok_or_else(|| format!("an output without a count: {output}"))?;
        let url = output["url"].as_str().unwrap_or_default();
        let name = url
            .rsplit_once("/file/")
            .map(|(_, name)| name)
            .ok_or_else(|| format!("an output URL without /file/: {url}"))?;
        written.counts[kind] += count;
        written.bytes += file_size(dir, name)?;
    }
    Ok(written)
}

/// The size of the layer's file `name`: it sits in a job folder under `dir`.
fn file_size(dir: &Path, name: &str) -> Result<u64, String> {
    let mut pending = vec![dir.to_owned()];
    while let Some(folder) = pending.pop() {
        let entries = std::fs::read_dir(&folder).map_err(|e| e.to_string())?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if entry.file_name() == name {
                return entry.metadata().map(|m| m.len()).map_err(|e| e.to_string());
            }
        }
    }
    Err(format!(
        "the manifest's file {name} is not in {}",
        dir.display()
    ))
}

async fn text<B>(body: B) -> String
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    match body.collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Err(error) => format!("(reading the body failed: {error})"),
    }
}

// ---- the generated NDJSON ---------------------------------------------------------------------

/// What the generator produced, read after the run.
#[derive(Default)]
struct Tally {
    bytes: AtomicU64,
    counts: [AtomicU64; TYPES.len()],
}

impl Tally {
    fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// An NDJSON body of about 1 KiB resources with varying content, made as it is read: at most
/// one frame and one line are held.
struct Ndjson {
    target: u64,
    generated: u64,
    line: u64,
    rng: u64,
    filler: Arc<str>,
    buffer: BytesMut,
    tally: Arc<Tally>,
}

impl Ndjson {
    fn new(target: u64, tally: Arc<Tally>) -> Self {
        Self {
            target,
            generated: 0,
            line: 0,
            rng: 0x5eed,
            filler: filler().into(),
            buffer: BytesMut::with_capacity(2 * FRAME),
            tally,
        }
    }

    fn random(&mut self) -> u64 {
        // splitmix64: fast, and the same stream in every run.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn push_line(&mut self) {
        let n = self.line;
        self.line += 1;
        let kind = CYCLE[((n / BLOCK) % CYCLE.len() as u64) as usize];
        let r = self.random();
        let s = self.random();
        // 300–1299 bytes of narrative around a ~300 byte skeleton: about 1.1 KiB a line.
        let length = 300 + (r % 1000) as usize;
        let at = (r >> 16) as usize % (self.filler.len() - length);
        let filler = &self.filler[at..at + length];
        let before = self.buffer.len();
        let out = &mut self.buffer;
        let pick = |list: &[&'static str], x: u64| list[(x % list.len() as u64) as usize];
        let (year, month, day) = (1990 + s % 35, 1 + (s >> 8) % 12, 1 + (s >> 12) % 28);
        let patient = s % 100_000;
        let written = match TYPES[kind] {
            "Patient" => write!(
                out,
                r#"{{"resourceType":"Patient","id":"pat-{n}","meta":{{"versionId":"{}","lastUpdated":"{year}-{month:02}-{day:02}T{:02}:{:02}:00Z"}},"identifier":[{{"system":"urn:oid:2.16.840.1.113883.4.1","value":"{:09}"}}],"active":true,"name":[{{"use":"official","family":"{}","given":["{}"]}}],"gender":"{}","birthDate":"{}-{:02}-{:02}","address":[{{"line":["{} {}"],"city":"{}","postalCode":"{:05}"}}],"text":{{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">{filler}</div>"}}}}"#,
                1 + s % 7,
                (s >> 16) % 24,
                (s >> 24) % 60,
                s % 1_000_000_000,
                pick(FAMILIES, s >> 5),
                pick(GIVEN, s >> 9),
                pick(&["female", "male", "other", "unknown"], s >> 13),
                1930 + (s >> 20) % 90,
                1 + (s >> 28) % 12,
                1 + (s >> 32) % 28,
                1 + (s >> 36) % 999,
                pick(STREETS, s >> 40),
                pick(CITIES, s >> 44),
                (s >> 48) % 100_000,
            ),
            "Observation" => {
                let (code, display, unit) = OBSERVATIONS[(s % OBSERVATIONS.len() as u64) as usize];
                write!(
                    out,
                    r#"{{"resourceType":"Observation","id":"obs-{n}","status":"final","category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}}]}}],"code":{{"coding":[{{"system":"http://loinc.org","code":"{code}","display":"{display}"}}]}},"subject":{{"reference":"Patient/pat-{patient}"}},"effectiveDateTime":"{year}-{month:02}-{day:02}","valueQuantity":{{"value":{}.{},"unit":"{unit}","system":"http://unitsofmeasure.org","code":"{unit}"}},"note":[{{"text":"{filler}"}}]}}"#,
                    (s >> 20) % 400,
                    (s >> 30) % 10,
                )
            }
            "Encounter" => write!(
                out,
                r#"{{"resourceType":"Encounter","id":"enc-{n}","status":"finished","class":{{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"{}"}},"subject":{{"reference":"Patient/pat-{patient}"}},"period":{{"start":"{year}-{month:02}-{day:02}T{:02}:00:00Z","end":"{year}-{month:02}-{day:02}T{:02}:30:00Z"}},"reasonCode":[{{"text":"{filler}"}}]}}"#,
                pick(&["AMB", "EMER", "IMP", "HH", "VR"], s >> 20),
                (s >> 24) % 23,
                (s >> 24) % 23 + 1,
            ),
            _ => {
                let (code, display) = CONDITIONS[(s % CONDITIONS.len() as u64) as usize];
                write!(
                    out,
                    r#"{{"resourceType":"Condition","id":"cond-{n}","clinicalStatus":{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/condition-clinical","code":"{}"}}]}},"code":{{"coding":[{{"system":"http://snomed.info/sct","code":"{code}"}}],"text":"{display}"}},"subject":{{"reference":"Patient/pat-{patient}"}},"onsetDateTime":"{year}-{month:02}-{day:02}","note":[{{"text":"{filler}"}}]}}"#,
                    pick(&["active", "recurrence", "remission", "resolved"], s >> 20),
                )
            }
        };
        written.expect("writing to memory cannot fail");
        out.extend_from_slice(b"\n");
        let length = (self.buffer.len() - before) as u64;
        self.generated += length;
        self.tally.bytes.fetch_add(length, Ordering::Relaxed);
        self.tally.counts[kind].fetch_add(1, Ordering::Relaxed);
    }
}

impl Body for Ndjson {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        while this.buffer.len() < FRAME && this.generated < this.target {
            this.push_line();
        }
        if this.buffer.is_empty() {
            return Poll::Ready(None);
        }
        let size = this.buffer.len().min(FRAME);
        Poll::Ready(Some(Ok(Frame::data(this.buffer.split_to(size).freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.buffer.is_empty() && self.generated >= self.target
    }
}

/// 64 KiB of clinical-sounding words; each line's narrative is a slice of it at a random place.
fn filler() -> String {
    const WORDS: [&str; 24] = [
        "patient",
        "reports",
        "mild",
        "intermittent",
        "pain",
        "since",
        "last",
        "visit",
        "no",
        "fever",
        "blood",
        "pressure",
        "stable",
        "follow-up",
        "in",
        "two",
        "weeks",
        "advised",
        "hydration",
        "rest",
        "labs",
        "reviewed",
        "within",
        "normal",
    ];
    let mut text = String::with_capacity(FRAME + 16);
    let mut x: u64 = 0x0dd_ba11;
    while text.len() < FRAME {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        text.push(if x % 11 == 0 { '.' } else { ' ' });
    }
    text
}

// Names with escapes and non-ASCII text, as real records have.
const FAMILIES: &[&str] = &[
    "Smith",
    "Müller",
    r"O\u2019Brien",
    "García",
    "Nguyen",
    "Kowalski",
    "Okafor",
    r#"\"Doc\" Holliday"#,
];
const GIVEN: &[&str] = &["Ana", "Björn", "Chen", "Dmitri", "Émile", "Fatima", "Grace"];
const STREETS: &[&str] = &[
    "Main St",
    "Elm Ave",
    "Hauptstraße",
    "Rue de la Paix",
    "Oak Lane",
];
const CITIES: &[&str] = &[
    "Springfield",
    "Zürich",
    "Lagos",
    "Kraków",
    "Osaka",
    "Boston",
];
const OBSERVATIONS: &[(&str, &str, &str)] = &[
    (
        "2345-7",
        "Glucose [Mass/volume] in Serum or Plasma",
        "mg/dL",
    ),
    (
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "mg/dL",
    ),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL"),
    ("8867-4", "Heart rate", "/min"),
    ("8480-6", "Systolic blood pressure", "mm[Hg]"),
];
const CONDITIONS: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195967001", "Asthma"),
    ("35489007", "Depressive disorder"),
];
