//! Named protocol-level prepared statements in transaction mode.
//!
//! A driver prepares `Parse("s1", query)` on whatever server its transaction has, and later
//! binds `s1` from a transaction that may land on another server. tidepool gives each distinct
//! (query, parameter types) one server-side name `tp_<id>` shared by all clients (one copy of
//! the text in memory), keeps per client its names → statements, and per server connection which
//! statements it has (bounded, least recently used evicted with a Close). When a client's
//! statement is missing on its current server, tidepool sends `Close` + `Parse` ahead of the
//! client's message and hides their replies; a `Parse` for a statement the server already has is
//! not sent at all and its ParseComplete is synthesised; a client's `Close` of a statement is
//! answered by tidepool. PgBouncer 1.21 does the same (`max_prepared_statements`).
//!
//! To place synthesised replies and hide injected ones, every request sent in transaction mode
//! is queued with the reply that completes it ([`Pending`]); replies come back in request order
//! (protocol docs 55.2.3 "Extended Query"), and after an ErrorResponse the server skips to the
//! next Sync.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};

/// A distinct statement: the server-side name and the Parse body after the name.
#[derive(Debug)]
pub struct Stmt {
    pub id: u64,
    pub name: Box<str>,
    /// Query text (with its NUL) and the parameter type list, as in the Parse message.
    pub tail: Bytes,
}

/// Every distinct statement, shared by all clients.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<Bytes, Weak<Stmt>>>,
    next: AtomicU64,
}

impl Registry {
    /// The statement for this Parse tail, created on first sight.
    pub fn intern(&self, tail: &[u8]) -> Arc<Stmt> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(tail).and_then(Weak::upgrade) {
            return s;
        }
        if map.len() >= 1024 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let tail = Bytes::copy_from_slice(tail);
        let stmt = Arc::new(Stmt {
            id,
            name: format!("tp_{id}").into_boxed_str(),
            tail: tail.clone(),
        });
        map.insert(tail, Arc::downgrade(&stmt));
        stmt
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Statements a server connection has prepared, least recently used first.
#[derive(Debug, Default)]
pub struct ServerStmts {
    /// Most recently used at the back. Small (bounded by max_prepared_statements).
    order: VecDeque<Arc<Stmt>>,
}

impl ServerStmts {
    pub fn has(&mut self, id: u64) -> bool {
        if let Some(i) = self.order.iter().position(|s| s.id == id) {
            // Touch: move to the back.
            if i + 1 != self.order.len() {
                if let Some(s) = self.order.remove(i) {
                    self.order.push_back(s);
                }
            }
            true
        } else {
            false
        }
    }

    /// Record a statement; returns the one evicted to stay within `cap`, if any.
    pub fn add(&mut self, stmt: Arc<Stmt>, cap: usize) -> Option<Arc<Stmt>> {
        let evicted = if self.order.len() >= cap.max(1) {
            self.order.pop_front()
        } else {
            None
        };
        self.order.push_back(stmt);
        evicted
    }

    pub fn remove(&mut self, id: u64) {
        self.order.retain(|s| s.id != id);
    }

    pub fn clear(&mut self) {
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// What a queued request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Parse,
    Bind,
    /// Describe: completes on RowDescription or NoData (after ParameterDescription).
    Describe,
    Execute,
    Close,
    Sync,
    /// Simple Query or FunctionCall: everything up to ReadyForQuery.
    Query,
}

impl Kind {
    /// Does this server message complete the request?
    pub fn completed_by(self, tag: u8) -> bool {
        match self {
            Kind::Parse => tag == b'1',
            Kind::Bind => tag == b'2',
            Kind::Describe => tag == b'T' || tag == b'n',
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Close => tag == b'3',
            Kind::Sync | Kind::Query => tag == b'Z',
        }
    }
}

/// What to do with a request's reply.
#[derive(Debug, Clone)]
pub enum Action {
    Forward,
    /// tidepool's own request: swallow its reply. For an injected Parse, the statement to
    /// forget on the server if it fails.
    Hide(Option<u64>),
    /// No request was sent: produce this reply for the client when its turn comes.
    Synth(u8),
}

#[derive(Debug, Clone)]
pub struct Pending {
    pub kind: Kind,
    pub action: Action,
    /// A Parse that was sent: the statement to forget on the server if it fails.
    pub parsed: Option<u64>,
    /// A Bind/Execute of a tracked statement: forget it on the server if Postgres says its
    /// cached plan is stale (SQLSTATE 0A000), so the next use prepares it afresh.
    pub uses: Option<u64>,
}

impl Pending {
    pub fn forward(kind: Kind) -> Self {
        Pending {
            kind,
            action: Action::Forward,
            parsed: None,
            uses: None,
        }
    }
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

    #[test]
    fn registry_shares_statements() {
        let r = Registry::default();
        let a = r.intern(b"SELECT 1\0\0\0");
        let b = r.intern(b"SELECT 1\0\0\0");
        let c = r.intern(b"SELECT 2\0\0\0");
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.id, c.id);
        assert_eq!(&*a.name, &format!("tp_{}", a.id));
    }

    #[test]
    fn server_set_is_lru_bounded() {
        let r = Registry::default();
        let s: Vec<_> = (0..3)
            .map(|i| r.intern(format!("q{i}\0\0\0").as_bytes()))
            .collect();
        let mut set = ServerStmts::default();
        assert!(set.add(s[0].clone(), 2).is_none());
        assert!(set.add(s[1].clone(), 2).is_none());
        assert!(set.has(s[0].id)); // s[1] is now least recently used
        let ev = set.add(s[2].clone(), 2).unwrap();
        assert_eq!(ev.id, s[1].id);
        assert!(!set.has(s[1].id));
    }

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
