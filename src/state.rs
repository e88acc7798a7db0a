//! The state every task shares: the config snapshot and what is derived from it
//! ([`Runtime`]), the pools, metrics, cancel keys, statement registry, client count and the
//! shutdown phase ([`Shared`]), and the reload that replaces the snapshot.
//!
//! It sits below everything that serves clients (`frontend`, `admin`) and below the wiring
//! (`server`), which builds it; see the layer table in the README.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ScramVerifier, Secret, ServerCredential};
use crate::backend::statements::Registry;
use crate::backend::ServerTarget;
use crate::budget::{Budget, BudgetSettings};
use crate::cancel::CancelRegistry;
use crate::config::{Config, ConfigError, ConfigSource};
use crate::lookup::{self, Lookup};
use crate::metrics::Metrics;
use crate::pool::{Closer, PauseSet, Pool, PoolStatus};
use crate::shutdown::Shutdown;

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
    /// The pool of the latest `pool_for`: (database, user, pool).
    last_pool: Mutex<Option<(String, String, Pool)>>,
    pub metrics: Arc<Metrics>,
    pub closer: Closer,
    pub cancels: CancelRegistry,
    /// Every distinct prepared statement (transaction mode), shared by all clients.
    pub statements: Registry,
    /// The effects of the last unnamed statement's text (see `sql::Memo`).
    pub unnamed_scan: crate::sql::Memo,
    clients: AtomicUsize,
    /// Every long-lived task and every closer job; the drain waits on it.
    pub tracker: TaskTracker,
    pub shutdown: Arc<Shutdown>,
    /// Stops the closer task once the drain has closed every pool.
    closer_stop: CancellationToken,
    /// The upstream answered its last check (readiness).
    pub upstream_ok: AtomicBool,
    pub started: Instant,
    /// The port the client listener is bound to (`listen.addr`'s, or the one the OS chose
    /// for port 0): every TCP client connected to it.
    pub listen_port: u16,
    test_panic: AtomicBool,
    /// `--listen` / `--admin-listen`: they win over the file on reload too.
    addr_overrides: Mutex<(Option<SocketAddr>, Option<SocketAddr>)>,
    /// The databases the console paused (a pool created meanwhile starts paused).
    pub pauses: PauseSet,
    /// The console's SHOW STATS averages window.
    pub stats_window: Mutex<crate::pool::StatsWindow>,
    /// Users looked up in Postgres (`auth.lookup_user`).
    pub lookup: Arc<Lookup>,
    /// `[budget]`: the fleet budget every pool consults (fixed at start: adding or removing
    /// the table needs a restart; its values reload).
    pub budget: Option<Arc<Budget>>,
}

impl Shared {
    /// The state of a process that is about to start serving: no pools yet, the closer task
    /// started on a new tracker.
    pub fn new(rt: Runtime, source: Option<ConfigSource>, listen_port: u16) -> Shared {
        let tracker = TaskTracker::new();
        let closer_stop = CancellationToken::new();
        let closer = Closer::start(&tracker, closer_stop.clone());
        let metrics = Arc::new(Metrics::new());
        let budget = rt.budget_settings().map(|b| {
            let counters = metrics.server_close_counters(&b.label);
            Budget::new(b, metrics.budget.clone(), counters)
        });
        Shared {
            lookup: Arc::new(Lookup::new(
                metrics.clone(),
                budget.clone(),
                tracker.clone(),
            )),
            runtime: RwLock::new(Arc::new(rt)),
            source,
            pools: Mutex::new(HashMap::new()),
            last_pool: Mutex::new(None),
            metrics,
            closer,
            closer_stop,
            cancels: CancelRegistry::new(),
            statements: Registry::default(),
            unnamed_scan: crate::sql::Memo::default(),
            clients: AtomicUsize::new(0),
            tracker,
            shutdown: Arc::new(Shutdown::new()),
            upstream_ok: AtomicBool::new(false),
            started: Instant::now(),
            listen_port,
            test_panic: AtomicBool::new(false),
            addr_overrides: Mutex::new((None, None)),
            pauses: PauseSet::default(),
            stats_window: Mutex::new(crate::pool::StatsWindow::new(Instant::now())),
            budget,
        }
    }

    /// Count a new client connection, unless `limit` are connected already; the slot
    /// uncounts it when dropped.
    pub fn admit_client(self: &Arc<Self>, limit: usize) -> Option<ClientSlot> {
        if self.clients.load(Ordering::Relaxed) >= limit {
            return None;
        }
        self.clients.fetch_add(1, Ordering::Relaxed);
        Some(ClientSlot(self.clone()))
    }

    /// Stop the closer task (the drain, once every pool is closed and its jobs are done).
    pub fn stop_closer(&self) {
        self.closer_stop.cancel();
    }

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
        credential: Option<&ServerCredential>,
    ) -> Result<Pool, String> {
        // The latest login's pool, compared without building a key (two allocations and a
        // hash per login otherwise: the login path, pgbench -C).
        let cached = match &*self.last_pool.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((d, u, p)) if d == database && u == user => Some(p.clone()),
            _ => None,
        };
        let pool = match cached {
            Some(p) => p,
            None => self.pool_in_map(rt, database, user, credential)?,
        };
        // Pass-through: the latest login's keys answer the next server logins (a password
        // changed in Postgres reaches new server connections this way).
        if let Some(c) = credential.filter(|c| !matches!(c, ServerCredential::Password(_))) {
            // (Only when they changed: resolving the target allocates.)
            if pool.target().credential.as_ref() != Some(c)
                && target_for(rt, database, user, Some(c.clone()))
                    .is_some_and(|t| t.credential.as_ref() == Some(c))
            {
                pool.set_credential(c);
            }
        }
        Ok(pool)
    }

    /// [`pool_for`](Self::pool_for) past its one-entry cache: the map, or a new pool; either
    /// becomes the cached one. The cache is set under the map's lock, as
    /// [`forget_pool_if_unused`](Self::forget_pool_if_unused) clears it: a pool forgotten
    /// meanwhile (by another worker thread) can then not stay cached outside the map, where
    /// neither upkeep nor the drain would see its connections.
    fn pool_in_map(
        &self,
        rt: &Runtime,
        database: &str,
        user: &str,
        credential: Option<&ServerCredential>,
    ) -> Result<Pool, String> {
        let key = (database.to_string(), user.to_string());
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let cache = |p: &Pool| {
            *self.last_pool.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((database.to_string(), user.to_string(), p.clone()));
        };
        if let Some(p) = pools.get(&key) {
            cache(p);
            return Ok(p.clone());
        }
        let (entry_name, _) = rt
            .config
            .database_entry(database)
            .ok_or_else(|| format!("database \"{database}\" does not exist"))?;
        let target = target_for(rt, database, user, credential.cloned())
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
        )
        .with_budget(self.budget.clone());
        tracing::info!(pool = %name, "pool created");
        if self.pauses.covers(database) {
            pool.pause(&self.shutdown.drain_token());
        }
        pools.insert(key, pool.clone());
        cache(&pool);
        Ok(pool)
    }

    /// Drop a pool that never got a connection (e.g. a `"*"` database missing upstream), so
    /// unknown names cannot grow the pool map.
    pub fn forget_pool_if_unused(&self, pool: &Pool) {
        let st = pool.status();
        if st.idle == 0 && st.active == 0 && pool.baseline().is_none() {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.retain(|_, p| !Arc::ptr_eq(&p.inner, &pool.inner));
            *self.last_pool.lock().unwrap_or_else(|e| e.into_inner()) = None;
            // A forgotten pool's pause would outlive every RESUME.
            pool.resume();
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

    /// Every pool with its database and user, sorted by them (the console).
    pub fn pool_entries(&self) -> Vec<(String, String, Pool)> {
        let mut v: Vec<(String, String, Pool)> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((d, u), p)| (d.clone(), u.clone(), p.clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
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
        for key in old.config.restart_only_changes(&config) {
            tracing::warn!("{key} changes take effect only after a restart");
        }
        let rt = Arc::new(Runtime::new(config)?);
        match (&self.budget, rt.budget_settings()) {
            (Some(b), Some(new)) => {
                let counters = self.metrics.server_close_counters(&new.label);
                b.reconfigure(new, counters);
            }
            (None, None) => {}
            _ => tracing::warn!("adding or removing [budget] takes effect only after a restart"),
        }
        for ((database, user), pool) in self.pools.lock().unwrap_or_else(|e| e.into_inner()).iter()
        {
            let Some((entry_name, _)) = rt.config.database_entry(database) else {
                continue;
            };
            // A listed user's password, else what its logins passed through.
            let credential = match rt.users.get(user).and_then(|u| u.secret.plaintext()) {
                Some(p) => Some(ServerCredential::Password(p.to_string())),
                None => pool.target().credential.clone(),
            };
            if let Some(target) = target_for(&rt, database, user, credential) {
                pool.reconfigure(target, rt.config.pool_settings(entry_name));
            }
        }
        *self.runtime.write().unwrap_or_else(|e| e.into_inner()) = rt;
        // The query or the lookup database may have changed: look users up afresh.
        self.lookup.clear();
        tracing::info!("configuration reloaded");
        Ok(())
    }
}

impl Runtime {
    /// How to look a user of `database` up, when `auth.lookup_user` is set: in
    /// `auth.lookup_dbname`, else in the client's database, as the lookup user.
    pub fn lookup_request(&self, database: &str) -> Option<lookup::Request> {
        let auth = &self.config.auth;
        let user = auth.lookup_user.as_deref()?;
        let password = auth.lookup_password()?;
        let db = auth.lookup_dbname.as_deref().unwrap_or(database);
        let (entry_name, _) = self.config.database_entry(db)?;
        let mut target = target_for(self, db, user, None)?;
        // Always the lookup user, even where the entry names a user of its own.
        target.user = user.to_string();
        target.credential = Some(ServerCredential::Password(password.to_string()));
        let settings = self.config.pool_settings(entry_name);
        Some(lookup::Request {
            target,
            query: auth.lookup_query.clone(),
            cache_for: auth.lookup_cache,
            connect_timeout: settings.connect_timeout,
            close_timeout: self.config.drain.server_close_timeout,
        })
    }

    /// The `[budget]` settings, with the control connection's target, if configured.
    pub fn budget_settings(&self) -> Option<BudgetSettings> {
        let b = self.config.budget.as_ref()?;
        let entry = self.config.databases.get(&b.control_database)?;
        let user = entry.user.as_deref()?;
        let target = target_for(self, &b.control_database, user, None)?;
        let pool = self.config.pool_settings(&b.control_database);
        Some(BudgetSettings::new(
            b,
            target,
            pool.connect_timeout,
            self.config.drain.server_close_timeout,
        ))
    }

    /// Server logins the readiness check can make before any pool exists: each database
    /// entry that names its server `user`, with the pool name it would have.
    pub fn login_targets(&self) -> Vec<(ServerTarget, String)> {
        self.config
            .databases
            .iter()
            .filter(|(name, _)| name.as_str() != "*")
            .filter_map(|(name, entry)| {
                let user = entry.user.as_deref()?;
                let target = target_for(self, name, user, None)?;
                Some((target, format!("{name}/{user}")))
            })
            .collect()
    }
}

fn target_for(
    rt: &Runtime,
    database: &str,
    user: &str,
    credential: Option<ServerCredential>,
) -> Option<ServerTarget> {
    let (entry_name, entry) = rt.config.database_entry(database)?;
    let (tls, tls_id) = rt.server_tls.get(entry_name).cloned().unwrap_or_default();
    let dbname = match (&entry.dbname, entry_name) {
        (Some(d), _) => d.clone(),
        (None, "*") => database.to_string(),
        (None, name) => name.to_string(),
    };
    Some(ServerTarget {
        hosts: entry.hosts().ok()?,
        attrs: entry.target_session_attrs,
        dbname,
        user: entry.user.clone().unwrap_or_else(|| user.to_string()),
        credential: match &entry.password {
            Some(p) => Some(ServerCredential::Password(p.clone())),
            // An entry that names its own user and no password: nothing of the client's
            // may answer for that other user.
            None if entry.user.as_deref().is_some_and(|u| u != user) => None,
            None => credential,
        },
        sslmode: entry.sslmode,
        tls,
        tls_id,
    })
}

/// Counts a connected client for as long as it lives.
pub struct ClientSlot(Arc<Shared>);
impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}
