//! Named protocol-level prepared statements across server switches in transaction mode.

mod common;

use std::time::Duration;

use common::pg::PgCluster;
use common::tp::{self, config_text, Tidepool};

fn pool(size: usize, extra: &str) -> String {
    format!("mode = \"transaction\"\nsize = {size}\ncheckout_timeout = \"30s\"\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_mode() {
    let pg = PgCluster::shared();
    let db = pg.create_db("prep_bench");
    let tp = Tidepool::start(&config_text(pg, &db, &pool(4, ""), "")).await;
    let port = tp.port();
    let db2 = db.clone();
    tokio::task::spawn_blocking(move || {
        let (ok, out) = tp::pgbench(port, &db2, &["-i", "-s", "1", "-q"]);
        assert!(ok, "{out}");
        // One thread per client: pgbench prepares with the blocking PQprepare, so a thread
        // waiting for a server for one client would stall its other clients, which hold the
        // servers mid-transaction (a deadlock of pgbench's own making, with any pooler).
        for script in [&["-S"][..], &[][..]] {
            let mut args = vec!["-c", "16", "-j", "16", "-t", "50", "-M", "prepared"];
            args.extend_from_slice(script);
            let (ok, out) = tp::pgbench(port, &db2, &args);
            assert!(ok, "pgbench {args:?}:\n{out}");
            assert_eq!(tp::pgbench_failed(&out), Some(0), "{out}");
            assert_eq!(tp::pgbench_processed(&out), Some(800), "{out}");
        }
    })
    .await
    .unwrap();
    let text = tp.shared.metrics.encode();
    let avoided = text
        .lines()
        .find(|l| {
            l.starts_with("tidepool_prepared_parses_total") && l.contains("outcome=\"avoided\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        avoided > 0.0,
        "the statement cache avoided no Parse:\n{text}"
    );
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_survives_server_switches() {
    let pg = PgCluster::shared();
    let db = pg.create_db("prep_switch");
    pg.psql(&db, "CREATE TABLE kv (k int primary key, v text)");
    let tp = Tidepool::start(&config_text(pg, &db, &pool(2, ""), "")).await;
    let a = tp.connect(&db).await;
    let stmt = a
        .prepare("INSERT INTO kv VALUES ($1, $2) RETURNING k")
        .await
        .unwrap();
    let get = a.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
    // Another client takes, in every iteration, the server `a` used last (the idle list is
    // most-recently-used first), so `a` lands on the other one every time.
    let b = tp.connect(&db).await;
    let mut pids = std::collections::HashSet::new();
    for i in 0..100i32 {
        let row = a.query_one(&stmt, &[&i, &format!("v{i}")]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
        let pid = a.simple_query("SELECT pg_backend_pid()").await.unwrap();
        pids.extend(pid.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        }));
        b.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let row = a.query_one(&get, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("v{i}"));
        // While b holds the other server, this runs where `get` just ran.
        let pid = a.simple_query("SELECT pg_backend_pid()").await.unwrap();
        pids.extend(pid.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        }));
        b.batch_execute("COMMIT").await.unwrap();
    }
    assert!(
        pids.len() >= 2,
        "transactions stayed on one server; the test proves nothing"
    );
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM kv"), "100");
    // Explicit transactions with a prepared statement inside.
    a.batch_execute("BEGIN").await.unwrap();
    a.query_one(&stmt, &[&1000i32, &"x"]).await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    drop(a);
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_statements_than_the_bound_still_work() {
    let pg = PgCluster::shared();
    let db = pg.create_db("prep_evict");
    let tp = Tidepool::start(&config_text(
        pg,
        &db,
        &pool(2, "max_prepared_statements = 3"),
        "",
    ))
    .await;
    let a = tp.connect(&db).await;
    let b = tp.connect(&db).await;
    let mut stmts = Vec::new();
    for i in 0..10 {
        stmts.push(a.prepare(&format!("SELECT $1::int + {i}")).await.unwrap());
    }
    for round in 0..3 {
        for (i, s) in stmts.iter().enumerate() {
            let row = a.query_one(s, &[&(round * 100)]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), round * 100 + i as i32);
            b.simple_query("SELECT 1").await.unwrap();
        }
    }
    // No server holds more than the bound (pg_prepared_statements is per backend, so ask
    // through tidepool; the statement doing the asking is unnamed).
    let n: i64 = a
        .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n <= 3 + 1, "{n} statements on one server");
    drop((a, b));
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_type_change_gives_postgres_error_then_reprepare_works() {
    let pg = PgCluster::shared();
    let db = pg.create_db("prep_ddl");
    pg.psql(&db, "CREATE TABLE t (a int); INSERT INTO t VALUES (1)");
    let tp = Tidepool::start(&config_text(pg, &db, &pool(1, ""), "")).await;
    let c = tp.connect(&db).await;
    let s = c.prepare("SELECT * FROM t").await.unwrap();
    assert_eq!(c.query(&s, &[]).await.unwrap().len(), 1);
    pg.psql(&db, "ALTER TABLE t ADD COLUMN b int");
    let err = c.query(&s, &[]).await.unwrap_err();
    let dbe = err.as_db_error().expect("a Postgres error");
    assert_eq!(dbe.code().code(), "0A000", "{dbe:?}");
    assert!(
        dbe.message()
            .contains("cached plan must not change result type"),
        "{}",
        dbe.message()
    );
    // The driver prepares again; it works.
    let s2 = c.prepare("SELECT * FROM t").await.unwrap();
    let rows = c.query(&s2, &[]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].len(), 2);
    // DEALLOCATE ALL and DISCARD ALL behave.
    c.batch_execute("DEALLOCATE ALL").await.unwrap();
    let s3 = c.prepare("SELECT 42").await.unwrap();
    assert_eq!(c.query_one(&s3, &[]).await.unwrap().get::<_, i32>(0), 42);
    drop(c);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_with_a_parameter_larger_than_the_relay_buffer() {
    let pg = PgCluster::shared();
    let db = pg.create_db("prep_big");
    let tp = Tidepool::start(&config_text(pg, &db, &pool(2, ""), "")).await;
    let c = tp.connect(&db).await;
    let s = c.prepare("SELECT length($1::text)").await.unwrap();
    let big = "z".repeat(3 * 1024 * 1024);
    let row = tokio::time::timeout(Duration::from_secs(20), c.query_one(&s, &[&big]))
        .await
        .expect("no stall on a 3 MiB Bind")
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 3 * 1024 * 1024);
    drop(c);
    assert_eq!(tp.stop().await.leaked, 0);
}
