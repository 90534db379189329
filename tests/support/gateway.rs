//! A gateway for the tests: the layer over `upstream::Upstream`, on a free port of 127.0.0.1.

use axum::Router;
use tower_fhir_async::upstream::Upstream;
use tower_fhir_async::{AsyncLayer, MemoryStore};

/// Serves a gateway to `upstream` whose public base is `http://127.0.0.1:PORT{path}`, and
/// returns that base. The layer also follows links on the upstream's own base.
pub async fn start(upstream: &str, path: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public = format!("http://{}{path}", listener.local_addr().unwrap());
    let forwarder = Upstream::builder(upstream)
        .public_base(&public)
        .build()
        .expect("a valid upstream");
    let layer = AsyncLayer::builder(MemoryStore::new())
        .base_url(&public)
        .follow_links_on(upstream)
        .build();
    let app = Router::new()
        .fallback_service(tower::ServiceBuilder::new().layer(layer).service(forwarder));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    public
}

/// [`start`], with the layer's builder set up further by `configure` (after `base_url` and
/// `follow_links_on`).
pub async fn start_with(
    upstream: &str,
    path: &str,
    configure: impl FnOnce(tower_fhir_async::AsyncLayerBuilder) -> tower_fhir_async::AsyncLayerBuilder,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public = format!("http://{}{path}", listener.local_addr().unwrap());
    let forwarder = Upstream::builder(upstream)
        .public_base(&public)
        .build()
        .expect("a valid upstream");
    let layer = configure(
        AsyncLayer::builder(MemoryStore::new())
            .base_url(&public)
            .follow_links_on(upstream),
    )
    .build();
    let app = Router::new()
        .fallback_service(tower::ServiceBuilder::new().layer(layer).service(forwarder));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    public
}
