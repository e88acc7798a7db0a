//! The HTTP admin endpoint and Prometheus metrics (DESIGN.md section 5).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::tp::{self, config_text, http_get, sample, Tidepool};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_load_and_match_pool_state() {
    let pg = PgCluster::shared();
    let db = pg.create_db("metrics");
    let tp = Tidepool::start_with(
        &config_text(
            pg,
            &db,
            "mode = \"transaction\"\nsize = 3\ncheckout_timeout = \"30s\"",
            "",
        ),
        true,
    )
    .await;
    let admin = tp.admin.expect("admin endpoint").port();
    let port = tp.port();
    let db2 = db.clone();
    let bench = tokio::task::spawn_blocking(move || {
        let (ok, out) = tp::pgbench(port, &db2, &["-i", "-s", "1", "-q"]);
        assert!(ok, "{out}");
        tp::pgbench(port, &db2, &["-c", "8", "-j", "2", "-T", "3", "-S"])
    });
    let pool = format!("{db}/postgres");
    let mut scrapes = Vec::new();
    while !bench.is_finished() {
        let (code, body) = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
            .await
            .unwrap();
        assert_eq!(code, 200);
        scrapes.push(body);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (ok, out) = bench.await.unwrap();
    assert!(ok, "{out}");
    assert!(scrapes.len() >= 5, "scraped {} times", scrapes.len());
    let first = &scrapes[0];
    let last = scrapes.last().unwrap();
    let tx = |t: &str| sample(t, "tidepool_transactions_total", &[("pool", &pool)]).unwrap_or(0.0);
    assert!(
        tx(last) > tx(first) + 100.0,
        "transactions moved: {} -> {}",
        tx(first),
        tx(last)
    );
    for (name, label) in [
        ("tidepool_checkout_wait_seconds_count", "pool"),
        ("tidepool_client_bytes_received_total", "pool"),
        ("tidepool_client_bytes_sent_total", "pool"),
        ("tidepool_queries_total", "pool"),
    ] {
        let v = sample(last, name, &[(label, &pool)]).unwrap_or(0.0);
        assert!(v > 0.0, "{name} is {v}");
    }
    // During load the gauges stay within the pool's size. A scrape reads the series one after
    // the other, not as one snapshot: a connection returned between the reads of `active` and
    // `idle` is seen in both (the at-rest check below catches a gauge that really drifts).
    for s in &scrapes {
        let active = sample(
            s,
            "tidepool_server_connections",
            &[("pool", &pool), ("state", "active")],
        )
        .unwrap_or(0.0);
        let idle = sample(
            s,
            "tidepool_server_connections",
            &[("pool", &pool), ("state", "idle")],
        )
        .unwrap_or(0.0);
        assert!(
            active + idle <= 3.0 + 1.0,
            "active {active} + idle {idle} > size + 1"
        );
    }
    // At rest they match the pool exactly.
    let (_, body) = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
        .await
        .unwrap();
    let status = tp
        .shared
        .pool_statuses()
        .into_iter()
        .find(|p| p.name == pool)
        .unwrap();
    assert_eq!(
        sample(
            &body,
            "tidepool_server_connections",
            &[("pool", &pool), ("state", "idle")]
        ),
        Some(status.idle as f64)
    );
    assert_eq!(
        sample(
            &body,
            "tidepool_server_connections",
            &[("pool", &pool), ("state", "active")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&body, "tidepool_client_connections", &[("state", "active")]),
        Some(0.0)
    );
    // /status has the same picture and no secrets.
    let (code, body) = tokio::task::spawn_blocking(move || http_get(admin, "/status"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["phase"], "running");
    assert_eq!(v["pools"][0]["name"], pool);
    assert_eq!(v["pools"][0]["mode"], "transaction");
    assert_eq!(v["pools"][0]["size"], 3);
    // No [budget]: no budget object.
    assert!(v["budget"].is_null(), "{v}");
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_a_real_prometheus_scrapes_them() {
    let pg = PgCluster::shared();
    let db = pg.create_db("prom");
    let tp = Tidepool::start_with(&config_text(pg, &db, "size = 2", ""), true).await;
    let admin = tp.admin.unwrap().port();
    let c = tp.connect(&db).await;
    c.simple_query("SELECT 1").await.unwrap();

    let (_, body) = tokio::task::spawn_blocking(move || http_get(admin, "/metrics"))
        .await
        .unwrap();
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`; scripts/test installs it)");
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
    }
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus, on loopback, scraping every second.
    let dir = tempfile::tempdir().unwrap();
    let prom_port = tp::free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tidepool\n    static_configs:\n      - targets: ['127.0.0.1:{admin}']\n"
        ),
    )
    .unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus server");
    let t0 = Instant::now();
    let mut found = String::new();
    while t0.elapsed() < Duration::from_secs(30) {
        let (code, body) = tokio::task::spawn_blocking(move || {
            http_get(
                prom_port,
                "/api/v1/query?query=tidepool_server_connections_leaked_total",
            )
        })
        .await
        .unwrap();
        if code == 200 && body.contains(&format!("{db}/postgres")) {
            found = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = prom.kill();
    let _ = prom.wait();
    assert!(
        !found.is_empty(),
        "Prometheus never saw tidepool_server_connections_leaked_total"
    );
    assert!(found.contains("\"0\""), "leak counter is 0: {found}");
    drop(c);
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_upstream() {
    let pg = PgCluster::start_dedicated(&[]);
    pg.psql("postgres", "CREATE DATABASE app");
    let tp = Tidepool::start_with(&config_text(&pg, "app", "size = 2", ""), true).await;
    let admin = tp.admin.unwrap().port();
    let get = move |path: &'static str| tokio::task::spawn_blocking(move || http_get(admin, path));
    let wait_for = |want: u16| async move {
        let t0 = Instant::now();
        loop {
            let (code, body) = get("/readyz").await.unwrap();
            if code == want {
                return (t0.elapsed(), body);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "/readyz stuck at {code}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_for(200).await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();
    let (took, body) = wait_for(503).await;
    assert!(took < Duration::from_secs(2), "503 after {took:?}");
    assert!(body.contains("upstream"), "{body}");
    assert_eq!(get("/livez").await.unwrap().0, 200);
    let pg = tokio::task::spawn_blocking(move || {
        pg.start();
        pg
    })
    .await
    .unwrap();
    wait_for(200).await;
    let c = tp.connect("app").await;
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    assert_eq!(tp.stop().await.leaked, 0);
    drop(pg);
}

#[test]
fn healthcheck_command_reports_readiness() {
    // Nothing listening: exit 1.
    let port = tp::free_port();
    let out = Command::new(tp::binary())
        .args([
            "healthcheck",
            "--url",
            &format!("http://127.0.0.1:{port}/readyz"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let pg = PgCluster::shared();
    let db = pg.create_db("health");
    let mut p = tp::TidepoolProcess::start(&config_text(pg, &db, "size = 1", ""));
    let url = format!("http://127.0.0.1:{}/readyz", p.admin_port);
    let t0 = Instant::now();
    loop {
        let out = Command::new(tp::binary())
            .args(["healthcheck", "--url", &url])
            .output()
            .unwrap();
        if out.status.code() == Some(0) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p.signal("TERM");
    assert_eq!(p.wait(Duration::from_secs(5)), Some(0));
}
