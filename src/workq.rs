//! A queue of blocking jobs drained by a few threads of tokio's blocking pool.
//!
//! `spawn_blocking` per job hands every job to a thread of its own: under many small reads the
//! thread wake-ups and the pool's lock take a large share of the daemon's CPU
//! (docs/design/read-queue.md). Here a job joins a queue; a worker drains it until it is empty,
//! so a burst of jobs costs one wake-up per worker, not one per job; up to `max_workers` run at
//! once, so jobs that block on the disk still overlap.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

/// A type-erased blocking job.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// `f` as a [`Job`] that sends its result to the returned receiver; if `f` panics the sender is
/// dropped unsent, so the receiver errors.
pub(crate) fn job<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> (Job, tokio::sync::oneshot::Receiver<T>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    (job, rx)
}

/// Runs `job`, containing a panic (the panic hook has logged it; the job's caller gets an error
/// from its receiver): the thread goes on with the next job.
pub(crate) fn run_job(job: Job) {
    let _ = catch_unwind(AssertUnwindSafe(job));
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    workers: usize,
}

/// A work queue for blocking jobs; cheap to share (`Arc`).
pub struct WorkQueue {
    state: Mutex<State>,
    max_workers: usize,
}

/// The job panicked (or its runtime shut down before it ran); the panic was logged by the hook.
#[derive(Debug, thiserror::Error)]
#[error("blocking job did not complete")]
pub struct JobFailed;

impl WorkQueue {
    /// A queue drained by at most `max_workers` (at least 1) threads at a time.
    pub fn new(max_workers: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            max_workers: max_workers.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on a blocking thread after the jobs queued before it; must be called inside a
    /// tokio runtime. Errors with [`JobFailed`] if `f` panicked.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, JobFailed> {
        let (job, rx) = job(f);
        let start_worker = {
            let mut st = self.lock();
            st.jobs.push_back(job);
            let start = st.workers < self.max_workers;
            if start {
                st.workers += 1;
            }
            start
        };
        if start_worker {
            let q = self.clone();
            tokio::task::spawn_blocking(move || q.drain());
        }
        rx.await.map_err(|_| JobFailed)
    }

    /// Runs queued jobs until none is left, then retires this worker.
    fn drain(&self) {
        loop {
            let job = {
                let mut st = self.lock();
                match st.jobs.pop_front() {
                    Some(j) => j,
                    None => {
                        st.workers -= 1;
                        return;
                    }
                }
            };
            run_job(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_every_job_and_returns_its_result() {
        let q = WorkQueue::new(3);
        let done = Arc::new(AtomicUsize::new(0));
        let runs = (0..500u64).map(|i| {
            let (q, done) = (q.clone(), done.clone());
            tokio::spawn(async move {
                q.run(move || {
                    done.fetch_add(1, Ordering::SeqCst);
                    i * 2
                })
                .await
            })
        });
        let results =
            tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(runs))
                .await
                .expect("jobs finished in time");
        for (i, r) in results.into_iter().enumerate() {
            assert_eq!(r.expect("task").expect("job"), i as u64 * 2);
        }
        assert_eq!(done.load(Ordering::SeqCst), 500);
        // A worker retires just after it delivers its last result: wait (bounded) for that.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while q.lock().workers != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "workers retire when the queue is empty"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_fails_alone() {
        let q = WorkQueue::new(1);
        let bad = q.run(|| -> u32 { panic!("job panics on purpose") });
        assert!(matches!(bad.await, Err(JobFailed)));
        let good = tokio::time::timeout(Duration::from_secs(30), q.run(|| 7u32)).await;
        assert_eq!(good.expect("in time").expect("job"), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_job_does_not_hold_up_the_queue() {
        // The first job waits until the second ran: only a second worker can run it.
        let q = WorkQueue::new(2);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let q2 = q.clone();
        let first = tokio::spawn(async move {
            q2.run(move || rx.recv_timeout(Duration::from_secs(30)).is_ok())
                .await
        });
        let second = q.run(move || tx.send(()).is_ok());
        let (a, b) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(first, second)
        })
        .await
        .expect("both finished in time");
        assert!(b.expect("second job"));
        assert!(
            a.expect("task").expect("first job"),
            "first job was released by the second"
        );
    }
}
