//! A real Prometheus server (the Debian `prometheus` package; scripts/test installs it) that
//! scrapes an in-process tidepool: loopback only, a free port, its own temporary directory,
//! and killed by PID when dropped, so no process is left behind even when a test panics.
//!
//! The HTTP calls here block; from async tests run them with `spawn_blocking` (the tidepool
//! that Prometheus scrapes runs on the test's runtime).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tp::{free_port, http_get};

pub struct Prometheus {
    child: Child,
    /// The HTTP API's port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Start Prometheus scraping `127.0.0.1:{admin_port}/metrics` every second (job
    /// `tidepool`) and evaluating `rule_files` every second; returns once it has scraped the
    /// target successfully (its scrape manager takes up to 5 s after start to pick targets
    /// up, so a test that starts its load earlier would not be seen).
    pub fn start(admin_port: u16, rule_files: &[&Path]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut cfg = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
        );
        if !rule_files.is_empty() {
            cfg.push_str("rule_files:\n");
            for f in rule_files {
                cfg.push_str(&format!("  - '{}'\n", f.display()));
            }
        }
        cfg.push_str(&format!(
            "scrape_configs:\n  - job_name: tidepool\n    static_configs:\n      - targets: ['127.0.0.1:{admin_port}']\n"
        ));
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, cfg).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package `prometheus`; scripts/test installs it)");
        let mut p = Prometheus { child, port, dir };
        let t0 = Instant::now();
        loop {
            if http_get(port, "/-/ready").0 == 200
                && query(port, "up{job=\"tidepool\"} == 1").len() == 1
            {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "prometheus has not scraped tidepool 20s after start:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Prometheus's own log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Child::kill signals this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET an API path on the Prometheus at `port` and return its `data`; panics unless the answer
/// is 200 with `"status": "success"`.
pub fn api(port: u16, path: &str) -> serde_json::Value {
    let (code, body) = http_get(port, path);
    assert_eq!(code, 200, "GET {path}: {body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
    assert_eq!(v["status"], "success", "GET {path}: {body}");
    v["data"].clone()
}

/// An instant query (`/api/v1/query`): the result's samples.
pub fn query(port: u16, expr: &str) -> Vec<serde_json::Value> {
    let q: String = url::form_urlencoded::byte_serialize(expr.as_bytes()).collect();
    let data = api(port, &format!("/api/v1/query?query={q}"));
    assert_eq!(data["resultType"], "vector", "{expr}: {data}");
    data["result"].as_array().cloned().unwrap_or_default()
}

/// The alerts Prometheus holds, pending or firing (`/api/v1/alerts`).
pub fn alerts(port: u16) -> Vec<serde_json::Value> {
    api(port, "/api/v1/alerts")["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Every loaded rule (`/api/v1/rules`), recording and alerting, across groups.
pub fn rules(port: u16) -> Vec<serde_json::Value> {
    api(port, "/api/v1/rules")["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}
