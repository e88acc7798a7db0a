//! The PgBouncer-compatible admin console (issue 17, DESIGN.md section 10), against the real
//! Postgres: every SHOW through psql with PgBouncer 1.25's columns, pgbouncer_exporter
//! scraping it, access control, errors that keep the session, the commands (PAUSE, RESUME,
//! RECONNECT, WAIT_CLOSE, KILL, KILL_CLIENT), an upstream switch under pgbench load with no
//! failed transaction, and SHUTDOWN as the signals' drains. Every test ends with no leaked
//! server connection and no abrupt disconnect in Postgres's log.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::raw::Raw;
use common::tp::{self, config_text, free_port, http_get, Tidepool, TidepoolProcess};
use common::venv;

// PgBouncer 1.25's columns, in its order, written down from its source at tag
// `pgbouncer_1_25_2` (github.com/pgbouncer/pgbouncer): src/admin.c (admin_show_pools,
// socket_header for CLIENTS and SERVERS, admin_show_databases, admin_show_users,
// admin_show_config, admin_show_lists, admin_show_version, admin_show_state) and src/stats.c
// (admin_database_stats, admin_database_stats_totals, admin_database_stats_averages).

const POOLS: &[&str] = &[
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "cl_active_cancel_req",
    "cl_waiting_cancel_req",
    "sv_active",
    "sv_active_cancel",
    "sv_being_canceled",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
    "load_balance_hosts",
];
/// SHOW CLIENTS and SHOW SERVERS (socket_header, not the debug columns).
const SOCKETS: &[&str] = &[
    "type",
    "user",
    "database",
    "replication",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
    "prepared_statements",
    "id",
];
const STATS: &[&str] = &[
    "database",
    "total_server_assignment_count",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "total_client_parse_count",
    "total_server_parse_count",
    "total_bind_count",
    "avg_server_assignment_count",
    "avg_xact_count",
    "avg_query_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
    "avg_client_parse_count",
    "avg_server_parse_count",
    "avg_bind_count",
];
const STATS_TOTALS: &[&str] = &[
    "database",
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
    "client_parse_count",
    "server_parse_count",
    "bind_count",
];
const STATS_AVERAGES: &[&str] = &[
    "database",
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
    "avg_client_parse_count",
    "avg_server_parse_count",
    "avg_bind_count",
];
const DATABASES: &[&str] = &[
    "name",
    "host",
    "port",
    "database",
    "force_user",
    "pool_size",
    "min_pool_size",
    "reserve_pool_size",
    "server_lifetime",
    "pool_mode",
    "load_balance_hosts",
    "max_connections",
    "current_connections",
    "max_client_connections",
    "current_client_connections",
    "paused",
    "disabled",
];
const USERS: &[&str] = &[
    "name",
    "pool_size",
    "reserve_pool_size",
    "pool_mode",
    "max_user_connections",
    "current_connections",
    "max_user_client_connections",
    "current_client_connections",
];
const CONFIG: &[&str] = &["key", "value", "default", "changeable"];
const LISTS: &[&str] = &["list", "items"];
const VERSION: &[&str] = &["version"];
const STATE: &[&str] = &["key", "value"];

/// Columns of tidepool's own, after PgBouncer's (README, "Admin console").
const POOLS_EXTRA: &[&str] = &["paused"];

/// A config for `db` on `pg` with console users `admin` (every command) and `mon` (SHOW).
fn console_config(pg: &PgCluster, db: &str, pool: &str) -> String {
    config_text(pg, db, pool, "").replacen(
        "[admin]\naddr = \"127.0.0.1:0\"\n",
        "[admin]\naddr = \"127.0.0.1:0\"\nconsole_users = [\"admin\"]\nstats_users = [\"mon\"]\n",
        1,
    )
}

/// A result set as psql prints it unaligned: the header, then the rows.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn col(&self, name: &str) -> usize {
        self.header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", self.header))
    }

    /// The rows whose `col` is `value`.
    fn find(&self, col: &str, value: &str) -> Vec<HashMap<String, String>> {
        let c = self.col(col);
        self.rows
            .iter()
            .filter(|r| r.get(c).is_some_and(|v| v == value))
            .map(|r| self.header.iter().cloned().zip(r.iter().cloned()).collect())
            .collect()
    }

    fn one(&self, col: &str, value: &str) -> HashMap<String, String> {
        let mut v = self.find(col, value);
        assert_eq!(v.len(), 1, "rows with {col} = {value}: {v:?}");
        v.remove(0)
    }
}

const SEP: &str = "\u{1f}";

/// `psql -h 127.0.0.1 -p PORT -U user pgbouncer -c sql`, unaligned; `Err(stderr)` if psql fails.
fn psql(port: u16, user: &str, sql: &str) -> Result<Table, String> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-F", SEP, "-P", "footer=off"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", user])
        .args(["-d", "pgbouncer", "-c", sql])
        .env_remove("PGPASSWORD")
        .env_remove("PGOPTIONS")
        .env_remove("PGSSLMODE")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines().filter(|l| !l.is_empty());
    let header = lines
        .next()
        .map(|h| h.split(SEP).map(str::to_string).collect())
        .unwrap_or_default();
    let rows = lines
        .map(|l| l.split(SEP).map(str::to_string).collect())
        .collect();
    Ok(Table { header, rows })
}

async fn psql_async(port: u16, user: &str, sql: &str) -> Result<Table, String> {
    let (user, sql) = (user.to_string(), sql.to_string());
    tokio::task::spawn_blocking(move || psql(port, &user, &sql))
        .await
        .unwrap()
}

/// Every SHOW command answers through psql with PgBouncer 1.25's columns, in its order, and
/// values in its units.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_show_answers_psql_with_pgbouncers_columns() {
    let _g = tp::serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("console_show");
    let offset = pg.log_len();
    let pool = "mode = \"transaction\"\nsize = 4\ncheckout_timeout = \"30s\"";
    let tp = Tidepool::start(&console_config(pg, &db, pool)).await;
    let port = tp.port();
    // Some traffic, and a client that stays connected.
    let client = tp.connect(&db).await;
    for _ in 0..5 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    client
        .batch_execute("BEGIN; SELECT pg_sleep(0.01); COMMIT")
        .await
        .unwrap();
    let pid: i32 = pg
        .psql(
            "postgres",
            &format!("SELECT pid FROM pg_stat_activity WHERE datname = '{db}' LIMIT 1"),
        )
        .parse()
        .expect("a server connection to the database");

    let expect: &[(&str, &[&str], &[&str])] = &[
        ("SHOW POOLS", POOLS, POOLS_EXTRA),
        ("SHOW CLIENTS", SOCKETS, &[]),
        ("SHOW SERVERS", SOCKETS, &[]),
        ("SHOW STATS", STATS, &[]),
        ("SHOW STATS_TOTALS", STATS_TOTALS, &[]),
        ("SHOW STATS_AVERAGES", STATS_AVERAGES, &[]),
        ("SHOW DATABASES", DATABASES, &[]),
        ("SHOW USERS", USERS, &[]),
        ("SHOW CONFIG", CONFIG, &[]),
        ("SHOW LISTS", LISTS, &[]),
        ("SHOW VERSION", VERSION, &[]),
        ("SHOW STATE", STATE, &[]),
    ];
    let mut tables = HashMap::new();
    for (cmd, cols, extra) in expect {
        let t = psql_async(port, "admin", cmd)
            .await
            .unwrap_or_else(|e| panic!("{cmd} through psql failed: {e}"));
        let want: Vec<&str> = cols.iter().chain(extra.iter()).copied().collect();
        assert_eq!(t.header, want, "{cmd}: columns");
        assert!(!t.rows.is_empty(), "{cmd}: no rows");
        for r in &t.rows {
            assert_eq!(r.len(), want.len(), "{cmd}: row {r:?}");
        }
        tables.insert(*cmd, t);
    }

    let pools = &tables["SHOW POOLS"];
    let p = pools.one("database", &db);
    assert_eq!(p["user"], "postgres");
    assert_eq!(p["pool_mode"], "transaction");
    assert_eq!(p["cl_active"], "1", "{p:?}");
    assert_eq!(p["cl_waiting"], "0");
    assert_eq!(p["sv_idle"], "1", "{p:?}");
    assert_eq!(p["maxwait"], "0");
    assert_eq!(p["load_balance_hosts"], "");
    assert_eq!(p["paused"], "0");
    let admin_pool = pools.one("database", "pgbouncer");
    assert_eq!(admin_pool["pool_mode"], "statement");
    assert_eq!(admin_pool["cl_active"], "1", "psql itself");

    let clients = &tables["SHOW CLIENTS"];
    let c = clients.one("database", &db);
    assert_eq!(c["type"], "C");
    assert_eq!(c["user"], "postgres");
    assert_eq!(c["state"], "idle");
    assert_eq!(c["addr"], "127.0.0.1");
    assert_eq!(c["local_port"], port.to_string());
    assert!(c["connect_time"].ends_with(" UTC"), "{c:?}");
    let me = clients.one("database", "pgbouncer");
    assert_eq!(me["user"], "admin");
    assert_eq!(
        me["application_name"], "",
        "console sessions keep no parameters"
    );

    let servers = &tables["SHOW SERVERS"];
    let s = servers.one("database", &db);
    assert_eq!(s["type"], "S");
    assert_eq!(s["state"], "idle");
    assert_eq!(s["port"], pg.port().to_string());
    assert_eq!(s["remote_pid"], pid.to_string(), "the backend's pid");
    assert_eq!(s["close_needed"], "0");

    let stats = &tables["SHOW STATS"];
    let st = stats.one("database", &db);
    let num = |m: &HashMap<String, String>, k: &str| -> u64 {
        m[k].parse().unwrap_or_else(|_| panic!("{k} = {:?}", m[k]))
    };
    assert!(num(&st, "total_xact_count") >= 6, "{st:?}");
    assert!(num(&st, "total_query_count") >= 6, "{st:?}");
    assert!(num(&st, "total_received") > 0 && num(&st, "total_sent") > 0);
    // Microseconds: the transaction with pg_sleep(0.01) alone held its server 10 ms.
    assert!(num(&st, "total_xact_time") >= 10_000, "{st:?}");
    assert!(num(&st, "total_server_assignment_count") >= 6, "{st:?}");
    assert!(num(&st, "avg_xact_count") > 0, "{st:?}");
    stats.one("database", "pgbouncer");
    let totals = tables["SHOW STATS_TOTALS"].one("database", &db);
    assert_eq!(totals["xact_count"], st["total_xact_count"]);

    let dbs = &tables["SHOW DATABASES"];
    let d = dbs.one("name", &db);
    assert_eq!(d["host"], "127.0.0.1");
    assert_eq!(d["port"], pg.port().to_string());
    assert_eq!(d["database"], db);
    assert_eq!(d["pool_size"], "4");
    assert_eq!(d["server_lifetime"], "3600", "seconds");
    assert_eq!(d["pool_mode"], "", "NULL: inherits [pool]'s mode");
    assert_eq!(d["current_connections"], "1");
    assert_eq!(d["current_client_connections"], "1");
    assert_eq!(d["paused"], "0");
    dbs.one("name", "pgbouncer");

    tables["SHOW USERS"].one("name", "postgres");
    let config = &tables["SHOW CONFIG"];
    assert_eq!(config.one("key", "max_client_conn")["value"], "10000");
    assert_eq!(config.one("key", "default_pool_size")["value"], "4");
    assert_eq!(config.one("key", "listen_port")["changeable"], "no");
    assert_eq!(config.one("key", "pool.size")["default"], "20");
    assert_eq!(config.one("key", "admin.console_users")["value"], "admin");
    let lists = &tables["SHOW LISTS"];
    assert_eq!(lists.one("list", "pools")["items"], "2");
    assert_eq!(lists.one("list", "used_servers")["items"], "1");
    let version = &tables["SHOW VERSION"].rows[0][0];
    assert!(version.starts_with("tidepool "), "{version}");
    let state = &tables["SHOW STATE"];
    assert_eq!(state.one("key", "paused")["value"], "no");
    assert_eq!(state.one("key", "active")["value"], "yes");

    // Lower case and a trailing semicolon work as with PgBouncer; SHOW HELP answers.
    let t = psql_async(port, "admin", "show pools;").await.unwrap();
    assert_eq!(t.header[0], "database");
    psql_async(port, "admin", "SHOW HELP").await.unwrap();

    drop(client);
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

async fn console_client(
    tp: &Tidepool,
    user: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    tp.try_connect("pgbouncer", user).await
}

/// The server's message of an error (tokio-postgres's Display says only "db error").
fn msg(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// Rows of a simple query as maps of column → value.
async fn rows(
    c: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<HashMap<String, Option<String>>>, tokio_postgres::Error> {
    let msgs = c.simple_query(sql).await?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| (col.name().to_string(), r.get(i).map(str::to_string)))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

async fn pool_row(c: &tokio_postgres::Client, db: &str) -> HashMap<String, Option<String>> {
    rows(c, "SHOW POOLS")
        .await
        .unwrap()
        .into_iter()
        .find(|r| r["database"].as_deref() == Some(db))
        .unwrap_or_else(|| panic!("no pool for {db}"))
}

/// Who may log in, and errors that never end the session: an unknown command, the extended
/// protocol (a driver's prepared query), a stats user's PAUSE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_and_errors_keep_the_session() {
    let _g = tp::serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("console_acl");
    let offset = pg.log_len();
    let pool = "mode = \"transaction\"\nsize = 2\ncheckout_timeout = \"30s\"";
    let tp = Tidepool::start(&console_config(pg, &db, pool)).await;

    // Not in console_users or stats_users: refused at login with 28000.
    let err = console_client(&tp, "app").await.expect_err("refused");
    assert_eq!(code(&err), "28000", "{err:?}");
    let err = tp
        .try_connect("tidepool", "app")
        .await
        .expect_err("refused");
    assert_eq!(code(&err), "28000", "{err:?}");
    let out = tokio::task::spawn_blocking({
        let port = tp.port();
        move || psql(port, "app", "SHOW POOLS")
    })
    .await
    .unwrap();
    assert!(out.is_err_and(|e| e.contains("may not use the console")));

    // A stats user: SHOW yes, PAUSE no, and the session goes on.
    let mon = console_client(&tp, "mon")
        .await
        .expect("stats user logs in");
    assert!(!rows(&mon, "SHOW POOLS").await.unwrap().is_empty());
    let err = mon.simple_query("PAUSE").await.expect_err("refused");
    assert_eq!(code(&err), "42501", "{err:?}");
    assert!(msg(&err).contains("admin access needed"), "{err:?}");
    for cmd in ["RESUME", "RELOAD", "SHUTDOWN", &format!("KILL {db}")] {
        let err = mon.simple_query(cmd).await.expect_err("refused");
        assert_eq!(code(&err), "42501", "{cmd}: {err:?}");
    }
    assert_eq!(
        rows(&mon, "SHOW STATE").await.unwrap()[1]["value"].as_deref(),
        Some("no")
    );

    // The admin, on the other name: errors keep the session.
    let admin = tp
        .try_connect("tidepool", "admin")
        .await
        .expect("admin logs in");
    let err = admin.simple_query("SHOW NOTHING").await.err().unwrap();
    assert_eq!(code(&err), "42601", "{err:?}");
    assert!(msg(&err).contains("use SHOW HELP"), "{err:?}");
    let err = admin.simple_query("SELECT 1").await.err().unwrap();
    assert_eq!(code(&err), "42601", "{err:?}");
    // The extended protocol (what a driver's query() sends): an error, then Sync, and on.
    let err = admin.query("SHOW POOLS", &[]).await.err().unwrap();
    assert!(msg(&err).contains("extended query protocol"), "{err:?}");
    assert!(admin.simple_query("").await.is_ok());
    let set = admin.simple_query("SET client_encoding = 'UTF8'").await;
    assert!(set.is_ok(), "{set:?}");
    let err = admin
        .simple_query("SET pool_mode = session")
        .await
        .err()
        .unwrap();
    assert_eq!(code(&err), "0A000", "{err:?}");
    let err = admin.simple_query("PAUSE nosuchdb").await.err().unwrap();
    assert_eq!(code(&err), "3D000", "{err:?}");
    assert!(msg(&err).contains("no such database: nosuchdb"), "{err:?}");
    let err = admin.simple_query("PAUSE pgbouncer").await.err().unwrap();
    assert!(msg(&err).contains("cannot pause admin db"), "{err:?}");
    let err = admin.simple_query("RESUME").await.err().unwrap();
    assert!(msg(&err).contains("not paused"), "{err:?}");
    let version = rows(&admin, "SHOW VERSION").await.unwrap();
    assert!(version[0]["version"]
        .as_deref()
        .unwrap()
        .contains("tidepool"));

    drop((mon, admin));
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

/// PAUSE/RESUME of a database, its deadline, RECONNECT + WAIT_CLOSE, KILL and KILL_CLIENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_reconnect_kill() {
    let _g = tp::serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("console_cmds");
    let offset = pg.log_len();
    let pool = "mode = \"transaction\"\nsize = 2\ncheckout_timeout = \"30s\"";
    let config = console_config(pg, &db, pool).replace("timeout = \"10s\"", "timeout = \"2s\"");
    let tp = Tidepool::start_with(&config, true).await;
    let http = tp.admin.expect("admin endpoint").port();
    let admin = console_client(&tp, "admin").await.unwrap();
    let app = tp.connect(&db).await;
    app.simple_query("SELECT 1").await.unwrap();
    let pool_name = format!("{db}/postgres");

    // PAUSE with an idle pool answers at once; a query then waits, visibly.
    let t0 = Instant::now();
    admin.simple_query(&format!("PAUSE {db}")).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    let waiting = tokio::spawn(async move {
        let r = app.simple_query("SELECT 42").await.map(|_| ());
        (app, r)
    });
    let mut row = pool_row(&admin, &db).await;
    let t0 = Instant::now();
    while row["cl_waiting"].as_deref() != Some("1") {
        assert!(t0.elapsed() < Duration::from_secs(5), "{row:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        row = pool_row(&admin, &db).await;
    }
    assert_eq!(row["paused"].as_deref(), Some("1"));
    assert_eq!(row["sv_active"].as_deref(), Some("0"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let row = pool_row(&admin, &db).await;
    let us = |k: &str| row[k].as_deref().unwrap().parse::<u64>().unwrap();
    let waited = us("maxwait") * 1_000_000 + us("maxwait_us");
    assert!((200_000..5_000_000).contains(&waited), "{row:?}");
    let dbs = rows(&admin, "SHOW DATABASES").await.unwrap();
    let d = dbs
        .iter()
        .find(|r| r["name"].as_deref() == Some(db.as_str()))
        .unwrap();
    assert_eq!(d["paused"].as_deref(), Some("1"));
    let clients = rows(&admin, "SHOW CLIENTS").await.unwrap();
    assert!(clients
        .iter()
        .any(|c| c["database"].as_deref() == Some(db.as_str())
            && c["state"].as_deref() == Some("waiting")));
    // Observability: /status and the gauge say paused; /readyz stays 200 (clients wait).
    let (s, status) = tokio::task::spawn_blocking(move || http_get(http, "/status"))
        .await
        .unwrap();
    assert_eq!(s, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["pools"][0]["paused"], true, "{status}");
    assert_eq!(
        tp.metric_with("tidepool_paused", &[("pool", &pool_name)]),
        1.0
    );
    let ready = tokio::task::spawn_blocking(move || http_get(http, "/readyz").0)
        .await
        .unwrap();
    assert_eq!(ready, 200);
    assert!(!waiting.is_finished());
    // RESUME without a database ends the global pause only (PgBouncer's rule).
    let err = admin.simple_query("RESUME").await.err().unwrap();
    assert!(msg(&err).contains("not paused"), "{err:?}");
    admin.simple_query(&format!("RESUME {db}")).await.unwrap();
    let (app, r) = tp::bounded(5, "query after RESUME", waiting).await.unwrap();
    r.expect("the waiting query runs after RESUME");
    assert_eq!(
        tp.metric_with("tidepool_paused", &[("pool", &pool_name)]),
        0.0
    );

    // PAUSE cannot finish while a transaction stays open: it fails at drain.timeout (2 s here)
    // and does not stay paused.
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let t0 = Instant::now();
    let err = admin.simple_query("PAUSE").await.expect_err("times out");
    assert_eq!(code(&err), "57014", "{err:?}");
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(msg(&err).contains("not paused"), "{err:?}");
    let state = rows(&admin, "SHOW STATE").await.unwrap();
    assert_eq!(state[1]["value"].as_deref(), Some("no"));
    let other = tp.connect(&db).await;
    tp::bounded(
        5,
        "a query after a failed PAUSE",
        other.simple_query("SELECT 1"),
    )
    .await
    .unwrap();
    app.batch_execute("COMMIT").await.unwrap();
    // Global PAUSE with everything idle.
    admin.simple_query("PAUSE").await.unwrap();
    let state = rows(&admin, "SHOW STATE").await.unwrap();
    assert_eq!(state[1]["value"].as_deref(), Some("yes"));
    let err = admin.simple_query("PAUSE").await.err().unwrap();
    assert!(msg(&err).contains("already suspended/paused"), "{err:?}");
    admin.simple_query("RESUME").await.unwrap();

    // RECONNECT: every server marked close_needed is replaced; WAIT_CLOSE waits for that.
    let servers = |rows: Vec<HashMap<String, Option<String>>>| -> Vec<String> {
        rows.into_iter()
            .filter(|r| r["database"].as_deref() == Some(db.as_str()))
            .map(|r| r["id"].clone().unwrap())
            .collect()
    };
    let before = servers(rows(&admin, "SHOW SERVERS").await.unwrap());
    assert!(!before.is_empty());
    admin
        .simple_query(&format!("RECONNECT {db}"))
        .await
        .unwrap();
    admin
        .simple_query(&format!("WAIT_CLOSE {db}"))
        .await
        .unwrap();
    app.simple_query("SELECT 1").await.unwrap();
    let after = servers(rows(&admin, "SHOW SERVERS").await.unwrap());
    assert!(
        after.iter().all(|id| !before.contains(id)),
        "{before:?} {after:?}"
    );

    // KILL_CLIENT ends one client with 57P01; others go on.
    let clients = rows(&admin, "SHOW CLIENTS").await.unwrap();
    let ids: Vec<String> = clients
        .iter()
        .filter(|c| c["database"].as_deref() == Some(db.as_str()))
        .map(|c| c["id"].clone().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{clients:?}");
    admin
        .simple_query(&format!("KILL_CLIENT {}", ids[0]))
        .await
        .unwrap();
    let err = admin
        .simple_query("KILL_CLIENT 999999")
        .await
        .err()
        .unwrap();
    assert!(msg(&err).contains("client not found"), "{err:?}");
    let t0 = Instant::now();
    while rows(&admin, "SHOW CLIENTS")
        .await
        .unwrap()
        .iter()
        .any(|c| c["id"].as_deref() == Some(ids[0].as_str()))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "client {} still listed",
            ids[0]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // app logged in first (lower id).
    let err = app.simple_query("SELECT 1").await.expect_err("killed");
    assert!(err.is_closed() || code(&err) == "57P01", "{err:?}");
    other.simple_query("SELECT 1").await.unwrap();

    // KILL db: its clients end (one of them mid-transaction), its servers close, and the
    // database stays paused until RESUME db, as in PgBouncer.
    other.batch_execute("BEGIN; SELECT 1").await.unwrap();
    admin.simple_query(&format!("KILL {db}")).await.unwrap();
    let t0 = Instant::now();
    while !other.is_closed() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "KILL left the client open"
        );
        let _ = other.simple_query("SELECT 1").await;
    }
    let dbs = rows(&admin, "SHOW DATABASES").await.unwrap();
    let d = dbs
        .iter()
        .find(|r| r["name"].as_deref() == Some(db.as_str()))
        .unwrap();
    assert_eq!(d["paused"].as_deref(), Some("1"));
    let t0 = Instant::now();
    while !servers(rows(&admin, "SHOW SERVERS").await.unwrap()).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "servers left after KILL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.simple_query(&format!("RESUME {db}")).await.unwrap();
    let again = tp.connect(&db).await;
    again.simple_query("SELECT 1").await.unwrap();

    drop((admin, again));
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
    assert_eq!(report.servers_closed_hard, 0, "{report:?}");
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

/// KILL_CLIENT of a client that waits for a server (the pool's one connection is held by
/// another client's transaction): it ends at once with 57P01, not when a server frees up,
/// and the transaction holding the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_ends_a_client_waiting_for_a_server() {
    let _g = tp::serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("console_kill_waiting");
    let offset = pg.log_len();
    let pool = "mode = \"transaction\"\nsize = 1\ncheckout_timeout = \"30s\"";
    let tp = Tidepool::start_with(&console_config(pg, &db, pool), true).await;
    let admin = console_client(&tp, "admin").await.unwrap();
    let holder = tp.connect(&db).await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = tp.connect(&db).await;
    let waiting = tokio::spawn(async move {
        let r = waiter.simple_query("SELECT 42").await.map(|_| ());
        (waiter, r)
    });
    let t0 = Instant::now();
    let id = loop {
        let clients = rows(&admin, "SHOW CLIENTS").await.unwrap();
        if let Some(c) = clients.iter().find(|c| {
            c["database"].as_deref() == Some(db.as_str())
                && c["state"].as_deref() == Some("waiting")
        }) {
            break c["id"].clone().unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{clients:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    let (waiter, r) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the killed client still waits")
        .unwrap();
    let err = r.expect_err("killed while waiting");
    assert!(err.is_closed() || code(&err) == "57P01", "{err:?}");
    drop(waiter);
    // The holder's transaction was not touched; the server goes back to the pool after it.
    holder.batch_execute("SELECT 2; COMMIT").await.unwrap();
    let again = tp.connect(&db).await;
    again.simple_query("SELECT 1").await.unwrap();

    drop((admin, holder, again));
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
    assert_eq!(report.servers_closed_hard, 0, "{report:?}");
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

/// The exporter's venv: prometheus-pgbouncer-exporter 2.x from PyPI. Installed with
/// `--no-deps` and its dependencies listed here: it pins `psycopg2==2.8.5`, a source build
/// (libpq headers, a compiler) that does not build on current Pythons; `psycopg2-binary`
/// provides the same `psycopg2` module. Its other pins are kept.
const EXPORTER: venv::Spec = venv::Spec {
    dir: "exporter-venv",
    override_var: "TIDEPOOL_TEST_EXPORTER_VENV",
    pip_args: &["--no-deps"],
    packages: &[
        "prometheus-pgbouncer-exporter>=2,<3",
        "psycopg2-binary>=2.9,<3",
        "prometheus_client==0.8.0",
        "python-json-logger==0.1.11",
        "PyYAML>=5.4.1",
    ],
    probe: "import prometheus_pgbouncer_exporter.collector, psycopg2; \
            from importlib.metadata import version; \
            print('prometheus-pgbouncer-exporter', version('prometheus-pgbouncer-exporter'), \
                  'psycopg2', psycopg2.__version__)",
    what: "pgbouncer_exporter",
};

static EXPORTER_VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// A running exporter, killed (by its PID) when dropped.
struct Exporter(Child);
impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real pgbouncer_exporter scrapes the console: `pgbouncer_up` is 1 and its pool series
/// carry tidepool's pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_exporter_scrapes_the_console() {
    let venv_dir = tokio::task::spawn_blocking(|| {
        match EXPORTER_VENV.get_or_init(|| venv::ensure(&EXPORTER)) {
            Ok(d) => d.clone(),
            Err(e) => panic!("cannot set up the exporter's virtualenv:\n{e}"),
        }
    })
    .await
    .unwrap();
    let _g = tp::serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("console_exporter");
    let offset = pg.log_len();
    let pool = "mode = \"transaction\"\nsize = 2\ncheckout_timeout = \"30s\"";
    let tp = Tidepool::start(&console_config(pg, &db, pool)).await;
    let app = tp.connect(&db).await;
    for _ in 0..3 {
        app.simple_query("SELECT 1").await.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "exporter_host: 127.0.0.1\nexporter_port: {port}\npgbouncers:\n  - dsn: postgresql://admin:@127.0.0.1:{}/pgbouncer\n    connect_timeout: 5\n",
        tp.port()
    );
    std::fs::write(dir.path().join("config.yml"), config).unwrap();
    let log = std::fs::File::create(dir.path().join("exporter.log")).unwrap();
    let child = Command::new(venv_dir.join("bin").join("pgbouncer-exporter"))
        .arg("--config")
        .arg(dir.path().join("config.yml"))
        .current_dir(dir.path())
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start pgbouncer-exporter");
    let exporter = Exporter(child);
    let exporter_log =
        || std::fs::read_to_string(dir.path().join("exporter.log")).unwrap_or_default();
    // Scrape until it answers (the collector connects to the console on each scrape).
    let t0 = Instant::now();
    let body = loop {
        let (code, body) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
            .await
            .unwrap();
        if code == 200 {
            break body;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the exporter did not answer; its log:\n{}",
            exporter_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let sample = |name: &str, labels: &[(&str, &str)]| tp::sample(&body, name, labels);
    assert_eq!(
        sample("pgbouncer_up", &[]),
        Some(1.0),
        "scrape:\n{body}\nexporter log:\n{}",
        exporter_log()
    );
    let pool = [("database", db.as_str()), ("user", "postgres")];
    assert_eq!(
        sample("pgbouncer_pools_client_active_connections", &pool),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample("pgbouncer_pools_server_idle_connections", &pool),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample("pgbouncer_pools_client_maxwait_seconds", &pool),
        Some(0.0),
        "{body}"
    );
    let xacts = sample(
        "pgbouncer_stats_transactions_total",
        &[("database", db.as_str())],
    );
    assert!(xacts.is_some_and(|x| x >= 3.0), "{body}");
    assert_eq!(
        sample(
            "pgbouncer_databases_database_pool_size",
            &[("database", db.as_str())]
        ),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        sample("pgbouncer_config_max_client_conn", &[]),
        Some(10000.0),
        "{body}"
    );
    drop(exporter);

    drop(app);
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "{report:?}");
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

/// The binary's config for the switch test: database `db` at `port`.
fn switch_config(db: &str, port: u16) -> String {
    format!(
        r#"
[listen]
addr = "127.0.0.1:0"
[admin]
addr = "127.0.0.1:0"
console_users = ["admin"]
[auth]
method = "trust"
[drain]
timeout = "20s"
server_close_timeout = "2s"
[pool]
mode = "transaction"
size = 8
checkout_timeout = "30s"
[databases.{db}]
host = "127.0.0.1"
port = {port}
"#
    )
}

fn metrics_of(tp: &TidepoolProcess) -> String {
    let (code, body) = tp.http_get("/metrics");
    assert_eq!(code, 200);
    body
}

/// The zero-failure upstream switch: pgbench (TPC-B, 8 clients, transaction mode) runs
/// through tidepool; PAUSE, point the database at a second cluster, RELOAD, RESUME. pgbench
/// ends with no failed transaction, the second cluster got transactions after the switch, and
/// neither cluster logged an abrupt disconnect.
#[test]
fn upstream_switch_under_pgbench_fails_no_transaction() {
    let pg1 = PgCluster::shared();
    let pg2 = PgCluster::start_dedicated(&[]);
    let db = pg1.create_db("console_switch");
    pg2.psql("postgres", &format!("CREATE DATABASE {db}"));
    for pg in [pg1, &pg2] {
        let (ok, out) = tp::pgbench(pg.port(), &db, &["-i", "-s", "1", "-q"]);
        assert!(ok, "pgbench -i: {out}");
    }
    let (off1, off2) = (pg1.log_len(), pg2.log_len());
    let mut tp = TidepoolProcess::start(&switch_config(&db, pg1.port()));
    let bench = tp::spawn_pgbench(tp.port, &db, &["-c", "8", "-j", "8", "-T", "8", "-n"]);
    std::thread::sleep(Duration::from_secs(2));

    let console = |sql: &str| {
        psql(tp.port, "admin", sql).unwrap_or_else(|e| panic!("{sql}: {e}\n{}", tp.log()))
    };
    let t0 = Instant::now();
    console(&format!("PAUSE {db}"));
    let paused_after = t0.elapsed();
    let pools = console("SHOW POOLS");
    let p = pools.one("database", &db);
    assert_eq!(
        p["sv_active"], "0",
        "PAUSE answered with servers lent: {p:?}"
    );
    assert_eq!(p["paused"], "1");
    tp.rewrite_config(&switch_config(&db, pg2.port()));
    console("RELOAD");
    console(&format!("RESUME {db}"));
    let switched_in = t0.elapsed();
    let databases = console("SHOW DATABASES");
    assert_eq!(databases.one("name", &db)["port"], pg2.port().to_string());

    let (ok, out) = tp::pgbench_output(bench);
    assert!(
        ok,
        "pgbench failed across the switch:\n{out}\ntidepool log:\n{}",
        tp.log()
    );
    assert_eq!(tp::pgbench_failed(&out), Some(0), "{out}");
    let processed = tp::pgbench_processed(&out).unwrap_or(0);
    assert!(processed > 0, "{out}");
    eprintln!("switch: PAUSE took {paused_after:?}, the whole switch {switched_in:?}; {processed} transactions");

    // Both clusters ran pgbench's transactions (each inserts one pgbench_history row).
    let history = |pg: &PgCluster| -> u64 {
        pg.psql(&db, "SELECT count(*) FROM pgbench_history")
            .parse()
            .unwrap()
    };
    let (h1, h2) = (history(pg1), history(&pg2));
    assert!(h1 > 0, "the first cluster got no transaction");
    assert!(
        h2 > 0,
        "the second cluster got no transaction after the switch"
    );
    assert_eq!(
        h1 + h2,
        processed,
        "every transaction pgbench counted ran on one cluster"
    );
    let metrics = metrics_of(&tp);
    assert_eq!(
        tidepool::metrics::sum_series(&metrics, "tidepool_server_connections_leaked_total"),
        0
    );
    assert!(
        metrics.lines().any(
            |l| l.starts_with("tidepool_server_connections_closed_total")
                && l.contains("reason=\"reload\"")
                && !l.ends_with(" 0")
        ),
        "the old cluster's servers were not closed as reloaded:\n{metrics}"
    );
    tp.signal("TERM");
    assert_eq!(tp.wait(Duration::from_secs(25)), Some(0), "{}", tp.log());
    let report = tp.drain_report().expect("drain report");
    assert_eq!(report["leaked"], 0, "{report}");
    assert_eq!(report["servers_closed_hard"], 0, "{report}");
    tp::assert_no_abrupt_disconnects_since(pg1, off1);
    tp::assert_no_abrupt_disconnects_since(&pg2, off2);
}

/// Console SHUTDOWN is SIGTERM's drain: under pgbench, clients finish, the process exits 0
/// with a graceful drain report; SHUTDOWN WAIT_FOR_SERVERS is SIGINT's.
#[test]
fn console_shutdown_drains_like_the_signals() {
    let pg = PgCluster::shared();
    let db = pg.create_db("console_shutdown");
    let offset = pg.log_len();
    let config = switch_config(&db, pg.port());

    // SHUTDOWN WAIT_FOR_SERVERS, an idle client connected: it is closed at once (boundary).
    let mut tp = TidepoolProcess::start(&config);
    let (ok, out) = tp::pgbench(tp.port, &db, &["-i", "-s", "1", "-q"]);
    assert!(ok, "{out}");
    let idle = Raw::login(tp.port, "postgres", &db);
    let t = psql(tp.port, "admin", "SHUTDOWN WAIT_FOR_SERVERS").expect("SHUTDOWN answers");
    assert!(t.header.is_empty());
    assert_eq!(tp.wait(Duration::from_secs(15)), Some(0), "{}", tp.log());
    let report = tp.drain_report().expect("drain report");
    assert_eq!(report["kind"], "boundary", "{report}");
    assert_eq!(report["leaked"], 0, "{report}");
    drop(idle);

    // SHUTDOWN under pgbench: as SIGTERM, pgbench's transactions all complete.
    let mut tp = TidepoolProcess::start(&config);
    let bench = tp::spawn_pgbench(tp.port, &db, &["-c", "4", "-j", "4", "-T", "4", "-n"]);
    std::thread::sleep(Duration::from_secs(1));
    psql(tp.port, "admin", "SHUTDOWN").expect("SHUTDOWN answers");
    // Draining: /readyz 503 and new logins refused, as after SIGTERM.
    assert_eq!(tp.http_get("/readyz").0, 503);
    let (ok, out) = tp::pgbench_output(bench);
    assert!(ok, "pgbench failed during the drain:\n{out}");
    assert_eq!(tp::pgbench_failed(&out), Some(0), "{out}");
    assert_eq!(tp.wait(Duration::from_secs(25)), Some(0), "{}", tp.log());
    let report = tp.drain_report().expect("drain report");
    assert_eq!(report["kind"], "graceful", "{report}");
    assert_eq!(report["clients_forced"], 0, "{report}");
    assert_eq!(report["servers_closed_hard"], 0, "{report}");
    assert_eq!(report["leaked"], 0, "{report}");
    assert!(
        report["servers_closed_clean"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(tp.log().contains("SHUTDOWN command issued"));
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}
