//! Listing a prefix with ListObjectsV2 requests of our own, signed by object_store's
//! SigV4 signer and sent through the run's counting HTTP client.
//!
//! Why not object_store's `list`: it parses every key of a page into its `Path` and
//! fails the whole listing on one key it cannot address (an empty `//` segment, a `.`
//! or `..` segment). One such object would then stop a run over a whole corpus. Here
//! every key is listed as the store has it; the places that read an object refuse an
//! unaddressable key for that object alone (an unreadable shard).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use object_store::aws::{AmazonS3, AwsAuthorizer};
use object_store::client::{HttpClient, HttpRequest, HttpRequestBody};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The key, exactly as the store lists it.
    pub key: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
}

/// What a bucket's listings need: where to send them and how to sign them.
#[derive(Debug)]
pub(super) struct BucketLister {
    /// object_store's `bucket_endpoint` for the same settings (listings go to it).
    pub(super) bucket_url: String,
    pub(super) region: String,
    /// False for anonymous access (`storage.anonymous`, or no credentials found).
    pub(super) signed: bool,
    pub(super) client: HttpClient,
    pub(super) max_retries: usize,
    pub(super) retry_timeout: Duration,
}

/// RFC 3986 unreserved characters stay, everything else is escaped: the form SigV4's
/// canonical query string uses, so the request sent is the request signed.
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListBucketResult {
    #[serde(default)]
    contents: Vec<Contents>,
    #[serde(default)]
    next_continuation_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Contents {
    key: String,
    size: u64,
    last_modified: DateTime<Utc>,
}

/// Why a listing failed: a message for the user and whether a retry may help.
#[derive(Debug)]
pub(super) struct ListError {
    pub(super) message: String,
    /// The HTTP status of the store's answer, when it answered.
    pub(super) status: Option<u16>,
    pub(super) retryable: bool,
}

impl BucketLister {
    /// Every object whose key starts with `prefix` (all depths), in the store's order
    /// (S3 lists keys in ascending UTF-8 byte order).
    pub(super) async fn list(
        &self,
        store: &AmazonS3,
        prefix: &str,
    ) -> Result<Vec<Listed>, ListError> {
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .page_with_retries(store, prefix, token.as_deref(), None)
                .await?;
            found.extend(page.contents.into_iter().map(|c| Listed {
                key: c.key,
                size: c.size,
                last_modified: c.last_modified,
            }));
            match page.next_continuation_token {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => return Ok(found),
            }
        }
    }

    /// One request for at most one key: fails when the bucket does not exist or these
    /// credentials may not list it.
    pub(super) async fn probe(&self, store: &AmazonS3, prefix: &str) -> Result<(), ListError> {
        self.page_with_retries(store, prefix, None, Some("1"))
            .await
            .map(|_| ())
    }

    /// One page, retried as object_store retries its requests: throttling, 5xx and
    /// broken connections, with exponential backoff from 100 ms to 15 s, up to
    /// `max_retries` times and `retry_timeout` in all.
    async fn page_with_retries(
        &self,
        store: &AmazonS3,
        prefix: &str,
        token: Option<&str>,
        max_keys: Option<&str>,
    ) -> Result<ListBucketResult, ListError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut retries = 0;
        loop {
            match self.page(store, prefix, token, max_keys).await {
                Err(e)
                    if e.retryable
                        && retries < self.max_retries
                        && started.elapsed() + backoff < self.retry_timeout =>
                {
                    retries += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(15));
                }
                other => return other,
            }
        }
    }

    async fn page(
        &self,
        store: &AmazonS3,
        prefix: &str,
        token: Option<&str>,
        max_keys: Option<&str>,
    ) -> Result<ListBucketResult, ListError> {
        let fail = |message: String, retryable| ListError {
            message,
            status: None,
            retryable,
        };
        let mut query = vec![("list-type", "2")];
        if !prefix.is_empty() {
            query.push(("prefix", prefix));
        }
        if let Some(token) = token {
            query.push(("continuation-token", token));
        }
        if let Some(max_keys) = max_keys {
            query.push(("max-keys", max_keys));
        }
        let query: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, QUERY)))
            .collect();
        let url = format!("{}?{}", self.bucket_url, query.join("&"));
        let mut request: HttpRequest = http::Request::builder()
            .method(http::Method::GET)
            .uri(&url)
            .body(HttpRequestBody::empty())
            .map_err(|e| fail(format!("cannot build the request for {url}: {e}"), false))?;
        if self.signed {
            let credential = store
                .credentials()
                .get_credential()
                .await
                .map_err(|e| fail(e.to_string(), false))?;
            AwsAuthorizer::new(&credential, "s3", &self.region).authorize(&mut request, None);
        }
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| fail(e.to_string(), true))?;
        let status = response.status();
        let body = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| fail(e.to_string(), true))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(ListError {
                message: format!("{status}: {}", error_message(&text)),
                status: Some(status.as_u16()),
                retryable: status.is_server_error() || status.as_u16() == 429,
            });
        }
        quick_xml::de::from_reader(body.as_ref())
            .map_err(|e| fail(format!("the store's listing is not valid XML: {e}"), false))
    }
}

/// The `<Code>` and `<Message>` of an S3 error body, or the body itself.
fn error_message(body: &str) -> String {
    let field = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].to_string())
    };
    match (field("Code"), field("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => body.chars().take(200).collect(),
    }
}

/// object_store's `bucket_endpoint` for these settings (aws/builder.rs): an endpoint
/// given with host-style addressing already names the bucket.
pub(super) fn bucket_url(
    endpoint: Option<&str>,
    bucket: &str,
    region: &str,
    virtual_hosted: bool,
) -> String {
    match (endpoint, virtual_hosted) {
        (Some(endpoint), true) => endpoint.to_string(),
        (Some(endpoint), false) => format!("{}/{bucket}", endpoint.trim_end_matches('/')),
        (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
        (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_escaped_as_sigv4_canonicalises_them() {
        let escaped = utf8_percent_encode("a b/c+d=é~_.-", QUERY).to_string();
        assert_eq!(escaped, "a%20b%2Fc%2Bd%3D%C3%A9~_.-");
    }

    #[test]
    fn bucket_urls_follow_object_store() {
        assert_eq!(
            bucket_url(Some("http://127.0.0.1:9000/"), "b", "r", false),
            "http://127.0.0.1:9000/b"
        );
        assert_eq!(
            bucket_url(None, "b", "eu-west-1", true),
            "https://b.s3.eu-west-1.amazonaws.com"
        );
    }

    #[test]
    fn pages_parse_keys_object_store_cannot_address() {
        let xml = "<?xml version=\"1.0\"?><ListBucketResult><Name>b</Name>\
            <Contents><Key>a//b.parquet</Key><LastModified>2026-12-06T10:00:00.000Z\
            </LastModified><ETag>\"x\"</ETag><Size>12</Size></Contents>\
            <Contents><Key>a/&amp;./c</Key><LastModified>2026-12-06T10:00:00Z\
            </LastModified><Size>3</Size></Contents>\
            <IsTruncated>true</IsTruncated><NextContinuationToken>t1\
            </NextContinuationToken></ListBucketResult>";
        let page: ListBucketResult = quick_xml::de::from_reader(xml.as_bytes()).unwrap();
        let keys: Vec<&str> = page.contents.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["a//b.parquet", "a/&./c"]);
        assert_eq!(page.contents[0].size, 12);
        assert_eq!(page.next_continuation_token.as_deref(), Some("t1"));
    }

    #[test]
    fn error_bodies_give_code_and_message() {
        let body = "<Error><Code>NoSuchBucket</Code><Message>The specified bucket does \
                    not exist</Message></Error>";
        assert_eq!(
            error_message(body),
            "NoSuchBucket: The specified bucket does not exist"
        );
    }
}
