//! How a session ends: the drain signals it watches, the forced close, the last words to the
//! client and handing the server back (clean to the idle list, anything else to the closer).

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;

use super::{timeouts, Ev, Session};
use crate::config::PoolMode;
use crate::metrics::TimeoutKind;
use crate::protocol::{self, Severity};
use crate::tls::ClientStream;

/// Postgres's wording for a terminated session (SQLSTATE 57P01, admin_shutdown).
pub const ADMIN_SHUTDOWN: &str = "terminating connection due to administrator command";

/// Why a session ended.
#[derive(Debug)]
pub(super) enum Exit {
    /// EOF, reset or Terminate from the client.
    ClientGone,
    /// The client broke the protocol.
    Protocol(String),
    /// The server connection died under the client.
    ServerLost { server_said_error: bool },
    /// No server could be had for the client's next request.
    Checkout(String, String),
    /// Drain: closed at a transaction boundary or forced.
    Shutdown,
    /// Parameter sync failed on a new server.
    Sync(String, String),
    /// `query_timeout` (its cancel unanswered), `idle_transaction_timeout` or
    /// `client_idle_timeout`.
    Timeout(TimeoutKind),
}

/// A session's view of the drain signals (see `Session::relay`).
///
/// One token future at a time, to keep every client's task small: the boundary token until
/// the session has seen the boundary signal, then the force token. Forcing cancels the boundary
/// token too (`Shutdown::force_now`), so waiting on the boundary token alone misses nothing;
/// the flags say which signal it was.
pub(super) struct DrainWatch<'a, 't> {
    pub(super) waiter: Pin<&'a mut tokio_util::sync::WaitForCancellationFuture<'t>>,
    /// The tokens and flags of the drain.
    pub(super) shutdown: &'t crate::shutdown::Shutdown,
    /// This client's shared state: the console's KILL sets its flag and wakes the session.
    pub(super) me: std::sync::Arc<crate::cancel::ClientShared>,
    /// `waiter` waits on the force token.
    pub(super) waits_for_force: bool,
    /// The waker `waiter` was last polled with.
    pub(super) registered: Option<std::task::Waker>,
    pub(super) boundary_seen: bool,
    pub(super) force_seen: bool,
}

impl<'t> DrainWatch<'_, 't> {
    /// A drain signal not yet handled, if any. Cheap enough for every relay step: three
    /// atomic loads, and a poll of the token future only when the task's waker changed.
    /// The console's KILL of this client (`me`) counts as a forced close.
    ///
    /// The usual case (no signal, the waker already registered) is inlined into the relay's
    /// steps; the rest is [`poll_rest`](Self::poll_rest).
    #[inline]
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Option<Ev> {
        let shutdown = self.shutdown;
        if !self.force_seen && (shutdown.is_forced() || self.me.is_killed()) {
            return Some(Ev::Force);
        }
        if !self.boundary_seen && shutdown.is_boundary() {
            return Some(Ev::Boundary);
        }
        if self.force_seen {
            return None;
        }
        if !self.boundary_seen
            && self
                .registered
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return None;
        }
        self.poll_rest(cx)
    }

    /// [`poll`](Self::poll) past its checks: wait on the force token once a boundary close
    /// has begun, and register a new waker.
    #[inline(never)]
    fn poll_rest(&mut self, cx: &mut Context<'_>) -> Option<Ev> {
        let shutdown = self.shutdown;
        let me = &*self.me;
        if self.boundary_seen && !self.waits_for_force {
            let shutdown: &'t crate::shutdown::Shutdown = self.shutdown;
            self.waiter.set(shutdown.force_token_ref().cancelled());
            self.waits_for_force = true;
            self.registered = None;
        }
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            // A kill wakes the waker stored here; one that came before the store is seen now
            // (the kill sets its flag before it takes the waker, under the same lock).
            me.set_waker(cx.waker());
            if me.is_killed() {
                return Some(Ev::Force);
            }
            // Ready here means cancelled, and the flags, set before the cancel, say which.
            if self.waiter.as_mut().poll(cx).is_ready() {
                if shutdown.is_forced() {
                    return Some(Ev::Force);
                }
                if !self.boundary_seen {
                    return Some(Ev::Boundary);
                }
            }
            self.registered = Some(cx.waker().clone());
        }
        None
    }
}

impl Session {
    /// True when closing now cannot cut a transaction or a message in half.
    pub(super) fn at_boundary(&self) -> bool {
        let server_idle = self.server.as_ref().is_none_or(|s| s.is_clean());
        server_idle && self.c_rem == 0 && self.s_rem == 0 && self.s_ready == self.sbuf.len()
    }

    /// Forced close: cancel the running query, then give the server `server_close_timeout` to
    /// answer (so an acknowledged COMMIT still reaches the client) before closing.
    pub(super) async fn start_force(&mut self) {
        let timeout = self.shared.runtime().config.drain.server_close_timeout;
        // A client already at a transaction boundary is closed at one; only a client cut off
        // mid-transaction counts as forced.
        self.forced = !self.at_boundary();
        self.force_deadline = Some(tokio::time::Instant::now() + timeout);
        if let Some(s) = self.server.as_ref() {
            if s.state.expected_rfq > 0 {
                let cs = self.login.shared.clone();
                // Deliver the cancel concurrently: the relay must keep reading the answer.
                self.shared.tracker.spawn(async move { cs.cancel().await });
            }
        }
    }

    /// Tell the client why the session ends, after everything it is owed.
    pub(super) async fn finish(&mut self, client: &mut ClientStream, exit: Exit) {
        let mut out = BytesMut::new();
        match &exit {
            Exit::ClientGone => return,
            Exit::Protocol(m) => protocol::error_response(&mut out, Severity::Fatal, "08P01", m),
            Exit::ServerLost { server_said_error } => {
                if !server_said_error {
                    protocol::error_response(
                        &mut out,
                        Severity::Fatal,
                        "08006",
                        "tidepool: server connection lost",
                    );
                }
            }
            Exit::Checkout(code, m) | Exit::Sync(code, m) => {
                protocol::error_response(&mut out, Severity::Fatal, code, m)
            }
            Exit::Shutdown => {
                protocol::error_response(&mut out, Severity::Fatal, "57P01", ADMIN_SHUTDOWN)
            }
            Exit::Timeout(kind) => {
                let (code, message) = match kind {
                    TimeoutKind::query => ("57014", timeouts::QUERY_NOT_CANCELLED),
                    TimeoutKind::idle_transaction => ("25P03", timeouts::IDLE_IN_TRANSACTION),
                    TimeoutKind::client_idle => ("57P05", timeouts::IDLE_SESSION),
                };
                protocol::error_response(&mut out, Severity::Fatal, code, message)
            }
        }
        if matches!(exit, Exit::Protocol(_)) {
            self.shared
                .metrics
                .reject(crate::metrics::RejectReason::protocol);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            // Complete messages the client is owed (an acknowledged COMMIT) go first.
            if self.s_ready > 0 {
                client.write_all(&self.sbuf[..self.s_ready]).await?;
                self.sbuf.advance(self.s_ready);
                self.s_ready = 0;
            }
            // An incomplete message the client never saw part of is dropped; our error can
            // follow. After half a message was forwarded, nothing more can be said cleanly.
            if self.s_rem == 0 {
                self.sbuf.clear();
                client.write_all(&out).await?;
            }
            client.flush().await
        })
        .await;
    }

    /// Give the server back: clean ones to the idle list, anything else to the closer along
    /// with the client bytes it had framed but not written.
    pub(super) async fn hand_off(&mut self) {
        self.clean_on_leave();
        let Some(mut server) = self.server.take() else {
            return;
        };
        self.login.shared.release().await;
        if self.c_ready > 0 {
            server.pending = Some(self.cbuf.split_to(self.c_ready));
            self.c_ready = 0;
        }
        if self.c_rem > 0 {
            server.state.partial_to_server = Some((self.c_tag, self.c_rem));
        }
        if !self.pending.is_empty() {
            // Replies never seen: what the server prepared is uncertain. Forgetting is safe
            // (every Parse tidepool sends is preceded by a Close of the same name).
            server.stmts.clear();
            self.pending.clear();
        }
        if self.forced {
            server.set_close_reason(crate::metrics::CloseReason::forced);
        }
        if self.s_rem > 0 || self.sbuf.len() > self.s_ready {
            // Unframed server bytes are lost with the client; the stream position is unknown.
            if self.s_rem > 0 {
                server.state.broken = true;
            }
        }
        if self.login.mode == PoolMode::Transaction {
            self.pool_metrics().transactions.inc();
            self.pool_metrics()
                .transaction_duration
                .observe(server.since.elapsed());
        }
        drop(server);
    }
}
