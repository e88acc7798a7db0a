mod common;

// Server-connection lifecycle against a real Postgres (issue: explicit shutdown contract,
// DESIGN.md sections 1 and 4): clients killed at every awkward moment, a session that panics,
// leaks made on purpose, lifetime / idle-timeout closes, a backend terminated under an idle
// server, and a cancellation matrix. Every server connection must end with an explicit
// shutdown: the leak counter stays 0 (unless a test leaks on purpose) and Postgres logs no
// abrupt disconnect.
//
// The tests of this file share one Postgres cluster and read its log, so they run one at a
// time (see [`serial`]): an abrupt disconnect in the log is then attributable to the test that
// is running.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::raw::{self, Raw};
use common::tp::{self, bounded, config_text, eventually, serial, wait_query_active, Tidepool};
use tokio_postgres::SimpleQueryMessage;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn pool_cfg(mode: &str, size: usize, extra: &str) -> String {
    format!("mode = \"{mode}\"\nsize = {size}\n{extra}")
}

fn pool_label(db: &str) -> String {
    format!("{db}/postgres")
}

fn closed_total(tp: &Tidepool, db: &str, reason: &str) -> u64 {
    tp.metric_with(
        "tidepool_server_connections_closed_total",
        &[("pool", &pool_label(db)), ("reason", reason)],
    ) as u64
}

fn shutdowns(tp: &Tidepool, db: &str, outcome: &str) -> u64 {
    tp.metric_with(
        "tidepool_server_shutdowns_total",
        &[("pool", &pool_label(db)), ("outcome", outcome)],
    ) as u64
}

/// `tidepool_server_connections{pool, state}` (a gauge: may be negative if miscounted).
fn server_gauge(tp: &Tidepool, db: &str, state: &str) -> i64 {
    tp.server_gauge(&pool_label(db), state)
}

/// Wait until no server connection of the pool is checked out or being recovered/closed.
async fn settle(tp: &Tidepool, db: &str) {
    tp.settle(&pool_label(db)).await
}

/// Backends connected to `db` (counted from another database, so psql does not count).
fn backends(pg: &PgCluster, db: &str) -> u64 {
    pg.psql(
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = {}",
            common::pg::quote_literal(db)
        ),
    )
    .parse()
    .expect("a count")
}

/// Wait (blocking) until at most `n` backends are connected to `db`; returns the last count.
fn wait_backends_at_most(pg: &PgCluster, db: &str, n: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let c = backends(pg, db);
        if c <= n || Instant::now() >= deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Postgres log since `offset`, once every backend of `db` has gone and the log has had a
/// moment to catch up (log lines are written asynchronously to the client's view).
async fn quiet_log_since(pg: &PgCluster, db: &str, offset: u64) -> String {
    let db2 = db.to_string();
    let left = tokio::task::spawn_blocking(move || {
        wait_backends_at_most(PgCluster::shared(), &db2, 0, Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert_eq!(left, 0, "backends of {db} still connected after stop");
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.log_since(offset)
}

fn assert_no_abrupt_disconnects(log: &str, context: &str) {
    let abrupt = tp::abrupt_disconnects(log);
    assert!(
        abrupt.is_empty(),
        "{context}: Postgres logged {} abrupt disconnect(s):\n{}\n--- log excerpt (last 60 lines) ---\n{}",
        abrupt.len(),
        abrupt.join("\n"),
        log.lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn first_value(msgs: &[SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("one row")
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    first_value(&c.simple_query("SELECT pg_backend_pid()").await.unwrap())
        .parse()
        .unwrap()
}

/// Send bytes on a raw socket.
fn send(sock: &mut TcpStream, bytes: &[u8]) {
    sock.write_all(bytes).expect("write to tidepool");
}

/// Read messages up to and including the one tagged `tag`.
fn read_until(sock: &mut TcpStream, tag: u8) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let (t, body) =
            raw::read_msg(sock).unwrap_or_else(|| panic!("EOF waiting for '{}'", tag as char));
        out.push((t, body));
        if t == tag {
            return out;
        }
    }
}

fn copy_data(payload: &[u8]) -> Vec<u8> {
    let mut m = vec![b'd'];
    m.extend_from_slice(&((payload.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

fn must(raw: &mut Raw, sql: &str) {
    if let Err(e) = raw.query(sql) {
        panic!("{sql}: {e:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Mixed workload, clients killed at every awkward moment, a panicking session, clean stop.
// ---------------------------------------------------------------------------------------------

/// The killed clients of test 1, one after another (blocking; runs beside pgbench).
fn killed_clients(port: u16, db: &str) {
    let pg = PgCluster::shared();

    // Mid-transaction, socket shut down after the INSERT was acknowledged.
    let mut a = Raw::login(port, "postgres", db);
    must(&mut a, "BEGIN");
    must(&mut a, "INSERT INTO t VALUES (9001, 'killed')");
    let _ = a.sock.shutdown(Shutdown::Both);
    drop(a);

    // Mid-transaction, dropped with a reply unread (the kernel sends RST).
    let mut b = Raw::login(port, "postgres", db);
    must(&mut b, "BEGIN");
    must(&mut b, "INSERT INTO t VALUES (9002, 'killed')");
    send(
        &mut b.sock,
        &raw::query_msg("INSERT INTO t VALUES (9003, 'killed')"),
    );
    std::thread::sleep(Duration::from_millis(150));
    drop(b);

    // Mid-query outside a transaction: dropped while pg_sleep runs, without reading.
    let mut c = Raw::login(port, "postgres", db);
    send(&mut c.sock, &raw::query_msg("SELECT pg_sleep(5) /* c */"));
    wait_query_active(pg, db, "SELECT pg_sleep(5) /* c */");
    drop(c);

    // Mid-query inside a transaction that has written a row; shut down.
    let mut d = Raw::login(port, "postgres", db);
    must(&mut d, "BEGIN");
    must(&mut d, "INSERT INTO t VALUES (9004, 'killed')");
    send(&mut d.sock, &raw::query_msg("SELECT pg_sleep(5) /* d */"));
    wait_query_active(pg, db, "SELECT pg_sleep(5) /* d */");
    let _ = d.sock.shutdown(Shutdown::Both);
    drop(d);

    // Mid-COPY, the last CopyData announcing more bytes than were sent.
    let mut e = Raw::login(port, "postgres", db);
    send(&mut e.sock, &raw::query_msg("COPY t FROM STDIN"));
    let msgs = read_until(&mut e.sock, b'G');
    assert!(
        !msgs.iter().any(|(t, _)| *t == b'E'),
        "COPY refused: {msgs:?}"
    );
    send(&mut e.sock, &copy_data(b"5001\tcopy\n"));
    send(&mut e.sock, &copy_data(b"5002\tcopy\n"));
    let mut partial = vec![b'd'];
    partial.extend_from_slice(&(4 + 1000i32).to_be_bytes());
    partial.extend_from_slice(b"5003\tcopy\n");
    send(&mut e.sock, &partial);
    std::thread::sleep(Duration::from_millis(150));
    drop(e);

    // Mid-COPY between whole messages; shut down.
    let mut f = Raw::login(port, "postgres", db);
    send(&mut f.sock, &raw::query_msg("COPY t FROM STDIN"));
    read_until(&mut f.sock, b'G');
    send(&mut f.sock, &copy_data(b"6001\tcopy\n"));
    std::thread::sleep(Duration::from_millis(150));
    let _ = f.sock.shutdown(Shutdown::Both);
    drop(f);

    // A client that is still fine afterwards.
    let mut g = Raw::login(port, "postgres", db);
    assert_eq!(g.query("SELECT 42").unwrap(), vec!["42".to_string()]);
    g.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_with_killed_clients_stops_clean() {
    let _serial = serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("lc_mixed");
    pg.psql(&db, "CREATE TABLE t (id int, src text)");
    let offset = pg.log_len();
    let tp = Tidepool::start(&config_text(
        pg,
        &db,
        &pool_cfg("transaction", 4, "checkout_timeout = \"10s\""),
        "",
    ))
    .await;
    let port = tp.port();
    bounded(40, "mixed workload", async {
        let db2 = db.clone();
        let (ok, out) =
            tokio::task::spawn_blocking(move || tp::pgbench(port, &db2, &["-i", "-s", "1", "-q"]))
                .await
                .unwrap();
        assert!(ok, "pgbench -i failed:\n{out}");

        // pgbench and the killed clients at the same time.
        let db2 = db.clone();
        let bench = tokio::task::spawn_blocking(move || {
            tp::pgbench(port, &db2, &["-c", "8", "-j", "2", "-T", "3"])
        });
        let db2 = db.clone();
        let kills = tokio::task::spawn_blocking(move || killed_clients(port, &db2));
        kills.await.expect("killed-client scenarios");
        let (ok, out) = bench.await.unwrap();
        assert!(ok, "pgbench failed:\n{out}");
        assert_eq!(tp::pgbench_failed(&out), Some(0), "{out}");

        // A session that panics while it holds a server (inside a transaction that wrote a
        // row): its client is cut off, and the server is recovered (rolled back), not leaked.
        let c = tp.connect(&db).await;
        c.batch_execute("BEGIN; INSERT INTO t VALUES (9005, 'killed')")
            .await
            .unwrap();
        tp.shared.panic_next_session_for_test();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            c.simple_query("SELECT pg_sleep(0.1)"),
        )
        .await
        .expect("the panicking session's client is answered or closed");
        assert!(r.is_err(), "the client of a panicked session gets an error");
        drop(c);

        settle(&tp, &db).await;
        // Rows of the transactions whose clients were killed were rolled back; the COPYs
        // whose clients were killed wrote nothing.
        assert_eq!(
            pg.psql(&db, "SELECT count(*) FROM t"),
            "0",
            "rows: {}",
            pg.psql(&db, "SELECT string_agg(id || ':' || src, ',') FROM t")
        );
        // Still serving.
        let c = tp.connect(&db).await;
        assert_eq!(first_value(&c.simple_query("SELECT 7").await.unwrap()), "7");
        drop(c);
    })
    .await;
    assert_eq!(tp.leaked(), 0, "leak counter");
    let hard = shutdowns(&tp, &db, "hard");
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
    assert_eq!(hard, 0, "server connections closed hard before the stop");
    assert_eq!(report.servers_closed_hard, 0, "{report:?}");
    let log = quiet_log_since(pg, &db, offset).await;
    assert_no_abrupt_disconnects(&log, "mixed workload");
}

// ---------------------------------------------------------------------------------------------
// 2. Leaks on purpose are counted exactly.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaked_connections_are_counted_exactly() {
    let _serial = serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("lc_leak");
    let tp = Tidepool::start(&config_text(pg, &db, &pool_cfg("transaction", 5, ""), "")).await;
    bounded(20, "leak on purpose", async {
        let pool = tp
            .shared
            .pool_for(&tp.shared.runtime(), &db, "postgres", None)
            .expect("pool");
        let before = tp.leaked();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.checkout().await.expect("checkout"));
        }
        let pids: std::collections::HashSet<i32> = held.iter().map(|c| c.key.pid).collect();
        assert_eq!(pids.len(), 3, "three distinct server connections");
        for c in held {
            c.leak_for_test();
        }
        assert_eq!(tp.leaked(), before + 3);
        assert_eq!(
            tp.metric_with(
                "tidepool_server_connections_leaked_total",
                &[("pool", &pool_label(&db))]
            ),
            3.0
        );
        // The slots came back: the pool still lends up to its size.
        let st = pool.status();
        assert_eq!((st.active, st.idle), (0, 0), "{st:?}");
        let mut again = Vec::new();
        for _ in 0..5 {
            again.push(pool.checkout().await.expect("checkout after the leaks"));
        }
        drop(again);
        settle(&tp, &db).await;
        // Nothing else leaked meanwhile.
        assert_eq!(tp.leaked(), before + 3);
    })
    .await;
    let report = tp.stop().await;
    assert_eq!(report.leaked, 3, "{report:?}");
}

// ---------------------------------------------------------------------------------------------
// 3. A panic while holding a server gives the slot back.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_while_holding_a_server_returns_the_slot() {
    let _serial = serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("lc_panic");
    let offset = pg.log_len();
    let tp = Tidepool::start(&config_text(
        pg,
        &db,
        &pool_cfg("transaction", 2, "checkout_timeout = \"5s\""),
        "",
    ))
    .await;
    bounded(20, "panic and capacity", async {
        // The victim holds a server (open transaction) when its session panics.
        let victim = tp.connect(&db).await;
        victim.batch_execute("BEGIN").await.unwrap();
        tp.shared.panic_next_session_for_test();
        let r = tokio::time::timeout(Duration::from_secs(5), victim.simple_query("SELECT 1"))
            .await
            .expect("bounded");
        assert!(r.is_err(), "the panicked session's client is closed");
        drop(victim);

        // Two clients that each hold a transaction at the same time: both slots are usable.
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let mut tasks = Vec::new();
        for i in 0..2 {
            let c = tp.connect(&db).await;
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                c.batch_execute("BEGIN").await?;
                let pid = backend_pid(&c).await;
                // Both transactions are open at once, or this never returns.
                barrier.wait().await;
                c.batch_execute(&format!("SELECT pg_sleep(0.2), {i}"))
                    .await?;
                c.batch_execute("COMMIT").await?;
                Ok::<_, tokio_postgres::Error>((pid, t0.elapsed()))
            }));
        }
        let mut pids = Vec::new();
        for t in tasks {
            let (pid, took) = tokio::time::timeout(Duration::from_secs(6), t)
                .await
                .expect("both transactions within checkout_timeout")
                .unwrap()
                .expect("transaction succeeds");
            assert!(took < Duration::from_secs(5), "took {took:?}");
            pids.push(pid);
        }
        assert_ne!(pids[0], pids[1], "two servers at once");
        settle(&tp, &db).await;
        assert_eq!(server_gauge(&tp, &db, "active"), 0);
        assert!(pool_within(&tp, &db, 2));
    })
    .await;
    assert_eq!(tp.leaked(), 0, "leak counter");
    // Every client has gone: no client may still be counted (the panicked one included).
    let clients_ok = eventually(Duration::from_secs(2), || {
        tp.metric_with("tidepool_client_connections", &[]) == 0.0
    })
    .await;
    let gauges: Vec<String> = tp
        .shared
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("tidepool_client_connections{"))
        .map(str::to_string)
        .collect();
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
    let log = quiet_log_since(pg, &db, offset).await;
    assert_no_abrupt_disconnects(&log, "panic while holding a server");
    assert!(
        clients_ok,
        "tidepool_client_connections still counts clients after all have gone: {gauges:?}"
    );
}

/// The hook's documented contract (`Shared::panic_next_session_for_test`): "the next session
/// that holds a server panics", including a transaction-mode client that takes its server for
/// the query it sends after the hook was armed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_hook_fires_for_the_next_query_in_transaction_mode() {
    let _serial = serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("lc_hook");
    let tp = Tidepool::start(&config_text(pg, &db, &pool_cfg("transaction", 2, ""), "")).await;
    bounded(20, "panic hook", async {
        let victim = tp.connect(&db).await;
        victim.simple_query("SELECT 1").await.unwrap();
        tp.shared.panic_next_session_for_test();
        let r = tokio::time::timeout(Duration::from_secs(5), victim.simple_query("SELECT 1"))
            .await
            .expect("bounded");
        assert!(
            r.is_err(),
            "the armed hook did not panic the session that took a server for this query"
        );
        drop(victim);
        settle(&tp, &db).await;
        let c = tp.connect(&db).await;
        c.simple_query("SELECT 1").await.unwrap();
        drop(c);
        settle(&tp, &db).await;
    })
    .await;
    assert_eq!(tp.leaked(), 0, "leak counter");
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
}

fn pool_within(tp: &Tidepool, db: &str, size: usize) -> bool {
    let idle = server_gauge(tp, db, "idle");
    let active = server_gauge(tp, db, "active");
    idle >= 0 && active >= 0 && (idle + active) as usize <= size
}

// ---------------------------------------------------------------------------------------------
// 4. server_lifetime and server_idle_timeout close with Terminate.
// ---------------------------------------------------------------------------------------------

async fn expiry_closes_with_terminate(setting: &str, reason: &str) {
    let pg = PgCluster::shared();
    let db = pg.create_db(&format!("lc_{reason}"));
    let offset = pg.log_len();
    let tp = Tidepool::start(&config_text(
        pg,
        &db,
        &pool_cfg("transaction", 2, &format!("{setting} = \"1s\"")),
        "",
    ))
    .await;
    bounded(20, reason, async {
        let c = tp.connect(&db).await;
        let pid = backend_pid(&c).await;
        let closed_before = closed_total(&tp, &db, reason);
        let clean_before = shutdowns(&tp, &db, "clean");
        // The upkeep runs once a second; the connection is past 1 s after at most two ticks.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let ok = eventually(Duration::from_secs(2), || {
            closed_total(&tp, &db, reason) > closed_before
        })
        .await;
        assert!(
            ok,
            "closed_total{{reason=\"{reason}\"}} did not increase ({closed_before})"
        );
        assert!(
            shutdowns(&tp, &db, "clean") > clean_before,
            "shutdowns{{outcome=\"clean\"}} did not increase"
        );
        assert_eq!(shutdowns(&tp, &db, "hard"), 0);
        let needle = format!("[{pid}]");
        let seen = {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let log = pg.log_since(offset);
                if log
                    .lines()
                    .any(|l| l.contains(&needle) && l.contains("disconnection:"))
                {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let log = pg.log_since(offset);
        let mine: Vec<&str> = log.lines().filter(|l| l.contains(&needle)).collect();
        assert!(
            seen,
            "no disconnection line for backend {pid}:\n{}",
            mine.join("\n")
        );
        assert_no_abrupt_disconnects(&mine.join("\n"), &format!("{reason} close of {pid}"));
        // The client carries on, on a new server.
        let pid2 = backend_pid(&c).await;
        assert_ne!(pid, pid2, "the expired server was not reused");
        drop(c);
        settle(&tp, &db).await;
    })
    .await;
    assert_eq!(tp.leaked(), 0, "leak counter");
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
    let log = quiet_log_since(pg, &db, offset).await;
    assert_no_abrupt_disconnects(&log, reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_closes_with_terminate() {
    let _serial = serial().await;
    expiry_closes_with_terminate("server_lifetime", "lifetime").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_idle_timeout_closes_with_terminate() {
    let _serial = serial().await;
    expiry_closes_with_terminate("server_idle_timeout", "idle_timeout").await;
}

// ---------------------------------------------------------------------------------------------
// 5. pg_terminate_backend on an idle server.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_idle_server_is_replaced() {
    let _serial = serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("lc_terminate");
    let tp = Tidepool::start(&config_text(pg, &db, &pool_cfg("transaction", 1, ""), "")).await;
    bounded(20, "terminated idle server", async {
        let c = tp.connect(&db).await;
        let pid = backend_pid(&c).await;
        assert_eq!(tp.metric("tidepool_server_connections_opened_total"), 1);
        let errors_before = closed_total(&tp, &db, "error");
        assert_eq!(
            pg.psql(&db, &format!("SELECT pg_terminate_backend({pid})")),
            "t"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rows = c
            .simple_query("SELECT pg_backend_pid()")
            .await
            .expect("the next query works on a fresh server");
        let pid2: i32 = first_value(&rows).parse().unwrap();
        assert_ne!(pid2, pid);
        let ok = eventually(Duration::from_secs(3), || {
            closed_total(&tp, &db, "error") > errors_before
        })
        .await;
        assert!(ok, "closed_total{{reason=\"error\"}} did not increase");
        // Exactly one: give a late double count the chance to show.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(closed_total(&tp, &db, "error"), errors_before + 1);
        assert_eq!(tp.metric("tidepool_server_connections_opened_total"), 2);
        drop(c);
        settle(&tp, &db).await;
    })
    .await;
    assert_eq!(tp.leaked(), 0, "leak counter");
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
}

// ---------------------------------------------------------------------------------------------
// 6. Cancellation matrix.
// ---------------------------------------------------------------------------------------------

/// Aborts the task on drop (so aborting the owner also kills a connection task).
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn client_work(
    client: &tokio_postgres::Client,
    style: usize,
    n: i32,
) -> Result<(), tokio_postgres::Error> {
    for round in 0..1000 {
        match (style + round) % 4 {
            0 => {
                client.batch_execute("BEGIN").await?;
                client
                    .execute("INSERT INTO t VALUES ($1, 'matrix')", &[&n])
                    .await?;
                client.batch_execute("SELECT pg_sleep(0.005)").await?;
                client.batch_execute("COMMIT").await?;
            }
            1 => {
                let row = client.query_one("SELECT $1::int4 + 1", &[&n]).await?;
                assert_eq!(row.get::<_, i32>(0), n + 1);
            }
            2 => {
                client.simple_query("SELECT pg_sleep(0.01)").await?;
            }
            _ => {
                client
                    .batch_execute("BEGIN; SELECT count(*) FROM t; SELECT pg_sleep(0.003)")
                    .await?;
                client.batch_execute("ROLLBACK").await?;
            }
        }
    }
    Ok(())
}

/// A client of the matrix: connects through tidepool and works until aborted. `style` picks
/// how the connection dies on abort: driven in this task (the socket is dropped abruptly), in
/// its own task that outlives the client (tokio-postgres closes it), or in its own task that
/// is aborted too.
async fn matrix_client(info: String, style: usize, n: i32) {
    let Ok((client, conn)) = tokio_postgres::connect(&info, tokio_postgres::NoTls).await else {
        return;
    };
    match style % 3 {
        0 => {
            tokio::select! {
                _ = conn => {}
                _ = client_work(&client, style, n) => {}
            }
        }
        1 => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let _ = client_work(&client, style, n).await;
        }
        _ => {
            let _conn = AbortOnDrop(tokio::spawn(async move {
                let _ = conn.await;
            }));
            let _ = client_work(&client, style, n).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_matrix_keeps_the_pool_sound() {
    let _serial = serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("lc_matrix");
    pg.psql(&db, "CREATE TABLE t (id int, src text)");
    let offset = pg.log_len();
    let tp = Tidepool::start(&config_text(
        pg,
        &db,
        &pool_cfg("transaction", 2, "checkout_timeout = \"5s\""),
        "",
    ))
    .await;
    let info = tp.conninfo(&db, "postgres");
    let pool = tp
        .shared
        .pool_for(&tp.shared.runtime(), &db, "postgres", None)
        .expect("pool");
    bounded(40, "cancellation matrix", async {
        // (a) Clients aborted at many points: connecting, logging in, waiting for a server,
        // mid-transaction, mid-query, between statements.
        let mut max_in_pool = 0usize;
        for i in 0..40usize {
            let delay = Duration::from_micros(((i * 7919) % 50_000) as u64);
            let handles: Vec<_> = (0..3)
                .map(|k| tokio::spawn(matrix_client(info.clone(), i + k, (i * 10 + k) as i32)))
                .collect();
            tokio::time::sleep(delay).await;
            let st = pool.status();
            max_in_pool = max_in_pool.max(st.active + st.idle);
            for h in &handles {
                h.abort();
            }
            for h in handles {
                let _ = h.await;
            }
        }
        assert!(max_in_pool <= 2, "pool held {max_in_pool} connections");
        settle(&tp, &db).await;

        // (b) pool.checkout() futures dropped at several points while a connect is under way.
        // Empty the pool first (explicit shutdown), so that every checkout has to connect.
        let mut taken = Vec::new();
        for _ in 0..2 {
            taken.push(pool.checkout().await.expect("checkout"));
        }
        for c in taken {
            c.detach().shutdown(Duration::from_secs(2)).await;
        }
        let (mut aborted, mut completed) = (0, 0);
        for i in 0..30u64 {
            let d = if i % 10 == 9 {
                Duration::from_secs(2)
            } else {
                Duration::from_micros((i * 523) % 5_000)
            };
            match tokio::time::timeout(d, pool.checkout()).await {
                Ok(Ok(c)) => {
                    completed += 1;
                    c.detach().shutdown(Duration::from_secs(2)).await;
                }
                Ok(Err(e)) => panic!("checkout failed: {e}"),
                Err(_) => aborted += 1,
            }
        }
        assert!(
            aborted > 0 && completed > 0,
            "aborted {aborted}, completed {completed}"
        );
        // And a checkout aborted while it waits for a slot.
        let h1 = pool.checkout().await.expect("checkout");
        let h2 = pool.checkout().await.expect("checkout");
        for ms in [0u64, 1, 3] {
            assert!(
                tokio::time::timeout(Duration::from_millis(ms), pool.checkout())
                    .await
                    .is_err(),
                "the pool is full"
            );
        }
        assert_eq!(pool.status().waiting, 0, "waiters counted after abort");
        drop((h1, h2));
        settle(&tp, &db).await;

        // Afterwards: the size bound holds, in tidepool and in Postgres.
        let st = pool.status();
        assert!(st.active + st.idle <= 2, "{st:?}");
        assert!(pool_within(&tp, &db, 2));
        let db2 = db.clone();
        let n = tokio::task::spawn_blocking(move || {
            wait_backends_at_most(PgCluster::shared(), &db2, 2, Duration::from_secs(5))
        })
        .await
        .unwrap();
        assert!(n <= 2, "{n} server connections in Postgres for a pool of 2");
        assert_eq!(tp.leaked(), 0, "leak counter");
        // A fresh client works.
        let c = tp.connect(&db).await;
        assert_eq!(
            first_value(&c.simple_query("SELECT 11").await.unwrap()),
            "11"
        );
        c.batch_execute("BEGIN; INSERT INTO t VALUES (-1, 'fresh'); COMMIT")
            .await
            .unwrap();
        drop(c);
        settle(&tp, &db).await;
    })
    .await;
    assert_eq!(tp.leaked(), 0, "leak counter");
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
    // Informational (shown with --nocapture): checkouts dropped mid-login leave abrupt
    // disconnects in the Postgres log; the client-facing form of that is asserted by
    // `client_leaving_during_server_connect_causes_no_abrupt_disconnect`.
    let log = quiet_log_since(pg, &db, offset).await;
    let abrupt = tp::abrupt_disconnects(&log);
    eprintln!(
        "cancellation matrix: {} abrupt disconnect line(s) in the Postgres log:\n{}",
        abrupt.len(),
        abrupt.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 7. A client that leaves while tidepool is still logging in to a server for it.
// ---------------------------------------------------------------------------------------------

/// DESIGN.md section 4: no abrupt disconnect in the Postgres log in any scenario that is not a
/// simulated crash. Here each client sends a query when the pool has no idle server and leaves
/// 0-6 ms later, so the relay gives up on its checkout at various points of the server login
/// (TCP connect, startup sent, authentication); that login must still end with Terminate
/// (finished and parked, or shut down), not with a dropped socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_during_server_connect_causes_no_abrupt_disconnect() {
    let _serial = serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("lc_abandon");
    let offset = pg.log_len();
    let tp = Tidepool::start(&config_text(
        pg,
        &db,
        &pool_cfg("transaction", 64, "checkout_timeout = \"5s\""),
        "",
    ))
    .await;
    let port = tp.port();
    bounded(25, "client leaving during connect", async {
        // Clients in open transactions keep every existing server busy, so that each leaving
        // client's query needs a new server.
        let mut holders = Vec::new();
        // 0 to 6 ms in steps of 125 us: the login window moves with the machine's speed.
        let delays_us = (0..48u64).map(|i| i * 125);
        for d in delays_us {
            let db2 = db.clone();
            let leaver = tokio::task::spawn_blocking(move || Raw::login(port, "postgres", &db2))
                .await
                .unwrap();
            while server_gauge(&tp, &db, "idle") > 0 {
                let h = tp.connect(&db).await;
                h.batch_execute("BEGIN").await.unwrap();
                holders.push(h);
            }
            tokio::task::spawn_blocking(move || {
                let mut c = leaver;
                send(&mut c.sock, &raw::query_msg("SELECT 1"));
                std::thread::sleep(Duration::from_micros(d));
                let _ = c.sock.shutdown(Shutdown::Both);
            })
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        for h in holders {
            h.batch_execute("ROLLBACK").await.unwrap();
        }
        settle(&tp, &db).await;
        let c = tp.connect(&db).await;
        c.simple_query("SELECT 1").await.unwrap();
        drop(c);
        settle(&tp, &db).await;
    })
    .await;
    assert_eq!(tp.leaked(), 0, "leak counter");
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
    let log = quiet_log_since(pg, &db, offset).await;
    assert_no_abrupt_disconnects(&log, "clients leaving while their server connects");
}
