//! Background workers under one supervisor: the outbox publisher, one consumer per peer, the
//! resolution worker and anti-entropy.
//!
//! Why: a worker that panics or returns would otherwise end silently, leaving a region that answers
//! every request while it no longer publishes or applies anything. Here every exit is logged,
//! counted (`locus_worker_restarts_total`), reflected in readiness (`/readyz` answers 503 naming
//! the worker until it runs again) and followed by a restart with exponential backoff. A worker
//! that keeps retrying on its own (a consumer waiting for NATS) is not down: only an exit is.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::task::{AbortHandle, JoinHandle};

/// First wait before a restart; it doubles up to [`MAX_BACKOFF`] while the worker keeps exiting
/// within [`HEALTHY_RUN`] of its start.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const HEALTHY_RUN: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Worker {
    /// Why it is down, while it waits for its restart.
    down: Option<String>,
    restarts: u64,
    running: Option<AbortHandle>,
}

/// The workers of one region process.
pub struct Supervisor {
    workers: Mutex<BTreeMap<String, Worker>>,
    restarts: IntCounterVec,
}

impl Supervisor {
    pub fn new(registry: &Registry) -> Supervisor {
        let restarts = IntCounterVec::new(
            Opts::new(
                "locus_worker_restarts_total",
                "Background workers restarted after they ended or panicked",
            ),
            &["worker"],
        )
        .expect("a valid metric");
        registry
            .register(Box::new(restarts.clone()))
            .expect("metric names are unique");
        Supervisor {
            workers: Mutex::new(BTreeMap::new()),
            restarts,
        }
    }

    /// Run `make()`'s future as worker `name`, again and again whenever it ends, in the caller's
    /// log span. Returns the supervising task (abort it to stop the worker for good).
    pub fn spawn<F, Fut>(self: &Arc<Self>, name: impl Into<String>, make: F) -> JoinHandle<()>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        use tracing::Instrument;
        let name = name.into();
        let supervisor = self.clone();
        let span = tracing::Span::current();
        let worker_span = span.clone();
        tokio::spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            loop {
                let started = Instant::now();
                let mut task =
                    AbortOnDrop(tokio::spawn(make().instrument(worker_span.clone())));
                supervisor.running(&name, task.0.abort_handle());
                let why = match (&mut task.0).await {
                    Ok(()) => "it ended".to_owned(),
                    Err(error) if error.is_panic() => format!("it panicked: {}", panic_text(error)),
                    Err(_) => "it was cancelled".to_owned(),
                };
                if started.elapsed() > HEALTHY_RUN {
                    backoff = FIRST_BACKOFF;
                }
                tracing::error!(worker = %name, reason = %why, restart_in_ms = backoff.as_millis() as u64, "background worker stopped; restarting");
                supervisor.down(&name, &why);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        .instrument(span))
    }

    fn running(&self, name: &str, handle: AbortHandle) {
        let mut workers = self.workers.lock().expect("supervisor lock");
        let worker = workers.entry(name.to_owned()).or_default();
        worker.down = None;
        worker.running = Some(handle);
    }

    fn down(&self, name: &str, why: &str) {
        self.restarts.with_label_values(&[name]).inc();
        let mut workers = self.workers.lock().expect("supervisor lock");
        let worker = workers.entry(name.to_owned()).or_default();
        worker.down = Some(why.to_owned());
        worker.restarts += 1;
        worker.running = None;
    }

    /// The workers that are down now, with why.
    pub fn down_now(&self) -> Vec<(String, String)> {
        self.workers
            .lock()
            .expect("supervisor lock")
            .iter()
            .filter_map(|(name, w)| w.down.clone().map(|why| (name.clone(), why)))
            .collect()
    }

    /// How often each worker was restarted.
    pub fn restarts(&self) -> BTreeMap<String, u64> {
        self.workers
            .lock()
            .expect("supervisor lock")
            .iter()
            .map(|(name, w)| (name.clone(), w.restarts))
            .collect()
    }

    /// Cancel the current run of worker `name`, as a crash would end it (for operators' drills
    /// and tests); the supervisor restarts it. False when no such worker runs.
    pub fn kill(&self, name: &str) -> bool {
        let workers = self.workers.lock().expect("supervisor lock");
        match workers.get(name).and_then(|w| w.running.as_ref()) {
            Some(handle) => {
                handle.abort();
                true
            }
            None => false,
        }
    }
}

/// Stopping the supervisor (aborting its task) stops the worker it runs too.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_text(error: tokio::task::JoinError) -> String {
    let payload = error.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}
