//! The fleet budget against the real Postgres (DESIGN.md section 12): several tidepool
//! processes sharing one `[budget]`, under pgbench, while a sampler counts server
//! connections in `pg_stat_activity` every 100 ms (control connections aside, recognised by
//! their `application_name`). Everything runs on 127.0.0.1, bounded in time; the processes
//! are the test's own (stopped by signal to their PIDs, or killed on drop).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pg::{quote_literal, PgCluster};
use common::tp::{self, config_text, TidepoolProcess};

/// One pgbench-driven test at a time: four instances and four pgbenches fill 2 cores.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

const BUDGET: usize = 24;

fn config(pg: &PgCluster, db: &str, name: &str, max: usize) -> String {
    config_text(
        pg,
        db,
        "size = 20\ncheckout_timeout = \"10s\"",
        &format!(
            "user = \"postgres\"\n[budget]\nname = \"{name}\"\nmax_server_connections = {max}\n\
             control_database = \"{db}\"\n"
        ),
    )
}

fn setup(prefix: &str) -> (&'static PgCluster, String) {
    let pg = PgCluster::shared();
    let db = pg.create_db(prefix);
    let (ok, out) = tp::pgbench(pg.port(), &db, &["-i", "-s", "1", "-q"]);
    assert!(ok, "pgbench -i: {out}");
    (pg, db)
}

fn start(pg: &PgCluster, db: &str, name: &str, n: usize) -> Vec<TidepoolProcess> {
    (0..n)
        .map(|_| TidepoolProcess::start(&config(pg, db, name, BUDGET)))
        .collect()
}

fn metrics(tp: &TidepoolProcess) -> String {
    let (code, body) = tp.http_get("/metrics");
    assert_eq!(code, 200, "/metrics: {body}");
    body
}

fn held(tp: &TidepoolProcess) -> usize {
    tp::sample(&metrics(tp), "tidepool_budget_slots", &[("state", "held")]).unwrap_or(0.0) as usize
}

fn members(tp: &TidepoolProcess) -> usize {
    tp::sample(&metrics(tp), "tidepool_budget_members", &[]).unwrap_or(0.0) as usize
}

fn leaked(tp: &TidepoolProcess) -> u64 {
    tidepool::metrics::sum_series(&metrics(tp), "tidepool_server_connections_leaked_total")
}

/// Counts `db`'s server connections in `pg_stat_activity` every 100 ms on a thread of its
/// own, control connections aside; keeps every sample with its time.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, i64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pg: &PgCluster, db: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let conninfo = pg.conninfo("postgres");
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = {} \
             AND backend_type = 'client backend' \
             AND application_name NOT LIKE 'tidepool budget %' AND pid <> pg_backend_pid()",
            quote_literal(db)
        );
        let (s, v) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                    .await
                    .expect("sampler connects");
                let task = tokio::spawn(conn);
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while !s.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let row = client.query_one(&sql, &[]).await.expect("sample");
                    let n: i64 = row.get(0);
                    v.lock().unwrap().push((Instant::now(), n));
                }
                drop(client);
                let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
            });
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn max(&self) -> i64 {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.1)
            .max()
            .unwrap_or(0)
    }

    fn max_since(&self, t: Instant) -> i64 {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.0 >= t)
            .map(|s| s.1)
            .max()
            .unwrap_or(0)
    }

    fn finish(mut self) -> Vec<(Instant, i64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("sampler thread");
        }
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `pgbench -S -c 16` through `tp`, one pgbench thread: with four pgbenches and four poolers
/// on 2 cores, one thread each keeps the scheduler's share per instance even (with `-j 4`
/// the instances' throughput spread 0.5-1.6x the mean with equal slots).
fn bench(tp: &TidepoolProcess, db: &str, secs: u64) -> std::process::Child {
    tp::spawn_pgbench(
        tp.port,
        db,
        &["-S", "-n", "-c", "16", "-j", "1", "-T", &secs.to_string()],
    )
}

/// (processed, output) of a pgbench that must have failed nothing.
fn bench_ok(child: std::process::Child, who: &str) -> u64 {
    let (ok, out) = tp::pgbench_output(child);
    assert!(ok, "{who}: pgbench failed:\n{out}");
    assert_eq!(tp::pgbench_failed(&out), Some(0), "{who}:\n{out}");
    tp::pgbench_processed(&out).unwrap_or_else(|| panic!("{who}: no count:\n{out}"))
}

/// SIGTERM each instance; each drains cleanly, leaks nothing and exits 0.
fn stop_all(tps: Vec<TidepoolProcess>) {
    for tp in &tps {
        assert_eq!(leaked(tp), 0, "leak counter");
        tp.signal("TERM");
    }
    for mut tp in tps {
        let code = tp.wait(Duration::from_secs(15));
        assert_eq!(code, Some(0), "exit code; log:\n{}", tp.log());
        let report = tp.drain_report().expect("drain report");
        assert_eq!(report["leaked"], 0, "{report}");
        assert_eq!(report["servers_closed_hard"], 0, "{report}");
    }
}

/// Wait (up to `timeout`) until `cond` holds, polling every 100 ms.
fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Slots of budget `name` held in `pg_locks`, by anyone.
fn locks_held(pg: &PgCluster, db: &str, name: &str) -> usize {
    let key = tidepool::budget::key_for(name);
    pg.psql(
        db,
        &format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 \
             AND classid = {key}::oid AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
    )
    .trim()
    .parse()
    .unwrap()
}

#[test]
fn four_instances_never_exceed_the_budget_and_share_it() {
    let _g = heavy();
    let (pg, db) = setup("budget_four");
    let name = format!("four-{}", std::process::id());
    let offset = pg.log_len();
    let tps = start(pg, &db, &name, 4);
    let sampler = Sampler::start(pg, &db);
    let t0 = Instant::now();
    let benches: Vec<_> = tps.iter().map(|tp| bench(tp, &db, 15)).collect();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(2));
        eprintln!("slots held: {:?}", tps.iter().map(held).collect::<Vec<_>>());
    }
    let seen: Vec<usize> = tps.iter().map(members).collect();
    assert!(seen.iter().all(|&m| m == 4), "members: {seen:?}");
    // /status shows each instance's part of the budget.
    for tp in &tps {
        let (_, body) = tp.http_get("/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let b = &v["budget"];
        assert_eq!(b["name"], name.as_str(), "{v}");
        assert_eq!(b["max_server_connections"], BUDGET, "{v}");
        assert_eq!(b["connected"], true, "{v}");
        let (held, used) = (b["held"].as_u64().unwrap(), b["used"].as_u64().unwrap());
        assert!(used <= held && held <= BUDGET as u64, "{v}");
    }
    let counts: Vec<u64> = benches
        .into_iter()
        .enumerate()
        .map(|(i, b)| bench_ok(b, &format!("instance {i}")))
        .collect();
    let elapsed = t0.elapsed();
    let samples = sampler.finish();
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    assert!(samples.len() > 100, "only {} samples", samples.len());
    assert!(
        max <= BUDGET as i64,
        "{max} server connections seen (budget {BUDGET})"
    );
    let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    for (i, c) in counts.iter().enumerate() {
        assert!(
            *c as f64 >= mean / 2.0,
            "instance {i}: {c} transactions, mean {mean:.0}: {counts:?}"
        );
    }
    eprintln!(
        "four instances, budget {BUDGET}: max {max} server connections in {} samples over {elapsed:?}; transactions {counts:?}",
        samples.len()
    );
    assert!(locks_held(pg, &db, &name) <= BUDGET);
    stop_all(tps);
    assert_eq!(locks_held(pg, &db, &name), 0, "every slot went back");
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

#[test]
fn survivors_take_the_share_of_a_killed_instance() {
    let _g = heavy();
    let (pg, db) = setup("budget_kill");
    let name = format!("kill-{}", std::process::id());
    let mut tps = start(pg, &db, &name, 4);
    let sampler = Sampler::start(pg, &db);
    let mut benches: Vec<_> = tps.iter().map(|tp| bench(tp, &db, 20)).collect();
    std::thread::sleep(Duration::from_secs(4));
    let victim = tps.pop().expect("four");
    let victim_bench = benches.pop().expect("four");
    let mut victim = victim;
    let _ = victim.child.kill();
    let _ = victim.child.wait();
    let killed_at = Instant::now();
    // Within 15 s the three survivors hold the whole budget between them.
    let ok = eventually(Duration::from_secs(15), || {
        tps.iter().map(held).sum::<usize>() == BUDGET
    });
    let took = killed_at.elapsed();
    assert!(
        ok,
        "survivors hold {:?} after 15 s",
        tps.iter().map(held).collect::<Vec<_>>()
    );
    assert!(tps.iter().all(|tp| members(tp) == 3));
    let (_, out) = tp::pgbench_output(victim_bench);
    assert!(!out.is_empty());
    for (i, b) in benches.into_iter().enumerate() {
        bench_ok(b, &format!("survivor {i}"));
    }
    let max = sampler.max();
    drop(sampler);
    assert!(max <= BUDGET as i64, "{max} server connections seen");
    eprintln!("survivors held the killed instance's share after {took:?}; max {max}");
    stop_all(tps);
}

#[test]
fn a_terminated_control_connection_overshoots_within_the_bound_and_recovers() {
    let _g = heavy();
    let (pg, db) = setup("budget_term");
    let name = format!("term-{}", std::process::id());
    let offset = pg.log_len();
    let tps = start(pg, &db, &name, 4);
    let sampler = Sampler::start(pg, &db);
    let benches: Vec<_> = tps.iter().map(|tp| bench(tp, &db, 16)).collect();
    std::thread::sleep(Duration::from_secs(5));
    assert!(sampler.max() <= BUDGET as i64);
    // The bound: the budget plus what the cut-off instance held (at most the most any
    // instance holds).
    let before = tps.iter().map(held).max().unwrap_or(0);
    let app = format!("tidepool budget {name}");
    // Terminate one instance's control connection.
    let pid: i32 = pg
        .psql(
            "postgres",
            &format!(
                "SELECT min(pid) FROM pg_stat_activity WHERE application_name = {}",
                quote_literal(&app)
            ),
        )
        .trim()
        .parse()
        .expect("a control connection");
    pg.psql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    let cut = Instant::now();
    // Recovery: four control connections again, the fleet back within the budget.
    let recovered = eventually(Duration::from_secs(10), || {
        pg.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = {}",
                quote_literal(&app)
            ),
        )
        .trim()
            == "4"
            && tps.iter().all(|tp| members(tp) == 4)
    });
    assert!(recovered, "the control connection did not come back");
    let recovered_in = cut.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let settled = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let after = sampler.max_since(settled);
    for (i, b) in benches.into_iter().enumerate() {
        bench_ok(b, &format!("instance {i}"));
    }
    let samples = sampler.finish();
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let bound = BUDGET + before;
    assert!(
        max <= bound as i64,
        "{max} server connections seen, bound {bound}"
    );
    assert!(
        after <= BUDGET as i64,
        "{after} server connections after recovery"
    );
    eprintln!(
        "control connection cut (an instance held at most {before}): max {max} (bound {bound}), {after} after recovery, recovered in {recovered_in:?}"
    );
    stop_all(tps);
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

#[test]
fn a_drain_under_the_budget_gives_every_slot_back() {
    let _g = heavy();
    let (pg, db) = setup("budget_drain");
    let name = format!("drain-{}", std::process::id());
    let offset = pg.log_len();
    let mut tps = start(pg, &db, &name, 2);
    let benches: Vec<_> = tps.iter().map(|tp| bench(tp, &db, 6)).collect();
    std::thread::sleep(Duration::from_secs(2));
    assert!(held(&tps[0]) > 0);
    let mut draining = tps.remove(0);
    assert_eq!(leaked(&draining), 0);
    draining.signal("TERM");
    let mut benches = benches.into_iter();
    bench_ok(benches.next().expect("two"), "draining instance");
    let code = draining.wait(Duration::from_secs(15));
    assert_eq!(code, Some(0), "log:\n{}", draining.log());
    let report = draining.drain_report().expect("drain report");
    assert_eq!(report["leaked"], 0, "{report}");
    assert_eq!(report["servers_closed_hard"], 0, "{report}");
    // Its slots went back: the other instance holds every slot still taken, and can take
    // the whole budget when it needs it.
    let other = &tps[0];
    assert!(eventually(Duration::from_secs(5), || {
        locks_held(pg, &db, &name) == held(other) && members(other) == 1
    }));
    bench_ok(benches.next().expect("two"), "other instance");
    stop_all(tps);
    assert_eq!(locks_held(pg, &db, &name), 0);
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}

#[test]
fn a_reload_lowers_the_budget_without_dropping_clients() {
    let _g = heavy();
    let (pg, db) = setup("budget_reload");
    let name = format!("reload-{}", std::process::id());
    let offset = pg.log_len();
    let tps = start(pg, &db, &name, 1);
    let sampler = Sampler::start(pg, &db);
    let b = bench(&tps[0], &db, 8);
    std::thread::sleep(Duration::from_secs(2));
    tps[0].rewrite_config(&config(pg, &db, &name, 8));
    tps[0].signal("HUP");
    assert!(eventually(Duration::from_secs(5), || held(&tps[0]) <= 8));
    std::thread::sleep(Duration::from_secs(1));
    let lowered = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        sampler.max_since(lowered) <= 8,
        "{} server connections after the reload",
        sampler.max_since(lowered)
    );
    bench_ok(b, "reloaded instance");
    drop(sampler);
    stop_all(tps);
    tp::assert_no_abrupt_disconnects_since(pg, offset);
}
