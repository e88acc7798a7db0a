//! tidepool under test: in-process servers (for tests that read metrics or use test hooks)
//! and the real binary (for signals and exit codes).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use tidepool::config::Config;
use tidepool::server::Server;
use tidepool::shutdown::{DrainKind, DrainReport};
use tidepool::state::Shared;

use super::pg::PgCluster;

static LOG: Once = Once::new();

/// Log to the test's output (shown for failing tests); RUST_LOG filters, default `warn`.
pub fn init_logging() {
    LOG.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A config for one database `db` on `pg`, with `[pool]` lines from `pool` (TOML) and any
/// extra TOML appended.
pub fn config_text(pg: &PgCluster, db: &str, pool: &str, extra: &str) -> String {
    format!(
        r#"
[listen]
addr = "127.0.0.1:0"
[admin]
addr = "127.0.0.1:0"
[auth]
method = "trust"
[drain]
timeout = "10s"
server_close_timeout = "2s"
[pool]
{pool}
[databases.{db}]
host = "127.0.0.1"
port = {port}
{extra}
"#,
        port = pg.port()
    )
}

/// An in-process tidepool.
pub struct Tidepool {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    handle: Option<tokio::task::JoinHandle<DrainReport>>,
}

impl Tidepool {
    pub async fn start(config: &str) -> Tidepool {
        Self::start_with(config, false).await
    }

    pub async fn start_with(config: &str, admin: bool) -> Tidepool {
        init_logging();
        let config = Config::parse(config, "test.toml").expect("test config parses");
        let server = Server::bind(config, None, admin)
            .await
            .expect("tidepool binds");
        let addr = server.local_addr();
        let admin = server.admin_addr();
        let shared = server.shared.clone();
        let handle = tokio::spawn(server.run());
        // Wait until running.
        let t0 = Instant::now();
        while shared.shutdown.phase() != tidepool::shutdown::Phase::Running {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "tidepool did not start"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Tidepool {
            addr,
            admin,
            shared,
            handle: Some(handle),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn conninfo(&self, db: &str, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={db} connect_timeout=10",
            self.port()
        )
    }

    pub async fn try_connect(
        &self,
        db: &str,
        user: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.try_connect_str(&self.conninfo(db, user)).await
    }

    pub async fn try_connect_str(
        &self,
        conninfo: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    pub async fn connect(&self, db: &str) -> tokio_postgres::Client {
        self.try_connect(db, "postgres")
            .await
            .unwrap_or_else(|e| panic!("connect through tidepool failed: {e}"))
    }

    pub fn leaked(&self) -> u64 {
        self.shared.metrics.leaked_total()
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.shared.metrics.total(name)
    }

    /// Sum of the samples of `name` whose labels include every `(key, value)` in `labels`.
    pub fn metric_with(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.shared.metrics.encode();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let Some(rest) = l.strip_prefix(name) else {
                    return false;
                };
                (rest.starts_with('{') || rest.starts_with(' '))
                    && labels
                        .iter()
                        .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `tidepool_server_connections{pool, state}` (a gauge: negative if miscounted).
    pub fn server_gauge(&self, pool: &str, state: &str) -> i64 {
        self.metric_with(
            "tidepool_server_connections",
            &[("pool", pool), ("state", state)],
        ) as i64
    }

    /// Wait until no server connection of `pool` (label `database/user`) is checked out or
    /// being recovered/closed.
    pub async fn settle(&self, pool: &str) {
        let ok = eventually(Duration::from_secs(8), || {
            self.server_gauge(pool, "active") == 0 && self.server_gauge(pool, "closing") == 0
        })
        .await;
        assert!(
            ok,
            "pool {pool} did not settle: active={} closing={} idle={}",
            self.server_gauge(pool, "active"),
            self.server_gauge(pool, "closing"),
            self.server_gauge(pool, "idle")
        );
    }

    /// Graceful drain, then the report. Asserts that it finished.
    pub async fn stop(mut self) -> DrainReport {
        self.shared.shutdown.begin(DrainKind::Graceful);
        let h = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("drain finishes")
            .expect("server task")
    }
}

impl Drop for Tidepool {
    fn drop(&mut self) {
        if self.handle.is_some() {
            // A test that panicked: stop anyway so the runtime can end.
            self.shared.shutdown.begin(DrainKind::Forced);
        }
    }
}

/// Path of the built binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tidepool"))
}

/// A tidepool process (the real binary), killed on drop if still running.
pub struct TidepoolProcess {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// A free loopback port (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl TidepoolProcess {
    /// Start the binary with `config` (whose listen/admin addrs are replaced by free ports).
    pub fn start(config: &str) -> TidepoolProcess {
        Self::start_logging(
            config,
            &std::env::var("TIDEPOOL_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
    }

    /// [`start`](Self::start) with `rust_log` as its log filter (e.g. `"trace"`).
    ///
    /// A port from [`free_port`] is only free when it is picked: another socket (a client's
    /// ephemeral port, in a test with many connections) can take it before tidepool binds it.
    /// Then tidepool exits with "Address already in use", and this starts it again on other
    /// ports (a few times).
    pub fn start_logging(config: &str, rust_log: &str) -> TidepoolProcess {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut p = Self::spawn(config, rust_log);
            match p.wait_ready(Duration::from_secs(10)) {
                Ok(()) => return p,
                Err(log) if attempt < 5 && log.contains("Address already in use") => {
                    eprintln!("tidepool's port was taken before it could bind it; again on others");
                }
                Err(log) => panic!("tidepool did not start; log:\n{log}"),
            }
        }
    }

    fn spawn(config: &str, rust_log: &str) -> TidepoolProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let admin_port = free_port();
        let cfg_path = dir.path().join("tidepool.toml");
        std::fs::write(&cfg_path, with_ports(config, port, admin_port)).expect("write config");
        let log_path = dir.path().join("tidepool.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(binary())
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tidepool");
        TidepoolProcess {
            child,
            port,
            admin_port,
            log_path,
            config_path: cfg_path,
            _dir: dir,
        }
    }

    /// Until tidepool accepts on its port: Err(its log) if it exits first or takes longer
    /// than `timeout`. (A connect is checked against the process still running, in case
    /// another listener holds the port.)
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                std::thread::sleep(Duration::from_millis(50));
                if matches!(self.child.try_wait(), Ok(None)) {
                    return Ok(());
                }
            }
            if !matches!(self.child.try_wait(), Ok(None)) || t0.elapsed() >= timeout {
                return Err(self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replace the config file (same port substitution as at start), e.g. before SIGHUP.
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(
            &self.config_path,
            with_ports(config, self.port, self.admin_port),
        )
        .expect("rewrite config");
    }

    /// GET a path on the admin endpoint: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_port, path)
    }

    /// The JSON of the "drain report" log line.
    pub fn drain_report(&self) -> Option<serde_json::Value> {
        let log = self.log();
        let line = log.lines().rev().find(|l| l.contains("drain report"))?;
        let start = line.find("report=")? + "report=".len();
        let json = line[start..].split_whitespace().next()?;
        serde_json::from_str(json).ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait for exit; returns the exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=10",
            self.port
        )
    }
}

impl Drop for TidepoolProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn with_ports(config: &str, port: u16, admin_port: u16) -> String {
    config
        .replacen(
            "addr = \"127.0.0.1:0\"",
            &format!("addr = \"127.0.0.1:{port}\""),
            1,
        )
        .replacen(
            "addr = \"127.0.0.1:0\"",
            &format!("addr = \"127.0.0.1:{admin_port}\""),
            1,
        )
}

/// A plain HTTP/1.0 GET on 127.0.0.1:port: (status code, body); (0, error) if it failed.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, "connect failed".into());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, "write failed".into());
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// Lines in a Postgres log that mean a client connection was dropped abruptly.
pub fn abrupt_disconnects(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("unexpected EOF on client connection")
                || l.contains("could not receive data from client")
        })
        .collect()
}

/// Assert that the Postgres log since `offset` shows no abrupt client disconnect (after a
/// moment: disconnection lines can land just after the client side is done).
pub fn assert_no_abrupt_disconnects_since(pg: &PgCluster, offset: u64) {
    std::thread::sleep(Duration::from_millis(300));
    let log = pg.log_since(offset);
    let abrupt = abrupt_disconnects(&log);
    assert!(
        abrupt.is_empty(),
        "abrupt disconnects in the Postgres log:\n{}",
        abrupt.join("\n")
    );
}

/// The value of the first sample of `name` in a text exposition whose labels include every
/// `(key, value)` in `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(name)
                && l[name.len()..].starts_with(['{', ' '])
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Run pgbench against `port`; returns (success, stdout+stderr).
pub fn pgbench(port: u16, db: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg(db)
        .env_remove("PGPASSWORD")
        .output()
        .expect("run pgbench");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Start pgbench against `port` in the background (stdout and stderr captured).
pub fn spawn_pgbench(port: u16, db: &str, args: &[&str]) -> Child {
    Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg(db)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgbench")
}

/// Wait for a pgbench from `spawn_pgbench`: (success, stdout+stderr).
pub fn pgbench_output(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("pgbench output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// pgbench's "number of failed transactions: N" (PostgreSQL 15+).
pub fn pgbench_failed(output: &str) -> Option<u64> {
    output
        .lines()
        .find(|l| l.starts_with("number of failed transactions:"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// pgbench's processed count "number of transactions actually processed: N/M".
pub fn pgbench_processed(output: &str) -> Option<u64> {
    output
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed:"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().split('/').next())
        .and_then(|v| v.trim().parse().ok())
}

/// One test at a time within a test binary (each binary has its own copy of this static):
/// tests that share the cluster's log, two CPU cores and timing assertions take it first.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Bound a whole test body.
pub async fn bounded<T>(secs: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs}s"),
    }
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait (blocking, up to 5 s) until a statement starting with `prefix` runs in `db`.
pub fn wait_query_active(pg: &PgCluster, db: &str, prefix: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = {} AND state = 'active' \
         AND query LIKE {}",
        super::pg::quote_literal(db),
        super::pg::quote_literal(&format!("{prefix}%"))
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while pg.psql("postgres", &sql) == "0" {
        assert!(
            Instant::now() < deadline,
            "`{prefix}` never started running in {db}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `sql` with psql through `port` as `user` with `password` (libpq answers whatever
/// authentication is asked for); Ok(output) or Err(psql's error text).
pub fn psql_as(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
    sql: &str,
) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            db,
        ])
        .args(["-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}
