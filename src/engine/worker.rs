//! The thread behind one model name: it drains the queue into batches and runs them.
//!
//! Each queued image carries the classifier it was admitted with, so a model swapped while images
//! wait never mixes: a batch only ever groups images of the same classifier and input size.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::oneshot;

use super::classifier::Classifier;
use crate::metrics::Metrics;
use crate::models::layers;

/// One image waiting for a forward pass.
pub struct Job {
    pub classifier: Arc<Classifier>,
    /// `[3, H, W]`, normalized.
    pub input: Tensor,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<Scored, String>>,
}

/// Softmax probabilities for one image, and how long it waited and ran.
pub struct Scored {
    pub probabilities: Vec<f32>,
    pub queue_time: Duration,
    pub inference_time: Duration,
}

pub struct BatchPolicy {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// Where the model lives; inputs are prepared on the CPU.
    pub device: candle_core::Device,
}

pub fn run(name: String, queue: Receiver<Job>, policy: BatchPolicy, metrics: Arc<Metrics>) {
    let label = Metrics::model(&name);
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + policy.max_batch_delay;
        while batch.len() < policy.max_batch_size {
            let left = deadline.saturating_duration_since(Instant::now());
            match queue.recv_timeout(left) {
                Ok(job) => batch.push(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics
            .queue_depth
            .get_or_create(&label)
            .dec_by(batch.len() as i64);
        for group in split_compatible(batch) {
            run_batch(group, &policy.device, &metrics, &label);
        }
    }
    tracing::debug!(model = %name, "worker stopped: model removed");
}

/// Groups jobs that can share one forward pass, keeping arrival order within each group.
fn split_compatible(batch: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in batch {
        let slot = groups.iter_mut().find(|g| {
            Arc::ptr_eq(&g[0].classifier, &job.classifier) && g[0].input.dims() == job.input.dims()
        });
        match slot {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

fn run_batch(
    jobs: Vec<Job>,
    device: &candle_core::Device,
    metrics: &Metrics,
    label: &crate::metrics::ModelLabel,
) {
    let started = Instant::now();
    let classifier = jobs[0].classifier.clone();
    let inputs: Vec<&Tensor> = jobs.iter().map(|j| &j.input).collect();
    let result = Tensor::stack(&inputs, 0)
        .and_then(|xs| xs.to_device(device))
        .and_then(|xs| classifier.logits(&xs))
        .and_then(|logits| layers::softmax(&logits))
        .and_then(|p| p.to_vec2::<f32>());
    let inference_time = started.elapsed();
    metrics
        .batch_size
        .get_or_create(label)
        .observe(jobs.len() as f64);
    metrics
        .inference_seconds
        .get_or_create(label)
        .observe(inference_time.as_secs_f64());
    match result {
        Ok(rows) => {
            for (job, probabilities) in jobs.into_iter().zip(rows) {
                let queue_time = started.saturating_duration_since(job.enqueued);
                metrics
                    .queue_seconds
                    .get_or_create(label)
                    .observe(queue_time.as_secs_f64());
                // The requester may have gone away (client disconnect): nothing to do then.
                let _ = job.reply.send(Ok(Scored {
                    probabilities,
                    queue_time,
                    inference_time,
                }));
            }
        }
        Err(e) => {
            tracing::error!(model = %classifier.name, error = %e, "forward pass failed");
            for job in jobs {
                let _ = job.reply.send(Err(e.to_string()));
            }
        }
    }
}
