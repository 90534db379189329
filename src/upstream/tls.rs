//! TLS for `https` upstreams (feature `upstream-tls`): rustls over hyper-util's HTTP connector,
//! trusting the platform's store and the roots given to the builder, HTTP/2 negotiated by ALPN.

use std::sync::Arc;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

use crate::config::BuildError;

/// The forwarder's connector: TLS for `https` upstreams, plain TCP for `http` ones.
pub(super) type Connector = HttpsConnector<HttpConnector>;

/// What the builder was told about TLS; turned into a connector by [`connector`](Self::connector).
#[derive(Debug, Clone, Default)]
pub(super) struct TlsSettings {
    /// PEM texts of certificate authorities to trust besides the platform's.
    roots: Vec<Vec<u8>>,
    /// A whole client configuration, used as it is (but for ALPN).
    config: Option<ClientConfig>,
}

impl TlsSettings {
    pub(super) fn add_root_pem(&mut self, pem: &[u8]) {
        self.roots.push(pem.to_vec());
    }

    pub(super) fn set_config(&mut self, config: ClientConfig) {
        self.config = Some(config);
    }

    /// `http` wrapped in TLS for `https` URLs (`https_or_http`), offering `h2` and `http/1.1` by
    /// ALPN, or only `h2` when `http2_only`. The platform's roots are loaded only when `upstream`
    /// is an `https` URL: an `http` upstream never uses them.
    pub(super) fn connector(
        self,
        mut http: HttpConnector,
        upstream: &str,
        https: bool,
        http2_only: bool,
    ) -> Result<Connector, BuildError> {
        if self.config.is_some() && !self.roots.is_empty() {
            return Err(BuildError(
                "root_certificate_pem and tls_config cannot be combined: add the certificate \
                 authority to the root store of the tls_config instead"
                    .into(),
            ));
        }
        let mut config = match self.config {
            Some(config) => config,
            None => default_config(&self.roots, upstream, https)?,
        };
        // The builder below sets ALPN itself, and refuses a configuration that has some.
        config.alpn_protocols.clear();
        // The HTTP connector must pass `https` URLs on to the TLS one.
        http.enforce_http(false);
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http();
        let builder = if http2_only {
            builder.enable_http2()
        } else {
            builder.enable_http1().enable_http2()
        };
        Ok(builder.wrap_connector(http))
    }
}

/// A client configuration trusting the platform's roots (for an `https` upstream) and `pems`.
fn default_config(
    pems: &[Vec<u8>],
    upstream: &str,
    https: bool,
) -> Result<ClientConfig, BuildError> {
    let mut roots = RootCertStore::empty();
    for pem in pems {
        add_pem(&mut roots, pem)?;
    }
    if https {
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        for error in &native.errors {
            tracing::debug!(%error, "reading the platform's trusted certificates");
        }
        if added == 0 && pems.is_empty() {
            let why = native
                .errors
                .first()
                .map_or_else(|| "it is empty".to_owned(), |e| e.to_string());
            return Err(BuildError(format!(
                "no certificate authority to trust {upstream:?} with: the platform's trust store \
                 has none ({why}); install the CA certificates (e.g. the ca-certificates package), \
                 point SSL_CERT_FILE at a PEM file, or give the upstream's CA with \
                 root_certificate_pem"
            )));
        }
    }
    // The application's process-wide provider when it installed one (FIPS, say), else ring.
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BuildError(format!("TLS cannot be set up: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Adds every certificate of the PEM text `pem` to `roots`; an error when it holds none or one
/// that cannot be read.
fn add_pem(roots: &mut RootCertStore, pem: &[u8]) -> Result<(), BuildError> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| {
            BuildError(format!(
                "root_certificate_pem: the PEM text cannot be read ({e})"
            ))
        })?;
        roots.add(cert).map_err(|e| {
            BuildError(format!(
                "root_certificate_pem: a certificate of the PEM text is not usable as a trusted \
                 root ({e})"
            ))
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(BuildError(
            "root_certificate_pem: the PEM text holds no certificate (expected \
             -----BEGIN CERTIFICATE-----)"
                .into(),
        ));
    }
    Ok(())
}

/// What failed the TLS handshake, with what to do about it, when a TLS error is among the causes
/// of `error` (an unknown certificate authority, a certificate for another name, no common
/// protocol).
pub(super) fn handshake_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::CertificateError as Cert;

    let tls = handshake_error(error)?;
    let hint = match tls {
        rustls::Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
            " Trust the certificate authority that issued the upstream's certificate \
             (root_certificate_pem)."
        }
        rustls::Error::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        ) => " Reach the upstream by a name its certificate holds.",
        rustls::Error::InvalidCertificate(_) => " Check the upstream's certificate.",
        rustls::Error::NoApplicationProtocol
        | rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol) => {
            " The upstream speaks none of the protocols offered by ALPN (only h2 with \
             http2(true))."
        }
        _ => "",
    };
    Some(format!("{tls}.{hint}"))
}

/// The TLS error among the causes of `error`.
fn handshake_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps, and hyper-rustls wraps tokio-rustls's
        // `io::Error` (which wraps rustls's) in another: look inside.
        cause = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    fn connector(settings: TlsSettings) -> Result<Connector, BuildError> {
        settings.connector(HttpConnector::new(), "https://h/fhir", true, false)
    }

    #[test]
    fn a_pem_certificate_is_trusted() {
        let mut roots = RootCertStore::empty();
        let pem = format!("{}{}", ca_pem(), ca_pem());
        add_pem(&mut roots, pem.as_bytes()).unwrap();
        assert_eq!(roots.len(), 2, "both certificates of the text");
    }

    // GATEWAY-1: a PEM text that is broken or holds no certificate is refused when built.
    #[test]
    fn a_pem_without_a_usable_certificate_is_a_build_error() {
        let pem = ca_pem();
        let broken_base64 = pem.replacen("MII", "M!I", 1);
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        for (what, text, expected) in [
            ("empty", "", "holds no certificate"),
            ("not PEM", "hello", "holds no certificate"),
            ("a key only", key.as_str(), "holds no certificate"),
            ("broken base64", broken_base64.as_str(), "cannot be read"),
            (
                "not a certificate inside",
                "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
                "not usable",
            ),
        ] {
            let mut settings = TlsSettings::default();
            settings.add_root_pem(text.as_bytes());
            let error = connector(settings).expect_err(what).to_string();
            assert!(error.contains("root_certificate_pem"), "{what}: {error}");
            assert!(error.contains(expected), "{what}: {error}");
        }
    }

    #[test]
    fn roots_and_a_whole_config_cannot_be_combined() {
        let mut settings = TlsSettings::default();
        settings.add_root_pem(ca_pem().as_bytes());
        settings.set_config(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
        );
        let error = connector(settings).expect_err("both").to_string();
        assert!(error.contains("tls_config"), "{error}");
    }

    #[test]
    fn a_whole_config_with_alpn_of_its_own_is_accepted() {
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
        config.alpn_protocols = vec![b"fancy".to_vec()];
        let mut settings = TlsSettings::default();
        settings.set_config(config);
        // hyper-rustls panics on a configuration with ALPN set; the forwarder sets its own.
        // ALPN on the wire is tested in tests/gateway_tls.rs.
        assert!(connector(settings).is_ok());
    }
}
