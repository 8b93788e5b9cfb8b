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
    pub sha256: String,
    pub loaded_at: DateTime<Utc>,
    pub default: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<serde_json::Value>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelList {
    pub default_model: Option<String>,
    pub models: Vec<ModelView>,
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
            loaded_at: c.loaded_at,
            default,
            base_model: c.meta.as_ref().map(|m| m.base_model.clone()),
            metrics: c.meta.as_ref().map(|m| m.metrics.clone()),
        }
    }
}

/// The loaded models, with the default one.
#[utoipa::path(get, path = "/models", tag = "models", responses((status = 200, body = ModelList)))]
pub async fn list(State(state): State<AppState>) -> Json<ModelList> {
    let default = state.default_model();
    let models: Vec<ModelView> = state
        .engine
        .models()
        .iter()
        .map(|c| ModelView::new(c, default.as_deref() == Some(&c.name), false))
        .collect();
    Json(ModelList {
        default_model: default,
        models,
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
    let removed = tokio::task::spawn_blocking(move || engine.delete(&name))
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
    let report = tokio::task::spawn_blocking(move || engine.reload(&dir))
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(report))
}

pub fn unknown(state: &AppState, name: &str) -> ApiError {
    ApiError::from(crate::engine::EngineError::UnknownModel {
        name: name.to_string(),
        known: state.engine.model_names(),
    })
}
