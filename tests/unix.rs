//! Unix-domain sockets (DESIGN.md section 13, issue 21), against the real Postgres: the client
//! listener (libpq naming, file mode, login, queries, drain, a stale file, a live one) and a
//! server reached over its own Unix socket (queries and cancel requests).

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::tp::{self, Tidepool};

fn config(pg: &PgCluster, db: &str, dir: &Path, server_host: &str) -> String {
    format!(
        r#"
[listen]
addr = "127.0.0.1:0"
unix_socket_dir = "{dir}"
unix_socket_mode = "0700"
[admin]
addr = "127.0.0.1:0"
[auth]
method = "trust"
[drain]
timeout = "10s"
[pool]
mode = "transaction"
size = 2
[databases.{db}]
host = "{server_host}"
port = {port}
"#,
        dir = dir.display(),
        port = pg.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_over_the_unix_socket_and_the_drain_removes_it() {
    let pg = PgCluster::shared();
    let db = pg.create_db("unix_listen");
    let dir = tempfile::tempdir().unwrap();
    let tp = Tidepool::start(&config(pg, &db, dir.path(), "127.0.0.1")).await;
    let path = dir.path().join(format!(".s.PGSQL.{}", tp.port()));
    let meta = std::fs::metadata(&path).expect("socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);

    // tokio-postgres with host = the directory.
    let conninfo = format!(
        "host={} port={} user=postgres dbname={db}",
        dir.path().display(),
        tp.port()
    );
    let c = tp
        .try_connect_str(&conninfo)
        .await
        .expect("login over the Unix socket");
    let r = c.simple_query("SELECT 41 + 1").await.unwrap();
    assert!(format!("{r:?}").contains("42"));
    // psql -h DIR -p PORT, as an operator would.
    let (dir_s, port, db2) = (dir.path().display().to_string(), tp.port(), db.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("psql")
            .args([
                "-h",
                &dir_s,
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                &db2,
            ])
            .args(["-X", "-At", "-c", "SELECT 'over unix'"])
            .env_remove("PGHOST")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("over unix"),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // TCP still serves alongside.
    let t = tp.connect(&db).await;
    t.simple_query("SELECT 1").await.unwrap();
    drop((c, t));
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0);
    assert!(!path.exists(), "the drain removes the socket file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_is_replaced_and_a_live_one_is_refused() {
    let pg = PgCluster::shared();
    let db = pg.create_db("unix_stale");
    let dir = tempfile::tempdir().unwrap();
    let port = tp::free_port();
    let path = dir.path().join(format!(".s.PGSQL.{port}"));
    let cfg = config(pg, &db, dir.path(), "127.0.0.1").replacen(
        "127.0.0.1:0",
        &format!("127.0.0.1:{port}"),
        1,
    );

    // Stale: a listener that went away and left its file.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let tp = Tidepool::start(&cfg).await;
    let conninfo = format!(
        "host={} port={port} user=postgres dbname={db}",
        dir.path().display()
    );
    let c = tp
        .try_connect_str(&conninfo)
        .await
        .expect("login after replacing the stale file");
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    assert_eq!(tp.stop().await.leaked, 0);
    assert!(!path.exists());

    // Live: another process listens on it. tidepool exits 70 and says why.
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let cfg_file = dir.path().join("tidepool.toml");
    std::fs::write(&cfg_file, &cfg).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(tp::binary())
            .arg("--config")
            .arg(&cfg_file)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(70), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another process is listening on"), "{err}");
    assert!(path.exists(), "the live process's file is left alone");
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reached_over_its_unix_socket() {
    let pg = PgCluster::shared();
    let db = pg.create_db("unix_server");
    let dir = tempfile::tempdir().unwrap();
    let server_dir = pg.dir().display().to_string();
    let log_start = pg.log_len();
    let tp = Tidepool::start(&config(pg, &db, dir.path(), &server_dir)).await;
    let c = tp.connect(&db).await;
    // Postgres sees a Unix-socket client: no client address.
    let r = c
        .simple_query("SELECT coalesce(inet_client_addr()::text, 'local')")
        .await
        .unwrap();
    assert!(format!("{r:?}").contains("local"), "{r:?}");
    // A cancel request reaches the server over its socket too.
    let cancel = c.cancel_token();
    let q = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = q.await.unwrap().unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0);
    tp::assert_no_abrupt_disconnects_since(pg, log_start);
}
