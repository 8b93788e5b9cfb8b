//! The browser demo page, compiled into the binary: one file to deploy, nothing to find at run time.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("../../static/index.html");
const APP: &str = include_str!("../../static/app.js");
const STYLE: &str = include_str!("../../static/style.css");

pub async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX)
}

pub async fn app() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP,
    )
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}
