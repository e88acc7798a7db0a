//! Real drivers through transaction mode: psycopg 3 with `prepare_threshold=0` and asyncpg with
//! its statement cache run workloads of named prepared statements through tidepool (pool size
//! 2, four client connections, so their transactions move between servers) and check every
//! result; psycopg 2, psycopg 3 and asyncpg check that session settings stay with their
//! connection (pool size 1). Each test ends with no leaked server connection.
//!
//! The drivers come from PyPI into a virtualenv at `$CARGO_TARGET_DIR/test-venv` (default
//! `target/test-venv`), created once and reused while the packages import (`common::venv`).
//! The workloads are `tests/drivers/*.py`; each runs standalone too:
//! `target/test-venv/bin/python tests/drivers/psycopg_workload.py 127.0.0.1 PORT DB`.
//!
//! Environment: `TIDEPOOL_TEST_VENV` puts the venv elsewhere; `TIDEPOOL_TEST_PYTHON` picks the
//! interpreter that creates it (default `python3`); `RUST_LOG=tidepool=debug` shows tidepool's
//! logs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::pg::PgCluster;
use common::tp::{self, config_text, Tidepool};
use common::venv::{self, run_bounded};

/// The drivers' venv: the packages the workloads need (major versions whose APIs they use).
const DRIVERS: venv::Spec = venv::Spec {
    dir: "test-venv",
    override_var: "TIDEPOOL_TEST_VENV",
    pip_args: &[],
    packages: &[
        "psycopg[binary]>=3.1,<4",
        "psycopg2-binary>=2.9,<3",
        "asyncpg>=0.27,<1",
    ],
    probe: "import psycopg, psycopg2, asyncpg; \
            print('psycopg', psycopg.__version__, psycopg.pq.__impl__, \
                  'psycopg2', psycopg2.__version__, 'asyncpg', asyncpg.__version__)",
    what: "drivers",
};
/// Bound on one workload script.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// Transaction mode, two servers for four clients.
const POOL: &str = "mode = \"transaction\"\nsize = 2\ncheckout_timeout = \"30s\"\n";

static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The venv's python, creating the venv on first use (blocking; call from spawn_blocking).
fn venv_python() -> PathBuf {
    match VENV.get_or_init(|| venv::ensure(&DRIVERS)) {
        Ok(dir) => dir.join("bin").join("python"),
        Err(e) => panic!("cannot set up the Python drivers' virtualenv:\n{e}"),
    }
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
    tp::assert_no_abrupt_disconnects_since(pg, log_start);
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
    tp::assert_no_abrupt_disconnects_since(pg, log_start);
}
