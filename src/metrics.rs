//! Prometheus metrics, one registry per server (no globals, so tests in one process stay apart).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    /// The HTTP status; for gRPC, the HTTP status its code stands for (200 for OK, 400 for
    /// INVALID_ARGUMENT, 429 for RESOURCE_EXHAUSTED, …).
    pub status: u16,
    /// `rest` (`/predict`), `v2` (the Open Inference Protocol over HTTP) or `grpc`.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub status: String,
}

fn latency() -> Histogram {
    // 1 ms .. ~33 s: a single 224px image on CPU is tens of ms, a full batch of VGG seconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 16,
    ))
}

fn batch_sizes() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub queue_seconds: Family<ModelLabel, Histogram>,
    pub inference_seconds: Family<ModelLabel, Histogram>,
    pub total_seconds: Family<ModelLabel, Histogram>,
    pub batch_size: Family<ModelLabel, Histogram>,
    pub queue_depth: Family<ModelLabel, Gauge>,
    pub worker_panics: Family<ModelLabel, Counter>,
    pub jobs: Family<JobLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cnnserve");
        let requests = Family::<RequestLabels, Counter>::default();
        let queue_seconds =
            Family::<ModelLabel, Histogram>::new_with_constructor(latency as fn() -> Histogram);
        let inference_seconds =
            Family::<ModelLabel, Histogram>::new_with_constructor(latency as fn() -> Histogram);
        let total_seconds =
            Family::<ModelLabel, Histogram>::new_with_constructor(latency as fn() -> Histogram);
        let batch_size =
            Family::<ModelLabel, Histogram>::new_with_constructor(batch_sizes as fn() -> Histogram);
        let queue_depth = Family::<ModelLabel, Gauge>::default();
        let worker_panics = Family::<ModelLabel, Counter>::default();
        let jobs = Family::<JobLabels, Gauge>::default();
        registry.register(
            "requests",
            "Prediction requests by model, status and protocol",
            requests.clone(),
        );
        registry.register(
            "queue_duration_seconds",
            "Time an image waited for its batch",
            queue_seconds.clone(),
        );
        registry.register(
            "inference_duration_seconds",
            "Forward pass time of the batch an image ran in",
            inference_seconds.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Whole prediction request time, decoding included",
            total_seconds.clone(),
        );
        registry.register("batch_size", "Images per forward pass", batch_size.clone());
        registry.register(
            "queue_depth",
            "Images waiting for a worker",
            queue_depth.clone(),
        );
        registry.register(
            "worker_panics",
            "Forward passes that panicked (their requests answered 503; the worker goes on)",
            worker_panics.clone(),
        );
        registry.register("jobs", "Fine-tuning jobs by status", jobs.clone());
        Self {
            registry,
            requests,
            queue_seconds,
            inference_seconds,
            total_seconds,
            batch_size,
            queue_depth,
            worker_panics,
            jobs,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn model(name: &str) -> ModelLabel {
        ModelLabel {
            model: name.to_string(),
        }
    }
}
