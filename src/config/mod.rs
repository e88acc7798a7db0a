//! Configuration: the TOML file of DESIGN.md section 3, its defaults, `${ENV}` expansion,
//! validation, and the no-file `--upstream` form.
//!
//! Errors name the file, the key and what is wrong, because the process exits 64 on them and an
//! operator must be able to fix the file from the message alone.

mod auth;
mod budget;
mod database;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::auth::{AuthConfig, AuthMethod, UserConfig, DEFAULT_LOOKUP_QUERY};
pub use self::budget::BudgetConfig;
pub use self::database::{DatabaseConfig, Ports, TargetSessionAttrs};

/// A configuration error, already worded for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: ListenConfig,
    pub admin: AdminConfig,
    pub drain: DrainConfig,
    pub auth: AuthConfig,
    pub pool: PoolDefaults,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    /// Key: the database name clients ask for; `"*"` is the fallback.
    pub databases: BTreeMap<String, DatabaseConfig>,
    /// `[budget]`: a server-connection budget shared with other instances (section 12).
    pub budget: Option<BudgetConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    pub addr: SocketAddr,
    pub max_clients: usize,
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// Largest message a client may send (bytes). Postgres itself allows up to 1 GiB.
    pub max_message_size: usize,
    /// TLS towards clients.
    pub tls: Option<ListenTls>,
    /// Also listen on the Unix socket `DIR/.s.PGSQL.<port of addr>` (libpq's naming); empty:
    /// no Unix socket.
    pub unix_socket_dir: String,
    /// Permissions of that socket file, in octal.
    pub unix_socket_mode: String,
    /// `TCP_DEFER_ACCEPT` on the TCP listener (PgBouncer's `tcp_defer_accept`): a connection
    /// is accepted only once its client's first bytes have arrived. Off by default (less CPU
    /// per login, a slower login: bench/RESULTS.md). Linux only; a restart applies it.
    pub tcp_defer_accept: bool,
}

impl ListenConfig {
    /// The Unix socket's path, for the TCP listener's `port`, if one is configured.
    pub fn unix_socket_path(&self, port: u16) -> Option<PathBuf> {
        (!self.unix_socket_dir.is_empty())
            .then(|| Path::new(&self.unix_socket_dir).join(format!(".s.PGSQL.{port}")))
    }

    /// `unix_socket_mode` as permission bits.
    pub fn unix_socket_mode_bits(&self) -> Result<u32, String> {
        u32::from_str_radix(self.unix_socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                format!(
                    "\"{}\" is not a file mode: octal digits expected, e.g. \"0770\"",
                    self.unix_socket_mode
                )
            })
    }
}

/// `listen.tls`: certificate, key and how clients must use them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub mode: crate::tls::ListenTlsMode,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            addr: "127.0.0.1:6432".parse().expect("literal address"),
            max_clients: 10_000,
            login_timeout: Duration::from_secs(10),
            max_message_size: 64 * 1024 * 1024,
            tls: None,
            unix_socket_dir: String::new(),
            unix_socket_mode: "0770".to_string(),
            tcp_defer_accept: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// Users who may run every command of the console (DESIGN.md section 10).
    pub console_users: Vec<String>,
    /// Users who may run the console's SHOW commands only.
    pub stats_users: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            addr: "127.0.0.1:9930".parse().expect("literal address"),
            console_users: Vec::new(),
            stats_users: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub accept_for: Duration,
    #[serde(with = "humantime_serde")]
    pub server_close_timeout: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            timeout: Duration::from_secs(25),
            accept_for: Duration::ZERO,
            server_close_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Session,
    Transaction,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// `[pool]`: defaults for every database.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolDefaults {
    pub mode: PoolMode,
    pub size: usize,
    pub min_idle: usize,
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub reset_query: String,
    /// Clients allowed to wait for a server per pool; beyond it a client gets an error at once.
    pub max_waiting: usize,
    /// Transaction mode: named statements kept prepared per server connection (LRU beyond).
    pub max_prepared_statements: usize,
    /// Transaction mode: state that cannot follow a client to another server (DESIGN.md
    /// section 8) pins the client to its server, or is refused.
    pub session_state: SessionStatePolicy,
    /// A client idle inside a transaction longer is ended (0 = off; DESIGN.md section 9).
    #[serde(with = "humantime_serde")]
    pub idle_transaction_timeout: Duration,
    /// A request running longer is cancelled (0 = off).
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// A client idle outside a transaction longer is ended (0 = off).
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// An idle server connection unused longer is checked with a round trip before it is lent.
    #[serde(with = "humantime_serde")]
    pub server_check_delay: Duration,
    /// After a failed connect, wait this long before the next try.
    #[serde(with = "humantime_serde")]
    pub server_login_retry: Duration,
}

/// `pool.session_state`: what transaction mode does with a temporary table, SQL `PREPARE`,
/// `LISTEN`, a session advisory lock or a `WITH HOLD` cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatePolicy {
    /// The client keeps its server until the state is gone or it leaves.
    #[default]
    Pin,
    /// The statement fails with SQLSTATE 0A000 before it runs.
    Reject,
}

impl Default for PoolDefaults {
    fn default() -> Self {
        PoolDefaults {
            mode: PoolMode::Transaction,
            size: 20,
            min_idle: 0,
            checkout_timeout: Duration::from_secs(5),
            server_lifetime: Duration::from_secs(3600),
            server_idle_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(5),
            reset_query: "DISCARD ALL".to_string(),
            max_waiting: 10_000,
            max_prepared_statements: 200,
            session_state: SessionStatePolicy::Pin,
            idle_transaction_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            client_idle_timeout: Duration::ZERO,
            server_check_delay: Duration::from_secs(30),
            server_login_retry: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// `[runtime]`: the threads tidepool runs on. Read once at start; a reload keeps the old value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads. 1 (the default): one thread runs every client, the admin endpoint and
    /// the drain, as PgBouncer's single event loop does. Next to an application or a database
    /// that costs the least CPU per transaction (bench/RESULTS.md, "Worker threads") and still
    /// carries tens of thousands of transactions per second. 0: one per CPU this process may
    /// use (`available_parallelism`, which honours a cgroup CPU quota), for a pooler with cores
    /// of its own and more load than one core carries.
    pub workers: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { workers: 1 }
    }
}

/// More worker threads than this is a typo, not a tuning.
pub const MAX_WORKERS: usize = 1024;

impl RuntimeConfig {
    /// The number of worker threads to start: `workers`, or when it is 0 the CPUs available.
    pub fn resolved_workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// The effective settings of one pool: `[pool]` with the database's overrides applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub size: usize,
    pub min_idle: usize,
    pub checkout_timeout: Duration,
    pub server_lifetime: Duration,
    pub server_idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub reset_query: String,
    pub max_waiting: usize,
    pub max_prepared_statements: usize,
    pub session_state: SessionStatePolicy,
    /// Zero: off.
    pub idle_transaction_timeout: Duration,
    /// Zero: off.
    pub query_timeout: Duration,
    /// Zero: off.
    pub client_idle_timeout: Duration,
    pub server_check_delay: Duration,
    pub server_login_retry: Duration,
}

impl PoolSettings {
    /// Any of the client-side timeouts is on.
    pub fn has_timeouts(&self) -> bool {
        !(self.idle_transaction_timeout.is_zero()
            && self.query_timeout.is_zero()
            && self.client_idle_timeout.is_zero())
    }
}

impl Config {
    /// The keys a reload cannot apply (a restart does): the reload warns when one of them
    /// changes, and the console's SHOW CONFIG lists them as not changeable.
    pub const RESTART_ONLY: [&'static str; 4] = [
        "listen.addr",
        "admin.addr",
        "runtime.workers",
        "listen.tcp_defer_accept",
    ];

    /// The [`RESTART_ONLY`](Self::RESTART_ONLY) keys whose values differ in `new`.
    pub fn restart_only_changes(&self, new: &Config) -> impl Iterator<Item = &'static str> {
        let changed = [
            self.listen.addr != new.listen.addr,
            self.admin.addr != new.admin.addr,
            self.runtime != new.runtime,
            self.listen.tcp_defer_accept != new.listen.tcp_defer_accept,
        ];
        Self::RESTART_ONLY
            .into_iter()
            .zip(changed)
            .filter_map(|(key, changed)| changed.then_some(key))
    }

    /// Read, expand and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        // Relative file names in the config are relative to the config file.
        if let Some(dir) = path.parent() {
            let fix = |p: &mut PathBuf| {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            };
            if let Some(t) = config.listen.tls.as_mut() {
                fix(&mut t.cert);
                fix(&mut t.key);
            }
            for d in config.databases.values_mut() {
                if let Some(r) = d.sslrootcert.as_mut() {
                    fix(r);
                }
            }
        }
        Ok(config)
    }

    /// Parse config text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError(format!("{origin}: {}", e.to_string().trim_end()))
        })?;
        expand_env_table(&mut value, "").map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        let de = toml::Value::Table(value);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ConfigError(format!("{origin}: key `{path}`: {}", inner.message()))
        })?;
        config
            .validate()
            .map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        Ok(config)
    }

    /// The config of `tidepool --upstream postgres://USER:PASS@HOST:PORT/DB`: one pool in front of
    /// one database; clients log in as USER with PASS (SCRAM-SHA-256).
    pub fn from_upstream(url: &str) -> Result<Config, ConfigError> {
        let bad = |what: &str| {
            ConfigError(format!(
                "--upstream: {what} (expected postgres://USER:PASS@HOST:PORT/DB)"
            ))
        };
        let u = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if u.scheme() != "postgres" && u.scheme() != "postgresql" {
            return Err(bad("scheme must be postgres://"));
        }
        let user = percent_decode(u.username());
        if user.is_empty() {
            return Err(bad("missing USER"));
        }
        let password = percent_decode(u.password().unwrap_or(""));
        let host = match u.host() {
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(h) => h.to_string(),
            None => return Err(bad("missing HOST")),
        };
        let port = u.port().unwrap_or(5432);
        let db = percent_decode(u.path().trim_start_matches('/'));
        if db.is_empty() {
            return Err(bad("missing /DB"));
        }
        let mut config = Config::default();
        config.auth.users.push(UserConfig {
            name: user.clone(),
            password: password.clone(),
        });
        config.databases.insert(
            db.clone(),
            DatabaseConfig {
                host,
                port: Ports(vec![port]),
                dbname: Some(db),
                user: Some(user),
                password: Some(password),
                size: None,
                mode: None,
                min_idle: None,
                checkout_timeout: None,
                server_lifetime: None,
                server_idle_timeout: None,
                connect_timeout: None,
                reset_query: None,
                session_state: None,
                idle_transaction_timeout: None,
                query_timeout: None,
                client_idle_timeout: None,
                server_check_delay: None,
                server_login_retry: None,
                target_session_attrs: TargetSessionAttrs::Any,
                sslmode: Default::default(),
                sslrootcert: None,
            },
        );
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, what: &str| Err(ConfigError(format!("key `{key}`: {what}")));
        if self.listen.max_clients == 0 {
            return err("listen.max_clients", "must be at least 1");
        }
        if self.listen.login_timeout.is_zero() {
            return err("listen.login_timeout", "must be greater than 0");
        }
        if self.pool.max_prepared_statements == 0 {
            return err("pool.max_prepared_statements", "must be at least 1");
        }
        if let Err(e) = self.listen.unix_socket_mode_bits() {
            return err("listen.unix_socket_mode", &e);
        }
        if self.listen.max_message_size < 1024 {
            return err("listen.max_message_size", "must be at least 1024 bytes");
        }
        if self.drain.server_close_timeout.is_zero() {
            return err("drain.server_close_timeout", "must be greater than 0");
        }
        if self.runtime.workers > MAX_WORKERS {
            return err(
                "runtime.workers",
                &format!("must be at most {MAX_WORKERS} (0: one per available CPU; default 1)"),
            );
        }
        if self.databases.is_empty() {
            return err("databases", "at least one database must be configured");
        }
        self.auth.validate(|db| self.database_entry(db).is_some())?;
        for (name, d) in &self.databases {
            if let Err(e) = d.hosts() {
                return err(&format!("databases.{name}.port"), &e);
            }
            if matches!(
                d.sslmode,
                crate::tls::SslMode::VerifyCa | crate::tls::SslMode::VerifyFull
            ) && d.sslrootcert.is_none()
            {
                return err(
                    &format!("databases.{name}.sslrootcert"),
                    "required with sslmode verify-ca or verify-full",
                );
            }
        }
        if let Some(b) = &self.budget {
            b.validate(self)?;
        }
        for name in self.databases.keys() {
            let s = self.pool_settings(name);
            let key = |k: &str| format!("databases.{name}.{k}");
            if s.size == 0 {
                return err(&key("size"), "must be at least 1");
            }
            if s.min_idle > s.size {
                return err(&key("min_idle"), "must not exceed size");
            }
            if s.checkout_timeout.is_zero() {
                return err(&key("checkout_timeout"), "must be greater than 0");
            }
            if s.connect_timeout.is_zero() {
                return err(&key("connect_timeout"), "must be greater than 0");
            }
            if s.server_lifetime.is_zero() {
                return err(&key("server_lifetime"), "must be greater than 0");
            }
            if s.server_idle_timeout.is_zero() {
                return err(&key("server_idle_timeout"), "must be greater than 0");
            }
        }
        Ok(())
    }

    /// The effective pool settings for the database entry `name` (a key of `databases`).
    pub fn pool_settings(&self, name: &str) -> PoolSettings {
        let p = &self.pool;
        let d = self.databases.get(name);
        let pick = |f: fn(&DatabaseConfig) -> Option<Duration>, default: Duration| {
            d.and_then(f).unwrap_or(default)
        };
        PoolSettings {
            mode: d.and_then(|d| d.mode).unwrap_or(p.mode),
            size: d.and_then(|d| d.size).unwrap_or(p.size),
            min_idle: d.and_then(|d| d.min_idle).unwrap_or(p.min_idle),
            checkout_timeout: d
                .and_then(|d| d.checkout_timeout)
                .unwrap_or(p.checkout_timeout),
            server_lifetime: d
                .and_then(|d| d.server_lifetime)
                .unwrap_or(p.server_lifetime),
            server_idle_timeout: d
                .and_then(|d| d.server_idle_timeout)
                .unwrap_or(p.server_idle_timeout),
            connect_timeout: d
                .and_then(|d| d.connect_timeout)
                .unwrap_or(p.connect_timeout),
            reset_query: d
                .and_then(|d| d.reset_query.clone())
                .unwrap_or_else(|| p.reset_query.clone()),
            max_waiting: p.max_waiting,
            max_prepared_statements: p.max_prepared_statements,
            session_state: d.and_then(|d| d.session_state).unwrap_or(p.session_state),
            idle_transaction_timeout: pick(
                |d| d.idle_transaction_timeout,
                p.idle_transaction_timeout,
            ),
            query_timeout: pick(|d| d.query_timeout, p.query_timeout),
            client_idle_timeout: pick(|d| d.client_idle_timeout, p.client_idle_timeout),
            server_check_delay: pick(|d| d.server_check_delay, p.server_check_delay),
            server_login_retry: pick(|d| d.server_login_retry, p.server_login_retry),
        }
    }

    /// The entry serving database `name`: the listed one, else the `"*"` fallback.
    pub fn database_entry(&self, name: &str) -> Option<(&str, &DatabaseConfig)> {
        if let Some((k, v)) = self.databases.get_key_value(name) {
            if k != "*" {
                return Some((k.as_str(), v));
            }
        }
        self.databases
            .get_key_value("*")
            .map(|(k, v)| (k.as_str(), v))
    }

    /// The effective settings as TOML with secrets left out (for `tidepool check`).
    pub fn effective_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Where the config comes from, for reloads.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    Upstream(String),
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replace `${NAME}` in every string value with the environment variable's value.
fn expand_env_table(t: &mut toml::Table, prefix: &str) -> Result<(), String> {
    for (k, v) in t.iter_mut() {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        expand_env_value(v, &path)?;
    }
    Ok(())
}

fn expand_env_value(v: &mut toml::Value, path: &str) -> Result<(), String> {
    match v {
        toml::Value::String(s) if s.contains("${") => {
            *s = expand_env_str(s).map_err(|e| format!("key `{path}`: {e}"))?;
        }
        toml::Value::Table(t) => expand_env_table(t, path)?,
        toml::Value::Array(a) => {
            for (i, item) in a.iter_mut().enumerate() {
                expand_env_value(item, &format!("{path}[{i}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_env_str(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${` in value".to_string())?;
        let name = &after[..end];
        if name.is_empty() {
            return Err("empty variable name in `${}`".to_string());
        }
        let val =
            std::env::var(name).map_err(|_| format!("environment variable `{name}` is not set"))?;
        out.push_str(&val);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[auth]
method = "trust"
[databases.app]
port = 5433
"#;

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.listen.addr.to_string(), "127.0.0.1:6432");
        assert_eq!(c.drain.timeout, Duration::from_secs(25));
        let s = c.pool_settings("app");
        assert_eq!(s.mode, PoolMode::Transaction);
        assert_eq!(s.size, 20);
        assert_eq!(s.reset_query, "DISCARD ALL");
        assert_eq!(c.databases["app"].port, Ports(vec![5433]));
    }

    #[test]
    fn restart_only_changes_name_each_key() {
        let old = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(old.restart_only_changes(&old.clone()).count(), 0);
        let edits: [fn(&mut Config); 4] = [
            |c| c.listen.addr = "127.0.0.1:7000".parse().unwrap(),
            |c| c.admin.addr = "127.0.0.1:7001".parse().unwrap(),
            |c| c.runtime.workers = 3,
            |c| c.listen.tcp_defer_accept = true,
        ];
        for (edit, key) in edits.into_iter().zip(Config::RESTART_ONLY) {
            let mut new = old.clone();
            edit(&mut new);
            assert_eq!(old.restart_only_changes(&new).collect::<Vec<_>>(), [key]);
        }
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let text = format!("{MINIMAL}\n[pool]\nsizee = 3\n");
        let e = Config::parse(&text, "t.toml").unwrap_err().0;
        assert!(e.contains("t.toml"), "{e}");
        assert!(e.contains("pool"), "{e}");
        assert!(e.contains("sizee"), "{e}");
    }

    #[test]
    fn bad_duration_is_reported_with_key() {
        let text = format!("{MINIMAL}\n[drain]\ntimeout = \"soon\"\n");
        let e = Config::parse(&text, "t.toml").unwrap_err().0;
        assert!(e.contains("drain.timeout"), "{e}");
    }

    #[test]
    fn env_expansion_and_missing_var() {
        std::env::set_var("TIDEPOOL_TEST_PW", "s3cret");
        let text = "[auth]\n[[auth.users]]\nname = \"app\"\npassword = \"${TIDEPOOL_TEST_PW}\"\n[databases.app]\n";
        let c = Config::parse(text, "t.toml").unwrap();
        assert_eq!(c.auth.users[0].password, "s3cret");
        let text = text.replace("TIDEPOOL_TEST_PW", "TIDEPOOL_TEST_UNSET_VAR");
        let e = Config::parse(&text, "t.toml").unwrap_err().0;
        assert!(e.contains("TIDEPOOL_TEST_UNSET_VAR"), "{e}");
        assert!(e.contains("auth.users[0].password"), "{e}");
    }

    #[test]
    fn overrides_and_fallback() {
        let text = r#"
[auth]
method = "trust"
[pool]
size = 7
[databases.app]
size = 3
mode = "session"
[databases."*"]
host = "127.0.0.1"
"#;
        let c = Config::parse(text, "t.toml").unwrap();
        assert_eq!(c.pool_settings("app").size, 3);
        assert_eq!(c.pool_settings("app").mode, PoolMode::Session);
        assert_eq!(c.pool_settings("*").size, 7);
        assert_eq!(c.database_entry("app").unwrap().0, "app");
        assert_eq!(c.database_entry("other").unwrap().0, "*");
    }

    #[test]
    fn validation_errors() {
        let e = Config::parse("[auth]\nmethod = \"trust\"\n", "t.toml")
            .unwrap_err()
            .0;
        assert!(e.contains("databases"), "{e}");
        let e = Config::parse("[databases.app]\n", "t.toml").unwrap_err().0;
        assert!(e.contains("auth.users"), "{e}");
        let text = format!("{MINIMAL}\n[pool]\nsize = 0\n");
        let e = Config::parse(&text, "t.toml").unwrap_err().0;
        assert!(e.contains("databases.app.size"), "{e}");
    }

    #[test]
    fn upstream_url() {
        let c = Config::from_upstream("postgres://app:p%40ss@127.0.0.1:5433/appdb").unwrap();
        assert_eq!(c.auth.users[0].name, "app");
        assert_eq!(c.auth.users[0].password, "p@ss");
        assert_eq!(c.auth.method, AuthMethod::ScramSha256);
        let d = &c.databases["appdb"];
        assert_eq!(d.port, Ports(vec![5433]));
        assert_eq!(d.password.as_deref(), Some("p@ss"));
        assert!(Config::from_upstream("mysql://a@b/c").is_err());
        assert!(Config::from_upstream("postgres://127.0.0.1/db").is_err());
    }

    #[test]
    fn runtime_workers_default_to_one_and_are_bounded() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.runtime.workers, 1);
        assert_eq!(c.runtime.resolved_workers(), 1);
        let c = Config::parse(&format!("{MINIMAL}[runtime]\nworkers = 0\n"), "t.toml").unwrap();
        assert_eq!(
            c.runtime.resolved_workers(),
            std::thread::available_parallelism().unwrap().get()
        );
        assert!(c.effective_toml().contains("workers = 0"));
        let e = Config::parse(&format!("{MINIMAL}[runtime]\nworkers = 5000\n"), "t.toml")
            .unwrap_err()
            .0;
        assert!(e.contains("t.toml") && e.contains("runtime.workers"), "{e}");
        let e = Config::parse(&format!("{MINIMAL}[runtime]\nthreads = 2\n"), "t.toml")
            .unwrap_err()
            .0;
        assert!(e.contains("threads"), "{e}");
    }

    #[test]
    fn effective_toml_has_no_secrets() {
        let c = Config::from_upstream("postgres://app:hunter2@127.0.0.1:5433/appdb").unwrap();
        let t = c.effective_toml();
        assert!(!t.contains("hunter2"), "{t}");
        assert!(t.contains("appdb"), "{t}");
    }
}
