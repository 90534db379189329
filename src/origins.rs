//! Which URLs the wrapped service writes the layer may follow, and where they lead inside it:
//! the public base (mapped onto the wrapped service's base path), bases trusted like it
//! (`follow_links_on`, an upstream's own address), and the kick-off's own host. Never another
//! server: the caller's credentials go with every request the layer makes.

use http::Uri;

use crate::config::Config;

/// Where links the wrapped service writes may lead (`next` links, an upstream's status URL).
pub(crate) struct Origins<'a> {
    /// The public base URL (`https://fhir.example.org/fhir`).
    public_base: &'a str,
    /// The base path as the wrapped service sees it.
    inner_base_path: &'a str,
    /// Other bases trusted like the public one (`follow_links_on`).
    trusted: &'a [String],
}

impl<'a> Origins<'a> {
    /// The origins of a layer configured as `config`, whose public base is `public_base`.
    pub(crate) fn new(config: &'a Config, public_base: &'a str) -> Self {
        Self {
            public_base,
            inner_base_path: &config.base_path,
            trusted: &config.trusted_bases,
        }
    }

    /// The URI of a `next` link, for the wrapped service: a link under the public base is
    /// mapped onto the inner base path; another absolute link must name the kick-off's own
    /// host (`host`), and its path and query are used. A link to another server is not
    /// followed: its answer would not be this server's, and the caller's credentials must not
    /// go there.
    pub(crate) fn inner_uri(&self, link: &str, host: Option<&str>) -> Result<Uri, String> {
        let invalid = || "its link is not a valid URL".to_owned();
        let under = |base: &str| {
            link.get(..base.len())
                .filter(|head| head.eq_ignore_ascii_case(base))
                .map(|_| &link[base.len()..])
                .filter(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
        };
        // GATEWAY-3: on the public base, or on a base trusted like it (an upstream's own).
        if let Some(rest) = std::iter::once(self.public_base)
            .chain(self.trusted.iter().map(String::as_str))
            .find_map(under)
        {
            let path = if rest.is_empty() || rest.starts_with('?') {
                format!("{}/{rest}", self.inner_base_path)
            } else {
                format!("{}{rest}", self.inner_base_path)
            };
            return path.parse().map_err(|_| invalid());
        }
        let uri: Uri = link.parse().map_err(|_| invalid())?;
        if let Some(theirs) = uri.authority() {
            if !host.is_some_and(|ours| theirs.as_str().eq_ignore_ascii_case(ours)) {
                return Err(format!("its link points to another server ({theirs})"));
            }
        }
        let Some(path_and_query) = uri.path_and_query().filter(|p| p.path().starts_with('/'))
        else {
            return Err("its link has no absolute path".to_owned());
        };
        path_and_query.as_str().parse().map_err(|_| invalid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_followed_on_this_server_only() {
        let origins = Origins {
            public_base: "https://fhir.example.org/fhir",
            inner_base_path: "/r4",
            trusted: &["http://upstream.internal:8103/fhir/R4".to_owned()],
        };
        let host = Some("internal:8080");
        let next = |link: &str| origins.inner_uri(link, host).map(|u| u.to_string());
        // Under the public base: mapped onto the inner base path.
        assert_eq!(
            next("https://fhir.example.org/fhir/Patient?_page=2").unwrap(),
            "/r4/Patient?_page=2"
        );
        assert_eq!(
            next("HTTPS://FHIR.example.org/fhir?_page=2").unwrap(),
            "/r4/?_page=2"
        );
        // The wrapped service's own view of itself.
        assert_eq!(
            next("http://internal:8080/r4/Patient?_page=2").unwrap(),
            "/r4/Patient?_page=2"
        );
        assert_eq!(next("/r4/Patient?_page=2").unwrap(), "/r4/Patient?_page=2");
        // GATEWAY-3: on a trusted base (an upstream's own): mapped onto the inner base path.
        assert_eq!(
            next("http://upstream.internal:8103/fhir/R4?_getpages=a&_page=2").unwrap(),
            "/r4/?_getpages=a&_page=2"
        );
        assert_eq!(
            next("http://upstream.internal:8103/fhir/R4/Patient?_page=2").unwrap(),
            "/r4/Patient?_page=2"
        );
        assert!(next("http://upstream.internal:8103/fhir/R4x/Patient").is_err());
        assert!(next("http://upstream.internal:8103/other/Patient").is_err());
        // Anywhere else: not followed.
        assert!(next("https://evil.example/fhir/Patient?_page=2").is_err());
        assert!(next("https://fhir.example.org/fhirx/Patient").is_err());
        assert!(next("https://fhir.example.org.evil/fhir/Patient").is_err());
        assert!(next("Patient?_page=2").is_err());
        assert!(next("not a url").is_err());
        assert!(
            origins
                .inner_uri("http://internal:8080/r4/Patient", None)
                .is_err()
        );
    }
}
