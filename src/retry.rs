//! Retry with exponential backoff and jitter, for backend calls (the caller owns retry policy).

use std::future::Future;
use std::time::Duration;

use rand::Rng;

use crate::backend::BackendError;

/// How often and how long to retry transient failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First delay.
    pub initial: Duration,
    /// Largest delay between attempts.
    pub max_delay: Duration,
    /// Attempts in all (including the first); `None` retries for ever.
    pub max_attempts: Option<u32>,
}

impl RetryPolicy {
    /// For reads on the request path: 6 attempts, 50 ms doubling to 2 s (about 5 s in all).
    pub fn reads() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            max_attempts: Some(6),
        }
    }

    /// For background uploads: for ever, 100 ms doubling to 5 s.
    pub fn forever() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_attempts: None,
        }
    }

    /// Delay before retry number `attempt` (0-based): `initial * 2^attempt`, capped, with
    /// "equal jitter" (half fixed, half random).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max_delay);
        let half = base / 2;
        half + half.mul_f64(rand::thread_rng().gen::<f64>())
    }
}

/// Stores `body` under `key` in `backend`, retrying transient failures with [`RetryPolicy::reads`]
/// (control-plane and metadata objects: a failure fails the operation).
pub async fn put_retried(
    backend: &crate::backend::SharedBackend,
    key: &str,
    body: bytes::Bytes,
) -> Result<(), BackendError> {
    retry(&RetryPolicy::reads(), key, || {
        backend.put(key, body.clone())
    })
    .await
}

/// Stores `body` under `key` only if no object is there (`Backend::put_if_absent`), retrying
/// transient failures like [`put_retried`]. `Ok(true)` when it is stored, also when the object
/// there holds exactly `body` (an earlier attempt landed but its answer was lost); `Ok(false)`
/// when another writer's object holds the key.
pub async fn put_if_absent_retried(
    backend: &crate::backend::SharedBackend,
    key: &str,
    body: bytes::Bytes,
) -> Result<bool, BackendError> {
    let policy = RetryPolicy::reads();
    if retry(&policy, key, || backend.put_if_absent(key, body.clone())).await? {
        return Ok(true);
    }
    Ok(retry(&policy, key, || backend.get(key)).await? == body)
}

/// Deletes `key` from `backend`, retrying transient failures like [`put_retried`].
pub async fn delete_retried(
    backend: &crate::backend::SharedBackend,
    key: &str,
) -> Result<(), BackendError> {
    retry(&RetryPolicy::reads(), key, || backend.delete(key)).await
}

/// Runs `op` until it succeeds, fails with a non-transient error, or the policy's attempts are
/// used up; logs each retry with `key`.
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, key: &str, mut op: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BackendError>>,
{
    let mut attempt = 0u32;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && policy.max_attempts.is_none_or(|m| attempt + 1 < m) => {
                tracing::warn!(key, error = %e, attempt, "backend call failed; retrying");
                tokio::time::sleep(policy.delay(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> BackendError {
        BackendError::Io {
            key: "k".into(),
            message: "503".into(),
            transient: true,
        }
    }

    fn fast(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            max_attempts: Some(attempts),
        }
    }

    #[tokio::test]
    async fn retries_transient_until_success() {
        let calls = AtomicU32::new(0);
        let r = retry(&fast(5), "k", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(transient())
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn gives_up_after_budget_and_on_permanent_errors() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry(&fast(3), "k", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(transient())
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        calls.store(0, Ordering::SeqCst);
        let r: Result<(), _> = retry(&fast(3), "k", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(BackendError::NotFound("k".into()))
        })
        .await;
        assert!(matches!(r, Err(BackendError::NotFound(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn delay_is_capped_and_jittered() {
        let p = RetryPolicy::forever();
        for a in 0..40 {
            let d = p.delay(a);
            assert!(d <= p.max_delay, "{d:?}");
            assert!(d >= p.initial.min(p.max_delay) / 2);
        }
    }
}
