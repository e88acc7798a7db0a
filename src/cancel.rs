//! Cancel requests: tidepool's own keys per client, mapped to whichever server the client holds
//! right now.
//!
//! The race PgBouncer fixed in 1.18 (a cancel that arrives after the client's server went back
//! to the pool hits the next borrower's query) is closed here by holding the server until every
//! cancel in flight for it has been delivered: [`ClientShared::release`] waits for them, and a
//! cancel is only sent while the client holds the server, under the same lock.
//!
//! The registry of keys is also the list of logged-in clients the console shows (SHOW
//! CLIENTS) and ends (KILL, KILL_CLIENT): each entry carries the client's [`ClientInfo`], written
//! once at login, and a kill flag its session checks with the drain flags.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::backend::{send_cancel, BackendKey, ServerAddr};
use crate::pool::Pool;

#[derive(Default)]
struct CancelState {
    /// The server the client holds now: its address and real key.
    server: Option<(ServerAddr, BackendKey)>,
    /// Cancels being delivered to that server.
    inflight: u32,
    /// The session task's waker, so that a kill wakes a session waiting for its client.
    waker: Option<Waker>,
}

/// What the console shows of a client; written once at login.
pub struct ClientInfo {
    /// The console's client id (SHOW CLIENTS `id`, KILL_CLIENT's argument).
    pub id: u64,
    pub addr: SocketAddr,
    /// The port it connected to (its address is `listen.addr`'s).
    pub local_port: u16,
    pub connected: SystemTime,
    pub tls: bool,
    /// The client's pool; `None` for a console session.
    pub pool: Option<Pool>,
    /// A console session's user and database (a pooled client's come from its pool).
    pub console: Option<Box<(String, String)>>,
    /// The startup parameters the client logged in with, shared with the other clients of
    /// its pool that have the same ones (application_name is read from them).
    pub params: Option<Arc<crate::backend::Params>>,
}

/// Per-client state shared with cancel requests and the console.
pub struct ClientShared {
    state: Mutex<CancelState>,
    delivered: Notify,
    /// Set by the console's KILL / KILL_CLIENT: the session ends as a forced one does.
    killed: AtomicBool,
    /// When the client began waiting for a server, in µs since the process started plus 1;
    /// 0 while it is not waiting.
    waiting_since: AtomicU64,
    pub info: ClientInfo,
}

impl ClientShared {
    pub fn new(info: ClientInfo) -> ClientShared {
        ClientShared {
            state: Mutex::default(),
            delivered: Notify::new(),
            killed: AtomicBool::new(false),
            waiting_since: AtomicU64::new(0),
            info,
        }
    }

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

    /// The server the client holds now, if any: its address and real key.
    pub fn held(&self) -> Option<(ServerAddr, BackendKey)> {
        self.lock().server.clone()
    }

    /// The client starts (`Some(time since the process started)`) or stops waiting for a
    /// server.
    pub fn set_waiting(&self, since_start: Option<Duration>) {
        let v = since_start.map_or(0, |d| d.as_micros() as u64 + 1);
        self.waiting_since.store(v, Ordering::Relaxed);
    }

    /// How long the client has waited for a server, if it waits; `now` is the time since the
    /// process started.
    pub fn waited(&self, now: Duration) -> Option<Duration> {
        match self.waiting_since.load(Ordering::Relaxed) {
            0 => None,
            v => Some(Duration::from_micros(
                (now.as_micros() as u64).saturating_sub(v - 1),
            )),
        }
    }

    /// The console ends this client: its session closes as a forced one does (a query in
    /// flight is cancelled first), with `57P01`.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let waker = self.lock().waker.clone();
        if let Some(w) = waker {
            w.wake();
        }
        self.delivered.notify_waiters();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }

    /// Remember the session task's waker for [`kill`](Self::kill) (only when it changed).
    pub fn set_waker(&self, waker: &Waker) {
        let mut s = self.lock();
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            s.waker = Some(waker.clone());
        }
    }

    /// Resolves once the client is killed.
    pub async fn killed(&self) {
        loop {
            let notified = self.delivered.notified();
            if self.is_killed() {
                return;
            }
            notified.await;
        }
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
    map: Mutex<KeyMap>,
    next_pid: AtomicI32,
    next_id: AtomicU64,
}

/// Cancel keys to clients, hashed by [`KeyHash`].
type KeyMap = HashMap<(i32, i32), Arc<ClientShared>, std::hash::BuildHasherDefault<KeyHash>>;

/// The registry's hash: a multiply of the key, not SipHash. Every key holds a random
/// `secret` tidepool drew, so the keys in the map are spread whatever clients send, and a
/// cancel request can only look one up; SipHash's defence against chosen keys buys nothing
/// here and cost about 160 instructions per hash, three hashes per login.
#[derive(Default)]
pub struct KeyHash(u64);

impl std::hash::Hasher for KeyHash {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_i32(&mut self, v: i32) {
        self.0 = self.0 << 32 | u64::from(v as u32);
    }
    fn finish(&self) -> u64 {
        // Fibonacci hashing: the multiply spreads both halves into the high bits hashbrown
        // uses for its control bytes.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

impl CancelRegistry {
    pub fn new() -> Self {
        CancelRegistry {
            map: Mutex::new(KeyMap::default()),
            // Fake process ids for transaction mode; high enough not to look like a real pid.
            next_pid: AtomicI32::new(1 << 22),
            next_id: AtomicU64::new(1),
        }
    }

    /// A new client id for [`ClientInfo::id`].
    pub fn next_client_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Every registered client (the console's SHOW CLIENTS, KILL), oldest first.
    pub fn clients(&self) -> Vec<Arc<ClientShared>> {
        let mut v: Vec<Arc<ClientShared>> = self.lock().values().cloned().collect();
        v.sort_by_key(|c| c.info.id);
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyMap> {
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
