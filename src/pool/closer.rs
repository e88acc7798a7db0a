//! The closer task: connections to recover (back to idle, after a reset in session mode) or
//! to shut down explicitly. Each job runs as a task on the process's tracker, so the drain
//! waits for every one of them; the pool slot stays taken until the job is done.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Conn, PoolInner, Reset};
use crate::metrics::CloseReason;

/// Work for the closer task.
pub(super) struct CloseJob {
    pub(super) conn: Conn,
    /// The pool slot stays taken until the job is done, so the size bound holds.
    pub(super) permit: Option<OwnedSemaphorePermit>,
    pub(super) pool: Arc<PoolInner>,
    pub(super) kind: CloseKind,
}

pub(super) enum CloseKind {
    /// Try to bring it back to idle (and run the reset query, in session mode); if it must
    /// close after all, the reason is `closed_as` when set.
    Recover {
        reset: Reset,
        closed_as: Option<CloseReason>,
    },
    Close(CloseReason),
}

/// The closer: receives connections to recover or shut down, and runs each job as a task on
/// the process's tracker so the drain can wait for every one of them.
#[derive(Clone)]
pub struct Closer {
    tx: mpsc::UnboundedSender<CloseJob>,
    /// Jobs sent and not finished; the drain waits for zero before stopping the closer.
    pending: Arc<AtomicUsize>,
}

impl Closer {
    /// Start the closer task on `tracker`. It runs until `stop` is cancelled, then starts the
    /// jobs already queued and ends; the tracker waits for those jobs.
    pub fn start(tracker: &TaskTracker, stop: CancellationToken) -> Closer {
        let (tx, mut rx) = mpsc::unbounded_channel::<CloseJob>();
        let pending = Arc::new(AtomicUsize::new(0));
        let t = tracker.clone();
        let p = pending.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    job = rx.recv() => match job {
                        Some(job) => {
                            t.spawn(run_job(job, Done(p.clone())));
                        }
                        None => return,
                    },
                    _ = stop.cancelled() => {
                        rx.close();
                        while let Some(job) = rx.recv().await {
                            t.spawn(run_job(job, Done(p.clone())));
                        }
                        return;
                    }
                }
            }
        });
        Closer { tx, pending }
    }

    pub(super) fn send(&self, job: CloseJob) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        // On failure the job (connection and permit) is dropped right here: the permit is
        // released, and the connection's Drop reports the leak.
        if self.tx.send(job).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Jobs queued or running.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

/// Marks a closer job finished when dropped.
struct Done(Arc<AtomicUsize>);
impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn run_job(job: CloseJob, _done: Done) {
    let CloseJob {
        mut conn,
        permit,
        pool,
        kind,
    } = job;
    let timeout = pool.server_close_timeout;
    let reason = match kind {
        CloseKind::Close(r) => r,
        CloseKind::Recover { reset, closed_as } => {
            let mut reason = closed_as.unwrap_or(CloseReason::error);
            if conn.recover(timeout).await {
                let settings = pool.settings();
                let mut clean = true;
                let sql = match reset {
                    Reset::No => "",
                    Reset::ResetQuery => settings.reset_query.as_str(),
                    // Transaction-mode isolation (DESIGN.md section 8): the whole session, not
                    // whatever reset_query says.
                    Reset::DiscardAll => "DISCARD ALL",
                };
                if !sql.is_empty() {
                    match conn.exec(sql, timeout).await {
                        Ok(o) if o.error.is_none() && conn.is_clean() => {
                            super::after_reset(&mut conn, sql)
                        }
                        Ok(o) => {
                            if let Some((code, msg)) = o.error {
                                tracing::warn!(pool = %pool.name, %code, %msg, sql, "server reset failed");
                            }
                            clean = false;
                        }
                        Err(_) => clean = false,
                    }
                    if !clean {
                        reason = closed_as.unwrap_or(CloseReason::reset_failed);
                    }
                }
                if clean {
                    if !pool.closed.load(Ordering::Acquire) {
                        pool.metrics.closing.dec();
                        pool.park(conn, Instant::now());
                        drop(permit);
                        return;
                    }
                    // Draining: close it here rather than queue another job.
                    reason = closed_as.unwrap_or(CloseReason::drain);
                }
            }
            reason
        }
    };
    // The slot stays taken until the server has really gone, so the size bound holds.
    pool.shutdown_conn(conn, reason).await;
    drop(permit);
}
