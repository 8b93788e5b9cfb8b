//! Fine-tuning over HTTP: `POST /finetune`, the job endpoints, live events, and model downloads.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::engine::ModelKind;
use crate::jobs::{JobEvent, JobManager};
use crate::models::TrainLayers;
use crate::train::{self, Params, TrainError};

fn manager(state: &AppState) -> Result<&JobManager, ApiError> {
    state.jobs.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "fine-tuning is not enabled on this server",
        )
    })
}

/// Removes a rejected upload's folder unless the job was queued.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

const TEXT_FIELDS: &[&str] = &[
    "base_model",
    "name",
    "epochs",
    "learning_rate",
    "batch_size",
    "valid_ratio",
    "augment",
    "train_layers",
    "seed",
];

/// Starts a fine-tuning job from a zipped ImageFolder data set.
#[utoipa::path(
    post,
    path = "/finetune",
    tag = "jobs",
    request_body(content_type = "multipart/form-data", description = "`dataset` (zip file) and optional fields base_model, name, epochs, learning_rate, batch_size, valid_ratio, augment, train_layers, seed"),
    responses(
        (status = 202, description = "`{\"job_id\", \"status\": \"queued\"}`, with a Location header"),
        (status = 400, description = "Malformed request, not a zip, bad field values", body = ErrorBody),
        (status = 409, description = "Name taken", body = ErrorBody),
        (status = 413, description = "Upload too large", body = ErrorBody),
        (status = 422, description = "Every data set problem, in details.problems", body = ErrorBody),
    )
)]
pub async fn submit(
    State(state): State<AppState>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let jobs = manager(&state)?.clone();
    let mut multipart = multipart.map_err(|e| {
        ApiError::bad_request(format!(
            "send multipart/form-data with a `dataset` zip file field: {}",
            e.body_text()
        ))
    })?;
    let limit = state.config.max_dataset_bytes;
    let (id, dir) = jobs.new_job_dir()?;
    let mut cleanup = Cleanup(Some(dir));
    let zip_path = jobs.dataset_path(&id);
    let mut fields: HashMap<String, String> = HashMap::new();
    let mut uploaded = false;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(upload_error(e.status(), e.body_text(), limit)),
        };
        let name = field.name().unwrap_or_default().to_string();
        if name == "dataset" {
            stream_to_file(field, &zip_path, limit).await?;
            crate::crash::point("upload");
            uploaded = true;
        } else if TEXT_FIELDS.contains(&name.as_str()) {
            let text = field
                .text()
                .await
                .map_err(|e| upload_error(e.status(), e.body_text(), limit))?;
            fields.insert(name, text.trim().to_string());
        } else {
            return Err(ApiError::bad_request(format!(
                "unknown field `{name}`; fields are `dataset` (the zip) and {}",
                TEXT_FIELDS.join(", ")
            )));
        }
    }
    if !uploaded {
        return Err(ApiError::bad_request(
            "no `dataset` field: attach the zip as a file field named `dataset`",
        ));
    }

    let params = parse_params(&fields)?;
    let base_model = fields
        .get("base_model")
        .cloned()
        .unwrap_or_else(|| "vgg11_bn".into());
    let base = state
        .engine
        .get(&base_model)
        .filter(|c| c.kind == ModelKind::Pretrained)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "base_model `{base_model}` is not a loaded pretrained model; loaded: {}",
                state.engine.pretrained_names().join(", ")
            ))
        })?;
    TrainError::check(base.arch, &params)?;
    let name = match fields.get("name") {
        Some(name) => name.clone(),
        None => format!("{base_model}-ft-{}", &id[..6]),
    };
    train::output::check_name(&name).map_err(ApiError::bad_request)?;
    // Checked early to spare a doomed upload its decoding; `submit` decides under its lock.
    let taken = {
        let (jobs, name) = (jobs.clone(), name.clone());
        tokio::task::spawn_blocking(move || jobs.name_taken(&name))
            .await
            .map_err(ApiError::internal)?
    };
    if taken {
        return Err(ApiError::conflict(crate::jobs::name_taken_message(&name)));
    }

    let limits = jobs.config().dataset_limits.clone();
    let path = zip_path.clone();
    let dataset = tokio::task::spawn_blocking(move || {
        train::dataset::load(&path, &limits, crate::jobs::IMAGE_SIZE)
    })
    .await
    .map_err(ApiError::internal)??;

    let job =
        tokio::task::spawn_blocking(move || jobs.submit(id, name, base_model, params, dataset))
            .await
            .map_err(ApiError::internal)??;
    cleanup.0 = None;
    let location = format!("/jobs/{}", job.job_id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(json!({ "job_id": job.job_id, "status": job.status })),
    )
        .into_response())
}

fn upload_error(status: StatusCode, detail: String, limit: u64) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the upload is larger than the {limit}-byte limit (--max-dataset-bytes)"),
        )
    } else {
        ApiError::bad_request(format!("malformed multipart body: {detail}"))
    }
}

/// Writes an upload to disk as it arrives, never holding more than a chunk in memory.
async fn stream_to_file(
    mut field: axum::extract::multipart::Field<'_>,
    path: &std::path::Path,
    limit: u64,
) -> Result<(), ApiError> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(ApiError::internal)?;
    let mut written: u64 = 0;
    loop {
        let chunk = match field.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => return Err(upload_error(e.status(), e.body_text(), limit)),
        };
        written += chunk.len() as u64;
        if written > limit {
            return Err(upload_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                String::new(),
                limit,
            ));
        }
        file.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    file.sync_all().await.map_err(ApiError::internal)?;
    Ok(())
}

fn parse_params(fields: &HashMap<String, String>) -> Result<Params, ApiError> {
    fn field<T: std::str::FromStr>(
        fields: &HashMap<String, String>,
        name: &str,
        default: T,
        what: &str,
    ) -> Result<T, ApiError> {
        match fields.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                ApiError::bad_request(format!("field `{name}` must be {what}, not `{v}`"))
            }),
        }
    }
    let defaults = Params::default();
    let augment = match fields.get("augment").map(|v| v.to_ascii_lowercase()) {
        None => defaults.augment,
        Some(v) if matches!(v.as_str(), "true" | "1" | "yes" | "on") => true,
        Some(v) if matches!(v.as_str(), "false" | "0" | "no" | "off") => false,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "field `augment` must be true or false, not `{v}`"
            )))
        }
    };
    let train_layers = match fields.get("train_layers").map(String::as_str) {
        None => defaults.train_layers,
        Some("head") => TrainLayers::Head,
        Some("classifier") => TrainLayers::Classifier,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "field `train_layers` must be head or classifier, not `{v}`"
            )))
        }
    };
    Ok(Params {
        epochs: field(fields, "epochs", defaults.epochs, "a whole number")?,
        batch_size: field(fields, "batch_size", defaults.batch_size, "a whole number")?,
        learning_rate: field(fields, "learning_rate", defaults.learning_rate, "a number")?,
        valid_ratio: field(fields, "valid_ratio", defaults.valid_ratio, "a number")?,
        seed: field(fields, "seed", defaults.seed, "a whole number")?,
        augment,
        train_layers,
    })
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct JobList {
    /// Newest first.
    pub jobs: Vec<crate::jobs::Job>,
}

/// Every job, newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs", responses((status = 200, body = JobList)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<JobList>, ApiError> {
    let jobs = manager(&state)?.clone();
    let jobs = tokio::task::spawn_blocking(move || jobs.list())
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(JobList { jobs }))
}

/// One job.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = crate::jobs::Job), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<crate::jobs::Job>, ApiError> {
    let job = find(manager(&state)?, id).await?;
    Ok(Json(job))
}

#[derive(Debug, Deserialize)]
pub struct DeleteQuery {
    #[serde(default)]
    purge: bool,
}

/// Cancels a queued or running job; with `?purge=true`, forgets a finished one and its upload.
#[utoipa::path(delete, path = "/jobs/{id}", tag = "jobs",
    params(("id" = String, Path), ("purge" = Option<bool>, Query, description = "Forget a finished job and delete its upload")),
    responses((status = 202, description = "Cancelled (or cancelling)", body = crate::jobs::Job), (status = 200, description = "Purged"),
        (status = 404, body = ErrorBody), (status = 409, description = "Already finished (cancel), or not finished (purge)", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let jobs = manager(&state)?.clone();
    if query.purge {
        let job = tokio::task::spawn_blocking(move || jobs.purge(&id))
            .await
            .map_err(ApiError::internal)??;
        return Ok(Json(json!({ "purged": job.job_id })).into_response());
    }
    let job = tokio::task::spawn_blocking(move || jobs.cancel(&id))
        .await
        .map_err(ApiError::internal)??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// Server-Sent Events: `progress` after every step, `epoch` after every epoch, and a final
/// `done` with the job's JSON (at once when the job has finished already).
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, description = "An event stream", content_type = "text/event-stream"), (status = 404, body = ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let jobs = manager(&state)?;
    // Subscribe before looking: a job finishing in between is then still heard.
    let receiver = jobs.subscribe();
    let job = find(jobs, id.clone()).await?;
    let finished = job.status.is_finished().then(|| Box::new(job));
    let stream = futures_util::stream::unfold(
        (receiver, finished, false),
        move |(mut receiver, finished, done)| {
            let id = id.clone();
            async move {
                if done {
                    return None;
                }
                if let Some(job) = finished {
                    return Some((Ok(done_event(&job)), (receiver, None, true)));
                }
                loop {
                    match receiver.recv().await {
                        Ok(JobEvent::Shutdown) => return None,
                        Ok(event) if event.job_id() == Some(id.as_str()) => {
                            let (sse, last) = match &event {
                                JobEvent::Progress { progress, .. } => (
                                    Event::default().event("progress").json_data(progress),
                                    false,
                                ),
                                JobEvent::Epoch { metrics, .. } => {
                                    (Event::default().event("epoch").json_data(metrics), false)
                                }
                                JobEvent::Done { job } => (Ok(done_event(job)), true),
                                JobEvent::Shutdown => unreachable!("matched above"),
                            };
                            let sse = sse.unwrap_or_else(|_| Event::default().event("error"));
                            return Some((Ok(sse), (receiver, None, last)));
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            continue
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Job `id`, read where the job store is (off the async threads), or 404.
async fn find(jobs: &JobManager, id: String) -> Result<crate::jobs::Job, ApiError> {
    let jobs = jobs.clone();
    let key = id.clone();
    tokio::task::spawn_blocking(move || jobs.get(&key))
        .await
        .map_err(ApiError::internal)??
        .ok_or_else(|| ApiError::not_found(format!("no job `{id}`")))
}

fn done_event(job: &crate::jobs::Job) -> Event {
    Event::default()
        .event("done")
        .json_data(job)
        .unwrap_or_else(|_| Event::default().event("done"))
}

/// The thumbnail of the n-th example of `result.examples`.
#[utoipa::path(get, path = "/jobs/{id}/examples/{n}", tag = "jobs", params(("id" = String, Path), ("n" = usize, Path)),
    responses((status = 200, description = "A PNG", content_type = "image/png"), (status = 404, body = ErrorBody)))]
pub async fn example(
    State(state): State<AppState>,
    Path((id, n)): Path<(String, usize)>,
) -> Result<Response, ApiError> {
    let jobs = manager(&state)?.clone();
    let key = id.clone();
    let bytes = tokio::task::spawn_blocking(move || jobs.example(&key, n))
        .await
        .map_err(ApiError::internal)??
        .ok_or_else(|| ApiError::not_found(format!("job `{id}` has no example {n}")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response())
}

#[derive(Debug, Deserialize)]
pub struct DownloadQuery {
    format: Option<String>,
}

/// A fine-tuned model's head (safetensors), or with `?format=json` its metadata.
#[utoipa::path(get, path = "/models/{name}/download", tag = "models",
    params(("name" = String, Path), ("format" = Option<String>, Query, description = "`safetensors` (default) or `json`")),
    responses((status = 200, description = "The head's safetensors, or its metadata"), (status = 404, body = ErrorBody), (status = 409, description = "A pretrained model", body = ErrorBody)))]
pub async fn download(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<DownloadQuery>,
) -> Result<Response, ApiError> {
    let model = state
        .engine
        .get(&name)
        .ok_or_else(|| super::models::unknown(&state, &name))?;
    if model.kind != ModelKind::FineTuned {
        return Err(ApiError::conflict(format!(
            "`{name}` is a pretrained model: only fine-tuned heads are downloaded here"
        )));
    }
    match query.format.as_deref() {
        Some("json") => Ok(Json(model.meta.clone()).into_response()),
        None | Some("safetensors") => {
            let file = tokio::fs::File::open(&model.file)
                .await
                .map_err(ApiError::internal)?;
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
            Ok((
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{name}.safetensors\""),
                    ),
                ],
                body,
            )
                .into_response())
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "format must be safetensors or json, not `{other}`"
        ))),
    }
}
