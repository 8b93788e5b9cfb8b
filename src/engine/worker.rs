//! The thread behind one model name: it drains the queue into batches and runs them.
//!
//! Each queued image carries the classifier it was admitted with, so a model swapped while images
//! wait never mixes: a batch only ever groups images of the same classifier and input size.
//!
//! An image that finds the worker idle runs at once. The batch delay is spent only while other
//! requests for the same model are on their way (admitted and still being decoded): those are
//! worth waiting for; a lone request is not.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
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

/// Logits and their softmax probabilities for one image, and how long it waited and ran.
pub struct Scored {
    pub logits: Vec<f32>,
    pub probabilities: Vec<f32>,
    pub queue_time: Duration,
    pub inference_time: Duration,
}

pub struct BatchPolicy {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
}

/// What the requests of one model share with its worker.
#[derive(Default)]
pub struct Shared {
    /// Requests admitted for this model whose images are not queued yet (being decoded).
    incoming: AtomicUsize,
    gate: Gate,
}

impl Shared {
    /// Counts a request as on its way until the returned guard is dropped.
    pub fn incoming(self: &Arc<Self>) -> IncomingGuard {
        self.incoming.fetch_add(1, Ordering::SeqCst);
        IncomingGuard(self.clone())
    }

    /// Stops the worker before its next batch until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>) -> Hold {
        *self.gate.held.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Hold(self.clone())
    }
}

pub struct IncomingGuard(Arc<Shared>);

impl Drop for IncomingGuard {
    fn drop(&mut self) {
        self.0.incoming.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Gate {
    held: Mutex<usize>,
    opened: Condvar,
}

impl Gate {
    fn wait_open(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held > 0 {
            held = self.opened.wait(held).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A model's worker held before its next batch (see [`super::Engine::hold`]); dropping it lets
/// the worker go on.
#[must_use = "the worker is held only while the guard lives"]
pub struct Hold(Arc<Shared>);

impl Drop for Hold {
    fn drop(&mut self) {
        let gate = &self.0.gate;
        *gate.held.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        gate.opened.notify_all();
    }
}

/// How long a worker stays idle before the feature-map buffers are given back to the system.
const IDLE_RELEASE: Duration = Duration::from_secs(2);

pub fn run(
    name: String,
    queue: Receiver<Job>,
    policy: BatchPolicy,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
) {
    let label = Metrics::model(&name);
    loop {
        let first = match queue.recv_timeout(IDLE_RELEASE) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                crate::models::cpu::release_buffers();
                match queue.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        shared.gate.wait_open();
        let mut batch = vec![first];
        // Everything already waiting joins at once.
        while batch.len() < policy.max_batch_size {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        // More only while requests for this model are still on their way.
        let deadline = Instant::now() + policy.max_batch_delay;
        while batch.len() < policy.max_batch_size && shared.incoming.load(Ordering::SeqCst) > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match queue.recv_timeout(left.min(Duration::from_millis(1))) {
                Ok(job) => batch.push(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics
            .queue_depth
            .get_or_create(&label)
            .dec_by(batch.len() as i64);
        // A request whose client has gone (its answer would go nowhere) costs no forward pass.
        batch.retain(|job| !job.reply.is_closed());
        for group in split_compatible(batch) {
            // A panic in a forward pass fails that batch only: its requests are answered (their
            // reply channels close: 503 `model_unavailable`) and the worker goes on with the next.
            let run = std::panic::AssertUnwindSafe(|| run_batch(group, &metrics, &label));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!(model = %name, "a forward pass panicked; the worker goes on");
                metrics.worker_panics.get_or_create(&label).inc();
            }
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

fn run_batch(jobs: Vec<Job>, metrics: &Metrics, label: &crate::metrics::ModelLabel) {
    crate::crash::panic_point("forward");
    let started = Instant::now();
    let classifier = jobs[0].classifier.clone();
    let inputs: Vec<&Tensor> = jobs.iter().map(|j| &j.input).collect();
    // Inputs were prepared on the model's device (`Classifier::device`).
    let result = Tensor::stack(&inputs, 0)
        .and_then(|xs| classifier.logits(&xs))
        .and_then(|logits| {
            let probabilities = layers::softmax(&logits)?.to_vec2::<f32>()?;
            let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            Ok((logits, probabilities))
        });
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
        Ok((logits, probabilities)) => {
            let rows = logits.into_iter().zip(probabilities);
            for (job, (logits, probabilities)) in jobs.into_iter().zip(rows) {
                let queue_time = started.saturating_duration_since(job.enqueued);
                metrics
                    .queue_seconds
                    .get_or_create(label)
                    .observe(queue_time.as_secs_f64());
                // The requester may have gone away (client disconnect): nothing to do then.
                let _ = job.reply.send(Ok(Scored {
                    logits,
                    probabilities,
                    queue_time,
                    inference_time,
                }));
            }
        }
        Err(e) => {
            let e = crate::models::error_message(&e);
            tracing::error!(model = %classifier.name, error = %e, "forward pass failed");
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}
