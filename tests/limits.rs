//! Hostile and greedy clients against the limits (issue "Robustness and security"): oversized
//! and garbage startup packets, oversized and unknown messages, truncated messages, slow-loris
//! logins, `listen.max_clients` and `pool.max_waiting`. Real Postgres, in-process tidepool, raw
//! sockets. Every test ends with the leak counter at 0 and a fresh client still served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::raw::{self, error_end, io_end, End, Raw};
use common::tp::{config_text, wait_query_active, Tidepool};
use tidepool::state::Shared;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `[pool]` lines.
fn pool(mode: &str, size: usize, extra: &str) -> String {
    format!("mode = \"{mode}\"\nsize = {size}\ncheckout_timeout = \"20s\"\n{extra}")
}

/// The test config with extra `[listen]` keys.
fn config(pg: &PgCluster, db: &str, pool: &str, listen: &str) -> String {
    config_text(pg, db, pool, "").replacen("[admin]", &format!("{listen}\n[admin]"), 1)
}

/// Run blocking socket work off the runtime that serves tidepool; panics propagate.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Sum of the samples of `name` whose labels contain `label` (e.g. `reason="protocol"`).
fn series(shared: &Shared, name: &str, label: &str) -> u64 {
    shared
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn rejected(shared: &Shared, reason: &str) -> u64 {
    series(
        shared,
        "tidepool_client_connections_rejected_total",
        &format!("reason=\"{reason}\""),
    )
}

/// Read messages (skipping anything but ErrorResponse) until an error, EOF or `within`.
fn read_end(sock: &mut TcpStream, within: Duration) -> End {
    sock.set_read_timeout(Some(within)).unwrap();
    loop {
        let mut head = [0u8; 5];
        if let Err(e) = sock.read_exact(&mut head) {
            return io_end(&e);
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        assert!(
            (4..1 << 20).contains(&len),
            "bad length {len} from tidepool"
        );
        let mut body = vec![0u8; len - 4];
        if let Err(e) = sock.read_exact(&mut body) {
            return io_end(&e);
        }
        if head[0] == b'E' {
            return error_end(&body);
        }
    }
}

/// After a FATAL the connection must be closed (EOF or reset), not left open.
fn assert_closed_after(sock: &mut TcpStream, what: &str) {
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    match sock.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: {n} more bytes after FATAL"),
        Err(e) => assert_ne!(io_end(&e), End::Hang, "{what}: still open after FATAL"),
    }
}

/// Expect a FATAL with `code` (message containing `needle`), then the close.
fn expect_fatal(sock: &mut TcpStream, code: &str, needle: &str, what: &str) -> String {
    match read_end(sock, Duration::from_secs(5)) {
        End::Error(sev, c, m) => {
            assert_eq!(
                (sev.as_str(), c.as_str()),
                ("FATAL", code),
                "{what}: got {c} {m:?}"
            );
            assert!(m.contains(needle), "{what}: message {m:?} lacks {needle:?}");
            assert_closed_after(sock, what);
            m
        }
        other => panic!("{what}: expected FATAL {code}, got {other:?}"),
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to tidepool");
    s.set_nodelay(true).unwrap();
    s
}

/// A fresh client logs in and runs a query.
fn served(port: u16, db: &str) {
    let mut c = Raw::login(port, "postgres", db);
    assert_eq!(c.query("SELECT 41 + 1").unwrap(), vec!["42".to_string()]);
    c.terminate();
}

/// Wait until `cond` holds (or panic after `timeout`).
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stop tidepool: nothing leaked, nothing closed hard by the drain.
async fn finish(tp: Tidepool) {
    assert_eq!(tp.leaked(), 0, "leak counter before stop");
    let report = tp.stop().await;
    assert_eq!(report.leaked, 0, "leak counter after stop");
}

// ---------------------------------------------------------------------------------------------
// Startup packets
// ---------------------------------------------------------------------------------------------

/// A startup packet of exactly `total` bytes, padded in `options` (whitespace is ignored).
fn padded_startup(db: &str, total: usize) -> Vec<u8> {
    let base = raw::startup_packet(&[
        ("user", "postgres"),
        ("database", db),
        ("options", "-c application_name=limits"),
    ]);
    let pad = total - base.len();
    let options = format!("{}-c application_name=limits", " ".repeat(pad));
    let p = raw::startup_packet(&[
        ("user", "postgres"),
        ("database", db),
        ("options", &options),
    ]);
    assert_eq!(p.len(), total);
    p
}

/// The startup packet is read whole in one call when it has arrived whole; split across
/// writes, or longer than that first read's buffer, it still logs in. Bytes sent after it,
/// before tidepool answered, are a protocol violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_packets_split_long_or_followed_by_data() {
    let pg = PgCluster::shared();
    let db = pg.create_db("lim_startup_read");
    let tp = Tidepool::start(&config(pg, &db, &pool("transaction", 2, ""), "")).await;
    let port = tp.port();
    let db2 = db.clone();
    blocking(move || {
        let login = |s: &mut TcpStream| loop {
            let (tag, body) = raw::read_msg(s).expect("login reply");
            match tag {
                b'Z' => break,
                b'E' => panic!("login failed: {:?}", raw::error_fields(&body)),
                _ => {}
            }
        };
        // Split: the length word, a pause, then the rest in two writes.
        let packet = raw::startup_packet(&[("user", "postgres"), ("database", &db2)]);
        let mut s = connect(port);
        s.write_all(&packet[..2]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(&packet[2..9]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(&packet[9..]).unwrap();
        login(&mut s);
        // Longer than the first read's 512 bytes.
        let mut s = connect(port);
        s.write_all(&padded_startup(&db2, 2000)).unwrap();
        login(&mut s);
        // Data after the packet in the same write.
        let mut s = connect(port);
        let mut both = packet.clone();
        both.extend_from_slice(&raw::query_msg("SELECT 1"));
        s.write_all(&both).unwrap();
        expect_fatal(
            &mut s,
            "08P01",
            "after the startup packet",
            "data after startup",
        );
    })
    .await;
    served(port, &db);
    finish(tp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_packet_over_10000_bytes_is_refused() {
    let pg = PgCluster::shared();
    let db = pg.create_db("lim_startup");
    let tp = Tidepool::start(&config(pg, &db, &pool("transaction", 2, ""), "")).await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    blocking(move || {
        let before = rejected(&shared, "protocol");

        // The length word alone, announcing 10,001 bytes.
        let mut s = connect(port);
        s.write_all(&10_001u32.to_be_bytes()).unwrap();
        expect_fatal(
            &mut s,
            "08P01",
            "invalid startup packet length 10001",
            "length word 10001",
        );
        assert_eq!(rejected(&shared, "protocol"), before + 1);

        // A whole 10,001-byte packet: FATAL, or a reset if the unread rest of the packet
        // makes the kernel answer the close with RST; never a login.
        let mut s = connect(port);
        s.write_all(&padded_startup(&db, 10_001)).unwrap();
        match read_end(&mut s, Duration::from_secs(5)) {
            End::Error(_, code, _) => assert_eq!(code, "08P01"),
            End::Closed | End::Reset => {}
            End::Hang => panic!("10,001-byte startup packet: no answer"),
            End::Garbage(g) => panic!("10,001-byte startup packet: {g}"),
        }
        assert_eq!(rejected(&shared, "protocol"), before + 2);

        // Absurd lengths: 0, 4 (less than the minimum 8) and 2^31.
        for len in [0u32, 4, 0x8000_0000] {
            let mut s = connect(port);
            s.write_all(&len.to_be_bytes()).unwrap();
            expect_fatal(
                &mut s,
                "08P01",
                "invalid startup packet length",
                "odd length",
            );
        }
        assert_eq!(rejected(&shared, "protocol"), before + 5);

        // Exactly 10,000 bytes is within Postgres's limit and logs in.
        let mut s = connect(port);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&padded_startup(&db, 10_000)).unwrap();
        loop {
            let (tag, body) = raw::read_msg(&mut s).expect("login reply");
            assert_ne!(
                tag,
                b'E',
                "10,000 bytes refused: {:?}",
                raw::error_fields(&body)
            );
            if tag == b'Z' {
                break;
            }
        }
        let mut c = Raw {
            sock: s,
            key: (0, 0),
            params: Vec::new(),
        };
        assert_eq!(
            c.query("SHOW application_name").unwrap(),
            vec!["limits".to_string()]
        );
        c.terminate();
        assert_eq!(rejected(&shared, "protocol"), before + 5);
        served(port, &db);
    })
    .await;
    finish(tp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_startup_is_refused_without_hanging() {
    let pg = PgCluster::shared();
    let db = pg.create_db("lim_garbage");
    // A long login_timeout: an answer that comes only from the timeout would be a hang here.
    let tp = Tidepool::start(&config(
        pg,
        &db,
        &pool("transaction", 2, ""),
        "login_timeout = \"30s\"",
    ))
    .await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    blocking(move || {
        let before = rejected(&shared, "protocol");
        let mut v2 = 8u32.to_be_bytes().to_vec();
        v2.extend_from_slice(&0x0002_0000u32.to_be_bytes());
        let mut no_terminator = 16u32.to_be_bytes().to_vec();
        no_terminator.extend_from_slice(&196_608u32.to_be_bytes());
        no_terminator.extend_from_slice(b"user\0postgres");
        no_terminator.truncate(16);
        let mut not_utf8 = raw::startup_packet(&[("user", "postgres")]);
        not_utf8[8] = 0xff;
        let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
            (
                "HTTP request",
                b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
                None,
            ),
            (
                "TLS ClientHello",
                vec![
                    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
                ],
                None,
            ),
            (
                "protocol 2.0",
                v2,
                Some("unsupported frontend protocol 2.0"),
            ),
            (
                "no terminator",
                no_terminator,
                Some("invalid startup packet layout"),
            ),
            ("name not UTF-8", not_utf8, Some("not UTF-8")),
        ];
        let n = cases.len() as u64;
        for (what, bytes, needle) in cases {
            let mut s = connect(port);
            let t0 = Instant::now();
            s.write_all(&bytes).unwrap();
            match read_end(&mut s, Duration::from_secs(5)) {
                End::Error(sev, code, msg) => {
                    // Postgres's codes: feature_not_supported for a protocol version it
                    // does not speak, protocol_violation for the rest.
                    let want = if what.starts_with("protocol 2") {
                        "0A000"
                    } else {
                        "08P01"
                    };
                    assert_eq!((sev.as_str(), code.as_str()), ("FATAL", want), "{what}");
                    if let Some(needle) = needle {
                        assert!(msg.contains(needle), "{what}: {msg:?}");
                    }
                }
                // The unread rest of the garbage may turn the close into a reset.
                End::Closed | End::Reset => assert!(needle.is_none(), "{what}: no FATAL"),
                End::Hang => panic!("{what}: tidepool hangs"),
                End::Garbage(g) => panic!("{what}: {g}"),
            }
            assert!(t0.elapsed() < Duration::from_secs(2), "{what}: slow answer");
        }
        assert_eq!(rejected(&shared, "protocol"), before + n);

        // A TCP probe that connects and leaves is not a rejection.
        drop(connect(port));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rejected(&shared, "protocol"), before + n);
        served(port, &db);
    })
    .await;
    finish(tp).await;
}

// ---------------------------------------------------------------------------------------------
// Messages after login
// ---------------------------------------------------------------------------------------------

/// A Query message of exactly `total` bytes on the wire.
fn query_of(total: usize) -> Vec<u8> {
    let sql = format!("SELECT length('{}')", "x".repeat(total - 6 - 17));
    let m = raw::query_msg(&sql);
    assert_eq!(m.len(), total);
    m
}

async fn message_over_max_message_size(mode: &str) {
    let pg = PgCluster::shared();
    let db = pg.create_db(&format!("lim_msgsize_{mode}"));
    let tp = Tidepool::start(&config(
        pg,
        &db,
        &pool(mode, 2, ""),
        "max_message_size = 4096",
    ))
    .await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    blocking(move || {
        let before = rejected(&shared, "protocol");
        // A neighbour in the middle of a transaction.
        let mut b = Raw::login(port, "postgres", &db);
        b.query("BEGIN").unwrap();
        b.query("CREATE TABLE t (x int)").unwrap();

        let mut a = Raw::login(port, "postgres", &db);
        // At the limit: fine.
        a.sock.write_all(&query_of(4096)).unwrap();
        let mut rows = Vec::new();
        loop {
            let (tag, body) = raw::read_msg(&mut a.sock).expect("reply");
            assert_ne!(tag, b'E', "{:?}", raw::error_fields(&body));
            if tag == b'D' {
                rows.push(String::from_utf8_lossy(&body[6..]).into_owned());
            }
            if tag == b'Z' {
                break;
            }
        }
        assert_eq!(rows, vec![(4096 - 6 - 17).to_string()]);
        // Over it: FATAL 08P01, and the client is closed.
        a.sock.write_all(&query_of(10_000)).unwrap();
        expect_fatal(
            &mut a.sock,
            "08P01",
            "message of 10000 bytes exceeds the limit",
            "10,000-byte Query",
        );
        assert_eq!(rejected(&shared, "protocol"), before + 1);

        // The neighbour is unaffected.
        b.query("INSERT INTO t VALUES (1)").unwrap();
        b.query("COMMIT").unwrap();
        assert_eq!(b.query("SELECT count(*) FROM t").unwrap(), vec!["1"]);
        b.terminate();
        served(port, &db);
    })
    .await;
    finish(tp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_max_message_size_transaction_mode() {
    message_over_max_message_size("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_max_message_size_session_mode() {
    message_over_max_message_size("session").await;
}

async fn unknown_message_type(mode: &str) {
    let pg = PgCluster::shared();
    let db = pg.create_db(&format!("lim_unknown_{mode}"));
    let tp = Tidepool::start(&config(pg, &db, &pool(mode, 2, ""), "")).await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    blocking(move || {
        let before = rejected(&shared, "protocol");
        let mut other = Raw::login(port, "postgres", &db);
        // As the first message (transaction mode: no server held yet) ...
        for tag in [b'Z', 0u8, b'R', 0xff] {
            let mut a = Raw::login(port, "postgres", &db);
            a.sock.write_all(&[tag, 0, 0, 0, 4]).unwrap();
            expect_fatal(
                &mut a.sock,
                "08P01",
                &format!("invalid frontend message type {tag}"),
                "unknown first message",
            );
        }
        // ... and right after a valid one, in the same write (a server is held).
        let mut a = Raw::login(port, "postgres", &db);
        let mut bytes = raw::query_msg("SELECT 1");
        bytes.extend_from_slice(&[b'T', 0, 0, 0, 6, 0, 0]);
        a.sock.write_all(&bytes).unwrap();
        expect_fatal(
            &mut a.sock,
            "08P01",
            "invalid frontend message type 84",
            "unknown second message",
        );
        assert_eq!(rejected(&shared, "protocol"), before + 5);
        assert_eq!(other.query("SELECT 7").unwrap(), vec!["7"]);
        other.terminate();
        served(port, &db);
    })
    .await;
    finish(tp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_message_type_after_login_transaction_mode() {
    unknown_message_type("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_message_type_after_login_session_mode() {
    unknown_message_type("session").await;
}

async fn truncated_message_then_close(mode: &str) {
    let pg = PgCluster::shared();
    let db = pg.create_db(&format!("lim_trunc_{mode}"));
    pg.psql(&db, "CREATE TABLE t (x int)");
    let tp = Tidepool::start(&config(pg, &db, &pool(mode, 2, ""), "")).await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    let db2 = db.clone();
    let mode = mode.to_string();
    blocking(move || {
        let mut other = Raw::login(port, "postgres", &db2);
        other.query("BEGIN").unwrap();
        other.query("INSERT INTO t VALUES (1)").unwrap();

        // Half a header: nothing reaches a server.
        let mut a = Raw::login(port, "postgres", &db2);
        a.query("SELECT 1").unwrap();
        a.sock.write_all(b"Q\0\0").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(a);

        // A header and part of the body: the part is already on its way to a server. The
        // statement must not run (it would be `DELETE FROM t` + whatever filler).
        let mut a = Raw::login(port, "postgres", &db2);
        a.query("SELECT 1").unwrap();
        let sql = format!(
            "DELETE FROM t WHERE x = 12345 OR x > 0 /* {} */",
            "pad ".repeat(50)
        );
        let whole = raw::query_msg(&sql);
        // More than the 69 bytes transaction mode looks at before forwarding a Query.
        a.sock.write_all(&whole[..whole.len() - 40]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(a);

        // Same, half-way through an extended-protocol batch.
        let mut a = Raw::login(port, "postgres", &db2);
        let mut parse = vec![b'P'];
        parse.extend_from_slice(&40u32.to_be_bytes());
        parse.extend_from_slice(b"\0SELECT 1");
        a.sock.write_all(&parse).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(a);

        // The neighbour is unaffected, its transaction intact.
        assert_eq!(other.query("SELECT count(*) FROM t").unwrap(), vec!["1"]);
        other.query("COMMIT").unwrap();
        other.terminate();
        // Settled: nothing left checked out.
        wait_for("servers to settle", Duration::from_secs(10), || {
            shared.pool_statuses().iter().all(|p| p.active == 0) && shared.closer.pending() == 0
        });
        eprintln!(
            "{mode}: opened {} closed {:?} shutdowns clean {} hard {}",
            series(&shared, "tidepool_server_connections_opened_total", ""),
            shared
                .metrics
                .encode()
                .lines()
                .filter(
                    |l| l.starts_with("tidepool_server_connections_closed_total{")
                        && !l.ends_with(" 0")
                )
                .collect::<Vec<_>>(),
            series(
                &shared,
                "tidepool_server_shutdowns_total",
                "outcome=\"clean\""
            ),
            series(
                &shared,
                "tidepool_server_shutdowns_total",
                "outcome=\"hard\""
            ),
        );
        served(port, &db2);
    })
    .await;
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM t"), "1");
    finish(tp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_message_then_close_transaction_mode() {
    truncated_message_then_close("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_message_then_close_session_mode() {
    truncated_message_then_close("session").await;
}

// ---------------------------------------------------------------------------------------------
// Slow clients and greedy clients
// ---------------------------------------------------------------------------------------------

/// Send `bytes`, stall, and expect FATAL 57014 after about `login_timeout` (1 s).
fn stall_and_expect_timeout(sock: &mut TcpStream, what: &str) {
    let t0 = Instant::now();
    let m = expect_fatal(
        sock,
        "57014",
        "canceling authentication due to timeout",
        what,
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took <= Duration::from_millis(1500),
        "{what}: closed after {took:?} ({m})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_login_is_cut_off_by_login_timeout() {
    let pg = PgCluster::shared();
    let db = pg.create_db("lim_loris");
    let tp = Tidepool::start(&config(
        pg,
        &db,
        &pool("transaction", 2, ""),
        "login_timeout = \"1s\"",
    ))
    .await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    let db2 = db.clone();
    blocking(move || {
        let before = rejected(&shared, "protocol");
        // Three bytes of the length word.
        let mut s = connect(port);
        s.write_all(&[0, 0, 0]).unwrap();
        stall_and_expect_timeout(&mut s, "3 bytes");
        assert_eq!(rejected(&shared, "protocol"), before + 1);

        // Most of a startup packet.
        let mut s = connect(port);
        let p = raw::startup_packet(&[("user", "postgres"), ("database", &db2)]);
        s.write_all(&p[..p.len() - 3]).unwrap();
        stall_and_expect_timeout(&mut s, "partial startup packet");

        // One byte at a time, never finishing: the deadline covers the whole login.
        let mut s = connect(port);
        let t0 = Instant::now();
        let mut i = 0;
        while t0.elapsed() < Duration::from_millis(1600) && i < p.len() - 1 {
            if s.write_all(&p[i..i + 1]).is_err() {
                break;
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(150));
        }
        let end = read_end(&mut s, Duration::from_secs(3));
        assert!(
            matches!(&end, End::Error(_, c, _) if c == "57014")
                || matches!(end, End::Closed | End::Reset),
            "byte-by-byte: {end:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert_eq!(rejected(&shared, "protocol"), before + 3);
        served(port, &db2);
    })
    .await;
    finish(tp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_during_authentication_is_cut_off() {
    let pg = PgCluster::shared();
    let db = pg.create_db("lim_loris_auth");
    let cfg = config(
        pg,
        &db,
        &pool("transaction", 2, ""),
        "login_timeout = \"1s\"",
    )
    .replacen(
        "method = \"trust\"",
        "method = \"md5\"\n[[auth.users]]\nname = \"postgres\"\npassword = \"secret\"",
        1,
    );
    let tp = Tidepool::start(&cfg).await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    blocking(move || {
        let before = rejected(&shared, "protocol");
        let mut s = connect(port);
        s.write_all(&raw::startup_packet(&[
            ("user", "postgres"),
            ("database", &db),
        ]))
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (tag, body) = raw::read_msg(&mut s).expect("auth request");
        assert_eq!(
            (tag, &body[..4]),
            (b'R', &5i32.to_be_bytes()[..]),
            "MD5 asked"
        );
        // The password message starts, then stalls.
        s.write_all(b"p\0\0").unwrap();
        stall_and_expect_timeout(&mut s, "stalled password");
        assert_eq!(rejected(&shared, "protocol"), before + 1);
    })
    .await;
    finish(tp).await;
}

/// Connect and send a startup packet; the first reply's tag and body.
fn try_login(port: u16, db: &str) -> (TcpStream, End) {
    let mut s = connect(port);
    s.write_all(&raw::startup_packet(&[
        ("user", "postgres"),
        ("database", db),
    ]))
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (tag, body) = raw::read_msg(&mut s).expect("a reply");
    let end = if tag == b'E' {
        let (c, m) = raw::error_fields(&body);
        End::Error("FATAL".into(), c, m)
    } else {
        End::Closed
    };
    (s, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_refuses_the_sixth_client() {
    let pg = PgCluster::shared();
    let db = pg.create_db("lim_maxcl");
    let tp = Tidepool::start(&config(
        pg,
        &db,
        &pool("transaction", 2, ""),
        "max_clients = 5\nlogin_timeout = \"3s\"",
    ))
    .await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    blocking(move || {
        let before = rejected(&shared, "max_clients");
        let mut five: Vec<Raw> = (0..5).map(|_| Raw::login(port, "postgres", &db)).collect();
        for c in five.iter_mut() {
            assert_eq!(c.query("SELECT 1").unwrap(), vec!["1"]);
        }
        let (mut s, end) = try_login(port, &db);
        assert_eq!(
            end,
            End::Error(
                "FATAL".into(),
                "53300".into(),
                "sorry, too many clients already".into()
            )
        );
        assert_closed_after(&mut s, "sixth client");
        assert_eq!(rejected(&shared, "max_clients"), before + 1);
        // The five are still served.
        for c in five.iter_mut() {
            assert_eq!(c.query("SELECT 2").unwrap(), vec!["2"]);
        }
        // One leaves: a new client gets its place.
        five.pop().unwrap().terminate();
        wait_for("client count 4", Duration::from_secs(5), || {
            shared.client_count() == 4
        });
        let mut again = Raw::login(port, "postgres", &db);
        assert_eq!(again.query("SELECT 3").unwrap(), vec!["3"]);
        again.terminate();
        for c in five {
            c.terminate();
        }
        wait_for("client count 0", Duration::from_secs(5), || {
            shared.client_count() == 0
        });

        // Connections still in login count too (as in Postgres): five sockets that sent
        // nothing fill the limit until login_timeout ends them.
        let idle: Vec<TcpStream> = (0..5).map(|_| connect(port)).collect();
        wait_for("five connections counted", Duration::from_secs(5), || {
            shared.client_count() == 5
        });
        let (_s, end) = try_login(port, &db);
        assert!(
            matches!(&end, End::Error(_, c, _) if c == "53300"),
            "with 5 connections in login: {end:?}"
        );
        assert_eq!(rejected(&shared, "max_clients"), before + 2);
        // Five more silent connections are held for their FATAL too; at twice the limit a
        // connection is closed at accept, unread, long before login_timeout.
        let more: Vec<TcpStream> = (0..5).map(|_| connect(port)).collect();
        wait_for("ten connections counted", Duration::from_secs(5), || {
            shared.client_count() == 10
        });
        let mut over = connect(port);
        assert_eq!(read_end(&mut over, Duration::from_secs(2)), End::Closed);
        assert_eq!(rejected(&shared, "max_clients"), before + 3);
        assert_eq!(shared.client_count(), 10);
        drop((idle, more));
        wait_for("client count 0", Duration::from_secs(5), || {
            shared.client_count() == 0
        });
        served(port, &db);
    })
    .await;
    finish(tp).await;
}

async fn max_waiting(mode: &str) {
    let pg = PgCluster::shared();
    let db = pg.create_db(&format!("lim_maxwait_{mode}"));
    let tp = Tidepool::start(&config(pg, &db, &pool(mode, 1, "max_waiting = 1"), "")).await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    let waiting = move |s: &Arc<Shared>| s.pool_statuses().iter().map(|p| p.waiting).sum::<usize>();
    blocking(move || {
        let pg = PgCluster::shared();
        // A holds the only server with a long query.
        let mut a = Raw::login(port, "postgres", &db);
        a.sock
            .write_all(&raw::query_msg("SELECT pg_sleep(3) /* holder */"))
            .unwrap();
        wait_query_active(pg, &db, "SELECT pg_sleep(3) /* holder */");
        // B logs in (on the pool's known parameters) and waits for the server.
        let mut b = Raw::login(port, "postgres", &db);
        b.sock.write_all(&raw::query_msg("SELECT 2")).unwrap();
        wait_for("B waiting", Duration::from_secs(5), || {
            waiting(&shared) == 1
        });
        // C is one waiter too many: refused at once, and counted.
        let refused_before = rejected(&shared, "max_clients");
        let mut c = Raw::login(port, "postgres", &db);
        let t0 = Instant::now();
        c.sock.write_all(&raw::query_msg("SELECT 3")).unwrap();
        expect_fatal(
            &mut c.sock,
            "53300",
            "too many clients waiting",
            "third client",
        );
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "refusal took {:?}",
            t0.elapsed()
        );
        assert_eq!(rejected(&shared, "max_clients"), refused_before + 1);
        // A finishes, then B gets the server.
        a.sock
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        loop {
            let (tag, body) = raw::read_msg(&mut a.sock).expect("A's reply");
            assert_ne!(tag, b'E', "{:?}", raw::error_fields(&body));
            if tag == b'Z' {
                break;
            }
        }
        // (In session mode A keeps the server until it leaves.)
        a.terminate();
        b.sock
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = None;
        loop {
            let (tag, body) = raw::read_msg(&mut b.sock).expect("B's reply");
            assert_ne!(tag, b'E', "{:?}", raw::error_fields(&body));
            if tag == b'D' {
                got = Some(String::from_utf8_lossy(&body[6..]).into_owned());
            }
            if tag == b'Z' {
                break;
            }
        }
        assert_eq!(got.as_deref(), Some("2"));
        b.terminate();
        wait_for("no waiters", Duration::from_secs(5), || {
            waiting(&shared) == 0
        });
        served(port, &db);
    })
    .await;
    finish(tp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_waiting_refuses_the_second_waiter_transaction_mode() {
    max_waiting("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_waiting_refuses_the_second_waiter_session_mode() {
    max_waiting("session").await;
}

/// An oversized (or malformed) first message is refused before a server is fetched for it:
/// it must not wait in the pool's queue (nor take a server, nor count as a waiter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused_without_waiting_for_a_server() {
    let pg = PgCluster::shared();
    let db = pg.create_db("lim_msgsize_busy");
    let tp = Tidepool::start(&config(
        pg,
        &db,
        &pool("transaction", 1, ""),
        "max_message_size = 4096",
    ))
    .await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    blocking(move || {
        let pg = PgCluster::shared();
        let before = rejected(&shared, "protocol");
        // The only server is busy for 3 s.
        let mut holder = Raw::login(port, "postgres", &db);
        holder
            .sock
            .write_all(&raw::query_msg("SELECT pg_sleep(3) /* busy */"))
            .unwrap();
        wait_query_active(pg, &db, "SELECT pg_sleep(3) /* busy */");
        for (what, bytes, needle) in [
            ("10,000-byte Query", query_of(10_000), "exceeds the limit"),
            (
                "length 2",
                b"Q\0\0\0\x02".to_vec(),
                "invalid message length 2",
            ),
        ] {
            let mut a = Raw::login(port, "postgres", &db);
            let t0 = Instant::now();
            a.sock.write_all(&bytes).unwrap();
            expect_fatal(&mut a.sock, "08P01", needle, what);
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "{what}: refused only after {:?}, once a server was free",
                t0.elapsed()
            );
        }
        assert_eq!(rejected(&shared, "protocol"), before + 2);
        holder
            .sock
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        loop {
            let (tag, _) = raw::read_msg(&mut holder.sock).expect("holder's reply");
            if tag == b'Z' {
                break;
            }
        }
        holder.terminate();
        served(port, &db);
    })
    .await;
    finish(tp).await;
}

/// `listen.tcp_defer_accept` sets TCP_DEFER_ACCEPT (PgBouncer's tcp_defer_accept): a
/// connection whose client has sent nothing waits in the kernel, not in tidepool, and is
/// accepted with its first bytes. One that stays silent is accepted anyway after about a
/// second (the kernel retransmits its SYN-ACK and the client acknowledges it), and
/// login_timeout ends it as before. A connect-and-close probe costs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_defer_accept_holds_silent_connections_in_the_kernel() {
    let pg = PgCluster::shared();
    let db = pg.create_db("lim_defer");
    let tp = Tidepool::start(&config(
        pg,
        &db,
        &pool("transaction", 2, ""),
        "login_timeout = \"1s\"\ntcp_defer_accept = true",
    ))
    .await;
    let (port, shared) = (tp.port(), tp.shared.clone());
    blocking(move || {
        // Connected, nothing sent: tidepool has not accepted it yet.
        let mut talker = connect(port);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(shared.client_count(), 0, "a silent connection was accepted");
        // Its startup packet is accepted and answered like any login.
        talker
            .write_all(&raw::startup_packet(&[
                ("user", "postgres"),
                ("database", &db),
            ]))
            .unwrap();
        talker
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        loop {
            let (tag, body) = raw::read_msg(&mut talker).expect("login reply");
            assert_ne!(tag, b'E', "login failed: {:?}", raw::error_fields(&body));
            if tag == b'Z' {
                break;
            }
        }
        assert_eq!(shared.client_count(), 1);
        talker.write_all(&[b'X', 0, 0, 0, 4]).unwrap();
        wait_for("client count 0", Duration::from_secs(5), || {
            shared.client_count() == 0
        });

        // A probe that connects and closes at once: accepted at its FIN, ended quietly.
        for _ in 0..3 {
            drop(connect(port));
        }
        served(port, &db);

        // Silent for good: accepted after the kernel's retransmission, then ended by
        // login_timeout with Postgres's FATAL.
        let t0 = Instant::now();
        let mut silent = connect(port);
        wait_for(
            "the silent connection accepted",
            Duration::from_secs(10),
            || shared.client_count() == 1,
        );
        expect_fatal(&mut silent, "57014", "timeout", "silent connection");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "ended after {:?}",
            t0.elapsed()
        );
        wait_for("client count 0", Duration::from_secs(5), || {
            shared.client_count() == 0
        });
        served(port, &db);
    })
    .await;
    finish(tp).await;
}
