//! Real drivers through transaction mode: psycopg 3 with `prepare_threshold=0` and asyncpg with
//! its statement cache run workloads of named prepared statements through tidepool (pool size
//! 2, four client connections, so their transactions move between servers) and check every
//! result; psycopg 2, psycopg 3 and asyncpg check that session settings stay with their
//! connection (pool size 1). Each test ends with no leaked server connection.
//!
//! The drivers come from PyPI into a virtualenv at `$CARGO_TARGET_DIR/test-venv` (default
//! `target/test-venv`), created once and reused while both packages import. The workloads are
//! `tests/drivers/*.py`; each runs standalone too:
//! `target/test-venv/bin/python tests/drivers/psycopg_workload.py 127.0.0.1 PORT DB`.
//!
//! Environment: `TIDEPOOL_TEST_VENV` puts the venv elsewhere; `TIDEPOOL_TEST_PYTHON` picks the
//! interpreter that creates it (default `python3`); `RUST_LOG=tidepool=debug` shows tidepool's
//! logs.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::tp::{self, config_text, Tidepool};

/// The packages the workloads need (major versions whose APIs they use).
const PACKAGES: &[&str] = &[
    "psycopg[binary]>=3.1,<4",
    "psycopg2-binary>=2.9,<3",
    "asyncpg>=0.27,<1",
];
/// Bound on `pip install` (download and install both packages).
const PIP_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on one workload script.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// Transaction mode, two servers for four clients.
const POOL: &str = "mode = \"transaction\"\nsize = 2\ncheckout_timeout = \"30s\"\n";

static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The venv's python, creating the venv on first use (blocking; call from spawn_blocking).
fn venv_python() -> PathBuf {
    match VENV.get_or_init(setup_venv) {
        Ok(p) => p.clone(),
        Err(e) => panic!("cannot set up the Python drivers' virtualenv:\n{e}"),
    }
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join(d)
            }
        }
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
    }
}

/// Run `cmd` with stdout and stderr into one temp file, killing it after `timeout`.
/// Returns the exit status and the output; `Err` if it could not start or timed out.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<(ExitStatus, String), String> {
    let what = format!("{cmd:?}");
    let temp = |e: std::io::Error| format!("temp file for {what}: {e}");
    let mut out = tempfile::tempfile().map_err(temp)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().map_err(temp)?)
        .stderr(out.try_clone().map_err(temp)?);
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {what}: {e}"))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if t0.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for {what}: {e}")),
        }
    };
    let mut bytes = Vec::new();
    let _ = out.seek(SeekFrom::Start(0));
    let _ = out.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    match status {
        Some(st) => Ok((st, text)),
        None => Err(format!(
            "{what} did not finish within {timeout:?}; killed. Output:\n{text}"
        )),
    }
}

/// Do the venv's packages import? Returns their versions.
fn probe(python: &Path) -> Result<String, String> {
    let mut cmd = Command::new(python);
    cmd.args([
        "-c",
        "import psycopg, psycopg2, asyncpg; \
         print('psycopg', psycopg.__version__, psycopg.pq.__impl__, \
               'psycopg2', psycopg2.__version__, 'asyncpg', asyncpg.__version__)",
    ]);
    match run_bounded(cmd, Duration::from_secs(60))? {
        (st, out) if st.success() => Ok(out.trim().to_string()),
        (st, out) => Err(format!("{st}: {out}")),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `python -m venv dir`; on a Debian python without ensurepip, install `python3-venv` (as
/// root) and use the system python.
fn create_venv(dir: &Path) -> Result<(), String> {
    let python = std::env::var("TIDEPOOL_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let venv = |python: &str| {
        let _ = std::fs::remove_dir_all(dir);
        let mut cmd = Command::new(python);
        cmd.args(["-m", "venv"]).arg(dir);
        run_bounded(cmd, Duration::from_secs(180))
    };
    let (st, out) = venv(&python)?;
    if st.success() {
        return Ok(());
    }
    if !out.contains("ensurepip") || !is_root() {
        return Err(format!("`{python} -m venv {}` failed ({st}):\n{out}\n(on Debian/Ubuntu: apt-get install python3-venv)", dir.display()));
    }
    eprintln!("drivers: `{python} -m venv` needs ensurepip; installing python3-venv with apt-get");
    for args in [&["update"][..], &["install", "-y", "python3-venv"][..]] {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let (st, out) = run_bounded(cmd, Duration::from_secs(300))?;
        if !st.success() {
            return Err(format!("apt-get {args:?} failed ({st}):\n{out}"));
        }
    }
    let (st, out) = venv("/usr/bin/python3")?;
    if st.success() {
        Ok(())
    } else {
        Err(format!(
            "`/usr/bin/python3 -m venv {}` failed ({st}) even after installing python3-venv:\n{out}",
            dir.display()
        ))
    }
}

fn setup_venv() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("TIDEPOOL_TEST_VENV") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => target_dir().join("test-venv"),
    };
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let python = dir.join("bin").join("python");
    // Other test processes may set up the same venv: one at a time.
    let lock_path = dir.with_extension("lock");
    let lock = File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("lock {}: {e}", lock_path.display()))?;

    if python.exists() {
        if let Ok(v) = probe(&python) {
            eprintln!("drivers: reusing {} ({v})", dir.display());
            return Ok(python);
        }
    }
    let t0 = Instant::now();
    create_venv(&dir)?;
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--timeout",
        "30",
        "--retries",
        "2",
    ])
    .args(PACKAGES);
    let (st, out) = run_bounded(cmd, PIP_TIMEOUT)
        .map_err(|e| format!("pip install {PACKAGES:?} (is PyPI reachable?): {e}"))?;
    if !st.success() {
        return Err(format!(
            "pip install {PACKAGES:?} into {} failed ({st}); is PyPI reachable?\n{out}",
            dir.display()
        ));
    }
    let v = probe(&python).map_err(|e| format!("installed, but the drivers do not import: {e}"))?;
    eprintln!(
        "drivers: created {} in {:.1}s ({v})",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(python)
}

/// Run blocking `f` off the runtime, re-raising its panic as is.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Run `tests/drivers/<script>` with `python` against tidepool; panics with its output unless
/// it exits 0.
async fn run_script(python: PathBuf, script: &str, port: u16, db: &str) -> String {
    let script_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("drivers")
        .join(script);
    let db = db.to_string();
    let name = script.to_string();
    blocking(move || {
        let mut cmd = Command::new(&python);
        cmd.arg(&script_path)
            .args(["127.0.0.1", &port.to_string(), &db, "postgres"])
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("PGPASSWORD")
            .env_remove("PGSSLMODE")
            .env_remove("PGOPTIONS");
        let (st, out) = run_bounded(cmd, SCRIPT_TIMEOUT).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            st.success(),
            "{name} failed ({st}) through tidepool (port {port}, db {db}):\n{out}"
        );
        out
    })
    .await
}

/// `tidepool_prepared_parses_total{outcome=...}`, summed over pools.
fn parses(tp: &Tidepool, outcome: &str) -> f64 {
    let text = tp.shared.metrics.encode();
    let label = format!("outcome=\"{outcome}\"");
    text.lines()
        .filter(|l| l.starts_with("tidepool_prepared_parses_total") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn driver_test(prefix: &str, script: &str) {
    let python = blocking(venv_python).await;
    let pg = PgCluster::shared();
    let db = pg.create_db(prefix);
    let log_start = pg.log_len();
    let tp = Tidepool::start(&config_text(pg, &db, POOL, "")).await;
    let out = run_script(python, script, tp.port(), &db).await;
    println!("{script}:\n{out}");
    let (forwarded, avoided) = (parses(&tp, "forwarded"), parses(&tp, "avoided"));
    println!("prepared parses: forwarded {forwarded}, avoided {avoided}");
    assert!(
        forwarded > 0.0,
        "no Parse of a named statement reached a server:\n{}",
        tp.shared.metrics.encode()
    );
    assert!(
        avoided > 0.0,
        "the statement cache avoided no Parse (the clients share statements, so it must):\n{}",
        tp.shared.metrics.encode()
    );
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "leaked server connections: {report:?}");
    let log = pg.log_since(log_start);
    let abrupt = tp::abrupt_disconnects(&log);
    assert!(
        abrupt.is_empty(),
        "Postgres saw abrupt disconnects:\n{}",
        abrupt.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepare_threshold_0_across_servers() {
    driver_test("drv_psycopg", "psycopg_workload.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_statement_cache_across_servers() {
    driver_test("drv_asyncpg", "asyncpg_workload.py").await;
}

/// Session isolation (issue 15) with psycopg 2 (`set_session(readonly=True)`, autocommit),
/// psycopg 3 and asyncpg: over a pool of one server, one connection's read-only default,
/// statement timeout and custom setting never reach another connection, and stay its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_keep_their_session_settings_their_own() {
    let python = blocking(venv_python).await;
    let pg = PgCluster::shared();
    let db = pg.create_db("drv_iso");
    let log_start = pg.log_len();
    let pool = "mode = \"transaction\"\nsize = 1\ncheckout_timeout = \"30s\"\n";
    let tp = Tidepool::start(&config_text(pg, &db, pool, "")).await;
    let out = run_script(python, "isolation_workload.py", tp.port(), &db).await;
    println!("isolation_workload.py:\n{out}");
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "leaked server connections: {report:?}");
    let log = pg.log_since(log_start);
    let abrupt = tp::abrupt_disconnects(&log);
    assert!(
        abrupt.is_empty(),
        "Postgres saw abrupt disconnects:\n{}",
        abrupt.join("\n")
    );
}
