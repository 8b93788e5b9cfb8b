//! Who may call the API: `--api-key` (header, or `?api_key=` where a browser cannot send one),
//! the routes open without it, CORS, and Swagger UI at `/docs`.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use cnnserve::engine::{Engine, EngineConfig};
use cnnserve::metrics::Metrics;
use cnnserve::server::auth::{Access, ApiKey};
use cnnserve::server::{self, AppState, ServerConfig};

const KEY: &str = "k3y-Of/the+server=";
const ORIGIN: &str = "https://app.example.com";

fn app(access: Access) -> Router {
    let engine = Engine::new(
        EngineConfig::on(candle_core::Device::Cpu),
        Arc::new(Metrics::new()),
    );
    let dir = std::env::temp_dir();
    let state = AppState::new(
        engine,
        ServerConfig {
            weights_dir: dir,
            payload_limit: 1 << 20,
            device_name: "cpu".into(),
            max_dataset_bytes: 1 << 20,
        },
        None,
    )
    .with_access(access);
    server::router(state)
}

fn locked() -> Router {
    app(Access {
        api_key: Some(ApiKey::new(KEY).unwrap()),
        cors_allow_origins: vec![HeaderValue::from_static(ORIGIN)],
    })
}

async fn send(
    app: &Router,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn with_key(method: Method, uri: &str, key: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn without_a_key_configured_everything_is_open() {
    let app = app(Access::default());
    let (status, headers, _) = send(&app, get("/models")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none(),
        "no CORS unless asked"
    );
}

#[tokio::test]
async fn protected_routes_need_the_key_in_the_header() {
    let app = locked();
    for (method, uri) in [
        (Method::GET, "/models"),
        (Method::GET, "/jobs"),
        (Method::GET, "/info"),
        (Method::POST, "/predict"),
        (Method::POST, "/models/reload"),
        (Method::DELETE, "/models/googlenet"),
        (Method::POST, "/finetune"),
        (Method::GET, "/no/such/route"),
    ] {
        let request = Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let (status, headers, body) = send(&app, request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error_type"], "unauthorized");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{body}"
        );

        let (status, _, body) = send(&app, with_key(method.clone(), uri, "wrong")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"].as_str().unwrap().contains("wrong"), "{body}");
    }
    let (status, _, body) = send(&app, with_key(Method::GET, "/models", KEY)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    // The scheme's case does not matter; a key with a prefix or suffix is another key.
    let request = Request::get("/models")
        .header(header::AUTHORIZATION, format!("bearer {KEY}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, request).await.0, StatusCode::OK);
    for almost in [&KEY[1..], &format!("{KEY}x"), ""] {
        assert_eq!(
            send(&app, with_key(Method::GET, "/models", almost)).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    // Past the key, the usual answers: an unknown route is a 404 again.
    let (status, _, _) = send(&app, with_key(Method::GET, "/no/such/route", KEY)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_page_docs_probes_and_metrics_stay_open() {
    let app = locked();
    for uri in [
        "/",
        "/static/app.js",
        "/static/style.css",
        "/openapi.json",
        "/docs/",
        "/health",
        "/ping",
        "/metrics",
    ] {
        let (status, _, _) = send(&app, get(uri)).await;
        assert_ne!(status, StatusCode::UNAUTHORIZED, "{uri}");
        assert!(
            status.is_success() || status == StatusCode::SERVICE_UNAVAILABLE,
            "{uri}: {status}"
        );
    }
}

#[tokio::test]
async fn browser_gets_may_carry_the_key_in_the_query_and_nothing_else_may() {
    let app = locked();
    let encoded = form_urlencoded::byte_serialize(KEY.as_bytes()).collect::<String>();
    // Past the check: no job manager in this app (503), no such model (404).
    for uri in [
        format!("/jobs/abc/events?api_key={encoded}"),
        format!("/jobs/abc/examples/0?api_key={encoded}"),
        format!("/models/none/download?api_key={encoded}"),
    ] {
        let (status, _, body) = send(&app, get(&uri)).await;
        assert!(
            status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::NOT_FOUND,
            "{uri}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        let (status, _, _) = send(&app, get(&uri.replace(&encoded, "nope"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
    }
    for (method, uri) in [
        (Method::GET, format!("/models?api_key={encoded}")),
        (Method::POST, format!("/predict?api_key={encoded}")),
        (Method::DELETE, format!("/jobs/abc?api_key={encoded}")),
    ] {
        let request = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = send(&app, request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("not in the query"),
            "{body}"
        );
    }
}

/// Everything tracing writes, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn keys_never_reach_the_logs() {
    // The process-wide subscriber: a scoped one misses events whose callsites other tests of this
    // binary, on other threads, registered first without one. The other tests' lines land here
    // too, and carry no key in the clear either.
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    let captured = CAPTURED
        .get_or_init(|| {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
            captured
        })
        .clone();
    let app = locked();
    send(
        &app,
        get(&format!("/models/none/download?api_key={KEY}&x=1")),
    )
    .await;
    send(&app, get("/jobs/abc/events?api_key=not-the-key")).await;
    send(&app, with_key(Method::GET, "/models", KEY)).await;
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("/models/none/download?api_key=[redacted]&x=1"),
        "{logs}"
    );
    assert!(
        logs.contains("/jobs/abc/events?api_key=[redacted]"),
        "{logs}"
    );
    assert!(
        !logs.contains("k3y") && !logs.contains("not-the-key"),
        "{logs}"
    );
}

#[tokio::test]
async fn cors_answers_preflights_and_marks_answers_for_allowed_origins_only() {
    let app = locked();
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/predict")
        .header(header::ORIGIN, ORIGIN)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "authorization,content-type",
        )
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = send(&app, preflight).await;
    assert!(status.is_success(), "{status}");
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], ORIGIN);
    let methods = headers[header::ACCESS_CONTROL_ALLOW_METHODS]
        .to_str()
        .unwrap();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    let allowed = headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );

    // A 401 is readable by the page that caused it; answers carry the headers it may read.
    let request = Request::get("/models")
        .header(header::ORIGIN, ORIGIN)
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = send(&app, request).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], ORIGIN);
    let mut request = with_key(Method::GET, "/models", KEY);
    request
        .headers_mut()
        .insert(header::ORIGIN, HeaderValue::from_static(ORIGIN));
    let (status, headers, _) = send(&app, request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], ORIGIN);
    let exposed = headers[header::ACCESS_CONTROL_EXPOSE_HEADERS]
        .to_str()
        .unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");

    // Another origin gets no permission.
    let mut request = with_key(Method::GET, "/models", KEY);
    request.headers_mut().insert(
        header::ORIGIN,
        HeaderValue::from_static("https://evil.example"),
    );
    let (_, headers, _) = send(&app, request).await;
    assert!(headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());

    // `*` allows any origin.
    let any = self::app(Access {
        api_key: None,
        cors_allow_origins: vec![HeaderValue::from_static("*")],
    });
    let request = Request::get("/models")
        .header(header::ORIGIN, "https://anyone.example")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = send(&any, request).await;
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
}

#[tokio::test]
async fn swagger_ui_is_served_from_the_binary_and_reads_our_openapi() {
    let app = app(Access::default());
    let (status, headers, body) = send(&app, get("/docs/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(String::from_utf8_lossy(&body).contains("swagger-ui"));
    let (status, _, body) = send(&app, get("/docs/swagger-initializer.js")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("/openapi.json"));
    for asset in ["/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js"] {
        let (status, _, body) = send(&app, get(asset)).await;
        assert_eq!(status, StatusCode::OK, "{asset}");
        assert!(body.len() > 10_000, "{asset} is the real file");
    }
    // /docs leads to /docs/.
    let (status, headers, _) = send(&app, get("/docs")).await;
    assert!(status.is_redirection() || status.is_success(), "{status}");
    if status.is_redirection() {
        assert_eq!(headers[header::LOCATION], "/docs/");
    }

    // The description marks what the key protects.
    let (_, _, body) = send(&app, get("/openapi.json")).await;
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );
    assert!(doc["paths"]["/predict"]["post"]["security"].is_array());
    assert!(doc["paths"]["/health"]["get"].get("security").is_none());
}
