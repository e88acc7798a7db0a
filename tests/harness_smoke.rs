//! Smoke tests for the throwaway-Postgres test harness (`tests/common/pg.rs`,
//! `scripts/pgcluster`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::pg::PgCluster;

#[test]
fn shared_cluster_answers_psql() {
    let pg = PgCluster::shared();
    assert_eq!(pg.host(), "127.0.0.1");
    assert_eq!(pg.psql("postgres", "SELECT 1"), "1");
    // Several statements in one call; only the last produces output.
    assert_eq!(
        pg.psql(
            "postgres",
            "CREATE TEMP TABLE t(x int); INSERT INTO t VALUES (41); SELECT x + 1 FROM t"
        ),
        "42"
    );
    assert_eq!(pg.psql("postgres", "SHOW listen_addresses"), "127.0.0.1");
    assert_eq!(pg.psql("postgres", "SHOW max_connections"), "400");
    assert!(pg
        .try_psql("postgres", "SELECT * FROM no_such_table")
        .is_err());
}

#[tokio::test]
async fn shared_cluster_answers_tokio_postgres() {
    let pg = PgCluster::shared();
    let db = pg.create_db("smoke tokio");
    let conninfo = format!(
        "host={} port={} user=postgres dbname={db}",
        pg.host(),
        pg.port()
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let conn_task = tokio::spawn(conn);
    let row = client
        .query_one("SELECT 1::int4, current_database()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(row.get::<_, String>(1), db);
    drop(client);
    conn_task.await.unwrap().unwrap();

    // The helper does the same.
    let client = pg.connect(&db).await;
    let row = client.query_one("SELECT 2::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
}

#[tokio::test]
async fn create_db_and_role() {
    let pg = PgCluster::shared();
    let a = pg.create_db("smoke");
    let b = pg.create_db("smoke");
    assert_ne!(a, b);
    for db in [&a, &b] {
        assert_eq!(pg.psql(db, "SELECT current_database()"), *db);
    }

    let role = format!("smoke_role_{}", std::process::id());
    pg.create_role(&role, "s3cr'et");
    pg.create_role(&role, "other"); // idempotent
    assert_eq!(
        pg.psql(
            "postgres",
            &format!("SELECT rolcanlogin FROM pg_roles WHERE rolname = '{role}'")
        ),
        "t"
    );

    // Connections and disconnections are logged.
    let off = pg.log_len();
    let client = pg.connect(&a).await;
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);
    assert!(
        pg.wait_for_log(off, "disconnection: session time", Duration::from_secs(10)),
        "no disconnection line in log:\n{}",
        pg.log_since(off)
    );
    assert!(pg.log_since(off).contains(&format!("database={a}")));
}

fn pg_isready(port: u16) -> bool {
    Command::new("pg_isready")
        .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-t", "2"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn dedicated_cluster_stop_start_kill9_drop() {
    // synchronous_commit=on (the harness default is off) so the commit below
    // survives kill9: with it off, the commit may still sit in WAL buffers.
    let pg = PgCluster::start_dedicated(&[
        "work_mem=7MB",
        "-c application_name=smoke",
        "synchronous_commit=on",
    ]);
    let port = pg.port();
    let dir = pg.dir().to_path_buf();
    assert_ne!(port, PgCluster::shared().port());
    assert_eq!(pg.psql("postgres", "SHOW work_mem"), "7MB");
    assert_eq!(pg.psql("postgres", "SHOW synchronous_commit"), "on");
    assert!(pg.is_running());
    assert!(pg_isready(port));

    pg.stop();
    assert!(!pg.is_running());
    assert!(!dir.join("postmaster.pid").exists());
    assert!(!pg_isready(port));
    pg.stop(); // idempotent

    pg.start();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("postgres", "SHOW work_mem"), "7MB"); // settings persist
    pg.psql(
        "postgres",
        "CREATE TABLE survivor(x int); INSERT INTO survivor VALUES (7)",
    );

    let pid = pg.postmaster_pid().expect("postmaster.pid");
    let off = pg.log_len();
    pg.kill9();
    assert!(!pg.is_running());
    assert!(
        !pg_isready(port),
        "postmaster {pid} still accepting after kill9"
    );

    pg.start();
    assert_ne!(pg.postmaster_pid(), Some(pid));
    assert_eq!(pg.psql("postgres", "SELECT x FROM survivor"), "7");
    assert!(
        pg.log_since(off)
            .contains("database system was interrupted"),
        "expected crash recovery in log:\n{}",
        pg.log_since(off)
    );

    drop(pg);
    assert!(!pg_isready(port), "cluster still answering after drop");
    assert!(!dir.exists(), "{} not removed after drop", dir.display());
}
