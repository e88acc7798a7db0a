//! Which protocol-level statements exist, and which ones each server connection has prepared.
//!
//! Every distinct (query, parameter types) a client names in a Parse gets one [`Stmt`] with a
//! server-side name `tp_<id>`, shared by all clients through the [`Registry`] (one copy of the
//! text in memory). Each server connection keeps in [`ServerStmts`] the statements it has
//! prepared, bounded by `max_prepared_statements`, least recently used evicted. The client
//! side's rewriting of Parse/Bind/Describe/Close lives in `frontend::relay::prepared`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::sql::{self, Effects};

/// A distinct statement: the server-side name and the Parse body after the name.
#[derive(Debug)]
pub struct Stmt {
    pub id: u64,
    pub name: Box<str>,
    /// Query text (with its NUL) and the parameter type list, as in the Parse message.
    pub tail: Bytes,
    /// What running it may do to the session (`sql::scan` of its text, done once).
    pub effects: Effects,
}

/// Every distinct statement, shared by all clients.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<Bytes, Weak<Stmt>>>,
    next: AtomicU64,
    /// Bumped whenever a client runs DDL: a statement a server prepared before is prepared
    /// again before its next use there, so its plan and its parameter and result types follow
    /// the current catalog (DESIGN.md section 8).
    epoch: AtomicU64,
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
        let effects = sql::scan(&tail);
        let stmt = Arc::new(Stmt {
            id,
            name: format!("tp_{id}").into_boxed_str(),
            tail: tail.clone(),
            effects,
        });
        map.insert(tail, Arc::downgrade(&stmt));
        stmt
    }

    /// The current catalog epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A client ran (or is about to commit) DDL: every server prepares its statements afresh.
    pub fn schema_changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
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
    /// Most recently used at the back, each with the catalog epoch it was prepared in. Small
    /// (bounded by max_prepared_statements).
    order: VecDeque<(Arc<Stmt>, u64)>,
}

impl ServerStmts {
    /// Does the server have statement `id`, prepared in catalog `epoch`? One prepared in an
    /// earlier epoch counts as missing (and is forgotten): the caller prepares it again, with a
    /// Close first.
    pub fn has(&mut self, id: u64, epoch: u64) -> bool {
        let Some(i) = self.order.iter().position(|(s, _)| s.id == id) else {
            return false;
        };
        if self.order[i].1 != epoch {
            self.order.remove(i);
            return false;
        }
        // Touch: move to the back.
        if i + 1 != self.order.len() {
            if let Some(s) = self.order.remove(i) {
                self.order.push_back(s);
            }
        }
        true
    }

    /// Record a statement prepared in `epoch`; returns the one evicted to stay within `cap`,
    /// if any.
    pub fn add(&mut self, stmt: Arc<Stmt>, cap: usize, epoch: u64) -> Option<Arc<Stmt>> {
        let evicted = if self.order.len() >= cap.max(1) {
            self.order.pop_front().map(|(s, _)| s)
        } else {
            None
        };
        self.order.push_back((stmt, epoch));
        evicted
    }

    pub fn remove(&mut self, id: u64) {
        self.order.retain(|(s, _)| s.id != id);
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
        assert!(set.add(s[0].clone(), 2, 0).is_none());
        assert!(set.add(s[1].clone(), 2, 0).is_none());
        assert!(set.has(s[0].id, 0)); // s[1] is now least recently used
        let ev = set.add(s[2].clone(), 2, 0).unwrap();
        assert_eq!(ev.id, s[1].id);
        assert!(!set.has(s[1].id, 0));
        // A schema change: what was prepared before is prepared again.
        assert!(!set.has(s[0].id, 1));
        assert_eq!(set.len(), 1);
    }
}
