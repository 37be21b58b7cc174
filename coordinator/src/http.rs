//! HTTP for operators and downloaders: `/v1/status`, `/v1/checkpoints`,
//! `/v1/checkpoints/{id}/{file}` (ETag = quoted blake3; `If-None-Match` honoured).

use std::path::PathBuf;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::sync::watch;

use crate::status::Status;

#[derive(Clone)]
struct AppState {
    status: watch::Receiver<Status>,
    checkpoints_dir: PathBuf,
}

/// The router; `checkpoints_dir` holds one dir per checkpoint id.
pub fn router(status: watch::Receiver<Status>, checkpoints_dir: PathBuf) -> Router {
    Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/checkpoints", get(list_checkpoints))
        .route("/v1/checkpoints/{id}/{file}", get(get_checkpoint_file))
        .with_state(AppState {
            status,
            checkpoints_dir,
        })
}

async fn get_status(State(s): State<AppState>) -> Json<Status> {
    Json(s.status.borrow().clone())
}

async fn list_checkpoints(State(s): State<AppState>) -> Response {
    Json(s.status.borrow().checkpoints.clone()).into_response()
}

async fn get_checkpoint_file(
    State(s): State<AppState>,
    Path((id, file)): Path<(String, String)>,
    headers: HeaderMap,
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
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let path = s.checkpoints_dir.join(&id).join(&entry.name);
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let mut resp = bytes.into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(v) = HeaderValue::from_str(&etag) {
                h.insert(header::ETAG, v);
            }
            resp
        }
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "checkpoint file unreadable");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "checkpoint file unreadable\n",
            )
                .into_response()
        }
    }
}
