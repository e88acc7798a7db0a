//! Session isolation in transaction mode (DESIGN.md section 8): what a client's statements do
//! to its server's session, and what tidepool does about it.
//!
//! - settings (`SET`, `RESET`, `SET ROLE`, `set_config`, ...): after the transaction, the
//!   server's session-level settings are read back and the client carries them to whichever
//!   server it lands on next; the next client's sync resets them there
//!   (`backend::params`);
//! - temporary tables, SQL `PREPARE`, `LISTEN`, session advisory locks, `WITH HOLD` cursors:
//!   the client is pinned to its server until the state is gone or it leaves (then the server
//!   gets `DISCARD ALL`), or with `session_state = "reject"` the statement is refused before it
//!   is sent;
//! - DDL: every server prepares its named statements afresh (`backend::statements`).

use bytes::BytesMut;

use super::tracking::{Action, Kind, Pending};
use super::Session;
use crate::backend::params;
use crate::config::SessionStatePolicy;
use crate::metrics::SessionStateAction;
use crate::protocol::{self, Severity};
use crate::sql::{self, pin, Effects};

/// `Session::iso` flag: transaction mode, every request is tracked with its reply.
pub(super) const TRACK: u8 = 16;
/// The pool has timeouts on: the session keeps its timer up to date (see `timeouts`).
pub(super) const TIMED: u8 = 32;
/// The client was told once that it is pinned (the log line).
pub(super) const PIN_LOGGED: u8 = 1;
/// A Parse was refused (`session_state = "reject"`): the batch is dropped up to its Sync.
pub(super) const REJECTING: u8 = 2;
/// The current transaction ran DDL.
pub(super) const DDL: u8 = 4;
/// The current transaction may have changed session-level settings: read them back when it
/// ends (the custom names its statements used are in `Session::extras`).
pub(super) const UNREAD: u8 = 8;

impl Session {
    /// Take note of what a statement (its text at `cbuf[text]`) does to the session. Returns
    /// the `sql::pin` kind to refuse it for, when the pool refuses session state.
    pub(super) fn note_effects(&mut self, fx: Effects, text: std::ops::Range<usize>) -> Option<u8> {
        if fx.pins != 0 && self.login.pool.settings().session_state == SessionStatePolicy::Reject {
            let kind = fx.pins & fx.pins.wrapping_neg();
            self.pool_metrics()
                .session_state
                .count(pin::name(kind), SessionStateAction::rejected);
            tracing::info!(
                pool = self.login.pool.name(),
                kind = pin::name(kind),
                "statement refused: session state in transaction mode"
            );
            return Some(kind);
        }
        if fx.settings {
            self.iso |= UNREAD;
            sql::custom_names(&self.cbuf[text.clone()], self.extras.custom_mut());
        }
        if fx.ddl {
            self.iso |= DDL;
            self.shared.statements.schema_changed();
        }
        if fx.drops_statements {
            self.extras.clear();
            if let Some(server) = self.server.as_mut() {
                server.stmts.clear();
            }
        }
        if fx.unpins & self.pins != 0 {
            self.pins &= !fx.unpins;
            if self.pins == 0 {
                self.pool_metrics().pinned.dec();
                tracing::info!(
                    pool = self.login.pool.name(),
                    "client unpinned: its session state is gone"
                );
            }
        }
        let new = fx.pins & !self.pins;
        if new != 0 {
            if self.pins == 0 {
                self.pool_metrics().pinned.inc();
            }
            self.pins |= new;
            for kind in pin::each(new) {
                self.pool_metrics()
                    .session_state
                    .count(pin::name(kind), SessionStateAction::pinned);
            }
            if self.iso & PIN_LOGGED == 0 {
                self.iso |= PIN_LOGGED;
                tracing::info!(
                    pool = self.login.pool.name(),
                    kind = pin::name(new & new.wrapping_neg()),
                    "client pinned to its server: session state that cannot follow it"
                );
            }
        }
        None
    }

    /// The ErrorResponse (and for a simple Query the ReadyForQuery) of a refused statement.
    pub(super) fn refusal(&self, kind: u8, query: bool) -> BytesMut {
        let mut out = BytesMut::with_capacity(256);
        protocol::error_response(&mut out, Severity::Error, "0A000", pin::refusal(kind));
        if query {
            let status = self.server.as_ref().map_or(b'I', |s| s.state.txn_status);
            protocol::ready_for_query(&mut out, status);
        }
        out
    }

    /// Queue the refusal of the statement at `at..at + len` in `cbuf` and drop it.
    pub(super) fn refuse(&mut self, kind: u8, request: Kind, at: usize, len: usize) {
        super::buffers::splice(&mut self.cbuf, at, len, &[]);
        self.pending.push_back(Pending {
            kind: request,
            action: Action::Reject(kind),
            parsed: None,
            uses: None,
        });
    }

    /// A transaction ended on the client's server: after DDL, statements are prepared afresh
    /// everywhere (again, now that it has committed); after a possible change of settings,
    /// read them back so the client carries them and the server records them.
    pub(super) async fn after_transaction(&mut self) {
        if self.iso & DDL != 0 {
            self.iso &= !DDL;
            self.shared.statements.schema_changed();
        }
        if self.iso & UNREAD == 0 {
            return;
        }
        self.iso &= !UNREAD;
        let unread = self.extras.take_custom();
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let custom: Vec<&str> = unread
            .iter()
            .map(String::as_str)
            .chain(self.login.params.custom_names())
            .chain(
                server
                    .applied
                    .iter()
                    .map(|(k, _)| k)
                    .filter(|k| k.contains('.')),
            )
            .collect();
        let sql = params::reread_sql(custom.into_iter());
        let timeout = self.shared.runtime().config.drain.server_close_timeout;
        match server.exec(&sql, timeout).await {
            Ok(o) if o.error.is_none() => {
                let carried = self.login.params.capture(server, &o.rows);
                if carried > 0 {
                    let kind = if server.applied.get("role").is_some() {
                        "role"
                    } else {
                        "parameter"
                    };
                    // (A field path: `server` borrows `self.server` mutably.)
                    self.login
                        .pool
                        .inner
                        .metrics
                        .session_state
                        .count(kind, SessionStateAction::carried);
                }
            }
            other => {
                // The server's settings are unknown: it is reset before anyone else uses it.
                let why = match other {
                    Ok(o) => o.error.map(|(c, m)| format!("{c} {m}")).unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(pool = %self.login.pool.inner.name, error = %why, "reading session settings back failed");
                server.set_discard_on_return();
            }
        }
    }

    /// The client leaves (or is closed) holding `server`: if its session state could not be
    /// carried (pinned, or settings not read back), the server gets `DISCARD ALL` before
    /// anyone else uses it.
    pub(super) fn clean_on_leave(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let unread = self.iso & UNREAD != 0;
        if self.pins == 0 && !unread {
            return;
        }
        server.set_discard_on_return();
        let m = &self.login.pool.inner.metrics;
        for kind in pin::each(self.pins) {
            m.session_state
                .count(pin::name(kind), SessionStateAction::cleaned);
        }
        if unread {
            m.session_state
                .count("parameter", SessionStateAction::cleaned);
        }
    }
}
