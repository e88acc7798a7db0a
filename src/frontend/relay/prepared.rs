//! Named protocol-level prepared statements in transaction mode: the client side's rewriting.
//!
//! A driver prepares `Parse("s1", query)` on whatever server its transaction has, and later
//! binds `s1` from a transaction that may land on another server. tidepool gives each distinct
//! (query, parameter types) one server-side name `tp_<id>` shared by all clients (one copy of
//! the text in memory, `backend::statements`), keeps per client its names → statements, and per
//! server connection which statements it has (bounded, least recently used evicted with a
//! Close). When a client's statement is missing on its current server, tidepool sends `Close` +
//! `Parse` ahead of the client's message and hides their replies; a `Parse` for a statement the
//! server already has is not sent at all and its ParseComplete is synthesised; a client's
//! `Close` of a statement is answered by tidepool. PgBouncer 1.21 does the same (`max_prepared_statements`).
//!
//! To place synthesised replies and hide injected ones, every request sent in transaction mode
//! is queued with the reply that completes it ([`Pending`]); replies come back in request order
//! (protocol docs 55.2.3 "Extended Query"), and after an ErrorResponse the server skips to the
//! next Sync.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::buffers::splice;
use super::timeouts::Timers;
use super::tracking::{Action, Kind, Pending};
use super::Session;
use crate::backend::statements::Stmt;
use crate::pool::Checkout;
use crate::protocol;

/// A transaction-mode client's rarely used state: its statement names, and the custom
/// settings (`app.tenant`) its current transaction named, to read back when it ends (see
/// `isolation`). Boxed and made on first use: an empty `HashMap` and `Vec` inline would cost
/// every session, idle or not, 64 bytes more, and most clients never name a statement nor set
/// anything.
#[derive(Default)]
pub(super) struct ClientExtras(Option<Box<Extras>>);

#[derive(Default)]
pub(super) struct Extras {
    names: HashMap<Vec<u8>, Arc<Stmt>>,
    custom: Vec<String>,
    /// The session's timeouts, when its pool has any on (see `timeouts`).
    timers: Option<Timers>,
}

impl ClientExtras {
    pub(super) fn get(&self, name: &[u8]) -> Option<&Arc<Stmt>> {
        self.0.as_ref()?.names.get(name)
    }

    pub(super) fn insert(&mut self, name: Vec<u8>, stmt: Arc<Stmt>) {
        self.0.get_or_insert_default().names.insert(name, stmt);
    }

    pub(super) fn remove(&mut self, name: &[u8]) {
        if let Some(m) = self.0.as_mut() {
            m.names.remove(name);
        }
    }

    /// Forget every statement name (`DISCARD ALL`, `DEALLOCATE ALL`).
    pub(super) fn clear(&mut self) {
        match self.0.as_mut() {
            Some(e) if !e.custom.is_empty() || e.timers.is_some() => e.names.clear(),
            _ => self.0 = None,
        }
    }

    pub(super) fn set_timers(&mut self, timers: Timers) {
        self.0.get_or_insert_default().timers = Some(timers);
    }

    pub(super) fn timers_mut(&mut self) -> Option<&mut Timers> {
        self.0.as_mut()?.timers.as_mut()
    }

    /// The custom setting names to read back after this transaction.
    pub(super) fn custom_mut(&mut self) -> &mut Vec<String> {
        &mut self.0.get_or_insert_default().custom
    }

    pub(super) fn take_custom(&mut self) -> Vec<String> {
        self.0
            .as_mut()
            .map(|e| std::mem::take(&mut e.custom))
            .unwrap_or_default()
    }
}

impl Session {
    /// Rewrite one whole Parse/Bind/Describe/Close at `c_ready`; returns the length of what
    /// replaces it (0 when nothing is sent).
    pub(super) fn rewrite_named(&mut self, h: protocol::Header) -> Result<usize, String> {
        let at = self.c_ready;
        let msg = &self.cbuf[at..at + h.total];
        let bad = || format!("malformed message '{}'", h.tag as char);
        let cap = self.login.pool.settings().max_prepared_statements;
        let mut out = BytesMut::new();
        match h.tag {
            b'P' => {
                let (name, after) = cstr(msg, 5).ok_or_else(bad)?;
                if name.is_empty() {
                    let fx = self.shared.unnamed_scan.scan(&msg[after..]);
                    if !fx.is_none() {
                        if let Some(kind) = self.note_effects(fx, at + after..at + h.total) {
                            self.refuse(kind, Kind::Parse, at, h.total);
                            self.iso |= super::iso::REJECTING;
                            return Ok(0);
                        }
                    }
                    self.pending.push_back(Pending::forward(Kind::Parse));
                    return Ok(h.total);
                }
                let stmt = self.shared.statements.intern(&msg[after..]);
                if !stmt.effects.is_none() {
                    if let Some(kind) = self.note_effects(stmt.effects, at + after..at + h.total) {
                        self.refuse(kind, Kind::Parse, at, h.total);
                        self.iso |= super::iso::REJECTING;
                        return Ok(0);
                    }
                }
                let msg = &self.cbuf[at..at + h.total];
                let (name, _) = cstr(msg, 5).ok_or_else(bad)?;
                let name = name.to_vec();
                let epoch = self.shared.statements.epoch();
                let server = self.server.as_mut().ok_or_else(bad)?;
                if server.stmts.has(stmt.id, epoch) {
                    self.pool_metrics().parses_avoided.inc();
                    self.pending.push_back(Pending {
                        kind: Kind::Parse,
                        action: Action::Synth(b'1'),
                        parsed: None,
                        uses: None,
                    });
                } else {
                    // (A field path: `server` borrows `self.server` mutably.)
                    self.login.pool.inner.metrics.parses_forwarded.inc();
                    prepare_on(
                        server,
                        &stmt,
                        cap,
                        epoch,
                        &mut out,
                        &mut self.pending,
                        false,
                    );
                }
                self.extras.insert(name, stmt);
            }
            b'B' | b'D' => {
                // Bind: portal, statement. Describe: 'S' or 'P', then the name.
                let (name, name_at, name_end) = if h.tag == b'B' {
                    let (_, after_portal) = cstr(msg, 5).ok_or_else(bad)?;
                    let (n, end) = cstr(msg, after_portal).ok_or_else(bad)?;
                    (n, after_portal, end)
                } else {
                    if msg.get(5) != Some(&b'S') {
                        self.pending.push_back(Pending::forward(Kind::Describe));
                        return Ok(h.total);
                    }
                    let (n, end) = cstr(msg, 6).ok_or_else(bad)?;
                    (n, 6, end)
                };
                let kind = if h.tag == b'B' {
                    Kind::Bind
                } else {
                    Kind::Describe
                };
                let Some(stmt) = (!name.is_empty())
                    .then(|| self.extras.get(name))
                    .flatten()
                    .cloned()
                else {
                    // Unnamed or unknown to us: as is (Postgres answers for an unknown name).
                    self.pending.push_back(Pending::forward(kind));
                    return Ok(h.total);
                };
                if h.tag == b'B' && !stmt.effects.is_none() {
                    // Running it again (a prepared `SELECT set_config(...)`, ...).
                    let text = at..at;
                    if let Some(kind) = self.note_effects(stmt.effects, text) {
                        self.refuse(kind, Kind::Bind, at, h.total);
                        self.iso |= super::iso::REJECTING;
                        return Ok(0);
                    }
                }
                let msg = &self.cbuf[at..at + h.total];
                let epoch = self.shared.statements.epoch();
                let server = self.server.as_mut().ok_or_else(bad)?;
                if !server.stmts.has(stmt.id, epoch) {
                    // (A field path: `server` borrows `self.server` mutably.)
                    self.login.pool.inner.metrics.parses_forwarded.inc();
                    prepare_on(server, &stmt, cap, epoch, &mut out, &mut self.pending, true);
                }
                // The message with the server-side name.
                let new_len = h.total - (name_end - name_at) + stmt.name.len() + 1;
                out.put_u8(h.tag);
                out.put_u32((new_len - 1) as u32);
                out.put_slice(&msg[5..name_at]);
                out.put_slice(stmt.name.as_bytes());
                out.put_u8(0);
                out.put_slice(&msg[name_end..]);
                self.pending.push_back(Pending {
                    kind,
                    action: Action::Forward,
                    parsed: None,
                    uses: Some(stmt.id),
                });
            }
            b'C' => {
                if msg.get(5) != Some(&b'S') {
                    self.pending.push_back(Pending::forward(Kind::Close));
                    return Ok(h.total);
                }
                let (name, _) = cstr(msg, 6).ok_or_else(bad)?;
                if name.is_empty() {
                    self.pending.push_back(Pending::forward(Kind::Close));
                    return Ok(h.total);
                }
                // The server keeps it for other clients; the client's name is gone.
                self.extras.remove(name);
                self.pending.push_back(Pending {
                    kind: Kind::Close,
                    action: Action::Synth(b'3'),
                    parsed: None,
                    uses: None,
                });
            }
            _ => return Ok(h.total),
        }
        splice(&mut self.cbuf, at, h.total, &out);
        Ok(out.len())
    }
}

/// Queue `Close` + `Parse` of `stmt` on `server` (evicting the least recently used statement
/// beyond `cap` with a Close). The Close first makes the Parse safe even if the server still
/// holds a stale copy under that name (a Close of a missing statement is not an error).
pub(super) fn prepare_on(
    server: &mut Checkout,
    stmt: &Arc<Stmt>,
    cap: usize,
    epoch: u64,
    out: &mut BytesMut,
    pending: &mut VecDeque<Pending>,
    hidden: bool,
) {
    let hide = |kind| Pending {
        kind,
        action: Action::Hide(None),
        parsed: None,
        uses: None,
    };
    if let Some(evicted) = server.stmts.add(stmt.clone(), cap, epoch) {
        put_close_stmt(out, &evicted.name);
        pending.push_back(hide(Kind::Close));
    }
    put_close_stmt(out, &stmt.name);
    pending.push_back(hide(Kind::Close));
    put_parse(out, stmt);
    pending.push_back(Pending {
        kind: Kind::Parse,
        action: if hidden {
            Action::Hide(Some(stmt.id))
        } else {
            Action::Forward
        },
        parsed: Some(stmt.id),
        uses: None,
    });
}

/// Read a NUL-terminated string at `at`; returns (bytes without NUL, index after NUL).
pub fn cstr(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let n = rest.iter().position(|&b| b == 0)?;
    Some((&rest[..n], at + n + 1))
}

/// Append a Parse for `stmt`.
pub fn put_parse(out: &mut BytesMut, stmt: &Stmt) {
    let len = 4 + stmt.name.len() + 1 + stmt.tail.len();
    out.put_u8(b'P');
    out.put_u32(len as u32);
    out.put_slice(stmt.name.as_bytes());
    out.put_u8(0);
    out.put_slice(&stmt.tail);
}

/// Append a Close of statement `name`.
pub fn put_close_stmt(out: &mut BytesMut, name: &str) {
    out.put_u8(b'C');
    out.put_u32((4 + 1 + name.len() + 1) as u32);
    out.put_u8(b'S');
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

/// Does a simple query drop every prepared statement (`DEALLOCATE ALL`, `DISCARD ALL`)?
pub fn drops_all_statements(query: &[u8]) -> bool {
    // Runs on every simple Query in transaction mode: no allocation, and an ordinary query
    // is rejected after its first word. Only the first 64 bytes are looked at.
    let text = &query[..query.len().min(64)];
    let mut words = text
        .split(|&c| c.is_ascii_whitespace() || c == b';' || c == 0)
        .filter(|w| !w.is_empty());
    let mut word = || words.next().unwrap_or_default();
    let is = |w: &[u8], keyword: &[u8]| w.eq_ignore_ascii_case(keyword);
    let first = word();
    if is(first, b"DISCARD") {
        return is(word(), b"ALL");
    }
    if !is(first, b"DEALLOCATE") {
        return false;
    }
    let second = word();
    is(second, b"ALL") || (is(second, b"PREPARE") && is(word(), b"ALL"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::statements::Registry;

    #[test]
    fn deallocate_detection() {
        assert!(drops_all_statements(b"DEALLOCATE ALL\0"));
        assert!(drops_all_statements(b"  deallocate prepare all;\0"));
        assert!(drops_all_statements(b"DISCARD ALL\0"));
        assert!(!drops_all_statements(b"DEALLOCATE s1\0"));
        assert!(!drops_all_statements(b"SELECT 1\0"));
        assert!(drops_all_statements(b"discard\tall\0"));
        assert!(!drops_all_statements(b"DEALLOCATE PREPARE s1\0"));
        assert!(!drops_all_statements(b"DISCARD PLANS\0"));
        assert!(!drops_all_statements(b"SELECT 'DISCARD ALL'\0"));
        assert!(!drops_all_statements(b"\0"));
        assert!(!drops_all_statements(b""));
    }

    #[test]
    fn builders() {
        let r = Registry::default();
        let s = r.intern(b"SELECT $1\0\0\x01\0\0\0\x17");
        let mut out = BytesMut::new();
        put_parse(&mut out, &s);
        let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
        put_close_stmt(&mut out, "tp_1");
        assert_eq!(out[len + 1], b'C');
    }
}
