//! Waiting for conditions with a deadline, the only way tests may wait.
//!
//! This module owns polling: it calls a condition again and again, with a short
//! interval that grows to [`MAX_POLL_INTERVAL`], until it holds or the timeout
//! passes, and then fails with a message that names what was awaited and, for
//! [`wait_for`], the last error seen. A slow condition is cut off at the
//! deadline too. It must never be used to sleep a fixed time "to be safe":
//! every wait here ends as soon as its condition is true.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// A generous default for conditions that should hold within a few seconds on
/// a loaded 2-core machine.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The first poll interval; it doubles after each failed check.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// The longest gap between two checks.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Poll `cond` until it returns `true`, failing after `timeout` with an error
/// naming `what` ("row 42 replicated to eu").
///
/// ```no_run
/// # async fn f(client: tokio_postgres::Client) -> anyhow::Result<()> {
/// use pgmesh_tests::{wait_until, DEFAULT_TIMEOUT};
/// wait_until(DEFAULT_TIMEOUT, "row replicated", || async {
///     client.query_opt("SELECT 1 FROM t WHERE id = 42", &[]).await.ok().flatten().is_some()
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, what, || {
        let fut = cond();
        async move { Ok(fut.await.then_some(())) }
    })
    .await
}

/// Poll until `sql` (with `params`) returns a row on `client`: a query error counts
/// as "not yet". Fails after `timeout` naming `what`.
pub async fn wait_row(
    client: &tokio_postgres::Client,
    timeout: Duration,
    what: &str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<()> {
    wait_until(timeout, what, || async {
        client.query_opt(sql, params).await.ok().flatten().is_some()
    })
    .await
}

/// Poll `probe` until it returns `Ok(Some(value))` and return that value. An
/// `Ok(None)` or `Err` means "not yet"; on timeout the error names `what` and
/// includes the last `Err`, which usually explains the hang.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut interval = MIN_POLL_INTERVAL;
    let mut last_error: Option<anyhow::Error> = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, probe()).await {
            Ok(Ok(Some(value))) => return Ok(value),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return timed_out(timeout, what, last_error);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(interval.min(remaining)).await;
        interval = (interval * 2).min(MAX_POLL_INTERVAL);
    }
}

/// The blocking form of [`wait_until`], for synchronous code (it sleeps the
/// thread between checks, so do not call it on an async runtime thread).
pub fn wait_until_blocking(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut interval = MIN_POLL_INTERVAL;
    loop {
        if cond() {
            return Ok(());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return timed_out(timeout, what, None);
        }
        std::thread::sleep(interval.min(remaining));
        interval = (interval * 2).min(MAX_POLL_INTERVAL);
    }
}

fn timed_out<T>(timeout: Duration, what: &str, last_error: Option<anyhow::Error>) -> Result<T> {
    match last_error {
        Some(e) => bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}"),
        None => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_once_condition_holds() {
        let calls = AtomicU32::new(0);
        wait_until(Duration::from_secs(5), "third call", || async {
            calls.fetch_add(1, Ordering::SeqCst) >= 2
        })
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn times_out_with_what_and_last_error() {
        let err = wait_for::<(), _, _>(Duration::from_millis(30), "never", || async {
            Err(anyhow::anyhow!("boom"))
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("waiting for never"), "{err}");
        assert!(err.contains("boom"), "{err}");
    }

    #[tokio::test]
    async fn cuts_off_a_hanging_probe() {
        let err = wait_until(Duration::from_millis(30), "hang", || async {
            std::future::pending::<bool>().await
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("hang"));
    }

    #[test]
    fn blocking_form_times_out() {
        let err = wait_until_blocking(Duration::from_millis(20), "nothing", || false).unwrap_err();
        assert!(err.to_string().contains("nothing"));
    }
}
