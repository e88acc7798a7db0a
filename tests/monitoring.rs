//! The operator's kit (issue 22): deploy/prometheus/tidepool-rules.yml (recording rules and
//! alerts, with promtool unit tests) and deploy/grafana/tidepool.json (the dashboard), kept
//! true against tidepool's real metrics:
//!
//! - promtool checks the rules and runs their unit tests;
//! - the dashboard is a Grafana model with the datasource and pool variables, and every panel
//!   queries through them;
//! - every `tidepool_*` name in the rules, their tests and the dashboard is one tidepool
//!   exports (no invented metric);
//! - a real Prometheus, scraping a tidepool under pgbench load with the rules loaded, returns
//!   data for every dashboard expression, every recording rule and every selector;
//! - a deliberate leak makes the leak alert pending or firing in that Prometheus.
//!
//! The Prometheus tests run one at a time ([`serial`]): each starts a Prometheus, and the
//! machine may have two cores.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::PgCluster;
use common::prom::{self, Prometheus};
use common::tp::{self, bounded, config_text, http_get, serial, Tidepool};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

const RULES: &str = "deploy/prometheus/tidepool-rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/tidepool-rules.test.yml";
const DASHBOARD: &str = "deploy/grafana/tidepool.json";

/// What the dashboard's template variables stand for when its queries go to Prometheus
/// directly: every pool, and a rate window of many 1 s scrapes.
const VARIABLES: [(&str, &str); 2] = [("$pool", ".+"), ("$__rate_interval", "30s")];

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Every non-row panel of the dashboard (rows here are not collapsed, so their panels are at
/// the top level; a collapsed row's `panels` are included too).
fn panels(dash: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().cloned().unwrap_or_default());
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// Every target expression of the dashboard: (panel title, expression as written).
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has an expr");
            out.push((title.clone(), expr.to_string()));
        }
    }
    out
}

/// A dashboard expression as Prometheus gets it once Grafana has filled in the variables.
fn with_variables(expr: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in VARIABLES {
        e = e.replace(var, value);
    }
    assert!(!e.contains('$'), "unknown variable left in {e}");
    e
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every `tidepool_*` metric name in `text`, each with the label matchers that follow it, if
/// any (`{...}`). Recording-rule names (`level:metric:ops`) are not metric names tidepool
/// exports, so tokens with a colon are left out.
fn tidepool_selectors(text: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("tidepool_") {
        let boundary = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !is_name_char(c));
        let tail = &rest[i..];
        let len = tail.find(|c| !is_name_char(c)).unwrap_or(tail.len());
        let name = &tail[..len];
        if boundary && !name.contains(':') {
            let after = &tail[len..];
            let matchers = if after.starts_with('{') {
                after.find('}').map(|end| after[..=end].to_string())
            } else {
                None
            };
            out.push((name.to_string(), matchers));
        }
        rest = &tail[len.max(1)..];
    }
    out
}

/// The metric names of a text exposition: every sample's name, and every family's name from
/// its TYPE line (a histogram's family name has no sample of its own).
fn exposed_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_file("deploy/prometheus"))
        .output()
        .expect("promtool (Debian package `prometheus`; scripts/test installs it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Run a blocking Prometheus API call off the runtime that serves tidepool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking call")
}

/// Poll `f` every 250 ms until it returns `Some`, for at most `timeout`.
async fn poll<T: Send + 'static>(
    timeout: Duration,
    f: impl Fn() -> Option<T> + Send + Sync + Clone + 'static,
) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = blocking(f.clone()).await {
            return Some(v);
        }
        if t0.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Static checks
// ---------------------------------------------------------------------------------------------

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "tidepool-rules.yml"]);
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(&["test", "rules", "tidepool-rules.test.yml"]);
    assert!(ok, "promtool test rules:\n{out}");

    // Every alert has a severity, a summary and a description, and a unit test group.
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 8, "alerts: {alerts:?}");
    for alert in &alerts {
        let block = rules
            .split("- alert: ")
            .find(|b| b.starts_with(&format!("{alert}\n")))
            .unwrap();
        let block = block.split("\n      - ").next().unwrap();
        for key in ["severity: ", "summary: ", "description: "] {
            assert!(block.contains(key), "{alert} has no {key}");
        }
        // It fires in a test and is expected silent in one.
        let mut fires = false;
        let mut silent = false;
        for case in tests
            .split("- eval_time: ")
            .filter(|c| c.contains(&format!("alertname: {alert}\n")))
        {
            if case.contains("exp_alerts: []") {
                silent = true;
            } else if case.contains("exp_labels:") {
                fires = true;
            }
        }
        assert!(fires && silent, "{alert}: fires {fires}, silent {silent}");
    }

    // The leak alert links to the README's leak section, which exists.
    assert!(rules.contains("README.md#a-non-zero-leak-counter"));
    assert!(read("README.md").contains("\n### A non-zero leak counter\n"));
}

#[test]
fn the_dashboard_is_a_grafana_model_whose_panels_use_its_variables() {
    let dash = dashboard();
    assert!(dash["schemaVersion"].as_u64().unwrap_or(0) >= 36);
    assert_eq!(dash["uid"], "tidepool");
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let pool = var("pool");
    assert_eq!(pool["type"], "query");
    assert_eq!(
        pool["definition"],
        "label_values(tidepool_transactions_total, pool)"
    );
    assert_eq!(
        pool["query"]["query"],
        "label_values(tidepool_transactions_total, pool)"
    );
    assert_eq!(pool["includeAll"], true);
    assert_eq!(pool["allValue"], ".+");

    let rows: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(rows, ["Traffic", "Waiting", "Servers", "Health"]);

    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().expect("id")), "duplicate id");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{} is wider than the grid", p["title"]);
    }
    // Metrics without a pool label; every other query filters on the pool variable.
    let poolless = [
        "tidepool_client_connections",
        "tidepool_client_connections_rejected_total",
        "tidepool_draining",
        "tidepool_auth_lookups_total",
        "tidepool_budget_slots",
        "tidepool_budget_members",
    ];
    for p in panels(&dash) {
        let title = &p["title"];
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().unwrap();
            for (name, matchers) in tidepool_selectors(expr) {
                if !poolless.contains(&name.as_str()) {
                    assert!(
                        matchers.is_some_and(|m| m.contains("pool=~\"$pool\"")),
                        "{title}: {name} is not filtered on $pool in {expr}"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Against a real tidepool
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_metric_in_the_rules_or_the_dashboard_is_invented() {
    let pg = PgCluster::shared();
    let db = pg.create_db("mon_names");
    let tp = Tidepool::start_with(&config_text(pg, &db, "size = 2", ""), true).await;
    let admin = tp.admin.expect("admin endpoint").port();
    // Serving a query creates the pool, and with it every pool series (at 0); a session-level
    // SET creates the session-isolation series, which exist only once used.
    let c = tp.connect(&db).await;
    c.simple_query("SELECT 1").await.unwrap();
    c.simple_query("SET statement_timeout = '1min'")
        .await
        .unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let (code, exposition) = blocking(move || http_get(admin, "/metrics")).await;
    assert_eq!(code, 200);
    let exposed = exposed_names(&exposition);

    let mut used = BTreeSet::new();
    for file in [RULES, RULE_TESTS, DASHBOARD] {
        for (name, _) in tidepool_selectors(&read(file)) {
            used.insert((name, file));
        }
    }
    assert!(used.len() >= 15, "found only {used:?}");
    let invented: Vec<_> = used
        .iter()
        .filter(|(name, _)| !exposed.contains(name))
        .collect();
    assert!(
        invented.is_empty(),
        "names tidepool does not export: {invented:?}\nexported: {exposed:?}"
    );

    // The bucket bound the queued-checkout ratio matches exactly exists as written.
    for file in [RULES, DASHBOARD] {
        let text = read(file).replace("\\\"", "\"");
        for part in text.split("le=\"").skip(1) {
            let le = part.split('"').next().unwrap();
            assert!(
                exposition.contains(&format!("le=\"{le}\"")),
                "{file}: bucket le=\"{le}\" not in /metrics"
            );
        }
    }
    drop(c);
    assert_eq!(tp.leaked(), 0);
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_gets_data_for_every_panel_and_rule_under_pgbench_load() {
    let _serial = serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("mon_load");
    let pool = format!("{db}/postgres");
    // Fewer servers than clients, so checkouts queue and the wait histogram has a shape.
    let tp = Tidepool::start_with(
        &config_text(
            pg,
            &db,
            "mode = \"transaction\"\nsize = 2\ncheckout_timeout = \"20s\"",
            "",
        ),
        true,
    )
    .await;
    let admin = tp.admin.expect("admin endpoint").port();
    let port = tp.port();
    let rules_path = repo_file(RULES);
    let prom = blocking(move || Prometheus::start(admin, &[&rules_path])).await;
    let pp = prom.port;

    bounded(50, "load, then every query", async {
        let db2 = db.clone();
        let (ok, out) = blocking(move || {
            let (ok, out) = tp::pgbench(port, &db2, &["-i", "-s", "1", "-q"]);
            if !ok {
                return (ok, out);
            }
            tp::pgbench(port, &db2, &["-c", "6", "-j", "2", "-T", "5", "-S"])
        })
        .await;
        assert!(ok, "pgbench: {out}");
        assert!(
            tp::pgbench_processed(&out).unwrap_or(0) > 100,
            "pgbench: {out}"
        );
        // A client that sets a session-level setting: the session-isolation series
        // (tidepool_session_state_total, created on first use) have data too.
        let c = tp.connect(&db).await;
        c.batch_execute("SET statement_timeout = '1min'; SELECT 1")
            .await
            .unwrap();
        drop(c);

        // Every recording rule, by its recorded name and by its expression, and every
        // dashboard expression returns data. (Rules are evaluated every second; the first
        // evaluations after the load may still be running.)
        let rules = blocking(move || prom::rules(pp)).await;
        let recording: Vec<(String, String)> = rules
            .iter()
            .filter(|r| r["type"] == "recording")
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_string(),
                    r["query"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert!(recording.len() >= 7, "recording rules loaded: {rules:?}");
        let alerting = rules.iter().filter(|r| r["type"] == "alerting").count();
        assert!(alerting >= 8, "alerts loaded: {rules:?}");

        let dash = dashboard();
        let mut queries: Vec<(String, String)> = Vec::new();
        for (name, expr) in &recording {
            queries.push((format!("recorded series {name}"), name.clone()));
            queries.push((format!("recording rule {name}"), expr.clone()));
        }
        for (title, expr) in dashboard_exprs(&dash) {
            queries.push((format!("panel {title:?}"), with_variables(&expr)));
        }
        // Every selector on its own, so a wrong label name or value cannot hide behind an
        // `or`, a comparison or an alert that is not supposed to fire.
        let mut selectors = BTreeSet::new();
        let dash_exprs = dashboard_exprs(&dash)
            .into_iter()
            .map(|(_, e)| with_variables(&e));
        for text in std::iter::once(read(RULES)).chain(dash_exprs) {
            for (name, matchers) in tidepool_selectors(&text) {
                if let Some(m) = matchers {
                    selectors.insert(format!("{name}{m}"));
                }
            }
        }
        assert!(selectors.len() >= 10, "{selectors:?}");
        for s in selectors {
            queries.push((format!("selector {s}"), s));
        }
        for (what, expr) in queries {
            let e = expr.clone();
            let got = poll(Duration::from_secs(15), move || {
                let r = prom::query(pp, &e);
                (!r.is_empty()).then_some(r)
            })
            .await;
            assert!(got.is_some(), "{what}: no data for {expr}");
        }

        // Numbers that must have moved under load.
        let recorded = format!("instance_pool:tidepool_transactions:rate5m{{pool=\"{pool}\"}}");
        let tx = blocking(move || prom::query(pp, &recorded)).await;
        assert_eq!(tx.len(), 1, "{tx:?}");
        let rate: f64 = tx[0]["value"][1].as_str().unwrap().parse().unwrap();
        assert!(rate > 1.0, "transactions/s {rate}");

        // The pool variable's query finds the pool.
        let values = blocking(move || {
            prom::api(
                pp,
                "/api/v1/label/pool/values?match[]=tidepool_transactions_total",
            )
        })
        .await;
        assert!(
            values
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v.as_str() == Some(pool.as_str())),
            "{values}"
        );

        // Every rule evaluates without error, and nothing fires on a healthy tidepool
        // (pending is allowed: the pool is saturated on purpose).
        let rules = blocking(move || prom::rules(pp)).await;
        for r in &rules {
            assert_eq!(r["health"], "ok", "{r}");
        }
        let firing: Vec<_> = blocking(move || prom::alerts(pp))
            .await
            .into_iter()
            .filter(|a| a["state"] == "firing")
            .collect();
        assert!(
            firing.is_empty(),
            "firing on a healthy tidepool: {firing:?}"
        );
    })
    .await;
    drop(prom);
    assert_eq!(tp.leaked(), 0);
    assert_eq!(tp.stop().await.leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliberate_leak_makes_the_leak_alert_pending_or_firing() {
    let _serial = serial().await;
    let pg = PgCluster::shared();
    let db = pg.create_db("mon_leak");
    let pool_label = format!("{db}/postgres");
    let tp = Tidepool::start_with(&config_text(pg, &db, "size = 2", ""), true).await;
    let admin = tp.admin.expect("admin endpoint").port();
    let rules_path = repo_file(RULES);
    let prom = blocking(move || Prometheus::start(admin, &[&rules_path])).await;
    let pp = prom.port;

    bounded(45, "leak, then the alert", async {
        let pool = tp
            .shared
            .pool_for(&tp.shared.runtime(), &db, "postgres", None)
            .expect("pool");
        // Prometheus has seen the pool's leak counter at 0, and the alert rule is silent.
        let selector = format!("tidepool_server_connections_leaked_total{{pool=\"{pool_label}\"}}");
        let seen = poll(Duration::from_secs(15), move || {
            let r = prom::query(pp, &selector);
            (r.first()?["value"][1] == "0").then_some(())
        })
        .await;
        assert!(
            seen.is_some(),
            "Prometheus never scraped the leak counter at 0"
        );
        let alert_of_pool = {
            let pool_label = pool_label.clone();
            move |a: &serde_json::Value| {
                a["labels"]["alertname"] == "TidepoolServerConnectionLeaked"
                    && a["labels"]["pool"] == pool_label.as_str()
            }
        };
        let evaluated = poll(Duration::from_secs(10), move || {
            prom::rules(pp)
                .iter()
                .find(|r| r["name"] == "TidepoolServerConnectionLeaked")
                .filter(|r| r["health"] == "ok")
                .map(|_| ())
        })
        .await;
        assert!(evaluated.is_some(), "the leak alert was never evaluated");
        let early = alert_of_pool.clone();
        assert!(
            !blocking(move || prom::alerts(pp)).await.iter().any(early),
            "leak alert before any leak"
        );

        // Leak one server connection (the test hook the lifecycle tests use).
        pool.checkout().await.expect("checkout").leak_for_test();
        assert_eq!(tp.leaked(), 1);

        let t0 = Instant::now();
        let alert = poll(Duration::from_secs(20), move || {
            prom::alerts(pp)
                .into_iter()
                .find(|a| alert_of_pool(a) && (a["state"] == "pending" || a["state"] == "firing"))
        })
        .await
        .expect("the leak alert went neither pending nor firing within 20s");
        assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
        assert!(
            alert["annotations"]["description"]
                .as_str()
                .is_some_and(|d| d.contains(&pool_label)),
            "{alert}"
        );
        eprintln!(
            "leak alert {} {:.1}s after the leak",
            alert["state"],
            t0.elapsed().as_secs_f64()
        );
    })
    .await;
    drop(prom);
    // Exactly the one leaked on purpose.
    assert_eq!(tp.leaked(), 1);
    assert_eq!(tp.stop().await.leaked, 1);
}
