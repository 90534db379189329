//! Linking an export the wrapped service runs itself ([`UpstreamFiles::Link`], GATEWAY-5): the
//! job adopts the upstream's own manifest as its result, checked to be a bulk data manifest
//! (BULK-8, BULK-9), instead of copying the files it lists.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, EXPIRES};
use http::{HeaderValue, StatusCode, Uri};
use serde_json::Value;

use crate::follow::UPSTREAM_JOB;
use crate::job::StoredResponse;
use crate::origins::Origins;
use crate::outcome::{IssueCode, synthesized};
use crate::redact::without_access_token;

/// What a bulk job does with the files of an export that the wrapped service runs itself: one
/// that answers the job's request with `202` + `Content-Location`, as a FHIR server behind
/// `upstream::Upstream` (feature `upstream`) answers its own `$export`. Set with
/// [`AsyncLayerBuilder::upstream_export_files`](crate::AsyncLayerBuilder::upstream_export_files).
///
/// Either way the job follows the upstream's job (polls it, shows its `X-Progress`, sends it a
/// `DELETE` when cancelled). Exports the layer runs itself (a paged search, an NDJSON answer) always
/// write their files into the layer's file store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UpstreamFiles {
    /// Every file the upstream's manifest lists is fetched through the wrapped service and written
    /// into the layer's file store; the job's manifest lists the layer's own file URLs. The files
    /// live as long as the job (its [`retention`](crate::AsyncLayerBuilder::retention)), however
    /// soon the upstream drops its own; the cost is reading and storing every byte once more.
    #[default]
    Copy,
    /// Nothing is copied: the job's manifest is the upstream's own, as the wrapped service
    /// answered it (through `Upstream`, its URLs are already on the public base), once checked
    /// to be a bulk data manifest; anything else fails the job with a `502` OperationOutcome.
    /// `requiresAccessToken` stays what the upstream said.
    ///
    /// Clients fetch the files at the URLs listed. A URL on the public base reaches the wrapped
    /// service through the layer, with the caller's credentials, even under the layer's own
    /// route prefix (an upstream with the same status path): a file request there for a job
    /// the layer does not hold is passed on, not answered `404`. Such requests are the
    /// upstream's to authorise, like any request passed through: the layer's caller binding
    /// ([`caller`](crate::AsyncLayerBuilder::caller)) covers its own jobs, not the upstream's
    /// files. A URL on another host (an object store's presigned URL: the bulk data IG allows
    /// files elsewhere) is left as the upstream wrote it, and is stored with the manifest in the
    /// job store for the job's retention.
    ///
    /// The files live only as long as the upstream keeps them: the job's result expires no
    /// later than the `Expires` the upstream sent with its manifest, and a `DELETE` of the job
    /// sends the upstream a `DELETE` of its own (best effort), which releases them. Without an
    /// upstream `Expires`, set the layer's [`retention`](crate::AsyncLayerBuilder::retention) no
    /// longer than the upstream keeps its files. An `access_token` in the manifest's `request`
    /// is removed before it is stored (SEC-11).
    Link,
}

/// The result of a linked export: the upstream's manifest `body` (its final answer, read whole),
/// kept as the job's manifest when it is one, with the upstream's status URL (`upstream_job`,
/// for a later `DELETE`) and its `Expires` (which bounds the job's retention) kept beside it.
/// `Err`: a failure (`502` + OperationOutcome) naming what is wrong with it.
pub(crate) fn adopt(
    body: Bytes,
    origins: &Origins<'_>,
    upstream_job: &Uri,
    expires: Option<&HeaderValue>,
) -> Result<StoredResponse, StoredResponse> {
    let invalid = |why: &str| {
        synthesized(
            StatusCode::BAD_GATEWAY,
            IssueCode::Processing,
            &format!(
                "The FHIR server's own export completed, but its answer is not a bulk data manifest the \
                 layer can pass on: {why}. No files are listed; ask the FHIR server's operator, or run the \
                 export again."
            ),
        )
    };
    let mut manifest: Value = serde_json::from_slice(&body)
        .map_err(|error| invalid(&format!("it is not JSON ({error})")))?;
    let elsewhere = check(&manifest, origins).map_err(|why| invalid(&why))?;
    if elsewhere > 0 {
        tracing::info!(
            files = elsewhere,
            "a linked export lists files on another host; their URLs are kept as the FHIR server wrote them"
        );
    }
    // SEC-11: the upstream's `request` is the replayed kick-off, which may carry the caller's
    // `access_token`; the manifest is stored, so that pair goes (and the manifest is written anew).
    let body = match manifest.get("request").and_then(Value::as_str) {
        Some(request) if without_access_token(request) != request => {
            let kept = without_access_token(request).into_owned();
            manifest["request"] = Value::String(kept);
            Bytes::from(manifest.to_string())
        }
        _ => body,
    };
    let mut headers = vec![
        (CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (
            UPSTREAM_JOB,
            HeaderValue::from_str(&upstream_job.to_string())
                .map_err(|_| invalid("its status URL cannot be kept"))?,
        ),
    ];
    if let Some(expires) = expires.filter(|value| {
        value
            .to_str()
            .is_ok_and(|v| httpdate::parse_http_date(v).is_ok())
    }) {
        headers.push((EXPIRES, expires.clone()));
    }
    Ok(StoredResponse {
        status: StatusCode::OK,
        headers,
        body,
    })
}

/// Checks that `manifest` is a bulk data manifest (BULK-9): an object with `transactionTime`,
/// `request` (not in the STU4 ballot's form, which names its `manifestType`),
/// `requiresAccessToken` and an `output` array, and where `error`, `outcome` and `deleted` are
/// given, arrays too; every file with an absolute `http(s)` URL. The count of files on another
/// host than the public base and the trusted bases; the reason when it is not one.
fn check(manifest: &Value, origins: &Origins<'_>) -> Result<usize, String> {
    let Some(fields) = manifest.as_object() else {
        return Err("it is not a JSON object".to_owned());
    };
    if fields
        .get("transactionTime")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("it has no `transactionTime`".to_owned());
    }
    let stu4 = fields.contains_key("manifestType");
    match fields.get("request") {
        Some(Value::String(_)) => {}
        None if stu4 => {}
        Some(_) => return Err("its `request` is not a string".to_owned()),
        None => return Err("it has no `request`".to_owned()),
    }
    if !fields
        .get("requiresAccessToken")
        .is_some_and(Value::is_boolean)
    {
        return Err("its `requiresAccessToken` is not true or false".to_owned());
    }
    if !fields.get("output").is_some_and(Value::is_array) {
        return Err("it has no `output` array".to_owned());
    }
    let mut elsewhere = 0;
    for name in ["output", "error", "outcome", "deleted"] {
        let Some(files) = fields.get(name) else {
            continue;
        };
        let Some(files) = files.as_array() else {
            return Err(format!("its `{name}` is not an array"));
        };
        for (index, file) in files.iter().enumerate() {
            let Some(url) = file.get("url").and_then(Value::as_str) else {
                return Err(format!("`{name}[{index}]` has no `url`"));
            };
            let shown = || url.chars().take(120).collect::<String>();
            let absolute = url.parse::<Uri>().is_ok_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
            });
            if !absolute {
                return Err(format!(
                    "the `url` of `{name}[{index}]` ({:?}) is not an absolute http(s) URL",
                    shown()
                ));
            }
            // On the public base (or a trusted one) the layer passes its requests on.
            if origins.inner_uri(url, None).is_err() {
                elsewhere += 1;
            }
        }
    }
    Ok(elsewhere)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{AsyncLayer, MemoryStore};

    const PUBLIC: &str = "https://gw.example/fhir";

    fn adopted(manifest: &Value) -> Result<StoredResponse, StoredResponse> {
        let shared = AsyncLayer::builder(MemoryStore::default())
            .base_url(PUBLIC)
            .follow_links_on("http://upstream.internal:8080/fhir")
            .assemble()
            .expect("a valid layer");
        let origins = Origins::new(&shared.config, PUBLIC);
        let job: Uri = "/fhir/_async/0123".parse().unwrap();
        let expires = HeaderValue::from_static("Wed, 21 Oct 2026 07:28:00 GMT");
        adopt(
            Bytes::from(manifest.to_string()),
            &origins,
            &job,
            Some(&expires),
        )
    }

    fn valid() -> Value {
        json!({
            "transactionTime": "2026-03-02T08:59:58.123Z",
            "request": "https://gw.example/fhir/Patient/$export?_type=Patient",
            "requiresAccessToken": true,
            "output": [{"type": "Patient", "url": "https://gw.example/fhir/_async/abc/file/Patient-1.ndjson", "count": 3}],
            "error": []
        })
    }

    // GATEWAY-5, BULK-8, BULK-9: a manifest is kept byte for byte, `application/json`, with the
    // upstream's status URL and `Expires` beside it; files elsewhere are kept as they are.
    #[tokio::test]
    async fn gateway_5_a_manifest_is_adopted_as_it_is() {
        let mut manifest = valid();
        manifest["output"].as_array_mut().unwrap().push(
            json!({"type": "Observation", "url": "https://bucket.s3.example/x?X-Amz-Signature=1"}),
        );
        let sent = manifest.to_string();
        let stored = adopted(&manifest).expect("a valid manifest");
        assert_eq!(stored.status, StatusCode::OK);
        assert_eq!(stored.body, sent.as_bytes());
        assert_eq!(stored.header(&CONTENT_TYPE).unwrap(), "application/json");
        assert_eq!(stored.header(&UPSTREAM_JOB).unwrap(), "/fhir/_async/0123");
        assert_eq!(
            stored.header(&EXPIRES).unwrap(),
            "Wed, 21 Oct 2026 07:28:00 GMT"
        );

        // BULK-9: the STU4 ballot's form has no `request`.
        let mut stu4 = valid();
        stu4.as_object_mut().unwrap().remove("request");
        stu4["manifestType"] =
            json!("http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest");
        assert!(adopted(&stu4).is_ok());
    }

    // GATEWAY-5, BULK-6, BULK-9: anything but a bulk data manifest fails the job: `502` and an
    // OperationOutcome that says what is wrong.
    #[tokio::test]
    async fn gateway_5_a_bad_manifest_fails_the_job_with_an_outcome() {
        let without = |field: &str| {
            let mut manifest = valid();
            manifest.as_object_mut().unwrap().remove(field);
            manifest
        };
        let with = |field: &str, value: Value| {
            let mut manifest = valid();
            manifest[field] = value;
            manifest
        };
        for (manifest, why) in [
            (json!([1, 2]), "not a JSON object"),
            (
                json!({"resourceType": "OperationOutcome", "issue": []}),
                "no `transactionTime`",
            ),
            (without("transactionTime"), "no `transactionTime`"),
            (without("request"), "no `request`"),
            (with("request", json!(7)), "`request` is not a string"),
            (without("requiresAccessToken"), "`requiresAccessToken`"),
            (
                with("requiresAccessToken", json!("yes")),
                "`requiresAccessToken`",
            ),
            (without("output"), "no `output` array"),
            (with("output", json!({})), "no `output` array"),
            (with("error", json!("none")), "`error` is not an array"),
            (
                with("output", json!([{"type": "Patient"}])),
                "`output[0]` has no `url`",
            ),
            (
                with(
                    "output",
                    json!([{"type": "Patient", "url": "/fhir/file/1"}]),
                ),
                "not an absolute http(s) URL",
            ),
            (
                with("deleted", json!([{"url": "ftp://files.example/1"}])),
                "`deleted[0]`",
            ),
        ] {
            let failed = adopted(&manifest).expect_err(&manifest.to_string());
            assert_eq!(failed.status, StatusCode::BAD_GATEWAY, "{manifest}");
            assert_eq!(
                failed.header(&CONTENT_TYPE).unwrap(),
                "application/fhir+json"
            );
            let outcome: Value = serde_json::from_slice(&failed.body).unwrap();
            assert_eq!(outcome["resourceType"], "OperationOutcome");
            assert_eq!(outcome["issue"][0]["code"], "processing");
            let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
            assert!(diagnostics.contains(why), "{why}: {diagnostics}");
        }
        let job: Uri = "/x".parse().unwrap();
        let shared = AsyncLayer::builder(MemoryStore::default())
            .base_url(PUBLIC)
            .assemble()
            .unwrap();
        let origins = Origins::new(&shared.config, PUBLIC);
        let failed = adopt(Bytes::from_static(b"not json"), &origins, &job, None).unwrap_err();
        assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
    }

    // SEC-11: a token in the upstream's `request` is not stored; everything else is kept.
    #[tokio::test]
    async fn sec_11_an_access_token_in_request_is_not_stored() {
        let mut manifest = valid();
        manifest["request"] =
            json!("https://gw.example/fhir/Patient/$export?access%5Ftoken=SECRET&_type=Patient");
        let stored = adopted(&manifest).unwrap();
        let text = String::from_utf8(stored.body.to_vec()).unwrap();
        assert!(!text.contains("SECRET"), "{text}");
        let kept: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            kept["request"],
            "https://gw.example/fhir/Patient/$export?_type=Patient"
        );
        assert_eq!(kept["output"], manifest["output"]);
    }
}
