//! Users looked up in Postgres, and pass-through to the server (DESIGN.md section 11), against
//! a real Postgres whose pg_hba demands scram-sha-256 from everyone but the harness's
//! superuser (and md5 from the one md5 role).
//!
//! tidepool's config holds one password: the lookup user's. Every application role here is
//! created in Postgres while tidepool runs.

mod common;

use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use common::pg::{quote_literal, PgCluster};
use common::tp::{psql_as, sample, TidepoolProcess};

const LOOKUP_USER: &str = "tp_lookup";
const LOOKUP_PW: &str = "Lookup-Pw-93XqT";
/// The md5 role (stored as md5; pg_hba asks it for md5).
const MD5_ROLE: &str = "lk_md5";

static SETUP: Once = Once::new();

/// The shared cluster with scram-sha-256 for everyone but `postgres` (and md5 for
/// [`MD5_ROLE`]), and the non-superuser lookup role.
fn cluster() -> &'static PgCluster {
    let pg = PgCluster::shared();
    SETUP.call_once(|| {
        pg.create_role(LOOKUP_USER, LOOKUP_PW);
        pg.set_hba(&format!(
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all {MD5_ROLE} 127.0.0.1/32 md5\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        ));
    });
    pg
}

/// A fresh database with the README's SECURITY DEFINER lookup function, which lets the
/// non-superuser lookup role read pg_authid for this one purpose.
fn database(pg: &PgCluster, prefix: &str) -> String {
    let db = pg.create_db(prefix);
    pg.psql(
        &db,
        &format!(
            "CREATE SCHEMA tidepool;
             CREATE FUNCTION tidepool.lookup(p_user name)
               RETURNS TABLE (rolname name, rolpassword text)
               LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
                 SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
                 FROM pg_authid WHERE rolname = p_user AND rolcanlogin $$;
             REVOKE ALL ON FUNCTION tidepool.lookup(name) FROM PUBLIC;
             GRANT USAGE ON SCHEMA tidepool TO {LOOKUP_USER};
             GRANT EXECUTE ON FUNCTION tidepool.lookup(name) TO {LOOKUP_USER};"
        ),
    );
    db
}

fn config(pg: &PgCluster, db: &str, method: &str, auth_extra: &str, pool: &str) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [auth]\nmethod = \"{method}\"\nlookup_user = \"{LOOKUP_USER}\"\n\
         lookup_query = \"SELECT rolname, rolpassword FROM tidepool.lookup($1)\"\n{auth_extra}\n\
         [[auth.users]]\nname = \"{LOOKUP_USER}\"\npassword = \"{LOOKUP_PW}\"\n\
         [drain]\ntimeout = \"10s\"\n\
         [pool]\nsize = 4\nmode = \"transaction\"\n{pool}\n\
         [databases.{db}]\nhost = \"127.0.0.1\"\nport = {}\n",
        pg.port()
    )
}

/// A LOGIN role with `password`, allowed to read the pgbench tables of `db`.
fn role(pg: &PgCluster, name: &str, password: &str, db: &str) {
    pg.create_role(name, password);
    pg.psql(db, &format!("GRANT ALL ON SCHEMA public TO {name}"));
}

fn login(tp: &TidepoolProcess, user: &str, password: &str, db: &str) -> Result<String, String> {
    psql_as(tp.port, user, password, db, "SELECT current_user")
}

fn lookups(tp: &TidepoolProcess, outcome: &str) -> f64 {
    let (_, text) = tp.http_get("/metrics");
    sample(
        &text,
        "tidepool_auth_lookups_total",
        &[("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

/// Stop tidepool with SIGTERM; assert a clean exit, no leak, no abrupt disconnect since
/// `offset` in the Postgres log. Returns tidepool's log.
fn stop(mut tp: TidepoolProcess, pg: &PgCluster, offset: u64) -> String {
    let (_, text) = tp.http_get("/metrics");
    assert_eq!(
        sample(&text, "tidepool_server_connections_leaked_total", &[]).unwrap_or(0.0),
        0.0,
        "leaked connections"
    );
    tp.signal("TERM");
    assert_eq!(tp.wait(Duration::from_secs(15)), Some(0), "{}", tp.log());
    let report = tp.drain_report().expect("a drain report");
    assert_eq!(report["leaked"], 0, "{report}");
    let log = tp.log();
    common::tp::assert_no_abrupt_disconnects_since(pg, offset);
    log
}

#[test]
fn a_role_created_after_start_logs_in_with_scram_and_runs_pgbench() {
    let pg = cluster();
    let db = database(pg, "lookup_late");
    let offset = pg.log_len();
    let cfg = config(pg, &db, "scram-sha-256", "", "");
    let tp = TidepoolProcess::start(&cfg);

    // Created after tidepool started; its password is nowhere in tidepool's config.
    let password = "Late-Role-Pw-1";
    role(pg, "lk_late", password, &db);
    assert!(!cfg.contains(password));
    assert_eq!(
        login(&tp, "lk_late", password, &db).as_deref(),
        Ok("lk_late")
    );
    // The server session is the role's own (pass-through, not the lookup user's).
    assert_eq!(
        psql_as(tp.port, "lk_late", password, &db, "SELECT session_user").as_deref(),
        Ok("lk_late")
    );
    assert!(lookups(&tp, "found") >= 1.0);
    assert!(lookups(&tp, "cached") >= 1.0);

    // pgbench -S -c 8 as that role.
    common::tp::pgbench(pg.port(), &db, &["-i", "-q", "-s", "1"]);
    pg.psql(
        &db,
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO lk_late",
    );
    let out = Command::new("pgbench")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &tp.port.to_string(),
            "-U",
            "lk_late",
        ])
        .args(["-S", "-c", "8", "-j", "2", "-t", "200", "-n", &db])
        .env("PGPASSWORD", password)
        .output()
        .expect("pgbench");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    assert!(
        text.contains("number of transactions actually processed: 1600/1600"),
        "{text}"
    );
    // The lookup connection is the lookup user's own, with its own application_name.
    let seen = pg.psql(
        "postgres",
        "SELECT usename || ' ' || application_name FROM pg_stat_activity \
         WHERE application_name = 'tidepool auth lookup'",
    );
    assert_eq!(seen, format!("{LOOKUP_USER} tidepool auth lookup"));
    stop(tp, pg, offset);
}

#[test]
fn an_md5_role_logs_in_with_md5_and_is_refused_where_scram_is_demanded() {
    let pg = cluster();
    let db = database(pg, "lookup_md5");
    let offset = pg.log_len();
    let password = "Md5-Role-Pw-2";
    pg.psql(
        "postgres",
        &format!(
            "SET password_encryption = 'md5'; DROP ROLE IF EXISTS {MD5_ROLE}; \
             CREATE ROLE {MD5_ROLE} LOGIN PASSWORD {}",
            quote_literal(password)
        ),
    );
    let tp = TidepoolProcess::start(&config(pg, &db, "md5", "", ""));
    assert_eq!(login(&tp, MD5_ROLE, password, &db).as_deref(), Ok(MD5_ROLE));
    let wrong = login(&tp, MD5_ROLE, "nope", &db).unwrap_err();
    assert!(wrong.contains("password authentication failed"), "{wrong}");
    stop(tp, pg, offset);

    // Where SCRAM is demanded, an md5 hash cannot do it: refused like a wrong password.
    let tp = TidepoolProcess::start(&config(pg, &db, "scram-sha-256", "", ""));
    let err = login(&tp, MD5_ROLE, password, &db).unwrap_err();
    assert!(
        err.contains(&format!(
            "password authentication failed for user \"{MD5_ROLE}\""
        )),
        "{err}"
    );
    stop(tp, pg, offset);
}

#[test]
fn a_changed_password_takes_effect_and_the_old_one_is_refused() {
    let pg = cluster();
    let db = database(pg, "lookup_rotate");
    let offset = pg.log_len();
    let (old, new) = ("Rotate-Old-Pw-3", "Rotate-New-Pw-4");
    role(pg, "lk_rotate", old, &db);
    // A long cache: the change must not wait for it to expire.
    let tp = TidepoolProcess::start(&config(
        pg,
        &db,
        "scram-sha-256",
        "lookup_cache = \"60s\"",
        "",
    ));
    assert_eq!(
        login(&tp, "lk_rotate", old, &db).as_deref(),
        Ok("lk_rotate")
    );
    pg.psql(
        "postgres",
        &format!("ALTER ROLE lk_rotate PASSWORD {}", quote_literal(new)),
    );
    // The cached secret refuses the new password once and is forgotten: the next login
    // looks the role up again.
    let t0 = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match login(&tp, "lk_rotate", new, &db) {
            Ok(who) => {
                assert_eq!(who, "lk_rotate");
                break;
            }
            Err(e) => {
                assert!(
                    attempts < 3 && t0.elapsed() < Duration::from_secs(10),
                    "{e}"
                );
            }
        }
    }
    let err = login(&tp, "lk_rotate", old, &db).unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
    assert_eq!(
        login(&tp, "lk_rotate", new, &db).as_deref(),
        Ok("lk_rotate")
    );
    stop(tp, pg, offset);
}

#[test]
fn refusals_are_uniform() {
    let pg = cluster();
    let db = database(pg, "lookup_refuse");
    let offset = pg.log_len();
    role(pg, "lk_expired", "Expired-Pw-5", &db);
    pg.psql("postgres", "ALTER ROLE lk_expired VALID UNTIL '2001-01-01'");
    role(pg, "lk_nologin", "Nologin-Pw-6", &db);
    pg.psql("postgres", "ALTER ROLE lk_nologin NOLOGIN");
    role(pg, "lk_good", "Good-Pw-7", &db);
    let tp = TidepoolProcess::start(&config(pg, &db, "scram-sha-256", "", ""));
    let cases = [
        ("lk_expired", "Expired-Pw-5"),
        ("lk_nologin", "Nologin-Pw-6"),
        ("lk_unknown", "whatever"),
        ("lk_good", "wrong password"),
        ("x' OR '1'='1", "whatever"),
    ];
    let mut messages = Vec::new();
    for (user, password) in cases {
        let err = login(&tp, user, password, &db).unwrap_err();
        let line = err
            .lines()
            .find(|l| l.contains("FATAL"))
            .unwrap_or(&err)
            .to_string();
        // The text past the port (psql names the port, which is the same for all).
        messages.push(line.replace(&format!("\"{user}\""), "\"USER\""));
    }
    for m in &messages {
        assert_eq!(m, &messages[0], "{messages:#?}");
    }
    assert!(
        messages[0].contains("FATAL:  password authentication failed for user \"USER\""),
        "{}",
        messages[0]
    );
    // The injection attempt was just a name that matched no role.
    assert_eq!(
        login(&tp, "lk_good", "Good-Pw-7", &db).as_deref(),
        Ok("lk_good")
    );
    assert!(lookups(&tp, "not_found") >= 3.0);
    stop(tp, pg, offset);
}

#[test]
fn the_lookup_runs_with_search_path_pg_catalog_and_the_default_query_works() {
    let pg = cluster();
    let db = database(pg, "lookup_path");
    let offset = pg.log_len();
    // A lookup query that returns the session's search_path as the "password": a role whose
    // password is "pg_catalog" logs in exactly when the lookup ran with that search_path.
    role(pg, "lk_path", "pg_catalog", &db);
    let cfg = config(pg, &db, "scram-sha-256", "", "").replace(
        "SELECT rolname, rolpassword FROM tidepool.lookup($1)",
        "SELECT $1::text, current_setting('search_path')",
    );
    let tp = TidepoolProcess::start(&cfg);
    assert_eq!(
        login(&tp, "lk_path", "pg_catalog", &db).as_deref(),
        Ok("lk_path")
    );
    stop(tp, pg, offset);

    // PgBouncer's default query on pg_authid, for a lookup user allowed to read it.
    pg.psql("postgres", &format!("ALTER ROLE {LOOKUP_USER} SUPERUSER"));
    let cfg = config(pg, &db, "scram-sha-256", "", "").replace(
        "lookup_query = \"SELECT rolname, rolpassword FROM tidepool.lookup($1)\"\n",
        "",
    );
    role(pg, "lk_default", "Default-Pw-8", &db);
    let tp = TidepoolProcess::start(&cfg);
    let r = login(&tp, "lk_default", "Default-Pw-8", &db);
    pg.psql("postgres", &format!("ALTER ROLE {LOOKUP_USER} NOSUPERUSER"));
    assert_eq!(r.as_deref(), Ok("lk_default"));
    stop(tp, pg, offset);
}

#[test]
fn no_secret_reaches_the_log_at_any_level() {
    let pg = cluster();
    let db = database(pg, "lookup_log");
    let offset = pg.log_len();
    let password = "Log-Check-Pw-9";
    role(pg, "lk_log", password, &db);
    let tp = TidepoolProcess::start_logging(&config(pg, &db, "scram-sha-256", "", ""), "trace");
    assert_eq!(login(&tp, "lk_log", password, &db).as_deref(), Ok("lk_log"));
    assert!(login(&tp, "lk_log", "Wrong-Pw-0", &db).is_err());
    assert_eq!(login(&tp, "lk_log", password, &db).as_deref(), Ok("lk_log"));
    let verifier = pg.psql(
        "postgres",
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'lk_log'",
    );
    let log = stop(tp, pg, offset);
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "not a trace log"
    );
    // The verifier: SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>.
    let parts: Vec<&str> = verifier.split(['$', ':']).collect();
    assert_eq!(parts.len(), 5, "{verifier}");
    let client_key = client_key(password, parts[2], parts[1].parse().unwrap());
    for secret in [
        password,
        "Wrong-Pw-0",
        LOOKUP_PW,
        &verifier,
        parts[2],
        parts[3],
        parts[4],
        &client_key,
    ] {
        assert!(
            !log.contains(secret),
            "a secret appeared in the log: {secret}"
        );
    }
    // No SCRAM client-final (its proof) either.
    assert!(!log.contains(",p="), "a SCRAM proof appeared in the log");
}

/// ClientKey = HMAC(Hi(password, salt, i), "Client Key") (RFC 5802 §3), base64.
fn client_key(password: &str, salt_b64: &str, iterations: u32) -> String {
    use base64::Engine as _;
    use hmac::{KeyInit, Mac};
    type H = hmac::Hmac<sha2::Sha256>;
    let b64 = base64::engine::general_purpose::STANDARD;
    let salt = b64.decode(salt_b64).unwrap();
    let mac = |key: &[u8], parts: &[&[u8]]| -> Vec<u8> {
        let mut m = <H as KeyInit>::new_from_slice(key).unwrap();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    };
    let mut u = mac(password.as_bytes(), &[&salt, &1u32.to_be_bytes()]);
    let mut salted = u.clone();
    for _ in 1..iterations {
        u = mac(password.as_bytes(), &[&u]);
        for (s, x) in salted.iter_mut().zip(&u) {
            *s ^= x;
        }
    }
    b64.encode(mac(&salted, &[b"Client Key"]))
}

#[test]
fn two_hundred_concurrent_new_logins() {
    let pg = cluster();
    let db = database(pg, "lookup_many");
    let offset = pg.log_len();
    let users: Vec<String> = (0..10).map(|i| format!("lk_many_{i}")).collect();
    for u in &users {
        role(pg, u, &format!("{u}-Pw"), &db);
    }
    let tp = TidepoolProcess::start(&config(pg, &db, "scram-sha-256", "", ""));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let port = tp.port;
    let failures = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..200 {
            let user = users[i % users.len()].clone();
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let conninfo = format!(
                    "host=127.0.0.1 port={port} user={user} password={user}-Pw dbname={db} connect_timeout=30"
                );
                let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| format!("{user}: {e}"))?;
                let conn = tokio::spawn(conn);
                let row = client
                    .query_one("SELECT current_user::text", &[])
                    .await
                    .map_err(|e| format!("{user}: {e}"))?;
                let who: String = row.get(0);
                drop(client);
                let _ = conn.await;
                if who == user {
                    Ok(())
                } else {
                    Err(format!("{user} ran as {who}"))
                }
            }));
        }
        let mut failures = Vec::new();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                failures.push(e);
            }
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // One lookup per user at most twice (concurrent logins of one user share a lookup; the
    // rest were served from the cache).
    let found = lookups(&tp, "found");
    let cached = lookups(&tp, "cached");
    assert!((10.0..=20.0).contains(&found), "found {found}");
    assert_eq!(found + cached, 200.0, "found {found} cached {cached}");
    stop(tp, pg, offset);
}

#[test]
fn lookups_fail_closed_while_postgres_is_down_and_work_again_after() {
    let pg = PgCluster::start_dedicated(&[]);
    pg.create_role(LOOKUP_USER, LOOKUP_PW);
    pg.set_hba(
        "local all all trust\nhost all postgres 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 scram-sha-256\n",
    );
    let db = database(&pg, "lookup_down");
    role(&pg, "lk_down", "Down-Pw-1", &db);
    role(&pg, "lk_down2", "Down-Pw-2", &db);
    let tp = TidepoolProcess::start(&config(&pg, &db, "scram-sha-256", "", ""));
    assert_eq!(
        login(&tp, "lk_down", "Down-Pw-1", &db).as_deref(),
        Ok("lk_down")
    );

    pg.stop();
    // Not in the cache: the lookup cannot be done, and the login is refused.
    let err = login(&tp, "lk_down2", "Down-Pw-2", &db).unwrap_err();
    assert!(err.contains("authentication lookup failed"), "{err}");
    // A wrong password is not let in either.
    assert!(login(&tp, "lk_down2", "nope", &db).is_err());
    assert!(lookups(&tp, "error") >= 1.0);
    assert!(tp.log().contains("auth lookup failed"), "{}", tp.log());

    pg.start();
    let offset = pg.log_len();
    let t0 = Instant::now();
    loop {
        match login(&tp, "lk_down2", "Down-Pw-2", &db) {
            Ok(who) => {
                assert_eq!(who, "lk_down2");
                break;
            }
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(15), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The pool's server connections died with Postgres; they are replaced as they fail.
    let t0 = Instant::now();
    while login(&tp, "lk_down", "Down-Pw-1", &db).as_deref() != Ok("lk_down") {
        assert!(t0.elapsed() < Duration::from_secs(15));
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(tp, &pg, offset);
}
