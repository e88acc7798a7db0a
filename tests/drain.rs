//! Signals and the drain, with the real binary against the real Postgres (DESIGN.md section 4).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::tp::{self, config_text, TidepoolProcess};

/// The pgbench-driven tests are heavy for 2 cores: run them one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.blocking_lock()
}

fn config(pg: &PgCluster, db: &str, mode: &str, size: usize, drain: &str) -> String {
    let text = config_text(
        pg,
        db,
        &format!("mode = \"{mode}\"\nsize = {size}\ncheckout_timeout = \"30s\""),
        "",
    );
    text.replace(
        "[drain]\ntimeout = \"10s\"\nserver_close_timeout = \"2s\"\n",
        &format!("[drain]\n{drain}\n"),
    )
}

fn pgbench_init(port: u16, db: &str) {
    let (ok, out) = tp::pgbench(port, db, &["-i", "-s", "1", "-q"]);
    assert!(ok, "pgbench -i: {out}");
}

/// `workers`: the `runtime.workers` setting, `None` for the default.
fn sigterm_mid_pgbench(mode: &str, workers: Option<usize>) {
    let _g = heavy();
    let pg = PgCluster::shared();
    let db = pg.create_db(&format!("drain_{mode}_{}", workers.unwrap_or(0)));
    let offset = pg.log_len();
    let mut text = config(
        pg,
        &db,
        mode,
        16,
        "timeout = \"25s\"\nserver_close_timeout = \"2s\"",
    );
    if let Some(n) = workers {
        text.push_str(&format!("[runtime]\nworkers = {n}\n"));
    }
    let mut tp = TidepoolProcess::start(&text);
    // The start line, logged just after the listener binds, names the threads (default 1).
    let expect = format!("workers={}", workers.unwrap_or(1));
    let t0 = Instant::now();
    while !tp.log().contains(&expect) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the start line does not show {expect}:\n{}",
            tp.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    pgbench_init(tp.port, &db);
    let bench = tp::spawn_pgbench(tp.port, &db, &["-c", "16", "-j", "4", "-T", "10"]);
    std::thread::sleep(Duration::from_secs(2));
    tp.signal("TERM");
    // The phase turns draining at once: /readyz answers 503 within 100 ms.
    let t0 = Instant::now();
    loop {
        let (code, _) = tp.http_get("/readyz");
        if code == 503 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "/readyz still {code}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(tp.http_get("/livez").0, 200);
    let (ok, text) = tp::pgbench_output(bench);
    let bench_done = Instant::now();
    assert!(ok, "pgbench failed during drain:\n{text}");
    assert_eq!(tp::pgbench_failed(&text), Some(0), "{text}");
    let code = tp.wait(Duration::from_secs(5));
    let exited_after = bench_done.elapsed();
    assert_eq!(code, Some(0), "exit code; log:\n{}", tp.log());
    assert!(
        exited_after < Duration::from_millis(500),
        "exited {exited_after:?} after the last client left"
    );
    let report = tp
        .drain_report()
        .unwrap_or_else(|| panic!("no drain report:\n{}", tp.log()));
    assert_eq!(report["clients_left"], 16, "{report}");
    assert_eq!(report["clients_forced"], 0, "{report}");
    assert_eq!(report["leaked"], 0, "{report}");
    assert_eq!(report["servers_closed_hard"], 0, "{report}");
    assert!(
        report["servers_closed_clean"].as_u64().unwrap() >= 1,
        "{report}"
    );
    let last = tp.log().lines().last().unwrap_or_default().to_string();
    assert!(last.contains("drain report"), "last log line: {last}");
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

#[test]
fn sigterm_drains_pgbench_transaction_mode() {
    sigterm_mid_pgbench("transaction", None);
}

/// The default `runtime.workers = 1` runs everything on tokio's current-thread scheduler (the
/// tests above); `workers = 2` runs the multi-thread one, where the relay, the admin endpoint,
/// the signal handler and the drain run on any of the threads.
#[test]
fn sigterm_drains_pgbench_on_two_worker_threads() {
    sigterm_mid_pgbench("transaction", Some(2));
}

#[test]
fn sigterm_drains_pgbench_session_mode() {
    sigterm_mid_pgbench("session", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_clients_and_cancels_queries() {
    let _g = HEAVY.lock().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("drain_timeout");
    let offset = pg.log_len();
    let mut tp = TidepoolProcess::start(&config(
        pg,
        &db,
        "transaction",
        8,
        "timeout = \"2s\"\nserver_close_timeout = \"1s\"",
    ));
    let port = tp.port;
    let db2 = db.clone();
    tokio::task::spawn_blocking(move || pgbench_init(port, &db2))
        .await
        .unwrap();
    let bench = tp::spawn_pgbench(tp.port, &db, &["-c", "4", "-j", "2", "-T", "30"]);
    let (sleeper, conn) = tokio_postgres::connect(&tp.conninfo(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let sleep_task = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    tp.signal("TERM");
    let err = tokio::time::timeout(Duration::from_secs(6), sleep_task)
        .await
        .expect("the sleeping query ends")
        .unwrap()
        .expect_err("cancelled");
    let took = t0.elapsed();
    let code = err.as_db_error().map(|e| e.code().code().to_string());
    assert_eq!(code.as_deref(), Some("57014"), "{err:?}");
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let (_, text) = tokio::task::spawn_blocking(move || tp::pgbench_output(bench))
        .await
        .unwrap();
    assert!(
        text.contains("terminating connection due to administrator command"),
        "{text}"
    );
    let code = tokio::task::spawn_blocking(move || {
        let c = tp.wait(Duration::from_secs(5));
        (c, tp)
    })
    .await
    .unwrap();
    let (code, tp) = code;
    assert!(code.is_some(), "still running");
    // timeout (2 s) + server_close_timeout (1 s) + 1 s
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "exit after {:?}",
        t0.elapsed()
    );
    let report = tp.drain_report().expect("drain report");
    assert_eq!(report["leaked"], 0, "{report}");
    assert_eq!(report["deadline_reached"], true, "{report}");
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_closes_idle_clients_now_and_busy_ones_after_commit() {
    let pg = PgCluster::shared();
    let db = pg.create_db("sigint");
    pg.psql(&db, "CREATE TABLE t (id int)");
    let offset = pg.log_len();
    let mut tp = TidepoolProcess::start(&config(
        pg,
        &db,
        "transaction",
        4,
        "timeout = \"20s\"\nserver_close_timeout = \"2s\"",
    ));
    let (idle, conn) = tokio_postgres::connect(&tp.conninfo(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    let idle_conn = tokio::spawn(conn);
    let (busy, conn) = tokio_postgres::connect(&tp.conninfo(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    idle.simple_query("SELECT 1").await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    tp.signal("INT");
    // The idle client is closed at once with 57P01.
    let r = tokio::time::timeout(Duration::from_millis(500), idle_conn)
        .await
        .expect("idle client closed at once")
        .unwrap();
    let err = r.expect_err("closed with an error");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57P01"),
        "{err:?}"
    );
    // The busy one finishes its transaction and gets the COMMIT result.
    busy.batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    busy.batch_execute("COMMIT")
        .await
        .expect("COMMIT acknowledged");
    let after = busy.simple_query("SELECT 1").await;
    assert!(after.is_err(), "closed right after the transaction");
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM t"), "2");
    let code = tokio::task::spawn_blocking(move || {
        let c = tp.wait(Duration::from_secs(5));
        (c, tp)
    })
    .await
    .unwrap();
    let (code, tp) = code;
    assert_eq!(code, Some(0), "{}", tp.log());
    let report = tp.drain_report().expect("drain report");
    assert_eq!(report["clients_closed_at_boundary"], 2, "{report}");
    assert_eq!(report["leaked"], 0, "{report}");
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_forces() {
    let pg = PgCluster::shared();
    let db = pg.create_db("second");
    let offset = pg.log_len();
    let mut tp = TidepoolProcess::start(&config(
        pg,
        &db,
        "transaction",
        4,
        "timeout = \"60s\"\nserver_close_timeout = \"1s\"",
    ));
    let (c, conn) = tokio_postgres::connect(&tp.conninfo(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let q = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tp.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!q.is_finished(), "a graceful drain lets the query run");
    let t0 = Instant::now();
    tp.signal("TERM");
    let r = tokio::time::timeout(Duration::from_secs(3), q)
        .await
        .expect("forced at once")
        .unwrap();
    assert!(r.is_err());
    let (code, tp) = tokio::task::spawn_blocking(move || (tp.wait(Duration::from_secs(5)), tp))
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(
        code,
        Some(1),
        "a forced client makes exit code 1; {}",
        tp.log()
    );
    let report = tp.drain_report().expect("drain report");
    assert_eq!(report["clients_forced"], 1, "{report}");
    assert_eq!(report["leaked"], 0, "{report}");
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

#[test]
fn accept_for_keeps_the_door_open_for_a_while() {
    let pg = PgCluster::shared();
    let db = pg.create_db("acceptfor");
    let mut tp = TidepoolProcess::start(&config(
        pg,
        &db,
        "transaction",
        2,
        "timeout = \"10s\"\naccept_for = \"3s\"\nserver_close_timeout = \"1s\"",
    ));
    tp.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    let inside = tp::psql_as(tp.port, "postgres", "", &db, "SELECT 1");
    assert!(
        inside.is_ok(),
        "a client inside the accept window works: {inside:?}"
    );
    std::thread::sleep(Duration::from_millis(3500));
    let after = tp::psql_as(tp.port, "postgres", "", &db, "SELECT 1");
    assert!(after.is_err(), "a client after the window is refused");
    assert_eq!(tp.wait(Duration::from_secs(5)), Some(0), "{}", tp.log());
}

#[test]
fn sighup_resizes_under_load_and_rejects_a_broken_file() {
    let _g = heavy();
    let pg = PgCluster::shared();
    let db = pg.create_db("sighup");
    let cfg = |size: usize| {
        config(
            pg,
            &db,
            "transaction",
            size,
            "timeout = \"10s\"\nserver_close_timeout = \"2s\"",
        )
    };
    let mut tp = TidepoolProcess::start(&cfg(2));
    pgbench_init(tp.port, &db);
    let bench = tp::spawn_pgbench(tp.port, &db, &["-c", "8", "-j", "2", "-T", "4", "-S"]);
    std::thread::sleep(Duration::from_secs(1));
    let pool_size = |tp: &TidepoolProcess| -> u64 {
        let (_, body) = tp.http_get("/status");
        let v: serde_json::Value = serde_json::from_str(&body).expect("status json");
        v["pools"][0]["size"].as_u64().expect("pool size")
    };
    assert_eq!(pool_size(&tp), 2);
    tp.rewrite_config(&cfg(4).replace("checkout_timeout = \"30s\"", "checkout_timeout = \"20s\""));
    tp.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pool_size(&tp), 4, "{}", tp.log());
    // A broken file is rejected and the old config stays.
    tp.rewrite_config("[pool]\nsize = \"many\"\n");
    tp.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(tp.log().contains("reload rejected"), "{}", tp.log());
    assert_eq!(pool_size(&tp), 4);
    let (ok, text) = tp::pgbench_output(bench);
    assert!(ok, "{text}");
    assert_eq!(tp::pgbench_failed(&text), Some(0), "{text}");
    assert!(tp::psql_as(tp.port, "postgres", "", &db, "SELECT 1").is_ok());
    tp.signal("TERM");
    assert_eq!(tp.wait(Duration::from_secs(10)), Some(0), "{}", tp.log());
}

#[test]
fn check_command_and_bad_config_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[auth]\nmethod = \"trust\"\n[pool]\nsizee = 3\n[databases.app]\n",
    )
    .unwrap();
    let out = Command::new(tp::binary())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("sizee"), "{err}");
    // The daemon refuses it the same way.
    let out = Command::new(tp::binary())
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // A good one prints the effective settings.
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[auth]\nmethod = \"trust\"\n[databases.app]\nport = 5999\n",
    )
    .unwrap();
    let out = Command::new(tp::binary())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("checkout_timeout") && text.contains("5999"),
        "{text}"
    );
    // A bad command line is EX_USAGE too.
    let out = Command::new(tp::binary())
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}
