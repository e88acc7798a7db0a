//! Client authentication (trust, md5, SCRAM-SHA-256) and server-side login through tidepool,
//! against a dedicated Postgres whose pg_hba demands passwords.

mod common;

use common::pg::PgCluster;
use common::tp::TidepoolProcess;

const APP_PW: &str = "app-Secret-4711";
const MD5U_PW: &str = "md5user-Pw-0815";
const VERI_PW: &str = "verifier-Pw-1234";

fn psql(port: u16, user: &str, password: &str, db: &str) -> Result<String, String> {
    common::tp::psql_as(port, user, password, db, "SELECT current_user")
}

fn setup() -> (PgCluster, String) {
    let pg = PgCluster::start_dedicated(&[]);
    pg.psql("postgres", "CREATE DATABASE app");
    // Roles: app (SCRAM on the server), md5user (stored as md5 on the server).
    pg.create_role("app", APP_PW);
    pg.psql(
        "postgres",
        "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5user-Pw-0815'",
    );
    pg.create_role("veri", VERI_PW);
    pg.set_hba(
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         host all app 127.0.0.1/32 scram-sha-256\n\
         host all veri 127.0.0.1/32 scram-sha-256\n\
         host all md5user 127.0.0.1/32 md5\n",
    );
    let md5_hash = format!(
        "md5{}",
        hex(&md5_digest(format!("{MD5U_PW}md5user").as_bytes()))
    );
    // veri's verifier as the server stores it (pass-through needs the server's own).
    let verifier = pg.psql(
        "postgres",
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'veri'",
    );
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let users = format!(
        "[[auth.users]]\nname = \"app\"\npassword = \"{APP_PW}\"\n\
         [[auth.users]]\nname = \"md5user\"\npassword = \"{md5_hash}\"\n\
         [[auth.users]]\nname = \"veri\"\npassword = \"{verifier}\"\n"
    );
    (pg, users)
}

fn md5_digest(data: &[u8]) -> [u8; 16] {
    use md5::Digest;
    md5::Md5::digest(data).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn config(pg: &PgCluster, method: &str, users: &str, db_extra: &str) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [auth]\nmethod = \"{method}\"\n{users}\n\
         [pool]\nsize = 2\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\n{db_extra}\n",
        pg.port()
    )
}

#[test]
fn scram_and_md5_clients_and_password_servers() {
    let (pg, users) = setup();
    let offset = pg.log_len();

    // SCRAM towards clients. app's plaintext password also logs tidepool in to the server
    // (which demands SCRAM).
    let mut tp = TidepoolProcess::start(&config(&pg, "scram-sha-256", &users, ""));
    assert_eq!(psql(tp.port, "app", APP_PW, "app").as_deref(), Ok("app"));
    let wrong = psql(tp.port, "app", "nope", "app").unwrap_err();
    let unknown = psql(tp.port, "ghost", "nope", "app").unwrap_err();
    assert!(
        wrong.contains("password authentication failed for user \"app\""),
        "{wrong}"
    );
    assert!(
        unknown.contains("password authentication failed for user \"ghost\""),
        "{unknown}"
    );
    // Same message apart from the name: users cannot be probed.
    assert_eq!(
        wrong.replace("\"app\"", "X"),
        unknown.replace("\"ghost\"", "X")
    );
    // A SCRAM verifier in the config, the server's own: the client logs in, and tidepool
    // logs in to the server with the keys the client's proof revealed (pass-through).
    assert_eq!(psql(tp.port, "veri", VERI_PW, "app").as_deref(), Ok("veri"));
    let err = psql(tp.port, "veri", "nope", "app").unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");

    // tokio-postgres with SCRAM.
    tokio_postgres_login(tp.port, "SCRAM");
    tp.signal("TERM");
    assert_eq!(tp.wait(std::time::Duration::from_secs(10)), Some(0));
    let log1 = tp.log();

    // md5 towards clients; server-side md5 (md5user) and SCRAM (app).
    let mut tp = TidepoolProcess::start(&config(&pg, "md5", &users, ""));
    assert_eq!(psql(tp.port, "app", APP_PW, "app").as_deref(), Ok("app"));
    let wrong = psql(tp.port, "app", "nope", "app").unwrap_err();
    assert!(
        wrong.contains("password authentication failed for user \"app\""),
        "{wrong}"
    );
    // tokio-postgres with md5.
    tokio_postgres_login(tp.port, "md5");
    // md5user's config secret is an md5 hash: the client logs in, and the hash answers the
    // server's md5 challenge too (pass-through).
    assert_eq!(
        psql(tp.port, "md5user", MD5U_PW, "app").as_deref(),
        Ok("md5user")
    );
    // With the database entry's own credentials it works as well.
    tp.signal("TERM");
    assert_eq!(tp.wait(std::time::Duration::from_secs(10)), Some(0));
    let log2 = tp.log();
    let mut tp = TidepoolProcess::start(&config(
        &pg,
        "md5",
        &users,
        &format!("user = \"md5user\"\npassword = \"{MD5U_PW}\""),
    ));
    assert_eq!(
        psql(tp.port, "md5user", MD5U_PW, "app").as_deref(),
        Ok("md5user")
    );
    // Server-side md5 login worked (tidepool logged in as md5user with md5).
    let err = psql(tp.port, "md5user", "bad", "app").unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
    tp.signal("TERM");
    assert_eq!(tp.wait(std::time::Duration::from_secs(10)), Some(0));
    let log3 = tp.log();

    // No secret in any log line.
    for log in [&log1, &log2, &log3] {
        for secret in [APP_PW, MD5U_PW, VERI_PW] {
            assert!(!log.contains(secret), "a password appeared in the log");
        }
    }
    // No abrupt disconnect on the server side.
    let pglog = pg.log_since(offset);
    assert!(common::tp::abrupt_disconnects(&pglog).is_empty(), "{pglog}");
}

#[test]
fn trust_requires_a_listed_user_when_users_are_configured() {
    let (pg, users) = setup();
    let mut tp = TidepoolProcess::start(&config(&pg, "trust", &users, "user = \"postgres\""));
    assert_eq!(psql(tp.port, "app", "", "app").as_deref(), Ok("postgres"));
    let err = psql(tp.port, "stranger", "", "app").unwrap_err();
    assert!(err.contains("not permitted"), "{err}");
    tp.signal("TERM");
    assert_eq!(tp.wait(std::time::Duration::from_secs(10)), Some(0));
}

/// Log in as `app` with tokio-postgres (whatever method tidepool asks for) and check who we
/// are. The runtime, and with it the client's connection task, ends before this returns.
fn tokio_postgres_login(port: u16, method: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=app password={APP_PW} dbname=app"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap_or_else(|e| panic!("tokio-postgres {method} login: {e}"));
        tokio::spawn(conn);
        let row = c.query_one("SELECT current_user::text", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "app");
    });
}
