//! TLS on both sides: a throwaway CA (openssl), Postgres with ssl=on, tidepool's TLS listener,
//! and sslmode towards the server.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::pg::PgCluster;
use common::tp::TidepoolProcess;

struct Certs {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    /// For 127.0.0.1 / localhost.
    good_crt: PathBuf,
    good_key: PathBuf,
    /// For db.example only.
    wrong_crt: PathBuf,
    wrong_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=tidepool-test-ca",
        ],
    );
    for (name, cn, san) in [
        (
            "good",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ),
        ("wrong", "db.example", "subjectAltName=DNS:db.example"),
    ] {
        std::fs::write(d.join(format!("{name}.ext")), san).unwrap();
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    // Postgres (running as `postgres`) must read the key files: 0600 and owned by it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["good.key", "wrong.key"] {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
        let _ = Command::new("chown")
            .arg("postgres")
            .arg(d.join(f))
            .status();
    }
    for f in ["ca.crt", "good.crt", "wrong.crt"] {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    Certs {
        ca: d.join("ca.crt"),
        good_crt: d.join("good.crt"),
        good_key: d.join("good.key"),
        wrong_crt: d.join("wrong.crt"),
        wrong_key: d.join("wrong.key"),
        _dir: dir,
    }
}

fn psql(port: u16, sslmode: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-At", "-d"])
        .arg(format!("host=127.0.0.1 port={port} user=postgres dbname=app sslmode={sslmode} connect_timeout=5"))
        .args(["-c", "SELECT 'ok'"])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn config(pg: &PgCluster, listen_tls: &str, db_tls: &str) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n{listen_tls}\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [auth]\nmethod = \"trust\"\n[pool]\nsize = 2\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\n{db_tls}\n",
        pg.port()
    )
}

#[test]
fn tls_both_sides() {
    let certs = make_certs();
    let pg = PgCluster::start_dedicated(&[
        "ssl=on",
        &format!("ssl_cert_file='{}'", certs.good_crt.display()),
        &format!("ssl_key_file='{}'", certs.good_key.display()),
    ]);
    pg.psql("postgres", "CREATE DATABASE app");
    let offset = pg.log_len();
    let listen = format!(
        "tls = {{ cert = \"{}\", key = \"{}\", mode = \"require\" }}",
        certs.good_crt.display(),
        certs.good_key.display()
    );

    // Clients must use TLS; the server connections are encrypted too (sslmode require).
    let mut tp = TidepoolProcess::start(&config(&pg, &listen, "sslmode = \"require\""));
    assert_eq!(psql(tp.port, "require").as_deref(), Ok("ok"));
    let plain = psql(tp.port, "disable").unwrap_err();
    assert!(plain.contains("requires SSL"), "{plain}");
    let ssl = pg.psql(
        "app",
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = 'app' AND a.pid <> pg_backend_pid()",
    );
    assert_eq!(ssl, "t", "tidepool's server connections are encrypted");
    tp.signal("TERM");
    assert_eq!(tp.wait(Duration::from_secs(10)), Some(0), "{}", tp.log());
    let report = tp.drain_report().expect("drain report");
    assert_eq!(report["servers_closed_hard"], 0, "{report}");
    assert_eq!(report["leaked"], 0, "{report}");

    // verify-full against the right name works, verify-ca too.
    let full = format!(
        "sslmode = \"verify-full\"\nsslrootcert = \"{}\"",
        certs.ca.display()
    );
    let mut tp = TidepoolProcess::start(&config(&pg, "", &full));
    assert_eq!(psql(tp.port, "disable").as_deref(), Ok("ok"));
    tp.signal("TERM");
    assert_eq!(tp.wait(Duration::from_secs(10)), Some(0));

    // Now Postgres presents a certificate for another host name.
    std::fs::copy(&certs.wrong_crt, &certs.good_crt).unwrap();
    std::fs::copy(&certs.wrong_key, &certs.good_key).unwrap();
    pg.psql("postgres", "SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(300));
    let mut tp = TidepoolProcess::start(&config(&pg, "", &full));
    let err = psql(tp.port, "disable").unwrap_err();
    assert!(
        err.contains("TLS handshake with the server failed"),
        "{err}"
    );
    tp.signal("TERM");
    assert_eq!(tp.wait(Duration::from_secs(10)), Some(0));
    let ca = format!(
        "sslmode = \"verify-ca\"\nsslrootcert = \"{}\"",
        certs.ca.display()
    );
    let mut tp = TidepoolProcess::start(&config(&pg, "", &ca));
    assert_eq!(
        psql(tp.port, "disable").as_deref(),
        Ok("ok"),
        "verify-ca ignores the name"
    );
    tp.signal("TERM");
    assert_eq!(tp.wait(Duration::from_secs(10)), Some(0));

    std::thread::sleep(Duration::from_millis(300));
    let log = pg.log_since(offset);
    let bad = common::tp::abrupt_disconnects(&log);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn sslmode_require_fails_against_a_plain_server() {
    let pg = PgCluster::shared();
    let db = pg.create_db("tls_plain");
    let text = config(pg, "", "sslmode = \"require\"")
        .replace("[databases.app]", &format!("[databases.{db}]"));
    let mut tp = TidepoolProcess::start(&text);
    let out = Command::new("psql")
        .args(["-X", "-At", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} sslmode=disable",
            tp.port
        ))
        .args(["-c", "SELECT 1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server does not support SSL"), "{err}");
    tp.signal("TERM");
    assert_eq!(tp.wait(Duration::from_secs(10)), Some(0));
}

#[test]
fn listener_certificate_reloads_on_sighup() {
    let certs = make_certs();
    let pg = PgCluster::shared();
    let db = pg.create_db("tls_reload");
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    std::fs::copy(&certs.good_crt, &crt).unwrap();
    std::fs::copy(&certs.good_key, &key).unwrap();
    let listen = format!(
        "tls = {{ cert = \"{}\", key = \"{}\", mode = \"require\" }}",
        crt.display(),
        key.display()
    );
    let text = config(pg, &listen, "sslmode = \"disable\"")
        .replace("[databases.app]", &format!("[databases.{db}]"));
    let mut tp = TidepoolProcess::start(&text);
    let verify_full = |port: u16| {
        Command::new("psql")
            .args(["-X", "-At", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={port} user=postgres dbname={db} sslmode=verify-full sslrootcert={} connect_timeout=5",
                certs.ca.display()
            ))
            .args(["-c", "SELECT 1"])
            .output()
            .unwrap()
    };
    let out = verify_full(tp.port);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Swap in a certificate for another name and reload: new clients see it.
    std::fs::copy(&certs.wrong_crt, &crt).unwrap();
    std::fs::copy(&certs.wrong_key, &key).unwrap();
    tp.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    let out = verify_full(tp.port);
    assert!(!out.status.success(), "the old certificate is still served");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not match host name") || err.contains("127.0.0.1"),
        "{err}"
    );
    tp.signal("TERM");
    assert_eq!(tp.wait(Duration::from_secs(10)), Some(0));
}

/// CPU time (utime + stime, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// An idle session waits for its client without a buffer (plain TCP) or with one (TLS, where
/// the socket's readiness says nothing about decrypted bytes). Either way it must sleep, not
/// poll in a loop: a regression here once made a TLS client's idle session spin.
#[test]
fn idle_sessions_use_no_cpu() {
    let certs = make_certs();
    let pg = PgCluster::shared();
    let db = pg.create_db("idle_cpu");
    let listen = format!(
        "tls = {{ cert = \"{}\", key = \"{}\", mode = \"prefer\" }}",
        certs.good_crt.display(),
        certs.good_key.display()
    );
    let text = config(pg, &listen, "").replace("[databases.app]", &format!("[databases.{db}]"));
    let mut tp = TidepoolProcess::start(&text);
    let mut clients = Vec::new();
    for sslmode in ["require", "disable", "require", "disable"] {
        let mut child = Command::new("psql")
            .args(["-X", "-At", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname={db} sslmode={sslmode} connect_timeout=5",
                tp.port
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("psql");
        let stdin = child.stdin.as_mut().expect("psql stdin");
        stdin.write_all(b"SELECT 'ok';\n").unwrap();
        stdin.flush().unwrap();
        // The answer arrived: the client is logged in, and idle from now on. (Bounded: a
        // session spinning without yielding can stall tidepool's worker threads.)
        let stdout = child.stdout.take().expect("psql stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(10));
        if line.is_err() {
            let _ = child.kill();
        }
        assert_eq!(
            line.as_deref().map(str::trim),
            Ok("ok"),
            "psql sslmode={sslmode}"
        );
        clients.push(child);
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = tp.child.id();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    // 100 ticks a second: a spinning session would use ~200 here; an idle process ~0.
    assert!(
        used <= 20,
        "tidepool used {used} ticks in 2 s with only idle clients"
    );
    for mut c in clients {
        c.stdin.take().unwrap().write_all(b"\\q\n").unwrap();
        assert!(c.wait().unwrap().success());
    }
    tp.signal("TERM");
    assert_eq!(tp.wait(Duration::from_secs(10)), Some(0), "{}", tp.log());
    let report = tp.drain_report().expect("drain report");
    assert_eq!(report["leaked"], 0, "{report}");
}
