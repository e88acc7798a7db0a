//! Session isolation in transaction mode (DESIGN.md section 8, issue 15), against the real
//! Postgres: with a pool of one server, client A sets some session state and B, on the same
//! server, must never see it, while A keeps its own state for its whole session, carried or
//! pinned. Then the `reject` policy, named statements across DDL, session mode's login
//! notices, and a randomized test of many clients over a small pool.
//!
//! `TIDEPOOL_ISOLATION_SEED=<n>` runs the randomized test with seed n, `=random` with a
//! random one (printed); the normal suite uses a fixed seed.

mod common;

use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::tp::{self, config_text, Tidepool};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Transaction mode, one server: every client lands on the same server connection.
const ONE: &str = "mode = \"transaction\"\nsize = 1\ncheckout_timeout = \"20s\"\n";

/// The first column of the first row of `sql`.
async fn one(c: &Client, sql: &str) -> String {
    first(c, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or_default()
}

async fn first(c: &Client, sql: &str) -> Result<Option<String>, tokio_postgres::Error> {
    for m in c.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).map(str::to_string));
        }
    }
    Ok(None)
}

async fn exec(c: &Client, sql: &str) {
    c.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

struct Setup {
    pg: &'static PgCluster,
    db: String,
    tp: Tidepool,
    log_start: u64,
}

async fn setup(prefix: &str, pool: &str) -> Setup {
    let pg = PgCluster::shared();
    let db = pg.create_db(prefix);
    let log_start = pg.log_len();
    let tp = Tidepool::start_with(&config_text(pg, &db, pool, ""), true).await;
    Setup {
        pg,
        db,
        tp,
        log_start,
    }
}

impl Setup {
    async fn client(&self) -> Client {
        self.tp.connect(&self.db).await
    }

    /// Stop tidepool: no leak, and Postgres logged no abrupt disconnect.
    async fn finish(self) {
        let report = self.tp.stop().await;
        assert_eq!(report.leaked, 0, "{report:?}");
        assert_eq!(report.servers_closed_hard, 0, "{report:?}");
        tp::assert_no_abrupt_disconnects_since(self.pg, self.log_start);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_default_stays_with_its_client() {
    let s = setup("iso_ro", ONE).await;
    let a = s.client().await;
    exec(&a, "SET default_transaction_read_only = on").await;
    let b = s.client().await;
    exec(&b, "CREATE TABLE made_by_b (x int)").await;
    assert_eq!(one(&b, "SHOW default_transaction_read_only").await, "off");
    // A's own setting lasts for its session, on whatever server it lands.
    assert_eq!(one(&a, "SHOW default_transaction_read_only").await, "on");
    let e = a
        .batch_execute("INSERT INTO made_by_b VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "25006", "{e}");
    drop(a);
    let c = s.client().await;
    exec(&c, "INSERT INTO made_by_b VALUES (2)").await;
    drop((b, c));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreported_settings_are_carried_and_cleaned() {
    let s = setup("iso_set", ONE).await;
    s.pg.psql(&s.db, "CREATE SCHEMA other_schema");
    let a = s.client().await;
    exec(
        &a,
        "SET statement_timeout = '5ms'; SET search_path = other_schema, public; \
         SET work_mem = '7MB'; SET app.tenant = 'tenant-a'; SET lock_timeout = 1234",
    )
    .await;
    let b = s.client().await;
    assert_eq!(one(&b, "SHOW statement_timeout").await, "0");
    assert_eq!(one(&b, "SHOW search_path").await, "\"$user\", public");
    assert_eq!(one(&b, "SHOW work_mem").await, "4MB");
    assert_eq!(one(&b, "SHOW lock_timeout").await, "0");
    assert_eq!(
        one(
            &b,
            "SELECT coalesce(current_setting('app.tenant', true), '')"
        )
        .await,
        ""
    );
    // B's pg_sleep is not cut by A's 5 ms.
    exec(&b, "SELECT pg_sleep(0.05)").await;
    assert_eq!(one(&a, "SHOW statement_timeout").await, "5ms");
    assert_eq!(one(&a, "SHOW search_path").await, "other_schema, public");
    assert_eq!(one(&a, "SHOW work_mem").await, "7MB");
    assert_eq!(one(&a, "SHOW lock_timeout").await, "1234ms");
    assert_eq!(
        one(&a, "SELECT current_setting('app.tenant')").await,
        "tenant-a"
    );
    let e = a.batch_execute("SELECT pg_sleep(1)").await.unwrap_err();
    assert_eq!(code(&e), "57014", "{e}");
    // RESET is followed too, and a set_config() inside a SELECT.
    exec(&a, "RESET statement_timeout").await;
    exec(&a, "SELECT set_config('app.tenant', 'tenant-a2', false)").await;
    exec(&b, "SELECT 1").await;
    assert_eq!(one(&a, "SHOW statement_timeout").await, "0");
    assert_eq!(
        one(&a, "SELECT current_setting('app.tenant')").await,
        "tenant-a2"
    );
    assert_eq!(
        one(
            &b,
            "SELECT coalesce(current_setting('app.tenant', true), '')"
        )
        .await,
        ""
    );
    // Set inside a transaction that commits: kept; one that rolls back: not.
    exec(&a, "BEGIN; SET work_mem = '9MB'; COMMIT").await;
    exec(&a, "BEGIN; SET lock_timeout = 99; ROLLBACK").await;
    exec(&b, "SELECT 1").await;
    assert_eq!(one(&a, "SHOW work_mem").await, "9MB");
    assert_eq!(one(&a, "SHOW lock_timeout").await, "1234ms");
    assert_eq!(one(&b, "SHOW work_mem").await, "4MB");
    // SET LOCAL costs nothing and leaves nothing.
    exec(&b, "BEGIN; SET LOCAL work_mem = '8MB'; COMMIT").await;
    assert_eq!(one(&b, "SHOW work_mem").await, "4MB");
    assert!(
        s.tp.metric_with(
            "tidepool_session_state_total",
            &[("kind", "parameter"), ("action", "carried")]
        ) >= 1.0
    );
    assert!(
        s.tp.metric_with(
            "tidepool_session_state_total",
            &[("kind", "parameter"), ("action", "cleaned")]
        ) >= 1.0
    );
    drop((a, b));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_never_reach_another_client() {
    let s = setup("iso_role", ONE).await;
    let role = format!("{}_other", s.db);
    s.pg.psql(
        &s.db,
        &format!("CREATE ROLE {role}; GRANT {role} TO postgres"),
    );
    let a = s.client().await;
    exec(&a, &format!("SET ROLE {role}")).await;
    let b = s.client().await;
    assert_eq!(one(&b, "SELECT current_user").await, "postgres");
    assert_eq!(one(&a, "SELECT current_user").await, role);
    // SET SESSION AUTHORIZATION (the harness's user is a superuser).
    exec(&a, &format!("SET SESSION AUTHORIZATION {role}")).await;
    assert_eq!(one(&b, "SELECT session_user").await, "postgres");
    assert_eq!(one(&b, "SELECT current_user").await, "postgres");
    assert_eq!(one(&a, "SELECT session_user").await, role);
    assert_eq!(one(&a, "SELECT current_user").await, role);
    drop(a);
    let c = s.client().await;
    assert_eq!(one(&c, "SELECT session_user").await, "postgres");
    assert_eq!(one(&c, "SHOW role").await, "none");
    drop((b, c));
    s.finish().await;
}

/// One kind of state that pins: how to make it, how to see it from its own session, and how
/// to see that it is gone.
struct PinCase {
    name: &'static str,
    make: &'static str,
    /// Run in the owner's session: errors if the state is not there.
    own: &'static str,
    /// 0 when the state is gone.
    left: &'static str,
}

const PIN_CASES: &[PinCase] = &[
    PinCase {
        name: "temp_table",
        make: "CREATE TEMP TABLE mine (x int); INSERT INTO mine VALUES (1)",
        own: "SELECT x FROM mine",
        left: "SELECT count(*) FROM pg_class WHERE relname = 'mine' AND relpersistence = 't'",
    },
    PinCase {
        name: "prepare",
        make: "PREPARE mystmt AS SELECT 7",
        own: "EXECUTE mystmt",
        left: "SELECT count(*) FROM pg_prepared_statements",
    },
    PinCase {
        name: "listen",
        make: "LISTEN mychannel",
        own: "SELECT 1 / (SELECT count(*)::int FROM pg_listening_channels())",
        left: "SELECT count(*) FROM pg_listening_channels()",
    },
    PinCase {
        name: "advisory_lock",
        make: "SELECT pg_advisory_lock(4242)",
        own: "SELECT 1 / (SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
        left: "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
    },
    PinCase {
        name: "cursor",
        make: "DECLARE mycur CURSOR WITH HOLD FOR SELECT 1",
        own: "FETCH 1 FROM mycur",
        left: "SELECT count(*) FROM pg_cursors",
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_state_lives_with_its_client_and_dies_with_it() {
    let s = setup("iso_pin", ONE).await;
    for case in PIN_CASES {
        let a = s.client().await;
        exec(&a, case.make).await;
        assert_eq!(
            s.tp.metric("tidepool_pinned_clients"),
            1,
            "{}: A is pinned",
            case.name
        );
        // A's state lasts across its transactions.
        for _ in 0..3 {
            exec(&a, case.own).await;
        }
        drop(a);
        // B, next on the only server, finds nothing of A's.
        let b = s.client().await;
        assert_eq!(
            one(&b, case.left).await,
            "0",
            "{}: A's state survived",
            case.name
        );
        assert_eq!(s.tp.metric("tidepool_pinned_clients"), 0, "{}", case.name);
        assert!(
            s.tp.metric_with(
                "tidepool_session_state_total",
                &[("kind", case.name), ("action", "pinned")]
            ) >= 1.0,
            "{}",
            case.name
        );
        drop(b);
    }
    // A client that removes its state itself is unpinned and shares the server again.
    let a = s.client().await;
    exec(&a, "CREATE TEMP TABLE t2 (x int)").await;
    assert_eq!(s.tp.metric("tidepool_pinned_clients"), 1);
    exec(&a, "DISCARD ALL").await;
    assert_eq!(s.tp.metric("tidepool_pinned_clients"), 0);
    let b = s.client().await;
    assert_eq!(one(&b, "SELECT 1").await, "1");
    drop((a, b));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_refuses_before_anything_runs() {
    let pool = format!("{ONE}session_state = \"reject\"\n");
    let s = setup("iso_rej", &pool).await;
    let a = s.client().await;
    for case in PIN_CASES {
        let e = a.batch_execute(case.make).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{}: {e}", case.name);
        let msg = e.as_db_error().map(|d| d.message().to_string());
        assert!(msg.unwrap_or_default().contains("session_state"), "{e:?}");
        assert_eq!(one(&a, case.left).await, "0", "{}: it ran", case.name);
        // The session goes on.
        assert_eq!(one(&a, "SELECT 1").await, "1");
    }
    // Inside a transaction: refused, and the transaction goes on.
    exec(&a, "BEGIN").await;
    let e = a.batch_execute("LISTEN x").await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    exec(&a, "CREATE TABLE in_txn (x int); COMMIT").await;
    // Extended protocol: the refused Parse and the rest of its batch.
    let e = a
        .query("SELECT pg_advisory_lock($1)", &[&7i64])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000", "{e}");
    let r = a.query_one("SELECT $1::int + 1", &[&1i32]).await.unwrap();
    assert_eq!(r.get::<_, i32>(0), 2);
    assert_eq!(s.tp.metric("tidepool_pinned_clients"), 0);
    assert!(s.tp.metric_with("tidepool_session_state_total", &[("action", "rejected")]) >= 6.0);
    drop(a);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_follow_the_catalog() {
    // Two servers, several clients: statements are prepared on both.
    let pool = "mode = \"transaction\"\nsize = 2\ncheckout_timeout = \"20s\"\n";
    let s = setup("iso_ddl", pool).await;
    s.pg.psql(
        &s.db,
        "CREATE TYPE mood AS ENUM ('a', 'b'); CREATE TABLE wide (x int); INSERT INTO wide VALUES (1)",
    );
    let clients = [s.client().await, s.client().await, s.client().await];
    for c in &clients {
        let st = c.prepare("SELECT 'a'::mood::text").await.unwrap();
        let r = c.query_one(&st, &[]).await.unwrap();
        assert_eq!(r.get::<_, String>(0), "a");
    }
    // The type is dropped and made again by one client through tidepool.
    exec(
        &clients[0],
        "DROP TYPE mood; CREATE TYPE mood AS ENUM ('a', 'b', 'c')",
    )
    .await;
    for (i, c) in clients.iter().enumerate() {
        // Parsed again (tokio-postgres closes its statement when dropped): runs against the
        // current schema, on whichever server.
        for _ in 0..3 {
            let st = c.prepare("SELECT 'a'::mood::text").await.unwrap();
            let r = c
                .query_one(&st, &[])
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(r.get::<_, String>(0), "a");
        }
    }
    // A new column: a statement parsed afterwards sees it, inside a transaction too.
    for c in &clients {
        let st = c.prepare("SELECT * FROM wide").await.unwrap();
        assert_eq!(c.query(&st, &[]).await.unwrap()[0].len(), 1);
    }
    exec(&clients[1], "ALTER TABLE wide ADD COLUMN y int").await;
    for c in &clients {
        let st = c.prepare("SELECT * FROM wide").await.unwrap();
        assert_eq!(c.query(&st, &[]).await.unwrap()[0].len(), 2);
        exec(c, "BEGIN").await;
        let st = c.prepare("SELECT * FROM wide").await.unwrap();
        assert_eq!(c.query(&st, &[]).await.unwrap()[0].len(), 2);
        exec(c, "COMMIT").await;
    }
    // A client that joins later parses the same text.
    let late = s.client().await;
    let st = late.prepare("SELECT 'c'::mood::text").await.unwrap();
    assert_eq!(
        late.query_one(&st, &[]).await.unwrap().get::<_, String>(0),
        "c"
    );
    drop((clients, late));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_session_attrs_read_write_after_another_client_set_read_only() {
    let s = setup("iso_tsa", ONE).await;
    let a = s.client().await;
    exec(&a, "SET default_transaction_read_only = on").await;
    let conninfo = format!(
        "{} target_session_attrs=read-write",
        s.tp.conninfo(&s.db, "postgres")
    );
    let b =
        s.tp.try_connect_str(&conninfo)
            .await
            .expect("read-write login while another client is read-only");
    exec(&b, "CREATE TABLE rw_ok (x int)").await;
    drop((a, b));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_relays_login_notices() {
    let pool = "mode = \"session\"\nsize = 2\n";
    let s = setup("iso_notice", pool).await;
    let port = s.tp.port();
    let db = s.db.clone();
    let long_name = "x".repeat(65);
    let notices = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sock.write_all(&common::raw::startup_packet(&[
            ("user", "postgres"),
            ("database", &db),
            ("application_name", &long_name),
        ]))
        .unwrap();
        let mut notices = Vec::new();
        loop {
            let (tag, body) = common::raw::read_msg(&mut sock).expect("login reply");
            match tag {
                b'N' => notices.push(common::raw::error_fields(&body)),
                b'E' => panic!("login failed: {:?}", common::raw::error_fields(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        let _ = sock.write_all(&[b'X', 0, 0, 0, 4]);
        notices
    })
    .await
    .unwrap();
    assert!(
        notices
            .iter()
            .any(|(code, m)| code == "42622" && m.contains("will be truncated")),
        "no truncation notice: {notices:?}"
    );
    s.finish().await;
}

/// A tiny deterministic generator (xorshift64*), so a seed replays a run exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    match std::env::var("TIDEPOOL_ISOLATION_SEED").ok().as_deref() {
        Some("random") => {
            let s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1;
            eprintln!("isolation: TIDEPOOL_ISOLATION_SEED={s}");
            s
        }
        Some(n) => n
            .parse()
            .expect("TIDEPOOL_ISOLATION_SEED: a number or `random`"),
        None => 0x5eed_1507,
    }
}

/// What one client's session must show: only what it set itself.
#[derive(Clone, Debug)]
struct Model {
    statement_timeout: String,
    tenant: String,
    role: Option<String>,
    read_only: bool,
}

async fn check(c: &Client, m: &Model, who: usize, step: usize) {
    let row = c
        .simple_query(
            "SELECT current_setting('statement_timeout'), \
             coalesce(current_setting('app.tenant', true), ''), current_user, \
             current_setting('default_transaction_read_only'), \
             (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), \
             (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
        )
        .await
        .unwrap_or_else(|e| panic!("client {who} step {step}: {e}"));
    let Some(r) = row.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    }) else {
        panic!("no row")
    };
    let got = (
        r.get(0).unwrap().to_string(),
        r.get(1).unwrap().to_string(),
        r.get(2).unwrap().to_string(),
        r.get(3).unwrap() == "on",
        r.get(4).unwrap().to_string(),
        r.get(5).unwrap().to_string(),
    );
    let want = (
        m.statement_timeout.clone(),
        m.tenant.clone(),
        m.role.clone().unwrap_or_else(|| "postgres".into()),
        m.read_only,
        "0".to_string(),
        "0".to_string(),
    );
    assert_eq!(
        got, want,
        "client {who} step {step} sees another client's state"
    );
}

/// Many clients over a pool of two, each running a random mix of session-state statements and
/// checking after each that its session shows exactly its own state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_clients_see_only_their_own_state() {
    let seed = seed();
    let pool = "mode = \"transaction\"\nsize = 2\ncheckout_timeout = \"30s\"\n";
    let s = setup("iso_rand", pool).await;
    let roles: Vec<String> = (0..2).map(|i| format!("{}_r{i}", s.db)).collect();
    for r in &roles {
        s.pg.psql(&s.db, &format!("CREATE ROLE {r}; GRANT {r} TO postgres"));
    }
    const CLIENTS: usize = 6;
    const STEPS: usize = 30;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut tasks = Vec::new();
    for who in 0..CLIENTS {
        let c = s.client().await;
        let roles = roles.clone();
        let mut rng = Rng(seed ^ (who as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        tasks.push(tokio::spawn(async move {
            let mut m = Model {
                statement_timeout: "0".into(),
                tenant: String::new(),
                role: None,
                read_only: false,
            };
            for step in 0..STEPS {
                if Instant::now() > deadline {
                    break;
                }
                match rng.below(9) {
                    0 => {
                        let ms = 10_000 + rng.below(1000);
                        exec(&c, &format!("SET statement_timeout = {ms}")).await;
                        m.statement_timeout = format!("{ms}ms");
                    }
                    1 => {
                        exec(&c, "RESET statement_timeout").await;
                        m.statement_timeout = "0".into();
                    }
                    2 => {
                        let t = format!("t{who}-{}", rng.below(100));
                        exec(&c, &format!("SET app.tenant = '{t}'")).await;
                        m.tenant = t;
                    }
                    3 => {
                        let r = &roles[rng.below(2) as usize];
                        exec(&c, &format!("SET ROLE {r}")).await;
                        m.role = Some(r.clone());
                    }
                    4 => {
                        exec(&c, "RESET ROLE").await;
                        m.role = None;
                    }
                    5 => {
                        let on = rng.below(2) == 0;
                        let v = if on { "on" } else { "off" };
                        exec(&c, &format!("SET default_transaction_read_only = {v}")).await;
                        m.read_only = on;
                    }
                    6 if !m.read_only => {
                        // Pinned for a moment: a temporary table, used, then dropped.
                        exec(&c, "CREATE TEMP TABLE scratch (x int)").await;
                        exec(&c, "SELECT count(*) FROM scratch").await;
                        exec(&c, "DISCARD TEMP").await;
                    }
                    7 => {
                        exec(&c, "SELECT pg_advisory_lock(77)").await;
                        exec(&c, "SELECT pg_advisory_unlock_all()").await;
                    }
                    _ => {
                        // A transaction with SET LOCAL: leaves nothing.
                        exec(&c, "BEGIN; SET LOCAL work_mem = '5MB'; SELECT 1; COMMIT").await;
                    }
                }
                check(&c, &m, who, step).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(s.tp.metric("tidepool_pinned_clients"), 0);
    s.finish().await;
}
