//! The dedicated OS thread that owns the `Runner`. Model forward passes are blocking,
//! so async handlers send it jobs over a channel and await the answer on a oneshot.
//! With the model on a GPU both sides poll for a while instead of sleeping, which
//! took ~0.25 ms off every step's round trip (a CPU shard made to poll, tiny model;
//! see `POLL_BEFORE_SLEEP`).

use super::Runner;
use anyhow::{anyhow, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce(&mut Runner) + Send>;

/// What the handlers may know of the worker without queueing behind its jobs.
#[derive(Default)]
struct WorkerStatus {
    busy: AtomicBool,
    has_cache: AtomicBool,
}

pub struct RunnerHandle {
    jobs: mpsc::Sender<Job>,
    status: Arc<WorkerStatus>,
    thread: JoinHandle<()>,
    /// The model runs on a GPU, so the host threads that wait on it may poll (spin)
    /// instead of sleeping: on a CPU they would take cores from the model.
    polls: bool,
}

impl RunnerHandle {
    /// Starts the worker thread and builds the runner on it, so that the model is
    /// loaded on the thread that will run it (CUDA contexts are per thread).
    pub async fn spawn<F>(build: F) -> Result<Self>
    where
        F: FnOnce() -> Result<Runner> + Send + 'static,
    {
        let (jobs, receiver) = mpsc::channel::<Job>();
        let (ready, built) = oneshot::channel();
        let status = Arc::new(WorkerStatus::default());
        let worker_status = status.clone();
        let thread = std::thread::Builder::new()
            .name("shard-runner".into())
            .spawn(move || {
                let mut runner = match catch_unwind(AssertUnwindSafe(build)) {
                    Ok(Ok(runner)) => runner,
                    Ok(Err(e)) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                    Err(panic) => {
                        let _ =
                            ready.send(Err(anyhow!("loading panicked: {}", panic_message(&panic))));
                        return;
                    }
                };
                let polls = runner.uses_gpu();
                let _ = ready.send(Ok(polls));
                while let Some(job) = next_job(&receiver, polls) {
                    worker_status.busy.store(true, Ordering::SeqCst);
                    if polls {
                        job(&mut runner);
                    } else {
                        // On CPU the job runs on a thread of the model's pool, which then
                        // takes its share of each parallel product itself: handing every
                        // product over from this thread and sleeping until it is done
                        // cost two thread wake-ups per product (a few ms per decode step).
                        let cpu_job = CpuJob(&mut runner, job);
                        rayon::scope(move |_| cpu_job.run());
                    }
                    worker_status
                        .has_cache
                        .store(runner.has_cache(), Ordering::SeqCst);
                    worker_status.busy.store(false, Ordering::SeqCst);
                }
            })?;
        let polls = built
            .await
            .map_err(|_| anyhow!("the shard runner thread stopped while loading"))??;
        Ok(Self {
            jobs,
            status,
            thread,
            polls,
        })
    }

    /// Runs `job` on the worker thread. A panic in it is reported as an error, and
    /// the worker keeps serving.
    pub async fn run<T, F>(&self, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Runner) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |runner| {
            let result = catch_unwind(AssertUnwindSafe(|| job(runner))).unwrap_or_else(|panic| {
                Err(anyhow!("shard runner panicked: {}", panic_message(&panic)))
            });
            // The handler may have gone away (client cancelled): nothing to answer then.
            let _ = reply.send(result);
        });
        self.jobs
            .send(job)
            .map_err(|_| anyhow!("the shard runner thread has stopped"))?;
        let stopped = || anyhow!("the shard runner thread has stopped");
        // The answer is polled rather than awaited for as long as a step takes: a parked
        // runtime thread takes tens of microseconds to wake for it.
        let mut answer = answer;
        let asked = Instant::now();
        while self.polls && asked.elapsed() < POLL_FOR_ANSWER {
            match answer.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Empty) => tokio::task::yield_now().await,
                Err(oneshot::error::TryRecvError::Closed) => return Err(stopped()),
            }
        }
        answer.await.map_err(|_| stopped())?
    }

    /// OK while the worker lives; once a cache exists and no step is running, also
    /// runs a one-token forward pass.
    pub async fn health(&self) -> Result<()> {
        if self.thread.is_finished() {
            return Err(anyhow!("the shard runner thread has stopped"));
        }
        if self.status.busy.load(Ordering::SeqCst) || !self.status.has_cache.load(Ordering::SeqCst)
        {
            return Ok(());
        }
        self.run(Runner::health).await
    }
}

/// How long an idle worker polls for its next job before it sleeps. During generation
/// the next step's job comes a gRPC round trip after the last answer, and waking a
/// sleeping thread costs tens of microseconds of every step.
const POLL_BEFORE_SLEEP: Duration = Duration::from_millis(2);

/// How long a handler polls for its job's answer before it awaits it: longer than a
/// decode step, shorter than a long prefill.
const POLL_FOR_ANSWER: Duration = Duration::from_millis(50);

/// The next job, polled for a while first when `polls`; None once every handle is gone.
fn next_job(receiver: &mpsc::Receiver<Job>, polls: bool) -> Option<Job> {
    let idle_since = Instant::now();
    while polls && idle_since.elapsed() < POLL_BEFORE_SLEEP {
        match receiver.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
            Err(mpsc::TryRecvError::Disconnected) => return None,
        }
    }
    receiver.recv().ok()
}

/// A job and the runner, lent to a thread of the CPU pool while the runner thread
/// waits for the job to finish.
struct CpuJob<'a>(&'a mut Runner, Job);

// SAFETY: only made when the model runs on the CPU (the runner does not poll), where the
// runner holds no thread-bound state (CUDA contexts and graphs exist on CUDA only); the
// runner thread waits in `rayon::scope` until the job is done, so one thread at a time
// uses the runner.
unsafe impl Send for CpuJob<'_> {}

impl CpuJob<'_> {
    fn run(self) {
        (self.1)(self.0)
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}
