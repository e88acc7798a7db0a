//! Cancel requests: tidepool's own keys per client, mapped to whichever server the client holds
//! right now.
//!
//! The race PgBouncer fixed in 1.18 (a cancel that arrives after the client's server went back
//! to the pool hits the next borrower's query) is closed here by holding the server until every
//! cancel in flight for it has been delivered: [`ClientShared::release`] waits for them, and a
//! cancel is only sent while the client holds the server, under the same lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::backend::{send_cancel, BackendKey, ServerAddr};

#[derive(Default)]
struct CancelState {
    /// The server the client holds now: its address and real key.
    server: Option<(ServerAddr, BackendKey)>,
    /// Cancels being delivered to that server.
    inflight: u32,
}

/// Per-client state shared with cancel requests.
#[derive(Default)]
pub struct ClientShared {
    state: Mutex<CancelState>,
    delivered: Notify,
}

impl ClientShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client now holds this server.
    pub fn hold(&self, addr: ServerAddr, key: BackendKey) {
        self.lock().server = Some((addr, key));
    }

    /// The client is about to give its server back: from now on cancels are dropped, and this
    /// waits (bounded) until cancels already sent to the server have been delivered.
    pub async fn release(&self) {
        if !self.try_release() {
            self.wait_released().await;
        }
    }

    /// The synchronous half of [`release`](Self::release): true when no cancel is in flight
    /// (nothing to wait for), else [`wait_released`](Self::wait_released) must be awaited.
    pub fn try_release(&self) -> bool {
        let mut s = self.lock();
        s.server = None;
        s.inflight == 0
    }

    /// Wait (bounded) until the cancels in flight have been delivered.
    pub async fn wait_released(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let notified = self.delivered.notified();
                if self.lock().inflight == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }

    /// Deliver a cancel for the client's current query, if it holds a server.
    pub async fn cancel(&self) {
        let target = {
            let mut s = self.lock();
            match s.server.clone() {
                Some(t) => {
                    s.inflight += 1;
                    t
                }
                None => return,
            }
        };
        if let Err(e) = send_cancel(target.0, target.1).await {
            tracing::debug!(error = %e, "cancel request failed");
        }
        self.lock().inflight -= 1;
        self.delivered.notify_waiters();
    }
}

/// tidepool-issued cancel keys → clients.
#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<(i32, i32), Arc<ClientShared>>>,
    next_pid: AtomicI32,
}

impl CancelRegistry {
    pub fn new() -> Self {
        CancelRegistry {
            map: Mutex::new(HashMap::new()),
            // Fake process ids for transaction mode; high enough not to look like a real pid.
            next_pid: AtomicI32::new(1 << 22),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i32), Arc<ClientShared>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a client. `pid` is the real server pid in session mode, `None` for a fresh
    /// tidepool-issued one. Returns the key to give the client.
    pub fn register(&self, pid: Option<i32>, shared: Arc<ClientShared>) -> BackendKey {
        let pid = pid.unwrap_or_else(|| {
            let p = self.next_pid.fetch_add(1, Ordering::Relaxed);
            if p <= 0 {
                self.next_pid.store(1 << 22, Ordering::Relaxed);
            }
            p.max(1)
        });
        let mut map = self.lock();
        loop {
            let secret: i32 = rand::random();
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry((pid, secret)) {
                e.insert(shared);
                return BackendKey { pid, secret };
            }
        }
    }

    pub fn unregister(&self, key: BackendKey) {
        self.lock().remove(&(key.pid, key.secret));
    }

    pub fn lookup(&self, pid: i32, secret: i32) -> Option<Arc<ClientShared>> {
        self.lock().get(&(pid, secret)).cloned()
    }
}
