//! Pools of server connections: one per (database, user). The idle list, the FIFO wait for a
//! slot, the RAII checkout guard, the closer task and periodic upkeep.
//!
//! Bookkeeping is synchronous: a [`Checkout`]'s `Drop` either parks a clean connection on the
//! idle list or hands it, with its slot, to the closer task by a non-blocking channel send. If
//! that hand-off never runs (the runtime is going away), dropping the queued job releases the
//! slot, so the pool cannot wedge (the lesson of sqlx issue #1396).

mod budgeted;
mod closer;
mod greeting;
mod health;
mod inspect;
mod pause;
mod stats;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::auth::ServerCredential;
use crate::backend::{self, BackendError, Params, ServerConn, ServerTarget, ShutdownOutcome};
use crate::budget::{Budget, Slot};
use crate::config::PoolSettings;
use crate::metrics::{CloseReason, PoolMetrics};

pub use self::closer::Closer;
use self::closer::{CloseJob, CloseKind};
pub use self::greeting::Greeting;
use self::health::ConnectFailure;
pub use self::inspect::{ConnInfo, ServerRow, ServerRowState};
pub use self::pause::{PausePhase, PauseSet};
pub use self::stats::{PoolStats, StatsWindow};

/// Why a checkout failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no server connection available within checkout_timeout ({0:?})")]
    Timeout(Duration),
    #[error("too many clients waiting for a server connection")]
    TooManyWaiting,
    #[error("the pool is closed")]
    Closed,
    #[error(transparent)]
    Connect(#[from] BackendError),
}

/// A server connection as the pool keeps it: boxed, so that parking it, lending it and
/// returning it move a pointer rather than the whole connection state (hot path).
pub type Conn = Box<ServerConn>;

/// A pool of server connections for one (database, user).
pub struct PoolInner {
    /// Label value: `database/user`.
    pub name: Arc<str>,
    target: RwLock<Arc<ServerTarget>>,
    settings: RwLock<Arc<PoolSettings>>,
    sem: Arc<Semaphore>,
    /// The configured size, for resizing on reload.
    size: AtomicUsize,
    /// Idle connections, most recently used last.
    idle: Mutex<VecDeque<Conn>>,
    waiting: AtomicUsize,
    /// Connections being opened right now (count towards the size through their permit).
    connecting: AtomicUsize,
    pub metrics: PoolMetrics,
    closer: Closer,
    /// Where server logins run (see `with_permit`); the drain waits for them.
    tracker: TaskTracker,
    server_close_timeout: Duration,
    /// Parameters of a freshly opened connection: what a client that asks for nothing sees.
    baseline: Mutex<Option<Arc<Params>>>,
    closed: AtomicBool,
    /// Bumped when the target changes on reload: older connections are replaced on return.
    generation: AtomicU64,
    /// The client parameters of the latest login, shared with every later login that has the
    /// same values (see `ClientParams::intern`).
    client_params: Mutex<Option<Arc<Params>>>,
    /// The latest transaction-mode login's greeting, reused by the next login with the same
    /// startup parameters (see [`Pool::greeting`]).
    greeting: Mutex<Option<Greeting>>,
    /// Every open server connection by id: its generation and what the console shows of it
    /// (registered at connect, removed at shutdown; never touched per transaction).
    conn_generation: Mutex<std::collections::HashMap<u64, ConnInfo>>,
    /// PAUSE / RESUME (see `pause.rs`).
    pause: Mutex<pause::PauseCtl>,
    /// The last failed connect, if the last connect failed (`server_login_retry`).
    last_failure: Mutex<Option<ConnectFailure>>,
    /// The fleet budget, if `[budget]` is configured (see `budgeted.rs`).
    budget: Option<Arc<Budget>>,
    /// Under a budget: each open server connection's slot, by connection id, dropped after
    /// the connection's shutdown.
    slots: Mutex<std::collections::HashMap<u64, Slot>>,
    /// Under a budget: a connection was parked (a checkout waiting for a slot may use it).
    parked: tokio::sync::Notify,
}

impl std::fmt::Debug for PoolInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).finish()
    }
}

/// A cheap, cloneable handle to a pool.
#[derive(Clone, Debug)]
pub struct Pool {
    pub inner: Arc<PoolInner>,
}

/// A snapshot for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub mode: &'static str,
    pub size: usize,
    pub idle: usize,
    pub active: usize,
    pub waiting: usize,
    /// Transaction mode: clients pinned to their server by session state.
    pub pinned: usize,
    /// The console paused the pool (PAUSE or KILL): it lends no server until RESUME.
    pub paused: bool,
}

impl Pool {
    pub fn new(
        name: &str,
        target: ServerTarget,
        settings: PoolSettings,
        metrics: PoolMetrics,
        closer: Closer,
        tracker: TaskTracker,
        server_close_timeout: Duration,
    ) -> Pool {
        let size = settings.size;
        Pool {
            inner: Arc::new(PoolInner {
                name: Arc::from(name),
                target: RwLock::new(Arc::new(target)),
                settings: RwLock::new(Arc::new(settings)),
                sem: Arc::new(Semaphore::new(size)),
                size: AtomicUsize::new(size),
                idle: Mutex::new(VecDeque::new()),
                waiting: AtomicUsize::new(0),
                connecting: AtomicUsize::new(0),
                metrics,
                closer,
                tracker,
                server_close_timeout,
                baseline: Mutex::new(None),
                closed: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                client_params: Mutex::new(None),
                greeting: Mutex::new(None),
                conn_generation: Mutex::new(Default::default()),
                last_failure: Mutex::new(None),
                pause: Mutex::new(pause::PauseCtl::new()),
                budget: None,
                slots: Mutex::new(Default::default()),
                parked: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Put a new pool under the fleet budget: every server connection it opens needs a slot.
    pub fn with_budget(mut self, budget: Option<Arc<Budget>>) -> Pool {
        Arc::get_mut(&mut self.inner)
            .expect("with_budget is called on a new pool")
            .budget = budget;
        self
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn settings(&self) -> Arc<PoolSettings> {
        self.inner.settings()
    }

    pub fn target(&self) -> Arc<ServerTarget> {
        self.inner
            .target
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Parameters a fresh server connection reports, if one was ever opened.
    pub fn baseline(&self) -> Option<Arc<Params>> {
        lock(&self.inner.baseline).clone()
    }

    /// Take a server connection: an idle one that still looks alive and within its lifetime,
    /// else a new one, waiting in FIFO order (tokio's semaphore is fair) up to
    /// `checkout_timeout` for a free slot.
    ///
    /// # Cancel safety
    /// Cancel safe: the slot is owned by a permit from the moment it is acquired and the
    /// connection is wrapped in its guard before the next await; a cancelled connect drops only
    /// a half-open socket.
    pub async fn checkout(&self) -> Result<Checkout, CheckoutError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(CheckoutError::Closed);
        }
        let settings = inner.settings();
        let start = Instant::now();
        let permit = match inner.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(CheckoutError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                if inner.waiting.load(Ordering::Relaxed) >= settings.max_waiting {
                    return Err(CheckoutError::TooManyWaiting);
                }
                let _w = Counted::new(&inner.waiting);
                match tokio::time::timeout(
                    settings.checkout_timeout,
                    inner.sem.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(CheckoutError::Closed),
                    Err(_) => {
                        inner.metrics.checkout_timeouts.inc();
                        return Err(CheckoutError::Timeout(settings.checkout_timeout));
                    }
                }
            }
        };
        inner.metrics.checkout_wait.observe(start.elapsed());
        let deadline = start + settings.checkout_timeout;
        self.with_permit(permit, &settings, deadline).await
    }

    /// One shared copy of equal client parameter sets: returns the pool's copy if it equals
    /// `params`, else makes `params` the pool's copy.
    pub fn intern_params(&self, params: Arc<Params>) -> Arc<Params> {
        let mut last = lock(&self.inner.client_params);
        match &*last {
            Some(shared) if **shared == *params => shared.clone(),
            _ => {
                *last = Some(params.clone());
                params
            }
        }
    }

    /// The hot path of a transaction-mode checkout, synchronous: a free slot and a usable
    /// idle connection right now, else `None` (the caller then goes through
    /// [`checkout`](Self::checkout), which waits, opens connections and reports errors).
    /// Fair to waiters: a released slot goes straight to the longest waiter, so no slot is
    /// free while clients wait.
    pub fn checkout_idle(&self) -> Option<Checkout> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return None;
        }
        let permit = inner.sem.clone().try_acquire_owned().ok()?;
        let conn = lock(&inner.idle).pop_back()?;
        inner.metrics.idle.dec();
        // One clock read for the checks and the checkout time (reads are not free in a VM).
        let now = Instant::now();
        let (lifetime, idle_timeout, check_delay) = {
            let s = inner.settings_ref();
            (
                s.server_lifetime,
                s.server_idle_timeout,
                s.server_check_delay,
            )
        };
        let idle_for = match inner.usable(&conn, lifetime, idle_timeout, now) {
            Ok(d) => d,
            Err(reason) => {
                inner.send_close(conn, reason);
                return None;
            }
        };
        if idle_for >= check_delay {
            // Unused long enough to need a round trip first: the caller's `checkout` does it.
            lock(&inner.idle).push_back(conn);
            inner.metrics.idle.inc();
            return None;
        }
        inner
            .metrics
            .checkout_wait
            .observe(std::time::Duration::ZERO);
        inner.metrics.active.inc();
        Some(Checkout::new(conn, permit, inner.clone(), now))
    }

    /// Like [`checkout`](Self::checkout), but only if a slot is free right now: `Ok(None)`
    /// when the pool is at its size.
    pub async fn checkout_now(&self) -> Result<Option<Checkout>, CheckoutError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(CheckoutError::Closed);
        }
        let settings = inner.settings();
        match inner.sem.clone().try_acquire_owned() {
            Ok(permit) => {
                let deadline = Instant::now() + settings.checkout_timeout;
                self.with_permit(permit, &settings, deadline)
                    .await
                    .map(Some)
            }
            Err(tokio::sync::TryAcquireError::Closed) => Err(CheckoutError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => Ok(None),
        }
    }

    /// Holding a slot: an idle connection that still looks alive (checked with a round trip
    /// when unused for `server_check_delay`), else a new one; under a fleet budget, a new one
    /// only once a budget slot is ours (or an idle one as soon as one is parked). `deadline`
    /// bounds the wait for a budget slot and for a connect to be allowed again after a failed
    /// one (`server_login_retry`).
    async fn with_permit(
        &self,
        permit: OwnedSemaphorePermit,
        settings: &PoolSettings,
        deadline: Instant,
    ) -> Result<Checkout, CheckoutError> {
        let inner = &self.inner;
        let slot = loop {
            if let Some((c, now)) = self.idle_checkout(settings).await {
                return Ok(Checkout::new(c, permit, inner.clone(), now));
            }
            match &inner.budget {
                None => break None,
                // Under a budget: a slot before the connect, or a connection parked meanwhile.
                Some(b) => match inner.budget_slot(b, deadline).await {
                    Ok(Some(slot)) => break Some(slot),
                    Ok(None) => continue,
                    Err(e) => {
                        inner.metrics.checkout_timeouts.inc();
                        return Err(e);
                    }
                },
            }
        };
        loop {
            // After a failed connect the next one waits for server_login_retry: clients that
            // ask meanwhile wait for it (up to their checkout_timeout, then they get the last
            // connect error), so a server that is down or refusing sees one attempt per
            // interval however many clients ask. A client whose own attempt failed is told
            // at once, with the server's SQLSTATE (or 08006).
            if let Some(failure) = inner.connect_failure(settings.server_login_retry) {
                let until = (failure.at + settings.server_login_retry).min(deadline);
                if Instant::now() >= deadline {
                    return Err(failure.error());
                }
                tokio::time::sleep_until(until.into()).await;
                if Instant::now() >= deadline {
                    return Err(failure.error());
                }
                continue;
            }
            return self
                .connect(permit, slot, settings.connect_timeout)
                .await
                .map_err(CheckoutError::Connect);
        }
    }

    /// Open and log in a new server connection, in a task of its own that always completes
    /// (a login cut off half way is an abrupt disconnect for Postgres; `backend::connect`).
    /// The task wraps the connection in its checkout guard, with `permit`, before handing it
    /// over: if the caller has stopped waiting, dropping the guard parks the connection (a
    /// bare connection dropped in the channel would be a leak). It also records the outcome
    /// for `server_login_retry`, whoever is still waiting.
    async fn connect(
        &self,
        permit: OwnedSemaphorePermit,
        slot: Option<Slot>,
        connect_timeout: Duration,
    ) -> Result<Checkout, BackendError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pool = self.clone();
        self.inner.tracker.spawn(async move {
            let inner = &pool.inner;
            let target = pool.target();
            let generation = inner.generation.load(Ordering::Acquire);
            let _c = Counted::new(&inner.connecting);
            let r = backend::connect(
                &target,
                inner.name.clone(),
                inner.metrics.leaked.clone(),
                connect_timeout,
            )
            .await;
            let mut conn = match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(pool = %inner.name, error = %e, "server login failed");
                    *lock(&inner.last_failure) = Some(ConnectFailure::new(&e));
                    drop(permit);
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            *lock(&inner.last_failure) = None;
            inner.metrics.opened.inc();
            inner.register_conn(&mut conn, generation);
            inner.keep_slot(conn.id, slot);
            {
                let mut b = lock(&inner.baseline);
                if b.is_none() {
                    *b = Some(Arc::new(conn.params.clone()));
                }
            }
            tracing::debug!(conn.id = conn.id, pool = %inner.name, pid = conn.key.pid, "server connection opened");
            inner.metrics.active.inc();
            let checkout = Checkout::new(Box::new(conn), permit, inner.clone(), Instant::now());
            // If the caller stopped waiting, the checkout is dropped here and parks the
            // connection on the idle list.
            let _ = tx.send(Ok(checkout));
        });
        rx.await.unwrap_or(Err(BackendError::Closed))
    }

    pub fn status(&self) -> PoolStatus {
        let s = self.settings();
        // Both read under the idle lock: a checkout counts a connection as active only after
        // taking it from the queue, and a return stops counting it before parking it, so a
        // reader holding the lock never counts one connection twice (read apart, a checkout
        // in between could make idle + active exceed the pool's size).
        let (idle, active) = {
            let queue = lock(&self.inner.idle);
            (queue.len(), self.inner.metrics.active.get().max(0) as usize)
        };
        PoolStatus {
            name: self.inner.name.to_string(),
            mode: s.mode.as_str(),
            size: self.inner.size.load(Ordering::Relaxed),
            idle,
            active,
            waiting: self.inner.waiting.load(Ordering::Relaxed),
            pinned: self.inner.metrics.pinned.get().max(0) as usize,
            paused: self.pause_phase() != PausePhase::Running,
        }
    }

    /// Periodic upkeep: close idle connections past `server_idle_timeout` or `server_lifetime`
    /// or that the server has closed, and open connections up to `min_idle`.
    pub async fn maintain(&self) {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let settings = inner.settings();
        let now = Instant::now();
        let expired: Vec<(Conn, CloseReason)> = {
            let mut idle = lock(&inner.idle);
            let mut keep = VecDeque::with_capacity(idle.len());
            let mut out = Vec::new();
            while let Some(c) = idle.pop_front() {
                match inner.usable(
                    &c,
                    settings.server_lifetime,
                    settings.server_idle_timeout,
                    now,
                ) {
                    Err(r) => out.push((c, r)),
                    Ok(_) => keep.push_back(c),
                }
            }
            *idle = keep;
            out
        };
        for (c, r) in expired {
            inner.metrics.idle.dec();
            inner.send_close(c, r);
        }
        if inner.budget.is_some() {
            inner.shed_idle();
        }
        // min_idle: open connections while the pool has free slots and too few idle ones.
        loop {
            let idle_now = lock(&inner.idle).len();
            if idle_now >= settings.min_idle {
                break;
            }
            let Ok(permit) = inner.sem.clone().try_acquire_owned() else {
                break;
            };
            // Under a budget, min_idle uses only slots already held and unused.
            let slot = match &inner.budget {
                None => None,
                Some(b) => match b.try_take() {
                    Some(s) => Some(s),
                    None => break,
                },
            };
            let target = self.target();
            let generation = inner.generation.load(Ordering::Acquire);
            match backend::connect(
                &target,
                inner.name.clone(),
                inner.metrics.leaked.clone(),
                settings.connect_timeout,
            )
            .await
            {
                Ok(mut conn) => {
                    inner.metrics.opened.inc();
                    inner.register_conn(&mut conn, generation);
                    inner.keep_slot(conn.id, slot);
                    inner.return_clean(Box::new(conn), Some(permit));
                }
                Err(e) => {
                    tracing::debug!(pool = %inner.name, error = %e, "min_idle connect failed");
                    break;
                }
            }
        }
    }

    /// Apply new settings and target (SIGHUP). The size changes at once for new checkouts;
    /// connections to a changed target are replaced as they come back.
    pub fn reconfigure(&self, target: ServerTarget, settings: PoolSettings) {
        let inner = &self.inner;
        let new_size = settings.size;
        {
            let mut t = inner.target.write().unwrap_or_else(|e| e.into_inner());
            if **t != target {
                *t = Arc::new(target);
                self.replace_servers(CloseReason::reload);
            }
        }
        *inner.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        let old = inner.size.swap(new_size, Ordering::AcqRel);
        if new_size > old {
            // While paused the new slots are the pause's to give out, at RESUME.
            inner.add_slots(new_size - old);
        } else if new_size < old {
            // Take the surplus permits as they become free, then forget them.
            let sem = inner.sem.clone();
            let n = (old - new_size) as u32;
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many_owned(n).await {
                    p.forget();
                }
            });
        }
    }

    /// Pass-through (DESIGN.md section 11): the credential a client's login revealed (SCRAM
    /// keys or an md5 hash) answers the next server logins. Open connections stay: they
    /// have logged in already.
    pub fn set_credential(&self, credential: &ServerCredential) {
        if self.target().credential.as_ref() == Some(credential) {
            return;
        }
        let mut t = self.inner.target.write().unwrap_or_else(|e| e.into_inner());
        let mut target = (**t).clone();
        target.credential = Some(credential.clone());
        *t = Arc::new(target);
    }

    /// Replace every server connection: idle ones are shut down now (counted as `reason`), the
    /// others as they come back (their generation is old). What a target change on reload
    /// does, and the console's RECONNECT and KILL.
    pub fn replace_servers(&self, reason: CloseReason) {
        let inner = &self.inner;
        inner.generation.fetch_add(1, Ordering::AcqRel);
        let idle: Vec<Conn> = lock(&inner.idle).drain(..).collect();
        for c in idle {
            inner.metrics.idle.dec();
            inner.send_close(c, reason);
        }
    }

    /// Stop lending connections and shut every idle one down (drain). Connections still checked
    /// out are shut down as they come back.
    pub async fn close(&self, reason: CloseReason) -> (usize, usize) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        let idle: Vec<Conn> = lock(&inner.idle).drain(..).collect();
        let mut clean = 0;
        let mut hard = 0;
        let mut set = tokio::task::JoinSet::new();
        for c in idle {
            inner.metrics.idle.dec();
            let inner = inner.clone();
            set.spawn(async move { inner.shutdown_conn(c, reason).await });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(ShutdownOutcome::Clean) => clean += 1,
                _ => hard += 1,
            }
        }
        (clean, hard)
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

impl PoolInner {
    fn settings(&self) -> Arc<PoolSettings> {
        self.settings_ref().clone()
    }

    /// The settings under their read lock, for the per-transaction paths: no reference count
    /// to raise and drop (two atomic operations each) for a field or two.
    fn settings_ref(&self) -> std::sync::RwLockReadGuard<'_, Arc<PoolSettings>> {
        self.settings.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The synchronous return path: park a clean connection, or hand it to the closer.
    fn give_back(
        self: &Arc<Self>,
        conn: Conn,
        permit: Option<OwnedSemaphorePermit>,
        reset: Reset,
        closed_as: Option<CloseReason>,
        now: Instant,
    ) {
        self.metrics.active.dec();
        if !conn.is_clean() || reset != Reset::No {
            // Even when draining: a connection mid-request is recovered (cancel, rollback)
            // before its shutdown, so the server sees Terminate, not a cut-off message.
            self.metrics.closing.inc();
            self.closer.send(CloseJob {
                conn,
                permit,
                pool: self.clone(),
                kind: CloseKind::Recover { reset, closed_as },
            });
            return;
        }
        if self.closed.load(Ordering::Acquire) {
            drop(permit);
            self.send_close(conn, closed_as.unwrap_or(CloseReason::drain));
            return;
        }
        let lifetime = self.settings_ref().server_lifetime;
        if now.saturating_duration_since(conn.created) >= lifetime {
            drop(permit);
            self.send_close(conn, CloseReason::lifetime);
        } else if self.is_stale(&conn) {
            drop(permit);
            self.send_close(conn, CloseReason::reload);
        } else if self.budget.is_some() && self.shed_for_budget(&conn) {
            drop(permit);
            self.send_close(conn, CloseReason::budget);
        } else {
            self.park(conn, now);
            drop(permit);
        }
    }

    /// Return a connection that the closer made clean again (its `closing` count ends here).
    fn return_clean(self: &Arc<Self>, conn: Conn, permit: Option<OwnedSemaphorePermit>) {
        if self.closed.load(Ordering::Acquire) {
            drop(permit);
            self.send_close(conn, CloseReason::drain);
            return;
        }
        if self.budget.is_some() && self.shed_for_budget(&conn) {
            drop(permit);
            self.send_close(conn, CloseReason::budget);
            return;
        }
        self.park(conn, Instant::now());
        drop(permit);
    }

    fn park(&self, mut conn: Conn, now: Instant) {
        conn.idle_since = now;
        lock(&self.idle).push_back(conn);
        self.metrics.idle.inc();
        if self.budget.is_some() {
            self.parked.notify_one();
        }
    }

    fn send_close(self: &Arc<Self>, conn: Conn, reason: CloseReason) {
        self.metrics.closing.inc();
        self.closer.send(CloseJob {
            conn,
            permit: None,
            pool: self.clone(),
            kind: CloseKind::Close(reason),
        });
    }

    /// Shut a connection down and count it. Expects `closing` to have been incremented.
    async fn shutdown_conn(&self, conn: Conn, reason: CloseReason) -> ShutdownOutcome {
        let id = conn.id;
        lock(&self.conn_generation).remove(&id);
        // The budget slot goes back only after the connection has really closed.
        let slot = self.take_slot(id);
        let outcome = if conn.state.broken && conn.state.partial_to_server.is_some() {
            conn.close_hard();
            ShutdownOutcome::Hard
        } else {
            conn.shutdown(self.server_close_timeout).await
        };
        self.metrics.closed(reason).inc();
        match outcome {
            ShutdownOutcome::Clean => self.metrics.shutdown_clean.inc(),
            ShutdownOutcome::Hard => self.metrics.shutdown_hard.inc(),
        };
        self.metrics.closing.dec();
        drop(slot);
        tracing::debug!(conn.id = id, pool = %self.name, ?reason, ?outcome, "server connection closed");
        outcome
    }
}

/// Idle connections parked at least this long are probed (a non-blocking peek) at checkout.
/// After a successful reset: `sql::scan` says what `sql` removed. Settings tidepool applied
/// are gone after `DISCARD ALL` / `RESET ALL` (reported ones were updated from the
/// ParameterStatus the reset sent), and prepared statements after `DISCARD ALL` /
/// `DEALLOCATE ALL`.
fn after_reset(conn: &mut ServerConn, sql: &str) {
    let fx = crate::sql::scan(sql.as_bytes());
    if fx.settings {
        conn.applied = Params::default();
    }
    if fx.drops_statements {
        conn.stmts.clear();
    }
    conn.synced_fp = None;
}

/// What a server connection needs before another client may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// Nothing: its session holds nothing of the last client's.
    No,
    /// Session mode: the configured `reset_query`.
    ResetQuery,
    /// Transaction mode, a client whose session state could not be carried (pinned, or left
    /// with its settings unread): `DISCARD ALL`.
    DiscardAll,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Increments an atomic for as long as it lives.
struct Counted<'a>(&'a AtomicUsize);
impl<'a> Counted<'a> {
    fn new(a: &'a AtomicUsize) -> Self {
        a.fetch_add(1, Ordering::Relaxed);
        Counted(a)
    }
}
impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A borrowed server connection.
///
/// # Drop behaviour
///
/// Returns the connection synchronously: a clean one (last ReadyForQuery `I`, nothing owed or
/// unread, within its lifetime) goes to the idle list; anything else goes, with its pool slot,
/// to the closer task, which recovers it (cancel, drain, rollback, reset) or shuts it down. It
/// never awaits or spawns.
pub struct Checkout {
    conn: Option<Conn>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<PoolInner>,
    /// Session mode: run `reset_query` before the connection is lent again.
    reset_on_return: Reset,
    /// Why, if the connection ends up closed on return (`forced` for a forced session).
    close_reason: Option<CloseReason>,
    pub since: Instant,
    /// When the caller gave the connection back, if it read the clock anyway (saves a read).
    returned_at: Option<Instant>,
}

impl Checkout {
    fn new(
        conn: Conn,
        permit: OwnedSemaphorePermit,
        pool: Arc<PoolInner>,
        now: Instant,
    ) -> Checkout {
        Checkout {
            conn: Some(conn),
            permit: Some(permit),
            pool,
            reset_on_return: Reset::No,
            close_reason: None,
            since: now,
            returned_at: None,
        }
    }

    /// Return the connection (by dropping the guard) as of `now`, a clock reading the caller
    /// just took.
    pub fn return_at(mut self, now: Instant) {
        self.returned_at = Some(now);
    }

    /// Session mode: run `reset_query` when the connection comes back.
    pub fn set_reset_on_return(&mut self, reset: bool) {
        if self.reset_on_return != Reset::DiscardAll {
            self.reset_on_return = if reset { Reset::ResetQuery } else { Reset::No };
        }
    }

    /// Transaction mode: `DISCARD ALL` before anyone else uses the connection.
    pub fn set_discard_on_return(&mut self) {
        self.reset_on_return = Reset::DiscardAll;
    }

    /// The reason to count if this connection is closed when it comes back.
    pub fn set_close_reason(&mut self, reason: CloseReason) {
        self.close_reason = Some(reason);
    }

    pub fn pool_metrics(&self) -> &PoolMetrics {
        &self.pool.metrics
    }

    /// Take the connection out of the pool's accounting for good (the caller must shut it
    /// down); its slot is freed.
    pub fn detach(mut self) -> Conn {
        let conn = self
            .conn
            .take()
            .expect("checkout holds a connection until dropped");
        self.pool.metrics.active.dec();
        conn
    }

    /// Test-only: drop the connection without shutdown (the leak detector must count it).
    #[doc(hidden)]
    pub fn leak_for_test(self) {
        let conn = self.detach();
        conn.leak_for_test();
    }
}

impl std::ops::Deref for Checkout {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .expect("checkout holds a connection until dropped")
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("checkout holds a connection until dropped")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let permit = self.permit.take();
            let now = self.returned_at.unwrap_or_else(Instant::now);
            self.pool
                .give_back(conn, permit, self.reset_on_return, self.close_reason, now);
        }
    }
}
