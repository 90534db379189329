//! # tower-fhir-async
//!
//! One [tower] layer that gives any FHIR server the
//! [FHIR asynchronous request patterns](https://hl7.org/fhir/R5/async.html).
//!
//! [`AsyncLayer`] wraps an existing FHIR service (an axum `Router`, a hyper service, a proxy to
//! a server you cannot change). A request carrying `Prefer: respond-async` is recorded in a
//! [`JobStore`], answered at once with `202 Accepted` and an absolute `Content-Location`, and run
//! against the wrapped service in the background. The layer serves the status URL itself:
//! `202` while the job runs (with `Retry-After` and `X-Progress`), then `200` with a
//! `batch-response` Bundle wrapping the inner response; `DELETE` cancels the job and really stops
//! its work. Every other request passes through untouched.
//!
//! A request for `$export` (at any level), or with `_outputFormat`, takes the bulk data pattern
//! instead: the job streams the wrapped service's answer (NDJSON, or search Bundles followed
//! page by page) into NDJSON files per resource type in an [`object_store`], completes with a
//! manifest, and the layer serves the files (gzip when asked) until they expire or the job is
//! deleted.
//!
//! ```
//! use axum::http::header::CONTENT_TYPE;
//! use axum::response::IntoResponse;
//! use axum::{Router, routing::post};
//! use tower_fhir_async::{AsyncLayer, MemoryStore};
//!
//! // FHIR JSON, labelled so: a `text/plain` answer (a bare `&str`) would become a base64
//! // `Binary` in the asynchronous result.
//! async fn reindex() -> impl IntoResponse {
//!     ([(CONTENT_TYPE, "application/fhir+json")], r#"{"resourceType":"Parameters"}"#)
//! }
//!
//! let layer = AsyncLayer::builder(MemoryStore::default())
//!     .base_url("https://fhir.example.org/fhir")
//!     .build();
//! // Apply it last, so that it sees every request, its own status URLs included. An
//! // authentication layer goes outside it (added after it).
//! let app: Router = Router::new().route("/fhir/$reindex", post(reindex)).layer(layer);
//! # drop(app);
//! ```
//!
//! ## Where things are
//!
//! - [`AsyncLayer`] and [`AsyncLayerBuilder`]: configuration.
//! - [`AsyncService`]: the wrapping service; [`RequestBody`] is the body type the wrapped service
//!   receives, [`ResponseBody`] the one it answers with.
//! - [`JobContext`]: inserted into replayed requests, for progress and cancellation.
//! - [`store`]: the [`JobStore`] trait, [`MemoryStore`], and [`store::DelegateStore`] for
//!   wrapping a store; with the `test-util` feature, the conformance suite
//!   (`store_conformance_tests!`).
//! - [`prefer`]: RFC 7240 `Prefer` parsing.
//! - [`ShutdownHandle`]: graceful shutdown.
//! - [`ManifestFormat`], [`UpstreamFiles`] and the `file_store` settings of
//!   [`AsyncLayerBuilder`]: the bulk data pattern.
//!
//! ## Features
//!
//! - `bulk` (default): the bulk data pattern, its builder settings, [`ManifestFormat`],
//!   [`UpstreamFiles`] and the [`object_store`] re-export. Without it the layer does not
//!   recognise bulk requests: `$export` and requests with `_outputFormat` pass through, or run as
//!   interaction jobs with `Prefer: respond-async`, like any other request.
//! - `redis`, `postgres`: `RedisStore` and `PostgresStore`, jobs shared by many instances;
//!   `redis-cluster`: `RedisClusterStore`, the same on a Redis Cluster.
//! - `s3`: `s3::file_store`, bulk data files in Amazon S3 or an S3-compatible store.
//! - `upstream`: [`upstream::Upstream`](crate::upstream), any FHIR server behind the layer over
//!   HTTP (a gateway); `upstream-tls`: `https` upstreams, by rustls.
//! - `test-util`: the store conformance suite (`store::conformance`).
//!
//! On docs.rs every feature is on, and items that need one say which.
//!
//! [tower]: https://docs.rs/tower
#![cfg_attr(docsrs, feature(doc_cfg))]
// Without `bulk`, the overview above and the builder's settings table still name the bulk items
// and settings; their links are plain text then.
#![cfg_attr(
    not(feature = "bulk"),
    allow(rustdoc::broken_intra_doc_links, rustdoc::private_intra_doc_links)
)]

mod admission;
mod audit;
mod body;
mod builder;
mod bulk;
mod bundle;
mod caller;
mod capability;
mod clock;
mod config;
mod context;
mod encoding;
mod follow;
mod future;
mod inner;
mod job;
mod kickoff;
mod layer;
mod media;
mod meters;
mod origins;
mod outcome;
pub mod prefer;
mod redact;
mod registry;
mod routes;
mod runner;
#[cfg(feature = "s3")]
pub mod s3;
mod service;
mod shutdown;
mod state;
pub mod store;
mod throttle;
#[cfg(feature = "upstream")]
pub mod upstream;
mod watcher;

/// A boxed error: what the layer's bodies, the wrapped service's errors and the stores' client
/// libraries are reduced to.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub use body::{RequestBody, ResponseBody};
pub use builder::AsyncLayerBuilder;
#[cfg(feature = "bulk")]
pub use bulk::{ManifestFormat, UpstreamFiles};
pub use caller::caller_digest;
pub use config::BuildError;
pub use config::{BulkWithoutPrefer, CompletionMode, RequestHead};
pub use context::JobContext;
pub use future::ResponseFuture;
pub use job::{InvalidJobId, JobId, JobKind, JobOutcome, JobRecord, JobState, StoredResponse};
pub use layer::AsyncLayer;
/// The `object_store` crate bulk data files are kept with, so that a store you build yourself
/// (`LocalFileSystem`, S3, …) is of the matching version. With the `bulk` feature.
#[cfg(feature = "bulk")]
pub use object_store;
pub use service::AsyncService;
pub use shutdown::{ShutdownHandle, ShutdownReport};
#[cfg(feature = "postgres")]
pub use store::PostgresStore;
#[cfg(feature = "redis-cluster")]
pub use store::RedisClusterStore;
pub use store::{JobStore, MemoryStore, StoreError};
#[cfg(feature = "redis")]
pub use store::{RedisStore, redis};

// The README's examples compile as doc tests (several configure the bulk pattern).
#[cfg(all(doctest, feature = "bulk"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
