//! Issue #13 item 1 (GATEWAY-1, GATEWAY-2, SEC-1): `https` upstreams, with the feature
//! `upstream-tls`. The upstream here is a real TLS server on 127.0.0.1 (hyper over tokio-rustls)
//! whose certificate an rcgen CA made for the test issues. It offers the ALPN protocols each test
//! names, speaks the one negotiated (HTTP/2 only for `h2`), records the HTTP version of every
//! request, and writes absolute URLs on its own `https` base. Clients reach it only through the
//! gateway's public `http` base.

#![cfg(all(feature = "upstream-tls", feature = "bulk"))]

mod support;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use http::{Method, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use support::{TestClient, fhir_json};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tower_fhir_async::upstream::{Upstream, UpstreamBuilder};
use tower_fhir_async::{AsyncLayer, MemoryStore};

/// A certificate authority made for one test.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tower-fhir-async test CA");
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// The CA's certificate, to trust with `root_certificate_pem`.
    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (IP addresses or DNS names) and its key.
    fn issue(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "upstream");
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], key)
    }
}

/// The TLS upstream's state: its own base, and the HTTP version of every request it answered.
#[derive(Clone)]
struct Upstreamed {
    base: String,
    versions: Arc<Mutex<Vec<Version>>>,
}

/// A running TLS upstream.
struct TlsUpstream {
    /// `https://127.0.0.1:PORT/fhir`.
    base: String,
    versions: Arc<Mutex<Vec<Version>>>,
}

impl TlsUpstream {
    fn versions(&self) -> Vec<Version> {
        self.versions.lock().unwrap().clone()
    }
}

/// `GET /fhir/Patient/1`: a Patient linking to another on the upstream's base.
async fn patient(State(up): State<Upstreamed>, version: Version) -> Response {
    up.versions.lock().unwrap().push(version);
    fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Patient", "id": "1",
                "link": [{"other": {"reference": format!("{}/Patient/2", up.base)}, "type": "seealso"}]}),
    )
}

/// `GET /fhir/Observation`: a searchset of three, with absolute `fullUrl`s and a `self` link.
async fn search(State(up): State<Upstreamed>, version: Version) -> Response {
    up.versions.lock().unwrap().push(version);
    let base = &up.base;
    let entries: Vec<Value> = (0..3)
        .map(|n| {
            json!({"fullUrl": format!("{base}/Observation/o{n}"),
                   "resource": {"resourceType": "Observation", "id": format!("o{n}"),
                                "subject": {"reference": format!("{base}/Patient/1")}},
                   "search": {"mode": "match"}})
        })
        .collect();
    fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Bundle", "type": "searchset", "total": 3,
                "link": [{"relation": "self", "url": format!("{base}/Observation")}],
                "entry": entries}),
    )
}

/// Serves the FHIR app over TLS on 127.0.0.1:0 with a certificate `ca` issues for `names`,
/// offering `alpn` (e.g. `[b"h2"]`); a connection that negotiated `h2` is served HTTP/2 only,
/// any other HTTP/1.1 only.
async fn start_tls_upstream(ca: &Ca, names: &[&str], alpn: &[&[u8]]) -> TlsUpstream {
    let (chain, key) = ca.issue(names);
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}/fhir", listener.local_addr().unwrap());
    let versions: Arc<Mutex<Vec<Version>>> = Arc::default();
    let app = Router::new()
        .route("/fhir/Patient/1", get(patient))
        .route("/fhir/Observation", get(search))
        .with_state(Upstreamed {
            base: base.clone(),
            versions: versions.clone(),
        });
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A refused handshake (an untrusted certificate) just ends the connection.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let service = hyper_util::service::TowerToHyperService::new(app);
                let io = TokioIo::new(tls);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    });
    TlsUpstream { base, versions }
}

/// The gateway: the layer over `forwarder` (its public base set here), on 127.0.0.1:0 with the
/// public base `http://127.0.0.1:PORT/fhir`, which it returns.
async fn start_gateway(forwarder: UpstreamBuilder) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public = format!("http://{}/fhir", listener.local_addr().unwrap());
    let forwarder = forwarder
        .public_base(&public)
        .build()
        .expect("a valid upstream");
    let layer = AsyncLayer::builder(MemoryStore::new())
        .base_url(&public)
        .follow_links_on(forwarder.base())
        .build();
    let app = Router::new()
        .fallback_service(tower::ServiceBuilder::new().layer(layer).service(forwarder));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    public
}

const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The OperationOutcome's diagnostics of a `502`, after checking its status and code.
fn bad_gateway_diagnostics(reply: &support::Reply) -> String {
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    reply.assert_outcome("exception");
    reply.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_owned()
}

// GATEWAY-1, GATEWAY-2, SEC-1: a request through the gateway reaches an https upstream whose CA
// is trusted with root_certificate_pem; its answer names the public (http) base where the
// upstream named its own https one.
#[tokio::test]
async fn gateway_1_a_request_reaches_an_https_upstream_trusted_by_a_pem_root() {
    let ca = Ca::new();
    let upstream = start_tls_upstream(&ca, &["127.0.0.1"], BOTH).await;
    let public =
        start_gateway(Upstream::builder(&upstream.base).root_certificate_pem(ca.pem())).await;
    let reply = TestClient::default()
        .get(&format!("{public}/Patient/1"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(
        !text.contains(&upstream.base),
        "the upstream's address leaked: {text}"
    );
    assert_eq!(
        reply.json()["link"][0]["other"]["reference"],
        format!("{public}/Patient/2")
    );
    assert!(public.starts_with("http://"), "{public}");
    assert_eq!(upstream.versions().len(), 1, "the upstream answered once");
}

// GATEWAY-1, GATEWAY-2, KICK-2, BUNDLE-1: an async search through the gateway to an https
// upstream completes with a batch-response Bundle whose search result names the public base.
#[tokio::test]
async fn gateway_2_an_async_search_of_an_https_upstream_names_the_public_base() {
    let ca = Ca::new();
    let upstream = start_tls_upstream(&ca, &["127.0.0.1"], BOTH).await;
    let public =
        start_gateway(Upstream::builder(&upstream.base).root_certificate_pem(ca.pem())).await;
    let client = TestClient::default();
    let status = client
        .kick_off(Method::GET, &format!("{public}/Observation"), &[], "")
        .await;
    let done = client.poll_until_done(&status, 500).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let text = String::from_utf8(done.body.to_vec()).unwrap();
    assert!(
        !text.contains(&upstream.base),
        "the upstream's address leaked: {text}"
    );
    let bundle = done.json();
    assert_eq!(bundle["type"], "batch-response", "{bundle}");
    let entry = &bundle["entry"][0];
    assert_eq!(entry["response"]["status"], "200 OK", "{entry}");
    let result = &entry["resource"];
    let full_urls: Vec<&str> = result["entry"]
        .as_array()
        .expect("the search's entries")
        .iter()
        .filter_map(|e| e["fullUrl"].as_str())
        .collect();
    assert_eq!(
        full_urls,
        (0..3)
            .map(|n| format!("{public}/Observation/o{n}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(result["link"][0]["url"], format!("{public}/Observation"));
}

// GATEWAY-1, SEC-1: an upstream whose certificate is not trusted — issued by a CA that is in
// neither the platform's store nor given — is a 502 OperationOutcome that says the TLS handshake
// failed and why; the upstream never sees a request.
#[tokio::test]
async fn gateway_1_an_untrusted_certificate_is_a_502_naming_the_problem() {
    let ca = Ca::new();
    let upstream = start_tls_upstream(&ca, &["127.0.0.1"], BOTH).await;
    let public = start_gateway(Upstream::builder(&upstream.base)).await;
    let reply = TestClient::default()
        .get(&format!("{public}/Patient/1"))
        .await;
    let diagnostics = bad_gateway_diagnostics(&reply);
    assert!(
        diagnostics.contains("TLS handshake") && diagnostics.contains(&upstream.base),
        "{diagnostics}"
    );
    assert!(
        diagnostics.contains("UnknownIssuer") && diagnostics.contains("root_certificate_pem"),
        "the certificate problem and what to do: {diagnostics}"
    );
    assert!(upstream.versions().is_empty());
}

// GATEWAY-1, SEC-1: a certificate from a trusted CA but for another name is refused too: a 502
// whose diagnostics name the mismatch.
#[tokio::test]
async fn gateway_1_a_certificate_for_another_name_is_a_502_naming_the_problem() {
    let ca = Ca::new();
    let upstream = start_tls_upstream(&ca, &["fhir.internal"], BOTH).await;
    let public =
        start_gateway(Upstream::builder(&upstream.base).root_certificate_pem(ca.pem())).await;
    let reply = TestClient::default()
        .get(&format!("{public}/Patient/1"))
        .await;
    let diagnostics = bad_gateway_diagnostics(&reply);
    assert!(
        diagnostics.contains("TLS handshake")
            && diagnostics.contains("not valid for name")
            && diagnostics.contains("fhir.internal"),
        "the name the certificate holds: {diagnostics}"
    );
    assert!(upstream.versions().is_empty());
}

// GATEWAY-1: the forwarder speaks the protocol the upstream picks by ALPN: HTTP/2 with an upstream
// that offers only `h2`, HTTP/1.1 with one that offers only `http/1.1`, HTTP/2 with one that
// offers both. Two requests each, so a second connection or a reused one agrees.
#[tokio::test]
async fn gateway_1_alpn_picks_http2_or_http1_as_the_upstream_offers() {
    let ca = Ca::new();
    for (alpn, expected) in [
        (&[b"h2".as_slice()][..], Version::HTTP_2),
        (&[b"http/1.1".as_slice()][..], Version::HTTP_11),
        (BOTH, Version::HTTP_2),
    ] {
        let upstream = start_tls_upstream(&ca, &["127.0.0.1"], alpn).await;
        let public =
            start_gateway(Upstream::builder(&upstream.base).root_certificate_pem(ca.pem())).await;
        let client = TestClient::default();
        for _ in 0..2 {
            let reply = client.get(&format!("{public}/Patient/1")).await;
            assert_eq!(reply.status, StatusCode::OK, "{alpn:?}: {reply:?}");
            assert_eq!(
                reply.json()["link"][0]["other"]["reference"],
                format!("{public}/Patient/2")
            );
        }
        assert_eq!(upstream.versions(), [expected, expected], "{alpn:?}");
    }
}

// GATEWAY-1: `http2(true)` means HTTP/2 only over TLS too: it is spoken to an upstream that offers
// both, and an upstream that offers only HTTP/1.1 is a 502 saying no protocol was agreed.
#[tokio::test]
async fn gateway_1_http2_only_offers_only_h2() {
    let ca = Ca::new();
    let both = start_tls_upstream(&ca, &["127.0.0.1"], BOTH).await;
    let public = start_gateway(
        Upstream::builder(&both.base)
            .root_certificate_pem(ca.pem())
            .http2(true),
    )
    .await;
    let client = TestClient::default();
    let reply = client.get(&format!("{public}/Patient/1")).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(both.versions(), [Version::HTTP_2]);

    let http1 = start_tls_upstream(&ca, &["127.0.0.1"], &[b"http/1.1"]).await;
    let public = start_gateway(
        Upstream::builder(&http1.base)
            .root_certificate_pem(ca.pem())
            .http2(true),
    )
    .await;
    let diagnostics = bad_gateway_diagnostics(&client.get(&format!("{public}/Patient/1")).await);
    assert!(
        diagnostics.contains("TLS handshake") && diagnostics.contains("NoApplicationProtocol"),
        "{diagnostics}"
    );
    assert!(http1.versions().is_empty());
}

// GATEWAY-1: in a build with TLS, http upstreams are still spoken to in plain HTTP.
#[tokio::test]
async fn gateway_1_http_upstreams_still_work_with_tls_built_in() {
    let seen: Arc<Mutex<Vec<Version>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/fhir/Patient/1", get(patient))
        .with_state(Upstreamed {
            base: base.clone(),
            versions: seen.clone(),
        });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let public = start_gateway(Upstream::builder(&base)).await;
    let reply = TestClient::default()
        .get(&format!("{public}/Patient/1"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.json()["link"][0]["other"]["reference"],
        format!("{public}/Patient/2")
    );
    assert_eq!(*seen.lock().unwrap(), [Version::HTTP_11]);
}
