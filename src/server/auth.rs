//! Who may call the API: an optional API key (`--api-key`, `--api-key-file`) and the origins whose
//! pages may call it from a browser (`--cors-allow-origin`).
//!
//! With a key, every request carries `Authorization: Bearer <key>`, except what a load balancer, a
//! browser or a monitoring system must reach without one ([`is_open`]). Browsers cannot set headers
//! on `EventSource`, `<img>` or a download link, so those GETs ([`accepts_query_key`]) may carry
//! `?api_key=<key>` instead; the parameter is taken off the request before any handler sees it,
//! and [`redacted`] keeps it out of logs and traces. Keys are compared in constant time and never
//! logged.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// The query parameter that may carry the key where a browser cannot send a header.
pub const QUERY_PARAM: &str = "api_key";

/// A secret the API asks for. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct ApiKey {
    /// sha256 of the key: what requests are compared against, so that neither the comparison's
    /// time nor a memory dump of the comparison tells the key's length or bytes.
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the API key is empty")]
    Empty,
    #[error(
        "the API key has characters that cannot be sent in an HTTP header (use printable ASCII)"
    )]
    NotPrintable,
}

impl ApiKey {
    /// A key as given on the command line or read from a file; surrounding whitespace (a file's
    /// final newline) is not part of it.
    pub fn new(key: &str) -> Result<Self, KeyError> {
        let key = key.trim();
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError::NotPrintable);
        }
        Ok(Self {
            digest: Sha256::digest(key.as_bytes()).into(),
        })
    }

    /// Whether `candidate` is the key, in time that depends on neither.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(candidate).into();
        digest.ct_eq(&self.digest).into()
    }

    /// Whether an `Authorization` header value is `Bearer <key>` (the scheme in any case).
    pub fn matches_bearer(&self, value: &HeaderValue) -> bool {
        let value = value.as_bytes();
        match value.split_at_checked(7) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") => {
                self.matches(token.trim_ascii())
            }
            _ => false,
        }
    }
}

/// The access settings of a server.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// None: the API is open to anyone who reaches it.
    pub api_key: Option<ApiKey>,
    /// Origins (`https://app.example.com`, or `*`) whose pages may call the API.
    pub cors_allow_origins: Vec<HeaderValue>,
}

/// Routes anyone may call, key or not: the page and its assets, the API's description, and what
/// probes and scrapers call.
pub fn is_open(method: &Method, path: &str) -> bool {
    if method == Method::OPTIONS {
        // CORS preflights carry no credentials by design; the CORS layer answers them.
        return true;
    }
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    matches!(
        path,
        "/" | "/openapi.json"
            | "/health"
            | "/ping"
            | "/metrics"
            | "/docs"
            | "/v2/health/live"
            | "/v2/health/ready"
    ) || path.starts_with("/static/")
        || path.starts_with("/docs/")
}

/// GETs a browser makes without being able to set a header: a job's event stream, its example
/// pictures, a model download.
pub fn accepts_query_key(method: &Method, path: &str) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(
        parts.as_slice(),
        ["jobs", _, "events"] | ["jobs", _, "examples", _] | ["models", _, "download"]
    )
}

/// The middleware: passes open routes and requests with the key, answers 401 otherwise.
pub async fn require_key(
    State(key): State<Option<ApiKey>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = key else {
        return next.run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    if is_open(&parts.method, parts.uri.path()) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let by_header = parts.headers.get(header::AUTHORIZATION);
    let (query_key, rest) = take_query_key(&parts.uri);
    let allowed = match (by_header, &query_key) {
        (Some(value), _) => key.matches_bearer(value),
        (None, Some(candidate)) if accepts_query_key(&parts.method, parts.uri.path()) => {
            key.matches(candidate.as_bytes())
        }
        _ => false,
    };
    if !allowed {
        let message = match (by_header, query_key.is_some()) {
            (Some(_), _) => "the API key is wrong: send `Authorization: Bearer <key>` with the server's key",
            (None, true) if !accepts_query_key(&parts.method, parts.uri.path()) => {
                "this endpoint takes the API key in the `Authorization: Bearer <key>` header, not in the query"
            }
            (None, true) => "the API key is wrong",
            (None, false) => "this server needs an API key: send `Authorization: Bearer <key>`",
        };
        let mut response =
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    if query_key.is_some() {
        // Handlers, and anything they log, never see the key.
        if let Some(uri) = rest {
            parts.uri = uri;
        }
    }
    next.run(Request::from_parts(parts, body)).await
}

/// The `api_key` parameter's (percent-decoded) value, and the URI without it.
fn take_query_key(uri: &Uri) -> (Option<String>, Option<Uri>) {
    let Some(query) = uri.query() else {
        return (None, None);
    };
    let mut key = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == QUERY_PARAM {
            key = Some(percent_decode(value));
        } else if !pair.is_empty() {
            kept.push(pair);
        }
    }
    if key.is_none() {
        return (None, None);
    }
    let path_and_query = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut builder = Uri::builder().path_and_query(path_and_query);
    if let Some(scheme) = uri.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = uri.authority() {
        builder = builder.authority(authority.clone());
    }
    (key, builder.build().ok())
}

fn percent_decode(value: &str) -> String {
    // `application/x-www-form-urlencoded`, as browsers write query strings.
    form_urlencoded::parse(format!("v={value}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// A URI as logs and traces may show it: an `api_key` parameter's value is replaced.
pub fn redacted(uri: &Uri) -> std::borrow::Cow<'_, str> {
    let Some(query) = uri.query() else {
        return std::borrow::Cow::Borrowed(uri.path());
    };
    if !query
        .split('&')
        .any(|p| p.split('=').next() == Some(QUERY_PARAM))
    {
        return std::borrow::Cow::Owned(format!("{}?{query}", uri.path()));
    }
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((QUERY_PARAM, _)) => format!("{QUERY_PARAM}=[redacted]"),
            _ if pair == QUERY_PARAM => format!("{QUERY_PARAM}=[redacted]"),
            _ => pair.to_string(),
        })
        .collect();
    std::borrow::Cow::Owned(format!("{}?{}", uri.path(), query.join("&")))
}

/// The CORS layer for `origins` (`*` allows any), preflights included; None when there are none.
pub fn cors(origins: &[HeaderValue]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().cloned())
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::HEAD])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                header::HeaderName::from_static("x-request-id"),
                header::HeaderName::from_static("inference-header-content-length"),
            ])
            .expose_headers([
                header::HeaderName::from_static("x-request-id"),
                header::HeaderName::from_static("x-inference-time"),
                header::HeaderName::from_static("x-total-time"),
                header::RETRY_AFTER,
                header::CONTENT_DISPOSITION,
                header::HeaderName::from_static("inference-header-content-length"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Checks an origin given to `--cors-allow-origin`: `*`, or `scheme://host[:port]` without a path.
pub fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    if origin == "*" {
        return Ok(HeaderValue::from_static("*"));
    }
    let bad = || {
        format!(
            "`{origin}` is not an origin: write it as a browser sends it, e.g. https://app.example.com or http://localhost:3000 (no path, no trailing slash), or * for any"
        )
    };
    let uri: Uri = origin.parse().map_err(|_| bad())?;
    // Exactly `scheme://authority`: what a browser's Origin header holds.
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) if origin == format!("{scheme}://{authority}") => {}
        _ => return Err(bad()),
    }
    HeaderValue::from_str(origin).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_themselves() {
        let key = ApiKey::new("s3cret-key\n").unwrap();
        assert!(key.matches(b"s3cret-key"));
        assert!(!key.matches(b"s3cret-ke"));
        assert!(!key.matches(b"s3cret-key "));
        assert!(!key.matches(b""));
        assert!(key.matches_bearer(&HeaderValue::from_static("Bearer s3cret-key")));
        assert!(key.matches_bearer(&HeaderValue::from_static("bearer s3cret-key")));
        assert!(!key.matches_bearer(&HeaderValue::from_static("Basic s3cret-key")));
        assert!(!key.matches_bearer(&HeaderValue::from_static("s3cret-key")));
        assert!(format!("{key:?}").find("s3cret").is_none());
        assert!(matches!(ApiKey::new(" \n"), Err(KeyError::Empty)));
        assert!(matches!(ApiKey::new("a b"), Err(KeyError::NotPrintable)));
    }

    #[test]
    fn the_query_key_is_taken_off_and_redacted() {
        let uri: Uri = "/jobs/1/events?x=1&api_key=a%2Bb%3D&y=2".parse().unwrap();
        let (key, rest) = take_query_key(&uri);
        assert_eq!(key.as_deref(), Some("a+b="));
        assert_eq!(rest.unwrap().to_string(), "/jobs/1/events?x=1&y=2");
        assert_eq!(redacted(&uri), "/jobs/1/events?x=1&api_key=[redacted]&y=2");
        let only: Uri = "/models/m/download?api_key=k".parse().unwrap();
        assert_eq!(
            take_query_key(&only).1.unwrap().to_string(),
            "/models/m/download"
        );
        assert_eq!(redacted(&only), "/models/m/download?api_key=[redacted]");
        let none: Uri = "/predict?top_k=3".parse().unwrap();
        assert_eq!(take_query_key(&none).0, None);
        assert_eq!(redacted(&none), "/predict?top_k=3");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn open_routes_and_query_routes() {
        for path in [
            "/",
            "/static/app.js",
            "/docs",
            "/docs/index.html",
            "/openapi.json",
            "/health",
            "/ping",
            "/metrics",
            "/v2/health/ready",
        ] {
            assert!(is_open(&Method::GET, path), "{path}");
        }
        for path in [
            "/predict",
            "/models",
            "/jobs",
            "/info",
            "/models/reload",
            "/v2/models/x",
        ] {
            assert!(!is_open(&Method::GET, path), "{path}");
        }
        assert!(!is_open(&Method::POST, "/health"));
        assert!(is_open(&Method::OPTIONS, "/predict"));
        assert!(accepts_query_key(&Method::GET, "/jobs/abc/events"));
        assert!(accepts_query_key(&Method::GET, "/jobs/abc/examples/3"));
        assert!(accepts_query_key(&Method::GET, "/models/cats/download"));
        assert!(!accepts_query_key(&Method::DELETE, "/models/cats"));
        assert!(!accepts_query_key(&Method::GET, "/models/cats"));
        assert!(!accepts_query_key(&Method::POST, "/jobs/abc/events"));
    }

    #[test]
    fn origins_are_checked() {
        assert!(parse_origin("https://app.example.com").is_ok());
        assert!(parse_origin("http://localhost:3000").is_ok());
        assert!(parse_origin("*").is_ok());
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://a.com/x",
            "",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }
}
