//! Threads for the flusher's CPU work (building chunks: zstd; committing them to the map) at a
//! lower CPU priority than the threads that serve requests.
//!
//! On a machine where the CPU is the limit, background work that runs at the same priority as
//! reads takes its share of the cores while a client waits
//! (docs/design/background-work-at-nice-10.md). RocksDB lowers its compaction threads the same
//! way (`Env::LowerThreadPoolCPUPriority`). Nice 10 only matters while the CPU is contended; when
//! the write buffer is full the writers wait and these threads get the cores.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use crate::workq::{job, run_job, Job, JobFailed};

/// Nice value of the background threads (0 is normal, 19 the lowest).
pub const NICE: i32 = 10;

struct Pool {
    tx: Mutex<Sender<Job>>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vblock-bg-{i}"))
                .spawn(move || worker(&rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a background thread");
            }
        }
        Pool { tx: Mutex::new(tx) }
    })
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    // Linux: PRIO_PROCESS with a thread id sets that thread's nice value only.
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE) {
        tracing::warn!(error = %e, "cannot lower the background thread's priority");
    }
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        run_job(job);
    }
}

/// Runs `f` on a background thread (nice [`NICE`]). Errors with [`JobFailed`] if `f` panicked
/// or no background thread could be started.
pub async fn run<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JobFailed> {
    let (job, rx) = job(f);
    let sent = pool()
        .tx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job);
    if sent.is_err() {
        return Err(JobFailed);
    }
    rx.await.map_err(|_| JobFailed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn jobs_run_at_the_lower_priority_and_panics_fail_alone() {
        let nice = tokio::time::timeout(
            Duration::from_secs(30),
            run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid()))),
        )
        .await
        .expect("in time")
        .expect("job ran")
        .expect("getpriority");
        assert_eq!(nice, NICE);
        let bad = run(|| -> u8 { panic!("job panics on purpose") }).await;
        assert!(bad.is_err());
        let sums = (0..64u64).map(|i| run(move || i + 1));
        let got = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(sums))
            .await
            .expect("in time");
        let total: u64 = got.into_iter().map(|r| r.expect("job ran")).sum();
        assert_eq!(total, (1..=64u64).sum::<u64>());
    }
}
