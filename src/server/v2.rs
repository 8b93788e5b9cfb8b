//! The Open Inference Protocol (KServe "v2"): what its HTTP ([`super::kserve`]) and gRPC
//! ([`super::grpc`]) transports share. Metadata, readiness, and inference requests from their
//! input tensors to the output tensors, through the same engine as `/predict`.
//!
//! Every model has two inputs, of which a request sends one:
//!
//! - `input`: FP32 `[N, 3, H, W]`, row-major, already normalized as the model expects (what
//!   torchvision's transforms make); any H and W from the architecture's smallest side up to
//!   `--max-pixels` pixels;
//! - `image`: BYTES `[N]` (or `[N, 1]`), each element an encoded image, preprocessed exactly as
//!   `/predict` does.
//!
//! and two outputs, FP32 `[N, classes]`: `logits` and `probabilities` (their softmax), both
//! unless the request names some. Errors are [`ApiError`]s, which each transport turns into its
//! own answer.

use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::engine::{EngineError, ModelState};

/// What `platform` says in a model's metadata.
pub const PLATFORM: &str = "cnnserve_candle";
/// Every model's one version.
pub const VERSION: &str = "1";
pub const INPUT: &str = "input";
pub const IMAGE: &str = "image";
pub const LOGITS: &str = "logits";
pub const PROBABILITIES: &str = "probabilities";
/// The outputs answered when a request names none, in this order.
pub const OUTPUTS: [&str; 2] = [LOGITS, PROBABILITIES];

const INPUTS_HELP: &str = "its inputs are `input` (FP32 [N, 3, H, W], normalized) and `image` \
                           (BYTES [N], encoded images)";

/// `GET /v2`, gRPC ServerMetadata.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerMetadata {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: Vec<&'static str>,
}

pub fn server_metadata(extensions: &[&'static str]) -> ServerMetadata {
    ServerMetadata {
        name: env!("CARGO_PKG_NAME"),
        version: env!("CARGO_PKG_VERSION"),
        extensions: extensions.to_vec(),
    }
}

/// A tensor of a model's metadata: -1 for a dimension of any size.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TensorMetadata {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{name}`, gRPC ModelMetadata.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<&'static str>,
    pub platform: &'static str,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

/// A served model's metadata; a model still loading or that failed answers as for `/predict`.
pub fn model_metadata(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<ModelMetadata, ApiError> {
    let classifier = state
        .engine
        .get(name)
        .ok_or_else(|| super::models::unknown(state, name))?;
    check_version(name, version)?;
    let classes = i64::try_from(classifier.num_classes()).unwrap_or(i64::MAX);
    let tensor = |name, datatype, shape| TensorMetadata {
        name,
        datatype,
        shape,
    };
    Ok(ModelMetadata {
        name: classifier.name.clone(),
        versions: vec![VERSION],
        platform: PLATFORM,
        inputs: vec![
            tensor(INPUT, "FP32", vec![-1, 3, -1, -1]),
            tensor(IMAGE, "BYTES", vec![-1]),
        ],
        outputs: OUTPUTS
            .iter()
            .map(|&name| tensor(name, "FP32", vec![-1, classes]))
            .collect(),
    })
}

/// Whether model `name` is ready: false while it loads or after its load failed; an error for a
/// model the server does not know (404) or a version it does not have.
pub fn model_ready(state: &AppState, name: &str, version: Option<&str>) -> Result<bool, ApiError> {
    match state.engine.state(name) {
        None => Err(super::models::unknown(state, name)),
        Some(s) => {
            check_version(name, version)?;
            Ok(s == ModelState::Ready)
        }
    }
}

/// No version, an empty one and `1` are the one version every model has.
fn check_version(name: &str, version: Option<&str>) -> Result<(), ApiError> {
    match version {
        None | Some("") | Some(VERSION) => Ok(()),
        Some(v) => Err(ApiError::not_found(format!(
            "model `{name}` has no version `{v}`: its only version is {VERSION}"
        ))),
    }
}

/// An input tensor as a request sends it.
#[derive(Debug)]
pub struct InputTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Data,
}

/// Where an input's elements are.
#[derive(Debug)]
pub enum Data {
    /// HTTP's JSON `data`: numbers for FP32, base64 strings for BYTES; flat or nested.
    Json(serde_json::Value),
    /// The binary-data extension or gRPC's `raw_input_contents`: little-endian values, BYTES
    /// elements each after its 4-byte little-endian length.
    Raw(Bytes),
    /// gRPC's `contents.fp32_contents`.
    Fp32(Vec<f32>),
    /// gRPC's `contents.bytes_contents`.
    Bytes(Vec<Bytes>),
    /// gRPC contents in another field than the datatype's, named: refused.
    Other(&'static str),
    /// No elements at all.
    Empty,
}

/// An output tensor: FP32 `[N, classes]`, row-major.
#[derive(Debug)]
pub struct Output {
    pub name: &'static str,
    pub shape: [i64; 2],
    pub data: Vec<f32>,
}

impl Output {
    /// The values as little-endian bytes: the binary-data extension's and gRPC's raw form.
    pub fn raw(&self) -> Vec<u8> {
        self.data.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// An inference request's answer: the outputs in the order asked for.
#[derive(Debug)]
pub struct Answer {
    pub model: String,
    pub outputs: Vec<Output>,
    pub queue_time: Duration,
    pub inference_time: Duration,
}

/// What the model runs: a prepared batch, or images.
enum Batch {
    Tensor { data: Vec<f32>, shape: [usize; 4] },
    Images(Vec<Bytes>),
}

/// Runs one inference request: checks the model, its version, the outputs asked for (none: all)
/// and the inputs, then classifies through the engine (the same admission, queue and batches as
/// `/predict`).
pub async fn infer(
    state: &AppState,
    model: &str,
    version: Option<&str>,
    inputs: Vec<InputTensor>,
    outputs: &[String],
) -> Result<Answer, ApiError> {
    if state.engine.get(model).is_none() {
        return Err(super::models::unknown(state, model));
    }
    check_version(model, version)?;
    let outputs = output_names(model, outputs)?;
    let predicted = match batch(model, inputs)? {
        Batch::Tensor { data, shape } => state.engine.predict_tensor(model, data, shape).await,
        Batch::Images(images) => state.engine.predict(model, images).await,
    }
    .map_err(engine_error)?;
    let n = i64::try_from(predicted.probabilities.len()).unwrap_or(i64::MAX);
    let classes = i64::try_from(predicted.classifier.num_classes()).unwrap_or(i64::MAX);
    let outputs = outputs
        .into_iter()
        .map(|name| {
            let rows = if name == LOGITS {
                &predicted.logits
            } else {
                &predicted.probabilities
            };
            Output {
                name,
                shape: [n, classes],
                data: rows.concat(),
            }
        })
        .collect();
    Ok(Answer {
        model: predicted.classifier.name.clone(),
        outputs,
        queue_time: predicted.queue_time,
        inference_time: predicted.inference_time,
    })
}

/// An engine error as the protocol answers it: an image that cannot be decoded is a bad
/// request here (400, `invalid_image`): the request's own type is fine, one of its elements is not.
fn engine_error(e: EngineError) -> ApiError {
    let mut e = ApiError::from(e);
    if e.status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        e.status = StatusCode::BAD_REQUEST;
    }
    e
}

/// The outputs asked for, checked; all of them when none is named.
fn output_names(model: &str, asked: &[String]) -> Result<Vec<&'static str>, ApiError> {
    if asked.is_empty() {
        return Ok(OUTPUTS.to_vec());
    }
    let mut names = Vec::with_capacity(asked.len());
    for name in asked {
        let Some(&known) = OUTPUTS.iter().find(|&&o| o == name) else {
            return Err(ApiError::bad_request(format!(
                "model `{model}` has no output `{name}`: its outputs are `logits` and \
                 `probabilities`"
            )));
        };
        if names.contains(&known) {
            return Err(ApiError::bad_request(format!(
                "output `{name}` is asked for twice"
            )));
        }
        names.push(known);
    }
    Ok(names)
}

fn batch(model: &str, inputs: Vec<InputTensor>) -> Result<Batch, ApiError> {
    if inputs.is_empty() {
        return Err(ApiError::bad_request(format!(
            "the request has no inputs: model `{model}` takes one; {INPUTS_HELP}"
        )));
    }
    for (i, input) in inputs.iter().enumerate() {
        if input.name != INPUT && input.name != IMAGE {
            return Err(ApiError::bad_request(format!(
                "model `{model}` has no input `{}`; {INPUTS_HELP}",
                input.name
            )));
        }
        if inputs[..i].iter().any(|other| other.name == input.name) {
            return Err(ApiError::bad_request(format!(
                "input `{}` is sent twice",
                input.name
            )));
        }
    }
    if inputs.len() > 1 {
        return Err(ApiError::bad_request(
            "the request sends both `input` and `image`: send one of them",
        ));
    }
    let input = inputs.into_iter().next().expect("one input");
    if input.name == INPUT {
        tensor(input)
    } else {
        images(input)
    }
}

/// The shape as sizes, with the number of elements it holds.
fn dims(input: &InputTensor) -> Result<(Vec<usize>, usize), ApiError> {
    let dims = input
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            ApiError::bad_request(format!(
                "input `{}` has shape {:?}, with a negative dimension",
                input.name, input.shape
            ))
        })?;
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "input `{}` has shape {:?}, which holds more elements than can be counted",
                input.name, input.shape
            ))
        })?;
    Ok((dims, count))
}

fn check_count(name: &str, shape: &[i64], found: usize, expected: usize) -> Result<(), ApiError> {
    if found == expected {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "input `{name}` has {found} elements, but its shape {shape:?} holds {expected}"
    )))
}

fn tensor(input: InputTensor) -> Result<Batch, ApiError> {
    if input.datatype != "FP32" {
        return Err(ApiError::bad_request(format!(
            "input `input` is FP32, not {}",
            input.datatype
        )));
    }
    let (dims, count) = dims(&input)?;
    let shape: [usize; 4] = match dims.as_slice() {
        &[n, 3, h, w] => [n, 3, h, w],
        _ => {
            return Err(ApiError::bad_request(format!(
                "input `input` has shape {:?}: it must be [N, 3, H, W]",
                input.shape
            )))
        }
    };
    if shape[0] == 0 {
        return Err(ApiError::bad_request(
            "input `input` holds no image: its first dimension (N) is 0",
        ));
    }
    let data = match input.data {
        Data::Json(value) => {
            let mut values = Vec::with_capacity(count.min(1 << 24));
            flatten(&value, &mut |v| match v.as_f64() {
                Some(x) => {
                    values.push(x as f32);
                    Ok(())
                }
                None => Err(ApiError::bad_request(format!(
                    "input `input` is FP32: its element {} is not a number but {v}",
                    values.len()
                ))),
            })?;
            values
        }
        Data::Raw(bytes) => {
            let expected = count.checked_mul(4);
            if expected != Some(bytes.len()) {
                return Err(ApiError::bad_request(format!(
                    "input `input` has {} bytes of binary data, but FP32 {:?} takes {} (4 bytes \
                     a value)",
                    bytes.len(),
                    input.shape,
                    expected.map_or("more than can be counted".to_string(), |e| e.to_string())
                )));
            }
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        Data::Fp32(values) => values,
        Data::Empty => Vec::new(),
        Data::Bytes(_) => return Err(wrong_field("input", "fp32_contents", "bytes_contents")),
        Data::Other(field) => return Err(wrong_field("input", "fp32_contents", field)),
    };
    check_count("input", &input.shape, data.len(), count)?;
    Ok(Batch::Tensor { data, shape })
}

fn wrong_field(input: &str, right: &str, wrong: &str) -> ApiError {
    ApiError::bad_request(format!(
        "input `{input}` sends its elements in contents.{wrong}: send them in contents.{right} \
         (or in raw_input_contents)"
    ))
}

fn images(input: InputTensor) -> Result<Batch, ApiError> {
    if input.datatype != "BYTES" {
        return Err(ApiError::bad_request(format!(
            "input `image` is BYTES (one encoded image per element), not {}",
            input.datatype
        )));
    }
    let (dims, count) = dims(&input)?;
    if !matches!(dims.as_slice(), [_] | [_, 1]) {
        return Err(ApiError::bad_request(format!(
            "input `image` has shape {:?}: it must be [N], one encoded image per element",
            input.shape
        )));
    }
    if count == 0 {
        return Err(ApiError::bad_request(
            "input `image` holds no image: its shape is [0]",
        ));
    }
    let images = match input.data {
        Data::Json(value) => {
            let mut images = Vec::new();
            flatten(&value, &mut |v| {
                let index = images.len();
                let text = v.as_str().ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "input `image`: element {index} is not a string; in JSON, send each \
                         image as a base64 string"
                    ))
                })?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|e| {
                        ApiError::bad_request(format!(
                            "input `image`: element {index} is not base64 ({e}); in JSON, send \
                             each image base64-encoded (binary data takes the bytes as they are)"
                        ))
                    })?;
                images.push(Bytes::from(bytes));
                Ok(())
            })?;
            images
        }
        Data::Raw(bytes) => split_bytes(bytes, count)?,
        Data::Bytes(images) => images,
        Data::Empty => Vec::new(),
        Data::Fp32(_) => return Err(wrong_field("image", "bytes_contents", "fp32_contents")),
        Data::Other(field) => return Err(wrong_field("image", "bytes_contents", field)),
    };
    check_count("image", &input.shape, images.len(), count)?;
    Ok(Batch::Images(images))
}

/// BYTES elements in their raw form: each one's length as 4 bytes, little-endian, then its bytes.
fn split_bytes(mut raw: Bytes, count: usize) -> Result<Vec<Bytes>, ApiError> {
    let mut elements = Vec::with_capacity(count.min(1024));
    while !raw.is_empty() {
        let index = elements.len();
        if raw.len() < 4 {
            return Err(ApiError::bad_request(format!(
                "input `image`: the binary data ends within element {index}'s 4-byte length"
            )));
        }
        let len = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        if raw.len() - 4 < len {
            return Err(ApiError::bad_request(format!(
                "input `image`: element {index} says it has {len} bytes, but only {} follow",
                raw.len() - 4
            )));
        }
        elements.push(raw.slice(4..4 + len));
        raw = raw.slice(4 + len..);
    }
    Ok(elements)
}

/// Calls `each` on every leaf of a JSON value, nested arrays read in row-major order.
fn flatten(
    value: &serde_json::Value,
    each: &mut dyn FnMut(&serde_json::Value) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    match value {
        serde_json::Value::Array(items) => items.iter().try_for_each(|v| flatten(v, each)),
        leaf => each(leaf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, datatype: &str, shape: &[i64], data: Data) -> InputTensor {
        InputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            data,
        }
    }

    fn refused(inputs: Vec<InputTensor>, needle: &str) {
        match batch("m", inputs) {
            Ok(_) => panic!("accepted; expected an error saying {needle:?}"),
            Err(e) => {
                assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
                assert!(e.message.contains(needle), "{}", e.message);
            }
        }
    }

    #[test]
    fn tensors_arrive_flat_nested_raw_or_typed() {
        let values: Vec<f32> = (0..3 * 32 * 32).map(|i| i as f32 / 7.0).collect();
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let nested: Vec<Vec<Vec<f32>>> = values
            .chunks(32 * 32)
            .map(|c| c.chunks(32).map(<[f32]>::to_vec).collect())
            .collect();
        for data in [
            Data::Json(serde_json::json!(values)),
            Data::Json(serde_json::json!([nested])),
            Data::Raw(Bytes::from(raw)),
            Data::Fp32(values.clone()),
        ] {
            match batch("m", vec![input("input", "FP32", &[1, 3, 32, 32], data)]).unwrap() {
                Batch::Tensor { data, shape } => {
                    assert_eq!(shape, [1, 3, 32, 32]);
                    assert_eq!(data, values);
                }
                Batch::Images(_) => panic!("images"),
            }
        }
    }

    #[test]
    fn bytes_elements_arrive_raw_base64_or_typed() {
        let images = [b"first".to_vec(), Vec::new(), b"third one".to_vec()];
        let mut raw = Vec::new();
        for image in &images {
            raw.extend_from_slice(&(image.len() as u32).to_le_bytes());
            raw.extend_from_slice(image);
        }
        let b64: Vec<String> = images
            .iter()
            .map(|i| base64::engine::general_purpose::STANDARD.encode(i))
            .collect();
        for (shape, data) in [
            (vec![3], Data::Raw(Bytes::from(raw))),
            (vec![3], Data::Json(serde_json::json!(b64))),
            (
                vec![3, 1],
                Data::Json(serde_json::json!([[b64[0]], [b64[1]], [b64[2]]])),
            ),
            (
                vec![3],
                Data::Bytes(images.iter().cloned().map(Bytes::from).collect()),
            ),
        ] {
            match batch("m", vec![input("image", "BYTES", &shape, data)]).unwrap() {
                Batch::Images(got) => assert_eq!(got, images.clone().map(Bytes::from).to_vec()),
                Batch::Tensor { .. } => panic!("a tensor"),
            }
        }
    }

    #[test]
    fn bad_inputs_are_refused_with_what_is_wrong() {
        let f = |shape: &[i64], data| input("input", "FP32", shape, data);
        refused(vec![], "no inputs");
        refused(vec![input("x", "FP32", &[1], Data::Empty)], "no input `x`");
        refused(
            vec![f(&[1, 3, 1, 1], Data::Empty), f(&[1, 3, 1, 1], Data::Empty)],
            "sent twice",
        );
        refused(
            vec![
                f(&[1, 3, 1, 1], Data::Empty),
                input("image", "BYTES", &[1], Data::Empty),
            ],
            "both",
        );
        refused(
            vec![input("input", "FP64", &[1], Data::Empty)],
            "FP32, not FP64",
        );
        refused(vec![f(&[1, 3, 4], Data::Empty)], "[N, 3, H, W]");
        refused(vec![f(&[1, 1, 4, 4], Data::Empty)], "[N, 3, H, W]");
        refused(vec![f(&[1, 3, -4, 4], Data::Empty)], "negative");
        refused(vec![f(&[0, 3, 4, 4], Data::Empty)], "is 0");
        refused(
            vec![f(&[i64::MAX, 3, i64::MAX, 4], Data::Empty)],
            "than can be counted",
        );
        refused(
            vec![f(
                &[1, 3, 2, 2],
                Data::Json(serde_json::json!(vec![1.0; 11])),
            )],
            "has 11 elements, but its shape [1, 3, 2, 2] holds 12",
        );
        refused(
            vec![f(
                &[1, 3, 2, 2],
                Data::Json(serde_json::json!(vec!["a"; 12])),
            )],
            "not a number",
        );
        refused(
            vec![f(&[1, 3, 2, 2], Data::Raw(Bytes::from(vec![0u8; 47])))],
            "47 bytes of binary data, but FP32 [1, 3, 2, 2] takes 48",
        );
        refused(
            vec![f(&[1, 3, 2, 2], Data::Other("int64_contents"))],
            "contents.int64_contents",
        );
        let img = |shape: &[i64], data| input("image", "BYTES", shape, data);
        refused(vec![input("image", "UINT8", &[1], Data::Empty)], "BYTES");
        refused(vec![img(&[1, 2], Data::Empty)], "must be [N]");
        refused(vec![img(&[0], Data::Empty)], "no image");
        refused(
            vec![img(&[1], Data::Raw(Bytes::from_static(&[9, 0])))],
            "4-byte length",
        );
        refused(
            vec![img(
                &[1],
                Data::Raw(Bytes::from_static(&[9, 0, 0, 0, 1, 2])),
            )],
            "says it has 9 bytes, but only 2 follow",
        );
        refused(
            vec![img(&[1], Data::Raw(Bytes::from_static(&[0; 8])))],
            "has 2 elements, but its shape [1] holds 1",
        );
        refused(
            vec![img(&[1], Data::Json(serde_json::json!(["not base64!"])))],
            "not base64",
        );
        refused(
            vec![img(&[1], Data::Json(serde_json::json!([3])))],
            "not a string",
        );
        refused(vec![img(&[1], Data::Fp32(vec![1.0]))], "bytes_contents");
    }

    #[test]
    fn outputs_default_to_both_and_unknown_ones_are_refused() {
        assert_eq!(output_names("m", &[]).unwrap(), OUTPUTS.to_vec());
        assert_eq!(
            output_names("m", &["probabilities".into()]).unwrap(),
            vec![PROBABILITIES]
        );
        let e = output_names("m", &["softmax".into()]).unwrap_err();
        assert!(e.message.contains("no output `softmax`"), "{}", e.message);
        let e = output_names("m", &["logits".into(), "logits".into()]).unwrap_err();
        assert!(e.message.contains("twice"), "{}", e.message);
    }
}
