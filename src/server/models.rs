//! The model registry over HTTP: list, describe, delete, reload.

use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::engine::{Classifier, ModelKind, ReloadReport};

#[derive(Serialize, utoipa::ToSchema)]
pub struct ClassView {
    pub index: usize,
    pub label: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelView {
    pub name: String,
    pub architecture: String,
    pub kind: ModelKind,
    pub num_classes: usize,
    /// Present in `GET /models/{name}` only: 1000 ImageNet labels are too many for a listing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<ClassView>>,
    pub preprocessing: &'static str,
    pub file: String,
    /// sha256 of the file.
    pub sha256: String,
    /// Pretrained models: sha256 of the tensors, the identity fine-tuned heads record (the same
    /// for a `.pth` and its safetensors conversion); present once computed (a head was trained
    /// on it or looked for it by its tensors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors_sha256: Option<String>,
    pub loaded_at: DateTime<Utc>,
    pub default: bool,
    /// Always `ready`: the model answers.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<serde_json::Value>,
}

/// A model found in the weights dir that is not served: `loading`, or `failed` with its `error`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PendingView {
    pub name: String,
    /// `loading` or `failed`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    pub default: bool,
}

/// One entry of `GET /models`: a served model (`"state": "ready"`) or one that is not (yet).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ModelEntry {
    Ready(ModelView),
    Pending(PendingView),
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelList {
    pub default_model: Option<String>,
    /// By name: served models and those still loading or failed.
    pub models: Vec<ModelEntry>,
}

impl ModelView {
    pub fn new(c: &Classifier, default: bool, with_classes: bool) -> Self {
        Self {
            name: c.name.clone(),
            architecture: c.arch.to_string(),
            kind: c.kind,
            num_classes: c.num_classes(),
            classes: with_classes.then(|| {
                c.labels
                    .iter()
                    .enumerate()
                    .map(|(index, label)| ClassView {
                        index,
                        label: label.clone(),
                    })
                    .collect()
            }),
            preprocessing: c.transform.name(),
            file: c.file.display().to_string(),
            sha256: c.sha256.clone(),
            tensors_sha256: c
                .identity
                .as_ref()
                .and_then(|id| id.tensors_sha256_if_known())
                .map(str::to_string),
            loaded_at: c.loaded_at,
            default,
            state: "ready",
            base_model: c.meta.as_ref().map(|m| m.base_model.clone()),
            metrics: c.meta.as_ref().map(|m| m.metrics.clone()),
        }
    }
}

/// Every model of the weights dir with its state (`ready`, `loading`, `failed`), and the default one.
#[utoipa::path(get, path = "/models", tag = "models", responses((status = 200, body = ModelList)))]
pub async fn list(State(state): State<AppState>) -> Json<ModelList> {
    let default = state.default_model();
    let is_default = |name: &str| default.as_deref() == Some(name);
    let mut models: Vec<(String, ModelEntry)> = state
        .engine
        .models()
        .iter()
        .map(|c| {
            let view = ModelView::new(c, is_default(&c.name), false);
            (c.name.clone(), ModelEntry::Ready(view))
        })
        .collect();
    for p in state.engine.pending() {
        let state = p.state();
        let view = PendingView {
            state: state.name(),
            error: state.error().map(str::to_string),
            default: is_default(&p.name),
            architecture: p.arch.map(|a| a.to_string()),
            name: p.name.clone(),
        };
        models.push((p.name, ModelEntry::Pending(view)));
    }
    models.sort_by(|a, b| a.0.cmp(&b.0));
    Json(ModelList {
        default_model: default,
        models: models.into_iter().map(|(_, m)| m).collect(),
    })
}

/// One model, with its classes.
#[utoipa::path(get, path = "/models/{name}", tag = "models", params(("name" = String, Path)),
    responses((status = 200, body = ModelView), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelView>, ApiError> {
    let classifier = state
        .engine
        .get(&name)
        .ok_or_else(|| unknown(&state, &name))?;
    let default = state.default_model().as_deref() == Some(name.as_str());
    Ok(Json(ModelView::new(&classifier, default, true)))
}

/// Deletes a fine-tuned model and its files.
#[utoipa::path(delete, path = "/models/{name}", tag = "models", params(("name" = String, Path)),
    responses((status = 200, description = "`{\"deleted\": name}`"), (status = 404, body = ErrorBody), (status = 409, description = "A pretrained model", body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let engine = state.engine.clone();
    let jobs = state.jobs.clone();
    // With fine-tuning on, the registry knows the model: it is deleted there, for every replica.
    let removed = tokio::task::spawn_blocking(move || match jobs {
        Some(jobs) if engine.get(&name).is_some() => {
            jobs.delete_model(&name).map_err(ApiError::from)
        }
        _ => engine.delete(&name).map_err(ApiError::from),
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(json!({ "deleted": removed.name })))
}

/// Rescans the weights dir: loads new and changed files, drops removed ones.
#[utoipa::path(post, path = "/models/reload", tag = "models",
    responses((status = 200, description = "`loaded`, `unchanged`, `removed`, `failed`, `skipped`")))]
pub async fn reload(State(state): State<AppState>) -> Result<Json<ReloadReport>, ApiError> {
    let engine = state.engine.clone();
    let dir = state.config.weights_dir.clone();
    let jobs = state.jobs.clone();
    let report = tokio::task::spawn_blocking(move || {
        // Heads put in the model store by hand are registered first, so that they load.
        if let Some(jobs) = &jobs {
            if let Err(e) = jobs.reconcile() {
                tracing::warn!(error = %e, "cannot bring the model registry in line with the model store");
            }
        }
        let report = engine.reload(&dir);
        if let Some(jobs) = &jobs {
            if let Err(e) = jobs.sync_models() {
                tracing::warn!(error = %e, "cannot load the registered models");
            }
        }
        report
    })
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(report))
}

/// Model `name` is not served: 404 when unknown, 503 while it loads or when its load failed.
pub fn unknown(state: &AppState, name: &str) -> ApiError {
    ApiError::from(state.engine.unknown(name))
}
