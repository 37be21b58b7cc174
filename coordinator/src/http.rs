//! HTTP for operators and downloaders: `/v1/status`, `/metrics` (Prometheus),
//! `/v1/contributors` (credit, paged), `/v1/checkpoints`,
//! `/v1/checkpoints/{id}/{file}`: files stream with `Range` (one range: 206, or 416 when it
//! cannot be served), `ETag` = the quoted blake3, `If-None-Match` (304) and `If-Range`, so
//! `curl -C -` resumes a download.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::sync::watch;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use crate::status::{Contribution, Status};

/// The most contributors one page of `/v1/contributors` lists.
pub const CONTRIBUTORS_PAGE_MAX: usize = 1000;

#[derive(Clone)]
struct AppState {
    status: watch::Receiver<Status>,
    contributors: watch::Receiver<Arc<Vec<Contribution>>>,
    checkpoints_dir: PathBuf,
}

/// The router; `contributors` is every peer's credit, most tokens first; `checkpoints_dir`
/// holds one dir per checkpoint id.
pub fn router(
    status: watch::Receiver<Status>,
    contributors: watch::Receiver<Arc<Vec<Contribution>>>,
    checkpoints_dir: PathBuf,
) -> Router {
    Router::new()
        .route("/v1/status", get(get_status))
        .route("/metrics", get(get_metrics))
        .route("/v1/contributors", get(list_contributors))
        .route("/v1/checkpoints", get(list_checkpoints))
        .route("/v1/checkpoints/{id}/{file}", get(get_checkpoint_file))
        .with_state(AppState {
            status,
            contributors,
            checkpoints_dir,
        })
}

async fn get_status(State(s): State<AppState>) -> Json<Status> {
    Json(s.status.borrow().clone())
}

async fn get_metrics(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let status = s.status.borrow().clone();
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let (kind, text) = if wants_openmetrics {
        (
            crate::metrics::OPENMETRICS,
            crate::metrics::render_openmetrics(&status),
        )
    } else {
        (crate::metrics::TEXT, crate::metrics::render_text(&status))
    };
    ([(header::CONTENT_TYPE, kind)], text).into_response()
}

/// Which page of `/v1/contributors`: `?offset=N&limit=M` (limit at most
/// [`CONTRIBUTORS_PAGE_MAX`], its default).
#[derive(Debug, serde::Deserialize)]
struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

/// Credit: each peer's accepted shards and tokens, most tokens first, a page at a time; every
/// peer that ever had a verdict, gone or not.
async fn list_contributors(
    State(s): State<AppState>,
    Query(page): Query<Page>,
) -> Json<Vec<Contribution>> {
    let all = s.contributors.borrow().clone();
    let limit = page
        .limit
        .unwrap_or(CONTRIBUTORS_PAGE_MAX)
        .min(CONTRIBUTORS_PAGE_MAX);
    Json(all.iter().skip(page.offset).take(limit).cloned().collect())
}

async fn list_checkpoints(State(s): State<AppState>) -> Response {
    Json(s.status.borrow().checkpoints.clone()).into_response()
}

async fn get_checkpoint_file(
    State(s): State<AppState>,
    Path((id, file)): Path<(String, String)>,
    mut request: Request,
) -> Response {
    // Only names the checkpoint list holds are served: nothing from the request reaches the
    // file system unchecked, so `..` and friends cannot escape.
    let entry = {
        let status = s.status.borrow();
        status
            .checkpoints
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.files.iter().find(|f| f.name == file))
            .cloned()
    };
    let Some(entry) = entry else {
        return (StatusCode::NOT_FOUND, "no such checkpoint file\n").into_response();
    };
    let etag = format!("\"{}\"", entry.blake3);
    let headers = request.headers_mut();
    if header_is(headers, header::IF_NONE_MATCH, &etag) {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    // A resumed download whose file changed gets the whole new file, not a spliced one.
    if headers.contains_key(header::IF_RANGE) && !header_is(headers, header::IF_RANGE, &etag) {
        headers.remove(header::RANGE);
    }
    // The file's own dates must not answer for its content: the ETag does.
    headers.remove(header::IF_MODIFIED_SINCE);
    headers.remove(header::IF_UNMODIFIED_SINCE);
    let path = s.checkpoints_dir.join(&id).join(&entry.name);
    let served = ServeFile::new(&path).oneshot(request);
    let Ok(response) = served.await;
    let mut response = response.map(axum::body::Body::new);
    if response.status() == StatusCode::NOT_FOUND {
        tracing::error!(path = %path.display(), "checkpoint file listed but missing");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "checkpoint file missing\n",
        )
            .into_response();
    }
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.remove(header::LAST_MODIFIED);
    response
}

fn header_is(headers: &HeaderMap, name: header::HeaderName, value: &str) -> bool {
    headers.get(name).and_then(|v| v.to_str().ok()) == Some(value)
}

#[cfg(test)]
mod tests;
