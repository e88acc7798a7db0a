//! A pool's view of its servers' health: the last failed connect (`server_login_retry`), the
//! round trip that checks a connection idle for `server_check_delay` (and taking an idle one
//! at checkout), and the failover reaction to a read-only server (`25006`) under
//! `target_session_attrs` (DESIGN.md section 9).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{lock, CheckoutError, Conn, Pool, PoolInner};
use crate::backend::{BackendError, ServerConn};
use crate::config::PoolSettings;
use crate::metrics::{CheckOutcome, CloseReason};

/// An idle connection parked for less than this is lent out without a liveness probe.
const PROBE_AFTER: Duration = Duration::from_millis(50);

/// A failed connect, remembered for `server_login_retry`.
#[derive(Debug, Clone)]
pub(super) struct ConnectFailure {
    pub(super) at: Instant,
    code: String,
    message: String,
}

impl ConnectFailure {
    pub(super) fn new(e: &BackendError) -> Self {
        ConnectFailure {
            at: Instant::now(),
            code: e.sqlstate().to_string(),
            message: e.to_string(),
        }
    }

    /// The error a client gets: the last connect error's message and SQLSTATE.
    pub(super) fn error(&self) -> CheckoutError {
        CheckoutError::Connect(BackendError::Server {
            code: self.code.clone(),
            message: self.message.clone(),
        })
    }
}

impl PoolInner {
    /// The last failed connect, while connects must still wait for `retry` after it.
    pub(super) fn connect_failure(&self, retry: Duration) -> Option<ConnectFailure> {
        let f = lock(&self.last_failure);
        f.as_ref().filter(|f| f.at.elapsed() < retry).cloned()
    }

    /// `server_check_delay`: a round trip (an empty query) on a connection idle that long,
    /// bounded by `server_close_timeout`. Counted in `tidepool_server_checks_total`.
    pub(super) async fn check(&self, conn: &mut ServerConn) -> bool {
        let ok = matches!(
            conn.exec("", self.server_close_timeout).await,
            Ok(o) if o.error.is_none() && conn.is_clean()
        );
        let outcome = if ok {
            CheckOutcome::ok
        } else {
            CheckOutcome::failed
        };
        self.metrics.server_check(outcome).inc();
        if !ok {
            tracing::info!(conn.id = conn.id, pool = %self.name, "idle server connection failed its check: replaced");
        }
        ok
    }
}

impl Pool {
    /// An idle connection that still looks alive (checked with a round trip when unused for
    /// `server_check_delay`), counted active, with the time it was taken; `None` if there is
    /// none.
    pub(super) async fn idle_checkout(&self, settings: &PoolSettings) -> Option<(Conn, Instant)> {
        let inner = &self.inner;
        loop {
            let candidate = lock(&inner.idle).pop_back();
            let mut conn = candidate?;
            inner.metrics.idle.dec();
            let mut now = Instant::now();
            let (lifetime, idle) = (settings.server_lifetime, settings.server_idle_timeout);
            let idle_for = match inner.usable(&conn, lifetime, idle, now) {
                Ok(d) => d,
                Err(reason) => {
                    inner.send_close(conn, reason);
                    continue;
                }
            };
            if idle_for >= settings.server_check_delay {
                if !inner.check(&mut conn).await {
                    inner.send_close(conn, CloseReason::error);
                    continue;
                }
                now = Instant::now();
            }
            inner.metrics.active.inc();
            return Some((conn, now));
        }
    }

    /// A server answered `25006` (read-only transaction) on connection `conn_id`: after a
    /// failover the host it is on is no longer the primary. With `target_session_attrs` other
    /// than `any`, every connection of the pool is replaced (idle ones now, the others as they
    /// come back, each with the explicit shutdown) and new ones go to whichever host is
    /// writable now. Once per failover: a connection already made stale changes nothing.
    pub fn server_read_only(&self, conn_id: u64) {
        let inner = &self.inner;
        if self.target().attrs == crate::config::TargetSessionAttrs::Any {
            return;
        }
        let current = inner.generation.load(Ordering::Acquire);
        let of_conn = lock(&inner.conn_generation)
            .get(&conn_id)
            .map_or(0, |c| c.generation);
        if of_conn != current {
            return;
        }
        if inner
            .generation
            .compare_exchange(current, current + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        tracing::warn!(pool = %inner.name, "a server is read-only (25006): replacing the pool's connections");
        let idle: Vec<Conn> = lock(&inner.idle).drain(..).collect();
        for c in idle {
            inner.metrics.idle.dec();
            inner.send_close(c, CloseReason::error);
        }
    }
}

impl PoolInner {
    /// Why an idle connection must not be lent out (`Err`), else how long it has been idle
    /// (for the caller's `server_check_delay`, without a second clock subtraction).
    /// `lifetime` and `idle_timeout` are the pool's `server_lifetime` and
    /// `server_idle_timeout`.
    pub(super) fn usable(
        &self,
        conn: &ServerConn,
        lifetime: Duration,
        idle_timeout: Duration,
        now: Instant,
    ) -> Result<Duration, CloseReason> {
        let idle_for = now.saturating_duration_since(conn.idle_since);
        if now.saturating_duration_since(conn.created) >= lifetime {
            Err(CloseReason::lifetime)
        } else if idle_for >= idle_timeout {
            Err(CloseReason::idle_timeout)
        } else if self.is_stale(conn) {
            Err(CloseReason::reload)
        } else if idle_for >= PROBE_AFTER && !conn.idle_check() {
            // A connection parked moments ago is not probed (a syscall per transaction under
            // load); upkeep probes every idle connection each second anyway.
            Err(CloseReason::error)
        } else {
            Ok(idle_for)
        }
    }

    pub(super) fn is_stale(&self, conn: &ServerConn) -> bool {
        let current = self.generation.load(Ordering::Acquire);
        current != 0
            && lock(&self.conn_generation)
                .get(&conn.id)
                .map_or(0, |c| c.generation)
                != current
    }
}
