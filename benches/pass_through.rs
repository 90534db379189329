//! Pass-through cost: the same trivial service, bare and behind `AsyncLayer`, for requests the
//! layer does not take. Reports time and allocations per request (divan's `AllocProfiler`).
//!
//! `cargo bench --bench pass_through`

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

fn main() {
    divan::main();
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

#[divan::bench]
fn bare(bencher: Bencher<'_, '_>) {
    drive(bencher, inner(), || {
        request("/fhir/Patient/1", None).map(RequestBody::streaming)
    });
}

#[divan::bench(args = ["no prefer", "prefer return=minimal", "status-like path", "post"])]
fn layered(bencher: Bencher<'_, '_>, case: &str) {
    let layer = AsyncLayer::builder(MemoryStore::default())
        .base_url("https://fhir.example.org/fhir")
        .build();
    let service = layer.layer(inner());
    let make = move || match case {
        "no prefer" => request("/fhir/Patient/1", None),
        "prefer return=minimal" => request("/fhir/Patient/1", Some("return=minimal")),
        "status-like path" => request("/fhir/_asyncx/0123456789abcdef0123456789abcdef", None),
        _ => Request::post("/fhir/Patient")
            .body(Empty::new())
            .expect("a valid request"),
    };
    drive(bencher, service, make);
}
