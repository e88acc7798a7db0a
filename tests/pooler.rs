//! The pooler core against a real Postgres, with real clients (issue: pooler core).

mod common;

use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::tp::{self, config_text, Tidepool};

fn pool(mode: &str, size: usize, extra: &str) -> String {
    format!("mode = \"{mode}\"\nsize = {size}\ncheckout_timeout = \"30s\"\n{extra}")
}

/// pgbench -i (COPY) through tidepool, then -S and TPC-B with -M simple and extended,
/// 16 clients over a pool of 4: zero failed transactions.
async fn pgbench_suite(mode: &str) {
    let pg = PgCluster::shared();
    let db = pg.create_db(&format!("bench_{mode}"));
    let tp = Tidepool::start(&config_text(pg, &db, &pool(mode, 4, ""), "")).await;
    let port = tp.port();
    let db2 = db.clone();
    let (ok, out) =
        tokio::task::spawn_blocking(move || tp::pgbench(port, &db2, &["-i", "-s", "1", "-q"]))
            .await
            .unwrap();
    assert!(ok, "pgbench -i failed:\n{out}");
    assert_eq!(
        pg.psql(&db, "SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
    for script in [&["-S"][..], &[][..]] {
        for proto in ["simple", "extended"] {
            let mut args: Vec<&str> = vec!["-c", "16", "-j", "16", "-t", "40", "-M", proto];
            args.extend_from_slice(script);
            let db2 = db.clone();
            let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let (ok, out) = tokio::task::spawn_blocking(move || {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                tp::pgbench(port, &db2, &a)
            })
            .await
            .unwrap();
            assert!(ok, "pgbench {args:?} failed:\n{out}");
            assert_eq!(tp::pgbench_failed(&out), Some(0), "{out}");
            assert_eq!(tp::pgbench_processed(&out), Some(640), "{out}");
        }
    }
    assert!(tp.metric("tidepool_server_connections_opened_total") <= 4 + 1);
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0);
    assert_eq!(report.servers_closed_hard, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_transaction_mode() {
    pgbench_suite("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_session_mode() {
    pgbench_suite("session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_inside_transaction_rolls_back_and_transaction_keeps_its_server() {
    let pg = PgCluster::shared();
    let db = pg.create_db("txn");
    pg.psql(&db, "CREATE TABLE t (id int primary key)");
    let tp = Tidepool::start(&config_text(pg, &db, &pool("transaction", 2, ""), "")).await;
    let a = tp.connect(&db).await;
    let b = tp.connect(&db).await;

    // A failing statement inside a transaction; the client rolls back and carries on.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let err = a
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23505");
    let err = a.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "25P02", "aborted transaction");
    a.batch_execute("ROLLBACK").await.unwrap();
    a.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    assert_eq!(pg.psql(&db, "SELECT string_agg(id::text, ',') FROM t"), "2");

    // A many-statement transaction stays on one server while another client works.
    a.batch_execute("BEGIN").await.unwrap();
    let pid0: i32 = a
        .simple_query("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .iter()
        .find_map(row_i32)
        .unwrap();
    for i in 0..20 {
        a.batch_execute(&format!("INSERT INTO t VALUES ({})", 100 + i))
            .await
            .unwrap();
        b.batch_execute("SELECT 1").await.unwrap();
        let pid: i32 = a
            .simple_query("SELECT pg_backend_pid()")
            .await
            .unwrap()
            .iter()
            .find_map(row_i32)
            .unwrap();
        assert_eq!(pid, pid0, "transaction moved to another server");
    }
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM t"), "21");
    drop((a, b));
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0);
}

fn row_i32(m: &tokio_postgres::SimpleQueryMessage) -> Option<i32> {
    match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
        _ => None,
    }
}

fn row_str(msgs: &[tokio_postgres::SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("one row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_parameters_follow_each_client_across_one_server() {
    let pg = PgCluster::shared();
    let db = pg.create_db("params");
    let tp = Tidepool::start(&config_text(pg, &db, &pool("transaction", 1, ""), "")).await;
    let a = tp
        .try_connect_str(&format!(
            "{} application_name=alpha options='-c TimeZone=Asia/Tokyo'",
            tp.conninfo(&db, "postgres")
        ))
        .await
        .unwrap();
    let b = tp
        .try_connect_str(&format!(
            "{} application_name=beta",
            tp.conninfo(&db, "postgres")
        ))
        .await
        .unwrap();
    b.batch_execute("SET TimeZone = 'America/New_York'")
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(
            row_str(&a.simple_query("SHOW TimeZone").await.unwrap()),
            "Asia/Tokyo"
        );
        assert_eq!(
            row_str(&b.simple_query("SHOW TimeZone").await.unwrap()),
            "America/New_York"
        );
        assert_eq!(
            row_str(
                &a.simple_query("SELECT current_setting('application_name')")
                    .await
                    .unwrap()
            ),
            "alpha"
        );
        assert_eq!(
            row_str(
                &b.simple_query("SELECT current_setting('application_name')")
                    .await
                    .unwrap()
            ),
            "beta"
        );
    }
    // A third client that asked for nothing sees the server defaults, not a neighbour's.
    let c = tp.connect(&db).await;
    assert_eq!(
        row_str(
            &c.simple_query("SELECT current_setting('application_name')")
                .await
                .unwrap()
        ),
        ""
    );
    let default_tz = pg.psql(&db, "SHOW TimeZone");
    assert_eq!(
        row_str(&c.simple_query("SHOW TimeZone").await.unwrap()),
        default_tz
    );
    // Logins with equal startup parameters reuse the pool's cached greeting and share one
    // parameter set; a SET by one of them stays its own (copy-on-write).
    let beta = format!("{} application_name=beta", tp.conninfo(&db, "postgres"));
    let d = tp.try_connect_str(&beta).await.unwrap();
    let e = tp.try_connect_str(&beta).await.unwrap();
    d.batch_execute("SET TimeZone = 'Europe/Paris'")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            row_str(&d.simple_query("SHOW TimeZone").await.unwrap()),
            "Europe/Paris"
        );
        assert_eq!(
            row_str(&e.simple_query("SHOW TimeZone").await.unwrap()),
            default_tz
        );
        for client in [&d, &e] {
            let app = client
                .simple_query("SELECT current_setting('application_name')")
                .await
                .unwrap();
            assert_eq!(row_str(&app), "beta");
        }
    }
    assert_eq!(tp.metric("tidepool_server_connections_opened_total"), 1);
    drop((a, b, c, d, e));
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_its_own_query() {
    let pg = PgCluster::shared();
    let db = pg.create_db("cancel");
    for mode in ["transaction", "session"] {
        let tp = Tidepool::start(&config_text(pg, &db, &pool(mode, 2, ""), "")).await;
        let a = tp.connect(&db).await;
        let b = tp.connect(&db).await;
        let token = a.cancel_token();
        let other =
            tokio::spawn(async move { b.simple_query("SELECT pg_sleep(1.5)").await.map(|_| ()) });
        let sleeper = tokio::spawn(async move {
            let t0 = Instant::now();
            let r = a.simple_query("SELECT pg_sleep(30)").await;
            (r.map(|_| ()), t0.elapsed(), a)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let (r, took, a) = sleeper.await.unwrap();
        let err = r.unwrap_err();
        let msg = err.as_db_error().map(|e| e.message().to_string());
        assert_eq!(
            msg.as_deref(),
            Some("canceling statement due to user request"),
            "{mode}: {err:?}"
        );
        assert!(
            took < Duration::from_secs(2),
            "{mode}: cancel took {took:?}"
        );
        other
            .await
            .unwrap()
            .expect("the other client's query is untouched");
        // The cancelled client carries on.
        a.simple_query("SELECT 1").await.unwrap();
        drop(a);
        assert_eq!(tp.stop().await.leaked, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_reports_the_real_backend_pid() {
    let pg = PgCluster::shared();
    let db = pg.create_db("pid");
    let tp = Tidepool::start(&config_text(pg, &db, &pool("session", 2, ""), "")).await;
    let port = tp.port();
    let db2 = db.clone();
    tokio::task::spawn_blocking(move || {
        let mut raw = common::raw::Raw::login(port, "postgres", &db2);
        let pid = raw.query("SELECT pg_backend_pid()").unwrap();
        assert_eq!(
            pid,
            vec![raw.key.0.to_string()],
            "BackendKeyData carries the real pid"
        );
        raw.terminate();
    })
    .await
    .unwrap();
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_few_servers_and_checkout_timeout() {
    let pg = PgCluster::shared();
    let db = pg.create_db("many");
    let tp = Tidepool::start(&config_text(pg, &db, &pool("transaction", 5, ""), "")).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let info = tp.conninfo(&db, "postgres");
        tasks.push(tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&info, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            for _ in 0..3 {
                let rows = c.simple_query(&format!("SELECT {i}")).await?;
                assert_eq!(row_str(&rows), i.to_string());
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every client served");
    }
    assert!(tp.metric("tidepool_server_connections_opened_total") <= 5);
    assert_eq!(tp.stop().await.leaked, 0);

    // checkout_timeout: one long query holds the only server.
    let tp = Tidepool::start(&config_text(
        pg,
        &db,
        "mode = \"transaction\"\nsize = 1\ncheckout_timeout = \"100ms\"",
        "",
    ))
    .await;
    let holder = tp.connect(&db).await;
    let waiter = tp.connect(&db).await;
    let h =
        tokio::spawn(async move { holder.simple_query("SELECT pg_sleep(1)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "error came after {:?}",
        t0.elapsed()
    );
    let msg = format!("{err:?}");
    assert!(msg.contains("checkout_timeout"), "{msg}");
    h.await.unwrap().expect("holder unaffected");
    assert_eq!(tp.metric("tidepool_checkout_timeouts_total"), 1);
    // And tidepool keeps serving.
    let fresh = tp.connect(&db).await;
    assert_eq!(row_str(&fresh.simple_query("SELECT 7").await.unwrap()), "7");
    drop(fresh);
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_for_unknown_database_and_unreachable_upstream() {
    let pg = PgCluster::shared();
    let db = pg.create_db("errs");
    let dead_port = tp::free_port();
    let extra = format!("[databases.deadbase]\nhost = \"127.0.0.1\"\nport = {dead_port}\n");
    let tp = Tidepool::start(&config_text(pg, &db, &pool("transaction", 2, ""), &extra)).await;
    let err = tp
        .try_connect("nosuchdb", "postgres")
        .await
        .err()
        .unwrap_or_else(|| panic!("refused"));
    let dbe = err.as_db_error().expect("a Postgres error");
    assert_eq!(dbe.code().code(), "3D000");
    assert!(
        dbe.message().contains("\"nosuchdb\" does not exist"),
        "{}",
        dbe.message()
    );

    let err = tp
        .try_connect("deadbase", "postgres")
        .await
        .err()
        .unwrap_or_else(|| panic!("refused"));
    let dbe = err.as_db_error().expect("a Postgres error");
    assert_eq!(dbe.code().code(), "08006");
    assert!(
        dbe.message().contains("could not connect to server"),
        "{}",
        dbe.message()
    );

    // The good database still works.
    let c = tp.connect(&db).await;
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_database_serves_any_name() {
    let pg = PgCluster::shared();
    let db = pg.create_db("star");
    let other = pg.create_db("star_other");
    let extra = format!(
        "[databases.\"*\"]\nhost = \"127.0.0.1\"\nport = {}\n",
        pg.port()
    );
    let tp = Tidepool::start(&config_text(pg, &db, &pool("transaction", 2, ""), &extra)).await;
    let c = tp.connect(&other).await;
    assert_eq!(
        row_str(&c.simple_query("SELECT current_database()").await.unwrap()),
        other
    );
    let err = tp
        .try_connect("star_missing_db", "postgres")
        .await
        .err()
        .unwrap_or_else(|| panic!("refused"));
    assert_eq!(err.as_db_error().expect("db error").code().code(), "3D000");
    drop(c);
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_notice_large_rows_and_multiple_results() {
    let pg = PgCluster::shared();
    let db = pg.create_db("relay");
    pg.psql(&db, "CREATE TABLE c (id int, v text)");
    for mode in ["transaction", "session"] {
        let tp = Tidepool::start(&config_text(pg, &db, &pool(mode, 2, ""), "")).await;
        let port = tp.port();
        let db2 = db.clone();
        let out = tokio::task::spawn_blocking(move || {
            let script = "\\copy c FROM STDIN\n1\tone\n2\ttwo\n\\.\n\
                          SELECT count(*) FROM c;\n\
                          \\copy (SELECT * FROM c ORDER BY id) TO STDOUT\n\
                          SELECT length(repeat('x', 3000000));\n\
                          SELECT 1; SELECT 2;\n\
                          DO $$ BEGIN RAISE NOTICE 'hello notice'; END $$;\n";
            let o = std::process::Command::new("psql")
                .args([
                    "-X",
                    "-At",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    &db2,
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut ch| {
                    use std::io::Write;
                    ch.stdin.take().unwrap().write_all(script.as_bytes())?;
                    ch.wait_with_output()
                })
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .await
        .unwrap();
        assert!(out.contains("1\tone\n2\ttwo"), "{out}");
        assert!(out.contains("3000000"), "{out}");
        assert!(out.contains("1\n2"), "{out}");
        assert!(out.contains("hello notice"), "{out}");
        // A row over 1 MiB through tokio-postgres, extended protocol.
        let c = tp.connect(&db).await;
        let row = c
            .query_one("SELECT repeat('y', 2000000)", &[])
            .await
            .unwrap();
        let v: String = row.get(0);
        assert_eq!(v.len(), 2_000_000);
        drop(c);
        pg.psql(&db, "TRUNCATE c");
        assert_eq!(tp.stop().await.leaked, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_in_session_mode() {
    let pg = PgCluster::shared();
    let db = pg.create_db("notify");
    let tp = Tidepool::start(&config_text(pg, &db, &pool("session", 2, ""), "")).await;
    let (listener, mut conn) =
        tokio_postgres::connect(&tp.conninfo(&db, "postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(msg)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener
        .batch_execute("LISTEN tidepool_events")
        .await
        .unwrap();
    let sender = tp.connect(&db).await;
    sender
        .batch_execute("NOTIFY tidepool_events, 'hello'")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification arrives")
        .unwrap();
    assert_eq!(got, ("tidepool_events".to_string(), "hello".to_string()));
    drop((listener, sender));
    assert_eq!(tp.stop().await.leaked, 0);
}
