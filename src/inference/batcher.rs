//! Micro-batching on a bounded pool of compute threads, off the proxy's async workers.
//!
//! A request's rows are queued as one job with a oneshot for its answer. A compute thread waits
//! for the first job, then sleeps until `max_size` rows are waiting or `max_wait` has passed
//! since the first was queued, takes the batch (up to `max_size` rows; another thread may
//! collect the rest while this one computes), runs the rows as one tensor and hands every job
//! its own rows back. A submitter wakes a compute thread only for a batch's first job and when
//! the batch is full — not for every job: on a shared CPU each wake is two context switches,
//! which cost more than the model's run. (A thread whose batch another thread took still wakes
//! once at that batch's deadline, and a reload of the knobs wakes them all.)
//! Admission is bounded by the number of jobs waiting or running (`max_queue`); past it a job is
//! refused at once (`overloaded`). A job whose deadline passed is answered without running.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use super::error::InferenceError;
use super::metrics::ModelMetrics;
use super::model::LoadedModel;
use super::tensor::{Data, NamedTensor};

/// What a job gets back: its own outputs, or why not.
pub type Reply = Result<Vec<NamedTensor>, InferenceError>;

/// Batching knobs, changeable by a reload without restarting the threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Knobs {
    pub max_size: usize,
    pub max_wait: Duration,
}

struct Job {
    model: Arc<LoadedModel>,
    /// In the model's input order, rows first.
    inputs: Vec<NamedTensor>,
    rows: usize,
    queued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Reply>,
    _admitted: Admitted,
}

/// One admitted job; gives its place back when the job is answered or dropped.
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Jobs waiting for a compute thread, in arrival order.
#[derive(Default)]
struct Pending {
    jobs: VecDeque<Job>,
    rows: usize,
    /// The batcher is gone: run what is queued, then end.
    closed: bool,
}

struct Queue {
    pending: Mutex<Pending>,
    /// Signalled for a batch's first job, a full batch, leftovers, and closing.
    ready: Condvar,
}

/// One model's queue and compute threads. Dropping it ends the threads once the queue is empty.
pub struct Batcher {
    queue: Arc<Queue>,
    admitted: Arc<AtomicUsize>,
    max_queue: usize,
    pub threads: usize,
    knobs: Arc<ArcSwap<Knobs>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("threads", &self.threads)
            .field("max_queue", &self.max_queue)
            .finish()
    }
}

impl Batcher {
    pub fn start(
        name: &str,
        threads: usize,
        max_queue: usize,
        knobs: Knobs,
        metrics: Arc<ModelMetrics>,
    ) -> Result<Batcher, std::io::Error> {
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending::default()),
            ready: Condvar::new(),
        });
        // Built first: if a thread cannot be spawned, dropping it closes the queue and ends the
        // threads already started.
        let batcher = Batcher {
            queue,
            admitted: Arc::new(AtomicUsize::new(0)),
            max_queue,
            threads,
            knobs: Arc::new(ArcSwap::from_pointee(knobs)),
        };
        for i in 0..threads.max(1) {
            let queue = batcher.queue.clone();
            let knobs = batcher.knobs.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("outrider-infer-{name}-{i}"))
                .spawn(move || work(&queue, &knobs, &metrics))?;
        }
        Ok(batcher)
    }

    pub fn set_knobs(&self, knobs: Knobs) {
        self.knobs.store(Arc::new(knobs));
        // A collector asleep on the old knobs looks again (a smaller batch may be due now); the
        // lock makes sure it is asleep, not between reading the old knobs and waiting.
        drop(self.queue.pending.lock());
        self.queue.ready.notify_all();
    }

    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    /// Jobs waiting or running now.
    pub fn depth(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    /// Queues `inputs` (rows first) for `model`; the receiver gets the answer.
    pub fn submit(
        &self,
        model: Arc<LoadedModel>,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Reply>, InferenceError> {
        let taken = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queue).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(InferenceError::Overloaded(model.name.clone()));
        }
        let admitted = Admitted(self.admitted.clone());
        let (reply, rx) = oneshot::channel();
        let rows = inputs.first().map_or(1, NamedTensor::rows);
        let name = model.name.clone();
        let job = Job {
            model,
            inputs,
            rows,
            queued: Instant::now(),
            deadline,
            reply,
            _admitted: admitted,
        };
        let max_size = self.knobs.load().max_size;
        let mut pending = self.queue.pending.lock();
        if pending.closed {
            return Err(InferenceError::Unavailable(name));
        }
        let before = pending.rows;
        pending.rows += job.rows;
        pending.jobs.push_back(job);
        // A batch's first job starts a collector's clock; a full batch ends its wait early.
        // Jobs in between only join the queue.
        let wake = pending.jobs.len() == 1 || (before < max_size && pending.rows >= max_size);
        drop(pending);
        if wake {
            self.queue.ready.notify_one();
        }
        Ok(rx)
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.queue.pending.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

fn work(queue: &Queue, knobs: &ArcSwap<Knobs>, metrics: &ModelMetrics) {
    // The batcher was dropped (model removed or its threads changed) and the queue is empty.
    while let Some(jobs) = collect(queue, knobs) {
        run_jobs(jobs, metrics);
    }
}

/// The next batch: the first job (waiting for one), then others until `max_size` rows or
/// `max_wait` after the first was queued, then whatever is already queued up to `max_size` (with
/// `max_wait: 0`, a batch is exactly what queued while the previous one ran: no added latency).
/// A job that would take the batch over `max_size` starts the next one. `None` once the batcher
/// is gone and nothing is left.
fn collect(queue: &Queue, knobs: &ArcSwap<Knobs>) -> Option<Vec<Job>> {
    let mut pending = queue.pending.lock();
    let knobs = loop {
        let Some(first) = pending.jobs.front() else {
            if pending.closed {
                return None;
            }
            queue.ready.wait(&mut pending);
            continue;
        };
        let knobs = **knobs.load();
        let until = first.queued + knobs.max_wait;
        if pending.rows >= knobs.max_size || pending.closed || Instant::now() >= until {
            break knobs;
        }
        // Woken early only when the batch fills (or the batcher closes).
        queue.ready.wait_until(&mut pending, until);
    };
    let mut jobs = Vec::new();
    let mut rows = 0;
    while let Some(job) = pending.jobs.front() {
        if !jobs.is_empty() && rows + job.rows > knobs.max_size {
            break;
        }
        rows += job.rows;
        jobs.extend(pending.jobs.pop_front());
    }
    pending.rows -= rows;
    let left = !pending.jobs.is_empty();
    drop(pending);
    if left {
        // The rest is the next batch's: another thread may collect it while this one computes.
        queue.ready.notify_one();
    }
    Some(jobs)
}

/// Runs collected jobs: those past their deadline are answered at once, the rest in one run
/// per model version (a swap may fall between two jobs of a batch).
fn run_jobs(jobs: Vec<Job>, metrics: &ModelMetrics) {
    let now = Instant::now();
    let mut live = Vec::with_capacity(jobs.len());
    for job in jobs {
        metrics
            .queue_wait
            .observe(now.saturating_duration_since(job.queued).as_secs_f64());
        if now >= job.deadline || job.reply.is_closed() {
            let _ = job.reply.send(Err(InferenceError::Deadline));
        } else {
            live.push(job);
        }
    }
    while let Some(first) = live.first() {
        let model = first.model.clone();
        let (same, rest): (Vec<Job>, Vec<Job>) = live
            .into_iter()
            .partition(|j| Arc::ptr_eq(&j.model, &model));
        live = rest;
        run_batch(&model, same, metrics);
    }
}

fn run_batch(model: &LoadedModel, jobs: Vec<Job>, metrics: &ModelMetrics) {
    let rows: usize = jobs.iter().map(|j| j.rows).sum();
    metrics.batch_size.observe(rows as f64);
    let started = Instant::now();
    let inputs = if jobs.len() == 1 {
        jobs.first().map(|j| j.inputs.clone()).unwrap_or_default()
    } else {
        concat_inputs(&jobs, rows)
    };
    // A model that panics on some input must not take the compute thread with it.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.run(inputs)))
        .unwrap_or_else(|_| Err(InferenceError::Compute("the model panicked".to_owned())));
    metrics.compute.observe(started.elapsed().as_secs_f64());
    match result {
        Err(e) => {
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
        Ok(outputs) => {
            let mut offset = 0;
            for job in jobs {
                let mine = split_rows(&outputs, offset, job.rows, rows);
                offset += job.rows;
                let _ = job.reply.send(mine);
            }
        }
    }
}

/// Every input of every job, joined along the batch dimension.
fn concat_inputs(jobs: &[Job], rows: usize) -> Vec<NamedTensor> {
    let Some(first) = jobs.first() else {
        return Vec::new();
    };
    first
        .inputs
        .iter()
        .enumerate()
        .map(|(i, template)| {
            let mut data = Data::empty(template.data.dtype());
            for job in jobs {
                if let Some(t) = job.inputs.get(i) {
                    data.extend(&t.data);
                }
            }
            let mut shape = template.shape.clone();
            if let Some(d) = shape.first_mut() {
                *d = rows;
            }
            NamedTensor {
                name: template.name.clone(),
                shape,
                data,
            }
        })
        .collect()
}

/// Rows `offset..offset + count` of every output of a batch of `total` rows.
fn split_rows(outputs: &[NamedTensor], offset: usize, count: usize, total: usize) -> Reply {
    outputs
        .iter()
        .map(|out| {
            if out.rows() != total {
                return Err(InferenceError::Compute(format!(
                    "output {:?} has {} rows for {total} input rows",
                    out.name,
                    out.rows()
                )));
            }
            let per_row = out.row_len();
            let mut shape = out.shape.clone();
            if let Some(d) = shape.first_mut() {
                *d = count;
            }
            Ok(NamedTensor {
                name: out.name.clone(),
                shape,
                data: out.data.slice(offset * per_row, (offset + count) * per_row),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_wait_a_batch_is_what_already_queued() {
        let bytes = std::fs::read("examples/models/risk.onnx").unwrap();
        let config: crate::inference::config::ModelConfig =
            serde_yaml_ng::from_str("path: examples/models/risk.onnx").unwrap();
        let model = Arc::new(LoadedModel::load("risk", &bytes, &config).unwrap());
        let queue = Queue {
            pending: Mutex::new(Pending::default()),
            ready: Condvar::new(),
        };
        let push = |job: Job| {
            let mut pending = queue.pending.lock();
            pending.rows += job.rows;
            pending.jobs.push_back(job);
        };
        let admitted = Arc::new(AtomicUsize::new(0));
        let job = || Job {
            model: model.clone(),
            inputs: Vec::new(),
            rows: 1,
            queued: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(60),
            reply: oneshot::channel().0,
            _admitted: Admitted(admitted.clone()),
        };
        for _ in 0..5 {
            push(job());
        }
        let knobs = |max_size| {
            ArcSwap::from_pointee(Knobs {
                max_size,
                max_wait: Duration::ZERO,
            })
        };
        // Everything queued joins at once, up to max_size; the rest starts the next batch.
        assert_eq!(collect(&queue, &knobs(3)).unwrap().len(), 3);
        assert_eq!(collect(&queue, &knobs(32)).unwrap().len(), 2);
        assert_eq!(queue.pending.lock().rows, 0);
        // Nothing more queued: the next job runs alone, without waiting for company.
        push(job());
        assert_eq!(collect(&queue, &knobs(32)).unwrap().len(), 1);
        // Closed with work left: the work is done first, then the thread ends.
        push(job());
        queue.pending.lock().closed = true;
        assert_eq!(collect(&queue, &knobs(32)).unwrap().len(), 1);
        assert!(collect(&queue, &knobs(32)).is_none());
        // A full batch is taken at once, long before its wait would be over.
        queue.pending.lock().closed = false;
        for _ in 0..4 {
            push(job());
        }
        let long = ArcSwap::from_pointee(Knobs {
            max_size: 4,
            max_wait: Duration::from_secs(30),
        });
        let started = Instant::now();
        assert_eq!(collect(&queue, &long).unwrap().len(), 4);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "did not wait out max_wait"
        );
    }

    #[test]
    fn split_rows_gives_each_caller_its_own_rows() {
        let out = NamedTensor {
            name: "y".into(),
            shape: vec![3, 2],
            data: Data::F32(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
        };
        let mine = split_rows(std::slice::from_ref(&out), 1, 2, 3).unwrap();
        assert_eq!(mine[0].shape, vec![2, 2]);
        assert_eq!(mine[0].data, Data::F32(vec![2.0, 3.0, 4.0, 5.0]));
        assert!(split_rows(&[out], 0, 1, 4).is_err());
    }
}
