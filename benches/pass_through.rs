//! Pass-through cost: the same trivial service, bare and behind `AsyncLayer`, for requests the
//! layer does not take. Reports time and allocations per request (divan's `AllocProfiler`).
//!
//! `cargo bench --bench pass_through`; instructions per call, which a busy machine does not
//! change: `bash benches/pass_through_instructions.sh` (after `cargo bench --bench pass_through
//! --no-run`).

use std::convert::Infallible;

use bytes::Bytes;
use divan::{AllocProfiler, Bencher};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Empty;
use tower::{Layer, Service, service_fn};
use tower_fhir_async::{AsyncLayer, MemoryStore, RequestBody};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

/// `side:case:count` (`bare:no prefer:10000`): instead of timing, make that many calls and exit,
/// for `benches/pass_through_instructions.sh` to count instructions under callgrind.
const COUNT_VAR: &str = "PASS_THROUGH_COUNT";

fn main() {
    match std::env::var(COUNT_VAR) {
        Ok(spec) => count(&spec),
        Err(_) => divan::main(),
    }
}

fn count(spec: &str) {
    let mut parts = spec.splitn(3, ':');
    let (Some(side), Some(case), Some(Ok(n))) = (
        parts.next(),
        parts.next(),
        parts.next().map(str::parse::<u64>),
    ) else {
        eprintln!("{COUNT_VAR}={spec}: expected side:case:count, e.g. bare:no prefer:10000");
        std::process::exit(2);
    };
    if !CASES.contains(&case) {
        eprintln!("{COUNT_VAR}: unknown case {case:?}; one of {CASES:?}");
        std::process::exit(2);
    }
    fn calls<S, B>(mut service: S, n: u64, make: impl Fn() -> Request<B>)
    where
        S: Service<Request<B>>,
    {
        for _ in 0..n {
            let response = service
                .call(make())
                .now_or_never()
                .expect("ready at once")
                .ok()
                .expect("no error");
            std::hint::black_box(response);
        }
    }
    match side {
        "bare" => calls(inner(), n, || {
            case_request(case).map(RequestBody::streaming)
        }),
        "layered" => calls(layered_service(), n, || case_request(case)),
        _ => {
            eprintln!("{COUNT_VAR}: side is bare or layered, not {side:?}");
            std::process::exit(2);
        }
    }
    println!("{side} {case}: {n} calls");
}

type Body = RequestBody<Empty<Bytes>>;

fn inner()
-> impl Service<Request<Body>, Response = Response<Empty<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    // A FHIR server always names its content type, so the response's header map has room.
    service_fn(|_: Request<Body>| async {
        let response = Response::builder()
            .header("content-type", "application/fhir+json")
            .body(Empty::new());
        Ok::<_, Infallible>(response.expect("a valid response"))
    })
}

fn request(uri: &str, prefer: Option<&'static str>) -> Request<Empty<Bytes>> {
    let mut builder = Request::get(uri).header("host", "fhir.example.org");
    if let Some(prefer) = prefer {
        builder = builder.header("prefer", prefer);
    }
    builder.body(Empty::new()).expect("a valid request")
}

/// Calls `service` once per iteration; both services answer without waiting, so the future
/// completes on its first poll.
fn drive<S, B>(bencher: Bencher<'_, '_>, mut service: S, make: impl Fn() -> Request<B> + Sync)
where
    S: Service<Request<B>>,
{
    bencher.with_inputs(&make).bench_local_values(|req| {
        service
            .call(req)
            .now_or_never()
            .expect("ready at once")
            .ok()
            .expect("no error");
    });
}

const CASES: [&str; 4] = [
    "no prefer",
    "prefer return=minimal",
    "status-like path",
    "post",
];

/// The request of each case. The bare service gets the same requests as the layered one, so
/// that the difference is the layer's work only (dropping a request with one header more costs
/// too, on both sides).
fn case_request(case: &str) -> Request<Empty<Bytes>> {
    match case {
        "no prefer" => request("/fhir/Patient/1", None),
        "prefer return=minimal" => request("/fhir/Patient/1", Some("return=minimal")),
        "status-like path" => request("/fhir/_asyncx/0123456789abcdef0123456789abcdef", None),
        _ => Request::post("/fhir/Patient")
            .body(Empty::new())
            .expect("a valid request"),
    }
}

#[divan::bench(args = CASES)]
fn bare(bencher: Bencher<'_, '_>, case: &str) {
    drive(bencher, inner(), move || {
        case_request(case).map(RequestBody::streaming)
    });
}

#[divan::bench(args = CASES)]
fn layered(bencher: Bencher<'_, '_>, case: &str) {
    drive(bencher, layered_service(), move || case_request(case));
}

fn layered_service() -> impl Service<Request<Empty<Bytes>>, Response: Send, Error: std::fmt::Debug>
{
    AsyncLayer::builder(MemoryStore::default())
        .base_url("https://fhir.example.org/fhir")
        .build()
        .layer(inner())
}
