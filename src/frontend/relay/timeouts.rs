//! Protective timeouts (DESIGN.md section 9): `query_timeout`, `idle_transaction_timeout`,
//! `client_idle_timeout`, with Postgres's own SQLSTATEs and wording.
//!
//! One timer per session, made once (boxed, in the session's extras) when the pool has any of
//! them on, and never when none is: a session without timeouts pays one flag test per relay
//! step. The timer is re-armed only when the session's state changes kind (a request sent, a
//! reply complete, the server given back), never per message, so a transaction costs at most
//! two timer updates and no allocation.
//!
//! Which timeout applies follows the server's protocol state:
//! - a request in flight (a Query, Sync or FunctionCall not yet answered, an extended
//!   exchange, COPY): `query_timeout`, from when it was sent. When it fires the query gets a
//!   CancelRequest (the client sees Postgres's 57014); if the server has not answered
//!   `server_close_timeout` later, the client gets FATAL 57014 and the server is shut down.
//!   (PgBouncer closes the server without a cancel.)
//! - a transaction open and nothing in flight: `idle_transaction_timeout`. The client gets
//!   FATAL 25P03; its transaction is rolled back and the server goes back to the pool (it is
//!   kept, unlike PgBouncer).
//! - no transaction open: `client_idle_timeout`; FATAL 57P05.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::Session;
use crate::config::PoolSettings;
use crate::metrics::TimeoutKind;

/// Postgres's wording (src/backend/tcop/postgres.c, ProcessInterrupts, Postgres 15).
pub(super) const IDLE_IN_TRANSACTION: &str =
    "terminating connection due to idle-in-transaction timeout";
pub(super) const IDLE_SESSION: &str = "terminating connection due to idle-session timeout";
pub(super) const QUERY_NOT_CANCELLED: &str =
    "canceling statement due to statement timeout; the server did not answer the cancel request";

/// What the timer is set for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Armed {
    Idle,
    Query,
    /// The query's cancel was sent; the server has until the deadline to answer.
    CancelSent,
    IdleTransaction,
}

/// A session's timeouts and its one timer.
pub(super) struct Timers {
    query: Option<Duration>,
    idle_transaction: Option<Duration>,
    client_idle: Option<Duration>,
    /// Bound on the wait for an answer to a cancel.
    cancel_grace: Duration,
    timer: Pin<Box<Sleep>>,
    armed: Option<Armed>,
}

impl Timers {
    /// The timers for a session of a pool with these settings, if any timeout is on.
    pub(super) fn new(settings: &PoolSettings, cancel_grace: Duration) -> Option<Timers> {
        if !settings.has_timeouts() {
            return None;
        }
        let on = |d: Duration| (!d.is_zero()).then_some(d);
        Some(Timers {
            query: on(settings.query_timeout),
            idle_transaction: on(settings.idle_transaction_timeout),
            client_idle: on(settings.client_idle_timeout),
            cancel_grace,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
        })
    }

    /// Set the timer for `want` (if that timeout is on), unless it is set for it already.
    pub(super) fn arm(&mut self, want: Armed) {
        if self.armed == Some(want)
            || (self.armed == Some(Armed::CancelSent) && want == Armed::Query)
        {
            return;
        }
        let d = match want {
            Armed::Idle => self.client_idle,
            Armed::Query => self.query,
            Armed::CancelSent => Some(self.cancel_grace),
            Armed::IdleTransaction => self.idle_transaction,
        };
        match d {
            Some(d) => {
                self.timer.as_mut().reset(Instant::now() + d);
                self.armed = Some(want);
            }
            None => self.armed = None,
        }
    }

    /// Ready with what fired, once its deadline has passed.
    pub(super) fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<Armed> {
        let Some(armed) = self.armed else {
            return Poll::Pending;
        };
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.armed = None;
                Poll::Ready(armed)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Session {
    /// Which timeout the session's state calls for now.
    fn timeout_state(&self) -> Armed {
        match &self.server {
            None => Armed::Idle,
            Some(s) => {
                let st = &s.state;
                if st.expected_rfq > 0
                    || st.in_extended
                    || st.copy_in
                    || st.copy_out
                    || self.c_ready > 0
                    || self.c_rem > 0
                {
                    Armed::Query
                } else if st.txn_status != b'I' {
                    Armed::IdleTransaction
                } else {
                    Armed::Idle
                }
            }
        }
    }

    /// Re-arm the timer if the session's state changed kind (a few comparisons otherwise).
    pub(super) fn update_timer(&mut self) {
        let want = self.timeout_state();
        if let Some(t) = self.extras.timers_mut() {
            t.arm(want);
        }
    }

    /// The timer fired: cancel the query (and wait for its answer a little), or say which
    /// timeout ends the session.
    pub(super) fn timer_fired(&mut self, fired: Armed) -> Option<TimeoutKind> {
        // The state may have moved on since the timer was set (then it is re-armed).
        let now = self.timeout_state();
        let kind = match (fired, now) {
            (Armed::CancelSent, Armed::Query) => {
                // The cancel went unanswered: the client is told, and the server, mid-request,
                // is shut down rather than recovered.
                if let Some(s) = self.server.as_mut() {
                    s.state.broken = true;
                }
                return Some(TimeoutKind::query);
            }
            (Armed::Query, Armed::Query) => {
                self.pool_metrics().timeout(TimeoutKind::query).inc();
                tracing::info!(
                    pool = self.login.pool.name(),
                    "query_timeout: cancelling the running request"
                );
                let cs = self.login.shared.clone();
                // Delivered concurrently: the relay must keep reading the answer.
                self.shared.tracker.spawn(async move { cs.cancel().await });
                if let Some(t) = self.extras.timers_mut() {
                    t.arm(Armed::CancelSent);
                }
                return None;
            }
            (Armed::IdleTransaction, Armed::IdleTransaction) => TimeoutKind::idle_transaction,
            (Armed::Idle, Armed::Idle) => TimeoutKind::client_idle,
            _ => {
                self.update_timer();
                return None;
            }
        };
        self.pool_metrics().timeout(kind).inc();
        tracing::info!(
            pool = self.login.pool.name(),
            ?kind,
            "client ended by its timeout"
        );
        Some(kind)
    }
}
