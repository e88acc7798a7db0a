//! Wiring: the shared state, the accept loop, upkeep, reload and the drain.
//!
//! [`Server::bind`] opens the listeners; [`Server::run`] serves until a drain completes and
//! returns the [`DrainReport`]. Tests drive it in-process and trigger shutdown through
//! [`Shared::shutdown`]; the binary connects signals to the same handle.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::auth::{ScramVerifier, Secret};
use crate::backend::ServerTarget;
use crate::config::{Config, ConfigError, ConfigSource};
use crate::frontend::cancel::CancelRegistry;
use crate::metrics::{CloseReason, Metrics, RejectReason};
use crate::pool::{Closer, Pool, PoolStatus};
use crate::shutdown::{DrainReport, Phase, Shutdown};

/// A configured user, with what each auth method needs precomputed.
pub struct UserAuth {
    pub secret: Secret,
    /// What SCRAM uses: the configured verifier, or one derived once from a plaintext password
    /// (PBKDF2 is deliberately slow; doing it per login would cap the login rate).
    pub scram_secret: Secret,
}

/// The config plus what is derived from it; replaced whole on reload (so certificates are
/// read again on SIGHUP).
pub struct Runtime {
    pub config: Config,
    pub users: HashMap<String, UserAuth>,
    /// TLS towards clients, if configured and not disabled.
    pub listen_tls: Option<(tokio_rustls::TlsAcceptor, crate::tls::ListenTlsMode)>,
    /// Per database entry: the rustls config for its sslmode and an id of those settings.
    server_tls: HashMap<String, (Option<Arc<tokio_rustls::rustls::ClientConfig>>, String)>,
}

impl Runtime {
    pub fn new(config: Config) -> Result<Runtime, ConfigError> {
        let mut users = HashMap::new();
        for (i, u) in config.auth.users.iter().enumerate() {
            let secret = Secret::parse(&u.password).map_err(|e| {
                ConfigError(format!(
                    "key `auth.users[{i}].password` (user \"{}\"): {e}",
                    u.name
                ))
            })?;
            let scram_secret = match &secret {
                Secret::Plain(p) => Secret::Scram(ScramVerifier::generate(p)),
                other => other.clone(),
            };
            users.insert(
                u.name.clone(),
                UserAuth {
                    secret,
                    scram_secret,
                },
            );
        }
        let listen_tls = match &config.listen.tls {
            Some(t) if t.mode != crate::tls::ListenTlsMode::Disable => {
                let sc = crate::tls::server_config(&t.cert, &t.key)
                    .map_err(|e| ConfigError(format!("key `listen.tls`: {e}")))?;
                Some((tokio_rustls::TlsAcceptor::from(sc), t.mode))
            }
            _ => None,
        };
        let mut server_tls = HashMap::new();
        for (name, d) in &config.databases {
            let cc = crate::tls::client_config(d.sslmode, d.sslrootcert.as_deref())
                .map_err(|e| ConfigError(format!("key `databases.{name}.sslmode`: {e}")))?;
            let ca = d
                .sslrootcert
                .as_ref()
                .and_then(|p| std::fs::read(p).ok())
                .map(|b| {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    b.hash(&mut h);
                    h.finish()
                })
                .unwrap_or(0);
            server_tls.insert(name.clone(), (cc, format!("{:?}:{ca:x}", d.sslmode)));
        }
        Ok(Runtime {
            config,
            users,
            listen_tls,
            server_tls,
        })
    }
}

/// State every task shares.
pub struct Shared {
    runtime: RwLock<Arc<Runtime>>,
    source: Option<ConfigSource>,
    pools: Mutex<HashMap<(String, String), Pool>>,
    pub metrics: Arc<Metrics>,
    pub closer: Closer,
    pub cancels: CancelRegistry,
    /// Every distinct prepared statement (transaction mode), shared by all clients.
    pub statements: crate::frontend::prepared::Registry,
    clients: AtomicUsize,
    /// Every long-lived task and every closer job; the drain waits on it.
    pub tracker: TaskTracker,
    pub shutdown: Arc<Shutdown>,
    /// Stops the closer task once the drain has closed every pool.
    closer_stop: tokio_util::sync::CancellationToken,
    /// The upstream answered its last check (readiness).
    pub upstream_ok: AtomicBool,
    pub started: Instant,
    test_panic: AtomicBool,
    /// `--listen` / `--admin-listen`: they win over the file on reload too.
    addr_overrides: Mutex<(Option<SocketAddr>, Option<SocketAddr>)>,
}

impl Shared {
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Test-only: make the next session that holds a server panic.
    #[doc(hidden)]
    pub fn panic_next_session_for_test(&self) {
        self.test_panic.store(true, Ordering::SeqCst);
    }

    pub(crate) fn take_test_panic(&self) -> bool {
        self.test_panic.load(Ordering::Relaxed) && self.test_panic.swap(false, Ordering::SeqCst)
    }

    /// The pool for (database, user), created on first use.
    pub fn pool_for(
        &self,
        rt: &Runtime,
        database: &str,
        user: &str,
        client_password: Option<&str>,
    ) -> Result<Pool, String> {
        let key = (database.to_string(), user.to_string());
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.get(&key) {
            return Ok(p.clone());
        }
        let (entry_name, _) = rt
            .config
            .database_entry(database)
            .ok_or_else(|| format!("database \"{database}\" does not exist"))?;
        let target = target_for(rt, database, user, client_password)
            .ok_or_else(|| format!("database \"{database}\" does not exist"))?;
        let settings = rt.config.pool_settings(entry_name);
        let name = format!("{database}/{user}");
        let pool = Pool::new(
            &name,
            target,
            settings,
            self.metrics.pool(&name),
            self.closer.clone(),
            self.tracker.clone(),
            rt.config.drain.server_close_timeout,
        );
        tracing::info!(pool = %name, "pool created");
        pools.insert(key, pool.clone());
        Ok(pool)
    }

    /// Drop a pool that never got a connection (e.g. a `"*"` database missing upstream), so
    /// unknown names cannot grow the pool map.
    pub fn forget_pool_if_unused(&self, pool: &Pool) {
        let st = pool.status();
        if st.idle == 0 && st.active == 0 && pool.baseline().is_none() {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.retain(|_, p| !Arc::ptr_eq(&p.inner, &pool.inner));
        }
    }

    pub fn pools(&self) -> Vec<Pool> {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn pool_statuses(&self) -> Vec<PoolStatus> {
        let mut v: Vec<PoolStatus> = self.pools().iter().map(Pool::status).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Record the command-line address overrides so a reload applies them again.
    pub fn set_addr_overrides(&self, listen: Option<SocketAddr>, admin: Option<SocketAddr>) {
        *self
            .addr_overrides
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (listen, admin);
    }

    /// SIGHUP: read the config again; on success resize and retarget pools.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let Some(source) = &self.source else {
            return Err(ConfigError("no configuration source to reload".into()));
        };
        let mut config = match source {
            ConfigSource::File(path) => Config::load(path)?,
            ConfigSource::Upstream(url) => Config::from_upstream(url)?,
        };
        let (listen, admin) = *self
            .addr_overrides
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(a) = listen {
            config.listen.addr = a;
        }
        if let Some(a) = admin {
            config.admin.addr = a;
        }
        let old = self.runtime();
        if config.listen.addr != old.config.listen.addr || config.admin.addr != old.admin_addr() {
            tracing::warn!("listen.addr and admin.addr changes take effect only after a restart");
        }
        if config.runtime != old.config.runtime {
            tracing::warn!("runtime.workers changes take effect only after a restart");
        }
        let rt = Arc::new(Runtime::new(config)?);
        for ((database, user), pool) in self.pools.lock().unwrap_or_else(|e| e.into_inner()).iter()
        {
            let Some((entry_name, _)) = rt.config.database_entry(database) else {
                continue;
            };
            let password = rt.users.get(user).and_then(|u| u.secret.plaintext());
            if let Some(target) = target_for(&rt, database, user, password) {
                pool.reconfigure(target, rt.config.pool_settings(entry_name));
            }
        }
        *self.runtime.write().unwrap_or_else(|e| e.into_inner()) = rt;
        tracing::info!("configuration reloaded");
        Ok(())
    }
}

impl Runtime {
    fn admin_addr(&self) -> SocketAddr {
        self.config.admin.addr
    }
}

fn target_for(
    rt: &Runtime,
    database: &str,
    user: &str,
    client_password: Option<&str>,
) -> Option<ServerTarget> {
    let (entry_name, entry) = rt.config.database_entry(database)?;
    let (tls, tls_id) = rt.server_tls.get(entry_name).cloned().unwrap_or_default();
    let dbname = match (&entry.dbname, entry_name) {
        (Some(d), _) => d.clone(),
        (None, "*") => database.to_string(),
        (None, name) => name.to_string(),
    };
    Some(ServerTarget {
        host: entry.host.clone(),
        port: entry.port,
        dbname,
        user: entry.user.clone().unwrap_or_else(|| user.to_string()),
        password: entry
            .password
            .clone()
            .or_else(|| client_password.map(str::to_string)),
        sslmode: entry.sslmode,
        tls,
        tls_id,
    })
}

/// Counts a connected client for as long as it lives.
struct ClientSlot(Arc<Shared>);
impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A bound, not yet running tidepool.
pub struct Server {
    pub shared: Arc<Shared>,
    listener: TcpListener,
    admin: Option<std::net::TcpListener>,
}

impl Server {
    /// Bind the client and admin listeners. `admin = false` skips the HTTP endpoint (tests).
    pub async fn bind(
        config: Config,
        source: Option<ConfigSource>,
        admin: bool,
    ) -> Result<Server, ServeError> {
        let rt = Runtime::new(config).map_err(ServeError::Config)?;
        let listener = TcpListener::bind(rt.config.listen.addr)
            .await
            .map_err(|e| ServeError::Bind(rt.config.listen.addr, e))?;
        let admin = if admin {
            let l = std::net::TcpListener::bind(rt.config.admin.addr)
                .map_err(|e| ServeError::Bind(rt.config.admin.addr, e))?;
            l.set_nonblocking(true)
                .map_err(|e| ServeError::Bind(rt.config.admin.addr, e))?;
            Some(l)
        } else {
            None
        };
        let tracker = TaskTracker::new();
        let closer_stop = tokio_util::sync::CancellationToken::new();
        let closer = Closer::start(&tracker, closer_stop.clone());
        let shared = Arc::new(Shared {
            runtime: RwLock::new(Arc::new(rt)),
            source,
            pools: Mutex::new(HashMap::new()),
            metrics: Arc::new(Metrics::new()),
            closer,
            closer_stop,
            cancels: CancelRegistry::new(),
            statements: Default::default(),
            clients: AtomicUsize::new(0),
            tracker,
            shutdown: Arc::new(Shutdown::new()),
            upstream_ok: AtomicBool::new(false),
            started: Instant::now(),
            test_panic: AtomicBool::new(false),
            addr_overrides: Mutex::new((None, None)),
        });
        Ok(Server {
            shared,
            listener,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serve until a drain completes. Returns the drain report.
    pub async fn run(self) -> DrainReport {
        let Server {
            shared,
            listener,
            admin,
        } = self;
        // The admin endpoint runs outside the tracker: it must answer until the very end.
        let admin_stop = tokio_util::sync::CancellationToken::new();
        let admin_task = admin.map(|l| {
            let shared = shared.clone();
            let stop = admin_stop.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(l, shared, stop).await {
                    tracing::error!(error = %e, "admin endpoint failed");
                }
            })
        });
        shared.tracker.spawn(upkeep(shared.clone()));
        shared.tracker.spawn(upstream_check(shared.clone()));
        let accept = tokio::spawn(accept_loop(shared.clone(), listener));
        shared.shutdown.set_phase(Phase::Running);
        tracing::info!("tidepool ready");

        shared.shutdown.drain_token().cancelled().await;
        let report = drain(&shared, accept).await;
        shared.shutdown.set_phase(Phase::Stopped);
        admin_stop.cancel();
        if let Some(t) = admin_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        report
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(ConfigError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let drain = shared.shutdown.drain_token();
    let force = shared.shutdown.force_token();
    let mut draining = false;
    let mut window: std::pin::Pin<Box<tokio::time::Sleep>> =
        Box::pin(tokio::time::sleep(Duration::from_secs(86400 * 365)));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => spawn_client(&shared, sock, peer),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = drain.cancelled(), if !draining => {
                draining = true;
                let accept_for = shared.runtime().config.drain.accept_for;
                if accept_for.is_zero() {
                    break;
                }
                window.as_mut().reset(tokio::time::Instant::now() + accept_for);
            }
            _ = &mut window, if draining => break,
            _ = force.cancelled() => break,
        }
    }
    shared.shutdown.stop_accepting();
    drop(listener);
    tracing::info!("listener closed");
}

fn spawn_client(shared: &Arc<Shared>, sock: TcpStream, peer: SocketAddr) {
    // Up to `max_clients` connections over the limit are served far enough to be told
    // `53300 sorry, too many clients already` once they send their startup packet. Past twice
    // the limit a connection is closed at once, unread: a flood of connections that send
    // nothing must not hold a task and a descriptor each until `login_timeout` ends them.
    let max = shared.runtime().config.listen.max_clients;
    if shared.clients.load(Ordering::Relaxed) >= max.saturating_mul(2) {
        shared.metrics.reject(RejectReason::max_clients);
        tracing::debug!(client.addr = %peer, "connection closed at accept: twice max_clients");
        drop(sock);
        return;
    }
    shared.clients.fetch_add(1, Ordering::Relaxed);
    let slot = ClientSlot(shared.clone());
    let shared = shared.clone();
    shared
        .tracker
        .clone()
        .spawn(crate::frontend::serve_client(shared, sock, peer, slot));
}

/// Idle timeouts, lifetimes, min_idle: once a second.
async fn upkeep(shared: Arc<Shared>) {
    let drain = shared.shutdown.drain_token();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = drain.cancelled() => return,
        }
        for pool in shared.pools() {
            pool.maintain().await;
        }
    }
}

/// Readiness: can the upstream be reached? A TCP connect per configured server, once a second,
/// bounded by `connect_timeout`; it uses no pool slot. (Postgres logs nothing for a connection
/// that sends no data, see ProcessStartupPacket in postmaster.c.)
async fn upstream_check(shared: Arc<Shared>) {
    let drain = shared.shutdown.drain_token();
    loop {
        let rt = shared.runtime();
        let timeout = rt.config.pool.connect_timeout;
        let mut ok = true;
        let mut seen = std::collections::HashSet::new();
        for entry in rt.config.databases.values() {
            if !seen.insert((entry.host.clone(), entry.port)) {
                continue;
            }
            let r = tokio::time::timeout(
                timeout,
                TcpStream::connect((entry.host.as_str(), entry.port)),
            )
            .await;
            if !matches!(r, Ok(Ok(_))) {
                ok = false;
            }
        }
        let was = shared.upstream_ok.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!("upstream reachable");
            } else {
                tracing::warn!("upstream unreachable");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = drain.cancelled() => return,
        }
    }
}

/// The drain, DESIGN.md section 4: wait for clients (bounded by `drain.timeout`), force the
/// rest, then shut every server connection down explicitly and report.
async fn drain(shared: &Arc<Shared>, accept: tokio::task::JoinHandle<()>) -> DrainReport {
    let start = Instant::now();
    let rt = shared.runtime();
    let cfg = &rt.config.drain;
    shared.metrics.draining.set(1);
    let clients_at_start = shared.client_count() as u64;
    let (clean_before, hard_before) = shared.metrics.shutdown_totals();
    let deadline = tokio::time::Instant::now() + cfg.timeout;
    let force = shared.shutdown.force_token();
    let mut deadline_reached = false;

    // Wait for clients to leave, or the deadline, or a forced stop.
    loop {
        if shared.client_count() == 0
            && (accept.is_finished() || shared.shutdown.refuse_new_clients())
        {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = tokio::time::sleep_until(deadline), if !deadline_reached => {
                deadline_reached = true;
                tracing::warn!(timeout = ?cfg.timeout, clients = shared.client_count(), "drain timeout reached: closing remaining clients");
                shared.shutdown.force_now();
            }
            _ = force.cancelled(), if !deadline_reached && !shared.shutdown.is_forced() => {}
        }
        if deadline_reached || shared.shutdown.is_forced() {
            // Forced sessions need at most server_close_timeout plus their writes.
            let grace = cfg.server_close_timeout + Duration::from_secs(1);
            let until = tokio::time::Instant::now() + grace;
            while shared.client_count() > 0 && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            break;
        }
    }
    let _ = accept.await;

    // Every server connection: idle ones now, returning ones as they come back.
    for pool in shared.pools() {
        pool.close(CloseReason::drain).await;
    }
    // Jobs already handed to the closer (recoveries, resets) finish, then it stops.
    let until = tokio::time::Instant::now() + cfg.server_close_timeout * 2 + Duration::from_secs(1);
    while shared.closer.pending() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shared.closer_stop.cancel();
    shared.tracker.close();
    if tokio::time::timeout(
        cfg.server_close_timeout + Duration::from_secs(2),
        shared.tracker.wait(),
    )
    .await
    .is_err()
    {
        tracing::warn!("some tasks did not finish within the drain bound");
    }
    let (clean_after, hard_after) = shared.metrics.shutdown_totals();
    let stats = &shared.shutdown.stats;
    let report = DrainReport {
        kind: shared.shutdown.kind(),
        duration_ms: start.elapsed().as_millis() as u64,
        clients_at_start,
        clients_left: stats.clients_left.load(Ordering::Relaxed),
        clients_closed_at_boundary: stats.clients_closed_at_boundary.load(Ordering::Relaxed),
        clients_forced: stats.clients_forced.load(Ordering::Relaxed),
        servers_closed_clean: clean_after - clean_before,
        servers_closed_hard: hard_after - hard_before,
        leaked: shared.metrics.leaked_total(),
        deadline_reached,
    };
    shared.metrics.draining.set(0);
    report
}
