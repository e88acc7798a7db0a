//! What the console's SHOW SERVERS and SHOW POOLS see of a pool: the registry of its open
//! server connections. An entry is written when a connection opens and removed when it is
//! shut down, under the lock that already kept each connection's generation; nothing is done
//! per transaction.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use super::{lock, Pool, PoolInner};
use crate::backend::ServerConn;

/// A server connection as registered when it opened.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The pool's generation when it opened: an older one is replaced when it comes back.
    pub generation: u64,
    /// The backend's process id.
    pub pid: i32,
    pub addr: crate::backend::ServerAddr,
    pub local: Option<SocketAddr>,
    pub connected: SystemTime,
    pub tls: bool,
}

/// Where a server connection is, as SHOW SERVERS says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerRowState {
    /// On the idle list.
    Idle,
    /// Lent out, or being recovered or shut down (the console tells lent ones apart by the
    /// client that holds them).
    Out,
}

/// One server connection for SHOW SERVERS.
#[derive(Debug, Clone)]
pub struct ServerRow {
    pub id: u64,
    pub info: ConnInfo,
    pub state: ServerRowState,
    /// Replaced when it comes back (RECONNECT, or a reload that changed the target).
    pub close_needed: bool,
    /// Idle ones: when the connection was last returned.
    pub idle_since: Option<SystemTime>,
    /// Idle ones: the server's application_name and the statements prepared on it.
    pub application_name: Option<String>,
    pub prepared: usize,
}

impl PoolInner {
    /// Record a connection that just opened.
    pub(super) fn register_conn(&self, conn: &mut ServerConn, generation: u64) {
        let local = conn.stream().tcp().and_then(|t| t.local_addr().ok());
        let info = ConnInfo {
            generation,
            pid: conn.key.pid,
            addr: conn.addr.clone(),
            local,
            connected: SystemTime::now(),
            tls: conn.is_tls(),
        };
        lock(&self.conn_generation).insert(conn.id, info);
    }
}

impl Pool {
    /// Every open server connection, idle ones first (a snapshot; cold path).
    pub fn server_rows(&self) -> Vec<ServerRow> {
        let inner = &self.inner;
        let current = inner.generation.load(Ordering::Acquire);
        let now_i = Instant::now();
        let now_s = SystemTime::now();
        let mut rows = Vec::new();
        let mut idle_ids = std::collections::HashSet::new();
        {
            let idle = lock(&inner.idle);
            let reg = lock(&inner.conn_generation);
            for c in idle.iter() {
                let Some(info) = reg.get(&c.id) else { continue };
                idle_ids.insert(c.id);
                let ago = now_i.saturating_duration_since(c.idle_since);
                rows.push(ServerRow {
                    id: c.id,
                    info: info.clone(),
                    state: ServerRowState::Idle,
                    close_needed: current != 0 && info.generation != current,
                    idle_since: now_s.checked_sub(ago),
                    application_name: c.params.get("application_name").map(str::to_string),
                    prepared: c.stmts.len(),
                });
            }
        }
        let reg = lock(&inner.conn_generation);
        let mut out: Vec<ServerRow> = reg
            .iter()
            .filter(|(id, _)| !idle_ids.contains(*id))
            .map(|(id, info)| ServerRow {
                id: *id,
                info: info.clone(),
                state: ServerRowState::Out,
                close_needed: current != 0 && info.generation != current,
                idle_since: None,
                application_name: None,
                prepared: 0,
            })
            .collect();
        drop(reg);
        out.sort_by_key(|r| r.id);
        rows.sort_by_key(|r| r.id);
        rows.extend(out);
        rows
    }

    /// Open server connections (lent, idle, recovering or closing).
    pub fn server_count(&self) -> usize {
        lock(&self.inner.conn_generation).len()
    }

    /// Server connections being opened (logging in) right now.
    pub fn connecting(&self) -> usize {
        self.inner.connecting.load(Ordering::Relaxed)
    }
}
