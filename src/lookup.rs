//! Users looked up in Postgres (DESIGN.md section 11): a user not listed in `auth.users` is
//! looked up with `auth.lookup_query` over a connection of tidepool's own, as
//! `auth.lookup_user`, and the secret found decides how the client authenticates.
//!
//! The connection is a tokio-postgres client on a stream tidepool opened itself (so TLS,
//! Unix sockets and the hosts list work as for pool connections). Nothing from a client's
//! startup packet reaches it: it logs in with its own user, database and
//! `application_name`, with `search_path` pinned to `pg_catalog` so no object a user created
//! can stand in for a catalog one (the lesson of PgBouncer's CVE-2025-12819), and the user
//! name travels as a bind parameter of a prepared statement, never as SQL text.
//!
//! Like every server connection it ends with the explicit shutdown (Terminate, then the
//! server's close, awaited), and one dropped without it is counted as leaked.
//!
//! Secrets found are reused for `auth.lookup_cache` (the cache is bounded); a user not found
//! is not cached, and a failed login forgets the secret, so a role created or a password
//! changed in Postgres takes effect at the next login. Concurrent logins of one user share
//! one lookup. Each lookup runs in a task of its own: a client that gives up half way does
//! not cut a login or a query off in the middle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;
use tokio_postgres::Statement;
use tokio_util::task::TaskTracker;

use crate::auth::Secret;
use crate::backend::client::{connect_own_client, end, OwnClient};
use crate::backend::ServerTarget;
use crate::budget::{Budget, Slot};
use crate::metrics::{CloseReason, LookupOutcome, Metrics, ServerCloseCounters};

/// At most this many secrets are cached; past it the oldest is forgotten.
const MAX_CACHED: usize = 10_000;

/// What the lookup connection calls itself in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "tidepool auth lookup";

/// What a lookup found.
#[derive(Clone, Debug)]
pub enum Found {
    /// The user may log in with this secret.
    Secret(Secret),
    /// No such user, or one that cannot log in (no LOGIN, password expired or NULL).
    NotFound,
    /// The lookup could not be done (logged): the login is refused.
    Failed,
}

impl Found {
    /// How a lookup that came to this counts in `tidepool_auth_lookups_total`.
    fn outcome(&self) -> LookupOutcome {
        match self {
            Found::Secret(_) => LookupOutcome::found,
            Found::NotFound => LookupOutcome::not_found,
            Found::Failed => LookupOutcome::error,
        }
    }
}

/// Where and how to look a user up: resolved from the configuration at each login, so a
/// reload applies at once.
#[derive(Clone, Debug)]
pub struct Request {
    /// The server and database to ask, as `lookup_user` with its password.
    pub target: ServerTarget,
    pub query: String,
    pub cache_for: Duration,
    pub connect_timeout: Duration,
    pub close_timeout: Duration,
}

impl Request {
    /// Identifies the lookup database (the cache and the connections are per database).
    fn key(&self) -> String {
        format!("{:?}", self.target)
    }
}

/// (lookup database, user name)
type Key = (String, String);

struct Cached {
    secret: Secret,
    at: Instant,
}

/// The lookups of the process: cache, in-flight lookups, one connection per database.
pub struct Lookup {
    metrics: Arc<Metrics>,
    cache: Mutex<HashMap<Key, Cached>>,
    inflight: Mutex<HashMap<Key, Arc<OnceCell<Found>>>>,
    conns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<LookupConn>>>>>,
    /// Set by the drain once the connections are closed: no lookup opens another.
    closed: AtomicBool,
    /// `[budget]`: a lookup connection is a server connection too, and takes a slot.
    budget: Option<Arc<Budget>>,
    /// The process's tracker: lookups and their connections' tasks run on it, so the drain
    /// waits for them.
    tasks: TaskTracker,
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lookup")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lookup {
    pub fn new(metrics: Arc<Metrics>, budget: Option<Arc<Budget>>, tasks: TaskTracker) -> Lookup {
        Lookup {
            budget,
            metrics,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            tasks,
        }
    }

    /// The secret of `user`: from the cache while fresh, else looked up.
    pub async fn secret(self: &Arc<Self>, req: &Request, user: &str) -> Found {
        let key = (req.key(), user.to_string());
        if let Some(c) = lock(&self.cache).get(&key) {
            if c.at.elapsed() < req.cache_for {
                self.metrics.auth_lookup(LookupOutcome::cached);
                return Found::Secret(c.secret.clone());
            }
        }
        let cell = lock(&self.inflight)
            .entry(key.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let mut mine = false;
        let found = cell
            .get_or_init(|| {
                mine = true;
                let this = self.clone();
                let req = req.clone();
                let user = user.to_string();
                async move {
                    // A task of its own: it runs to the end whoever still waits for it
                    // (tracked: the drain waits for it).
                    let tasks = this.tasks.clone();
                    let task = tasks.spawn(async move { this.fetch(&req, &user).await });
                    task.await.unwrap_or(Found::Failed)
                }
            })
            .await
            .clone();
        {
            let mut inflight = lock(&self.inflight);
            if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(&key);
            }
        }
        if !mine {
            // Shared another login's lookup: counted like a reuse (a secret) or like the
            // lookup's own outcome (every refused login counts).
            self.metrics.auth_lookup(match &found {
                Found::Secret(_) => LookupOutcome::cached,
                other => other.outcome(),
            });
        }
        found
    }

    /// Forget `user`'s secret (its login failed: the password may have changed).
    pub fn forget(&self, req: &Request, user: &str) {
        lock(&self.cache).remove(&(req.key(), user.to_string()));
    }

    /// Forget every secret (a reload may have changed the query or the lookup database).
    pub fn clear(&self) {
        lock(&self.cache).clear();
    }

    async fn fetch(&self, req: &Request, user: &str) -> Found {
        let found = self.query(req, user).await;
        self.metrics.auth_lookup(found.outcome());
        if let Found::Secret(secret) = &found {
            let mut cache = lock(&self.cache);
            if cache.len() >= MAX_CACHED {
                let now = Instant::now();
                cache.retain(|_, c| now.duration_since(c.at) < req.cache_for);
                if cache.len() >= MAX_CACHED {
                    let oldest = cache
                        .iter()
                        .min_by_key(|(_, c)| c.at)
                        .map(|(k, _)| k.clone());
                    if let Some(k) = oldest {
                        cache.remove(&k);
                    }
                }
            }
            cache.insert(
                (req.key(), user.to_string()),
                Cached {
                    secret: secret.clone(),
                    at: Instant::now(),
                },
            );
        }
        found
    }

    /// Run the query on the database's connection, opening it if needed; a connection found
    /// broken is replaced once.
    async fn query(&self, req: &Request, user: &str) -> Found {
        let slot = lock(&self.conns)
            .entry(req.key())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(None)))
            .clone();
        let mut conn = slot.lock().await;
        for attempt in 0..2 {
            if self.closed.load(Ordering::Acquire) {
                tracing::warn!(user, "auth lookup refused: tidepool is shutting down");
                return Found::Failed;
            }
            if conn.as_ref().is_some_and(|c| c.query != req.query) {
                if let Some(old) = conn.take() {
                    old.shutdown(req.close_timeout, CloseReason::reload).await;
                }
            }
            if conn.is_none() {
                match LookupConn::open(req, &self.metrics, self.budget.as_ref(), &self.tasks).await
                {
                    Ok(c) => *conn = Some(c),
                    Err(e) => {
                        tracing::warn!(target = ?req.target, error = %e, "auth lookup failed: cannot log in as auth.lookup_user; the login is refused");
                        return Found::Failed;
                    }
                }
            }
            let Some(c) = conn.as_mut() else {
                return Found::Failed;
            };
            match c.run(user, req.connect_timeout).await {
                Ok(found) => return found,
                Err(LookupFailure::Broken(e)) => {
                    if let Some(old) = conn.take() {
                        old.shutdown(req.close_timeout, CloseReason::error).await;
                    }
                    if attempt == 0 {
                        tracing::info!(error = %e, "auth lookup connection lost; opening another");
                        continue;
                    }
                    tracing::warn!(target = ?req.target, error = %e, "auth lookup failed; the login is refused");
                    return Found::Failed;
                }
                Err(LookupFailure::Query(e)) => {
                    tracing::warn!(target = ?req.target, error = %e, "auth lookup query failed (check auth.lookup_query and the lookup user's rights); the login is refused");
                    return Found::Failed;
                }
            }
        }
        Found::Failed
    }

    /// Close connections unused for `idle` (upkeep).
    pub async fn close_idle(&self, idle: Duration, close_timeout: Duration) {
        let slots: Vec<_> = lock(&self.conns).values().cloned().collect();
        for slot in slots {
            let Ok(mut conn) = slot.try_lock() else {
                continue; // in use
            };
            if conn.as_ref().is_some_and(|c| c.last_used.elapsed() >= idle) {
                if let Some(c) = conn.take() {
                    c.shutdown(close_timeout, CloseReason::idle_timeout).await;
                }
            }
        }
    }

    /// The drain: close every lookup connection (waiting for a lookup in flight), and open
    /// none after.
    pub async fn close(&self, close_timeout: Duration) {
        self.closed.store(true, Ordering::Release);
        let slots: Vec<_> = lock(&self.conns).values().cloned().collect();
        for slot in slots {
            if let Some(c) = slot.lock().await.take() {
                c.shutdown(close_timeout, CloseReason::drain).await;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum LookupFailure {
    /// The connection is unusable: replace it.
    #[error("{0}")]
    Broken(String),
    /// The server answered with an error: the query or the rights are wrong.
    #[error("{0}")]
    Query(String),
}

/// One lookup connection: a tokio-postgres client and the task that drives its connection.
struct LookupConn {
    /// The client and its connection task (None once shut down).
    own: Option<OwnClient>,
    /// Prepared once per connection.
    statement: Option<Statement>,
    /// The query `statement` was prepared from (a reload may change it).
    query: String,
    metrics: ServerCloseCounters,
    /// Under `[budget]`: the slot this connection holds, given back (dropped) only after
    /// its shutdown.
    _slot: Option<Slot>,
    name: String,
    last_used: Instant,
}

impl LookupConn {
    async fn open(
        req: &Request,
        metrics: &Metrics,
        budget: Option<&Arc<Budget>>,
        tasks: &TaskTracker,
    ) -> Result<LookupConn, String> {
        let t = &req.target;
        let name = format!("{}/{}", t.dbname, t.user);
        // Counted with the server connections, under its own pool label (no pool gauges).
        let metrics = metrics.server_close_counters(&name);
        let slot = match budget {
            None => None,
            Some(b) => match b.take(Instant::now() + req.connect_timeout).await {
                Some(s) => Some(s),
                None => {
                    return Err(format!(
                        "no [budget] slot for the lookup connection within {:?}",
                        req.connect_timeout
                    ))
                }
            },
        };
        // Catalog objects only: nothing a user created can shadow pg_authid.
        let own = connect_own_client(
            t,
            APPLICATION_NAME,
            Some("-c search_path=pg_catalog"),
            req.connect_timeout,
            || {},
            tasks,
        )
        .await?;
        metrics.opened.inc();
        let prepared =
            tokio::time::timeout(req.connect_timeout, own.client.prepare(&req.query)).await;
        let mut conn = LookupConn {
            own: Some(own),
            statement: None,
            query: req.query.clone(),
            metrics,
            _slot: slot,
            name,
            last_used: Instant::now(),
        };
        let problem = match prepared {
            Ok(Ok(st)) if st.params().len() == 1 && st.columns().len() >= 2 => {
                conn.statement = Some(st);
                return Ok(conn);
            }
            Ok(Ok(_)) => "auth.lookup_query must take one parameter ($1, the user name) \
                          and return (name, secret)"
                .to_string(),
            Ok(Err(e)) => format!("auth.lookup_query: {}", db_error_text(&e)),
            Err(_) => format!(
                "preparing auth.lookup_query timed out after {:?}",
                req.connect_timeout
            ),
        };
        conn.shutdown(req.close_timeout, CloseReason::error).await;
        Err(problem)
    }

    /// Look `user` up.
    async fn run(&mut self, user: &str, timeout: Duration) -> Result<Found, LookupFailure> {
        self.last_used = Instant::now();
        let (Some(own), Some(statement)) = (self.own.as_ref(), self.statement.as_ref()) else {
            return Err(LookupFailure::Broken("connection closed".into()));
        };
        let client = &own.client;
        if client.is_closed() {
            return Err(LookupFailure::Broken("connection closed".into()));
        }
        let rows = match tokio::time::timeout(timeout, client.query(statement, &[&user])).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) if e.as_db_error().is_some() => {
                return Err(LookupFailure::Query(db_error_text(&e)))
            }
            Ok(Err(e)) => return Err(LookupFailure::Broken(e.to_string())),
            Err(_) => {
                return Err(LookupFailure::Broken(format!(
                    "no answer within {timeout:?}"
                )))
            }
        };
        let Some(row) = rows.first() else {
            return Ok(Found::NotFound);
        };
        if rows.len() > 1 {
            return Err(LookupFailure::Query(
                "auth.lookup_query returned more than one row for a user".into(),
            ));
        }
        let text: Option<String> = row
            .try_get(1)
            .map_err(|e| LookupFailure::Query(format!("auth.lookup_query's second column: {e}")))?;
        // A NULL secret (no password, or past VALID UNTIL with the default query) cannot log
        // in; neither can one Postgres would not accept.
        Ok(match text.as_deref().map(Secret::parse) {
            Some(Ok(secret)) => Found::Secret(secret),
            _ => Found::NotFound,
        })
    }

    /// The explicit shutdown: dropping the client makes the connection task send Terminate
    /// and close its stream; that task is awaited, bounded by `timeout`.
    async fn shutdown(mut self, timeout: Duration, reason: CloseReason) {
        let clean = match self.own.take() {
            Some(own) => end(own, timeout).await,
            None => false,
        };
        self.metrics.count_close(reason, clean);
        tracing::debug!(pool = %self.name, ?reason, clean, "auth lookup connection closed");
    }
}

/// The leak detector, as for pool connections: a lookup connection dropped without its
/// shutdown is counted and logged (its task is stopped, which closes the socket).
impl Drop for LookupConn {
    fn drop(&mut self) {
        if let Some(own) = self.own.take() {
            self.metrics.leaked.inc();
            tracing::warn!(pool = %self.name, "auth lookup connection dropped without shutdown");
            own.task.abort();
        }
    }
}

/// A server error's message and SQLSTATE (never a parameter value).
fn db_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}
