//! Throwaway PostgreSQL clusters for integration tests.
//!
//! A thin Rust wrapper around `scripts/pgcluster`, which does the real work
//! (initdb, free-port selection, start/stop, dropping privileges to the
//! `postgres` account when running as root, and a watchdog that stops the
//! cluster once the test process is gone).
//!
//! - [`PgCluster::shared`]: one cluster per test binary, started on first use.
//!   Statics are never dropped, so it is stopped (and its directory removed)
//!   by the watchdog when the test process exits, or explicitly via
//!   [`PgCluster::stop_shared`].
//! - [`PgCluster::start_dedicated`]: a private cluster for tests that stop,
//!   restart or crash Postgres; stopped and removed on `Drop`.
//!
//! Every cluster listens on `127.0.0.1` only, trusts every connection
//! (`--auth=trust`), has superuser `postgres`, and logs connections,
//! disconnections and `debug1` messages to [`PgCluster::log_path`].
//!
//! Set `TIDEPOOL_KEEP_PG=1` to keep cluster directories (and logs) after the
//! run for debugging; their paths are printed to stderr.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Host every harness cluster listens on.
pub const HOST: &str = "127.0.0.1";

/// Superuser created by initdb.
pub const SUPERUSER: &str = "postgres";

static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
static DB_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A throwaway PostgreSQL cluster (data directory + running postmaster).
pub struct PgCluster {
    /// Data directory (also holds the unix socket, `port`, `postgres.log`).
    dir: PathBuf,
    /// Owns the directory's lifetime; `None` when `TIDEPOOL_KEEP_PG` is set.
    _tmp: Option<tempfile::TempDir>,
    port: u16,
    /// Stop on Drop (dedicated clusters only).
    dedicated: bool,
    keep: bool,
}

/// The port `pgcluster start`/`standby` prints as its last line.
fn port_printed(stdout: &str) -> Option<u16> {
    stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse::<u16>().ok())
}

/// Path of `scripts/pgcluster` in this crate.
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join("pgcluster")
}

fn pgcluster() -> Command {
    // Run through bash so a lost executable bit does not matter.
    let mut cmd = Command::new("bash");
    cmd.arg(script_path());
    cmd.stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> Result<Output, String> {
    cmd.output()
        .map_err(|e| format!("failed to run {:?}: {e}", cmd))
}

fn keep_dirs() -> bool {
    std::env::var_os("TIDEPOOL_KEEP_PG").is_some_and(|v| !v.is_empty() && v != "0")
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn read_log_tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => tail_lines(&String::from_utf8_lossy(&bytes), n),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Quote `s` as an SQL string literal (standard_conforming_strings = on).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quote `s` as an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Is process `pid` alive (zombies count as dead: PID 1 here may not reap)?
fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            !matches!(state, Some(Some('Z' | 'X')))
        }
        Err(_) => false,
    }
}

impl PgCluster {
    /// The cluster shared by all tests of this test binary, started on first use.
    ///
    /// Tests sharing it must isolate themselves (e.g. [`PgCluster::create_db`],
    /// unique role names) and must not stop or crash it.
    pub fn shared() -> &'static PgCluster {
        let res = SHARED.get_or_init(|| Self::try_start(&[], false));
        match res {
            Ok(c) => c,
            Err(e) => panic!("shared PostgreSQL cluster failed to start:\n{e}"),
        }
    }

    /// Stop the shared cluster now, if it was started. Normally unnecessary:
    /// the watchdog stops it (and removes its directory) when the process exits.
    pub fn stop_shared() {
        if let Some(Ok(c)) = SHARED.get() {
            c.stop();
        }
    }

    /// Start a dedicated cluster (for tests that must stop/restart/crash
    /// Postgres). `extra_settings` are `name=value` server settings (a leading
    /// `-c ` is tolerated), persisted across [`stop`](Self::stop)/[`start`](Self::start).
    /// The cluster is stopped and its directory removed on Drop.
    pub fn start_dedicated(extra_settings: &[&str]) -> PgCluster {
        match Self::try_start(extra_settings, true) {
            Ok(c) => c,
            Err(e) => panic!("dedicated PostgreSQL cluster failed to start:\n{e}"),
        }
    }

    fn try_start(extra_settings: &[&str], dedicated: bool) -> Result<PgCluster, String> {
        let keep = keep_dirs();
        let tmp = tempfile::Builder::new()
            .prefix("tidepool-pg-")
            .tempdir()
            .map_err(|e| format!("cannot create temp dir: {e}"))?;
        let dir = tmp.path().to_path_buf();

        let mut cmd = pgcluster();
        cmd.arg("start").arg(&dir);
        cmd.arg("--watch-pid").arg(std::process::id().to_string());
        if !keep {
            cmd.arg("--rm-on-exit");
        }
        cmd.arg("--");
        for s in extra_settings {
            let s = s.trim();
            let s = s.strip_prefix("-c").map(str::trim_start).unwrap_or(s);
            cmd.arg("-c").arg(s);
        }
        let out = run(cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let port = port_printed(&stdout);
        let port = match (out.status.success(), port) {
            (true, Some(p)) => p,
            _ => {
                return Err(format!(
                    "`pgcluster start {}` failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- log tail ---\n{}",
                    dir.display(),
                    out.status,
                    read_log_tail(&dir.join("postgres.log"), 40),
                ));
            }
        };

        let _tmp = if keep {
            eprintln!(
                "tidepool test harness: keeping PostgreSQL cluster at {} (port {port})",
                dir.display()
            );
            let _ = tmp.keep();
            None
        } else {
            Some(tmp)
        };
        Ok(PgCluster {
            dir,
            _tmp,
            port,
            dedicated,
            keep,
        })
    }

    /// A streaming standby of this (running) cluster, on a port of its own, stopped and
    /// removed on Drop like a dedicated cluster. Promote it with `SELECT pg_promote()`.
    pub fn start_standby(&self) -> PgCluster {
        let keep = keep_dirs();
        let tmp = tempfile::Builder::new()
            .prefix("tidepool-pg-standby-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().join("data");
        let mut cmd = pgcluster();
        cmd.arg("standby").arg(&self.dir).arg(&dir);
        cmd.arg("--watch-pid").arg(std::process::id().to_string());
        if !keep {
            cmd.arg("--rm-on-exit");
        }
        let out = run(cmd).unwrap_or_else(|e| panic!("pgcluster standby: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let port = port_printed(&stdout);
        let port = match (out.status.success(), port) {
            (true, Some(p)) => p,
            _ => panic!(
                "pgcluster standby failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        };
        let _tmp = if keep {
            let _ = tmp.keep();
            None
        } else {
            Some(tmp)
        };
        PgCluster {
            dir,
            _tmp,
            port,
            dedicated: true,
            keep,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        HOST
    }

    /// Data directory (also holds the unix socket and `postgres.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// `host=127.0.0.1 port=N user=postgres dbname=DB` for tokio-postgres / libpq.
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host={HOST} port={} user={SUPERUSER} dbname={db} connect_timeout=10",
            self.port
        )
    }

    /// Connect as superuser `postgres` with tokio-postgres (NoTls); the
    /// connection task is spawned onto the current tokio runtime.
    pub async fn connect(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(db), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {} failed: {e}", self.conninfo(db)));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Run `sql` (any number of statements, fed to psql on stdin) as superuser
    /// `postgres` in database `db`. Returns stdout (`-At` format, trimmed) or
    /// an error message with psql's stderr.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = pgcluster();
        cmd.arg("psql")
            .arg(&self.dir)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-d",
                db,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("failed to run psql via {}: {e}", script_path().display()))?;
        {
            let mut stdin = child.stdin.take().expect("psql stdin");
            // psql may exit early (e.g. cannot connect); its stderr says why.
            let _ = stdin.write_all(sql.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for psql failed: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "psql (db {db}, port {}) failed ({}): {}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Like [`try_psql`](Self::try_psql) but panics (with psql's stderr and the SQL) on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        match self.try_psql(db, sql) {
            Ok(s) => s,
            Err(e) => panic!("{e}\n--- SQL ---\n{sql}"),
        }
    }

    /// `CREATE DATABASE` with a unique name derived from `prefix`; returns the name.
    pub fn create_db(&self, prefix: &str) -> String {
        let mut base: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        if base.is_empty() || base.starts_with(|c: char| c.is_ascii_digit()) {
            base.insert_str(0, "db_");
        }
        let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{base}_{n}_{}", std::process::id());
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(&name)),
        );
        name
    }

    /// Create a LOGIN role with `password`, or reset the password (and LOGIN) if
    /// it exists. Safe to call concurrently for the same name. The stored
    /// password format follows the server's `password_encryption` (scram-sha-256
    /// unless changed, e.g. via `start_dedicated(&["password_encryption=md5"])`).
    pub fn create_role(&self, name: &str, password: &str) {
        let (n, p) = (quote_literal(name), quote_literal(password));
        assert!(
            !name.contains("$tp$") && !password.contains("$tp$"),
            "role name/password must not contain $tp$"
        );
        let sql = format!(
            "DO $tp$\nBEGIN\n  EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', {n}, {p});\n\
             EXCEPTION WHEN duplicate_object OR unique_violation THEN\n  \
             EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', {n}, {p});\nEND\n$tp$;"
        );
        self.psql("postgres", &sql);
    }

    /// Replace `pg_hba.conf` with `contents` and reload the server config
    /// (e.g. to require md5/scram from the pooler instead of trust).
    pub fn set_hba(&self, contents: &str) {
        let path = self.dir.join("pg_hba.conf");
        fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        let ok = self.psql("postgres", "SELECT pg_reload_conf()");
        assert_eq!(ok, "t", "pg_reload_conf failed");
    }

    /// Current size of the server log in bytes (record before an action, then
    /// read what the action logged with [`log_since`](Self::log_since)).
    pub fn log_len(&self) -> u64 {
        fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0)
    }

    /// Server log written since byte `offset` (lossy UTF-8).
    pub fn log_since(&self, offset: u64) -> String {
        let path = self.log_path();
        let mut f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(_) => return String::new(),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(offset.min(len))).is_err() {
            return String::new();
        }
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Poll the log (written since `offset`) until it contains `needle` or
    /// `timeout` passes. Returns whether it was found. The server writes log
    /// lines asynchronously to the client, so use this instead of a single read.
    pub fn wait_for_log(&self, offset: u64, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_since(offset).contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Last `n` lines of the server log (for assertion messages).
    pub fn log_tail(&self, n: usize) -> String {
        read_log_tail(&self.log_path(), n)
    }

    /// Whether the postmaster is alive.
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some_and(pid_alive)
    }

    /// PID of the postmaster from `postmaster.pid`, if the file exists.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Stop the cluster (fast shutdown, falling back to immediate/SIGKILL).
    /// A no-op if it is already stopped.
    pub fn stop(&self) {
        let mut cmd = pgcluster();
        cmd.arg("stop").arg(&self.dir);
        match run(cmd) {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "pgcluster stop {} failed ({}): {}\n--- log tail ---\n{}",
                self.dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(30)
            ),
            Err(e) => panic!("{e}"),
        }
    }

    /// (Re)start the cluster on the same directory and port, e.g. after
    /// [`stop`](Self::stop) or [`kill9`](Self::kill9) (crash recovery runs as needed).
    /// A no-op if it is running.
    pub fn start(&self) {
        let mut cmd = pgcluster();
        cmd.arg("start")
            .arg(&self.dir)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--watch-pid")
            .arg(std::process::id().to_string());
        if !self.keep {
            cmd.arg("--rm-on-exit");
        }
        match run(cmd) {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "pgcluster start {} --port {} failed ({}): {}\n--- log tail ---\n{}",
                self.dir.display(),
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(40)
            ),
            Err(e) => panic!("{e}"),
        }
    }

    /// SIGKILL the postmaster (simulated crash) and wait until it is dead.
    /// Its backends notice and exit on their own within moments, dropping
    /// their client connections. Use [`start`](Self::start) to bring it back.
    ///
    /// The harness runs with `synchronous_commit=off`, so recently committed
    /// transactions may be lost; start the cluster with
    /// `"synchronous_commit=on"` if a test needs them to survive the crash.
    pub fn kill9(&self) {
        let pid = self
            .postmaster_pid()
            .unwrap_or_else(|| panic!("kill9: no postmaster.pid in {}", self.dir.display()));
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill9: cannot run kill: {e}"));
        assert!(
            status.success() || !pid_alive(pid),
            "kill -KILL {pid} failed: {status}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_alive(pid) {
            assert!(
                Instant::now() < deadline,
                "postmaster {pid} survived SIGKILL for 10s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.dedicated {
            return;
        }
        let mut cmd = pgcluster();
        cmd.arg("stop").arg(&self.dir);
        match run(cmd) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: pgcluster stop {} failed ({}): {}",
                self.dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: {e}"),
        }
        // `_tmp` (if any) removes the directory after this.
    }
}
