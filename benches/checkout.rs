//! Micro-benchmark of `Pool::checkout` plus the `Checkout` drop that returns the connection
//! clean, against a warm pool of real server connections.
//!
//! - `checkout_return/uncontended`: one task on a current_thread runtime checks out and returns
//!   in a loop; every checkout finds an idle connection.
//! - `checkout_return/uncontended_checkout_idle`: the same through `Pool::checkout_idle`, the
//!   synchronous fast path the relay tries first for each transaction.
//! - `checkout_return/contended`: [`TASKS`] tasks on a multi-thread runtime with [`WORKERS`]
//!   workers share a pool of [`POOL_SIZE`]. Each holds its connection across one
//!   `yield_now` before returning it, so the other tasks really run out of slots and queue on
//!   the pool's FIFO wait. The time reported is total elapsed / total checkout+return pairs.
//!
//! The pool points at a throwaway PostgreSQL started like the integration tests start theirs
//! (`tests/common/pg.rs`, i.e. `scripts/pgcluster`), only when a benchmark actually runs (not
//! for `--list` or a filter that matches nothing), and stopped at the end.
//!
//! `cargo bench --bench checkout -- --measurement-time 5` measures; `cargo test --bench
//! checkout` (and so `cargo test --all-targets`) runs each benchmark once as a smoke test.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput};
use tidepool::backend::ServerTarget;
use tidepool::config::{PoolMode, PoolSettings};
use tidepool::metrics::{CloseReason, PoolMetrics};
use tidepool::pool::{Closer, Pool};
use tidepool::tls::SslMode;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[path = "../tests/common/pg.rs"]
mod pg;

use pg::PgCluster;

/// Server connections in the pool (all opened before measuring).
const POOL_SIZE: usize = 4;
/// Tasks sharing the pool in the contended benchmark.
const TASKS: u64 = 16;
/// Worker threads of the contended benchmark's runtime.
const WORKERS: usize = 2;

/// A pool with its closer, on its own runtime.
struct Fixture {
    rt: Runtime,
    pool: Pool,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Fixture {
    /// A pool of [`POOL_SIZE`] connections to `pg`, all opened and idle.
    fn new(rt: Runtime, pg: &PgCluster) -> Fixture {
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let target = ServerTarget {
            hosts: vec![(pg.host().to_string(), pg.port())],
            attrs: Default::default(),
            dbname: "postgres".to_string(),
            user: pg::SUPERUSER.to_string(),
            credential: None,
            sslmode: SslMode::Disable,
            tls: None,
            tls_id: String::new(),
        };
        let settings = PoolSettings {
            mode: PoolMode::Transaction,
            size: POOL_SIZE,
            min_idle: 0,
            checkout_timeout: Duration::from_secs(10),
            server_lifetime: Duration::from_secs(3600),
            server_idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(10),
            reset_query: "DISCARD ALL".to_string(),
            max_waiting: 10_000,
            max_prepared_statements: 200,
            session_state: Default::default(),
            idle_transaction_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            client_idle_timeout: Duration::ZERO,
            server_check_delay: Duration::from_secs(30),
            server_login_retry: Duration::from_secs(2),
        };
        let pool = rt.block_on(async {
            let closer = Closer::start(&tracker, stop.clone());
            let pool = Pool::new(
                "bench/checkout",
                target,
                settings,
                PoolMetrics::detached(),
                closer,
                tracker.clone(),
                Duration::from_secs(2),
            );
            // Hold POOL_SIZE checkouts at once so that each opens a connection of its own,
            // then return them all to the idle list.
            let mut held = Vec::with_capacity(POOL_SIZE);
            for _ in 0..POOL_SIZE {
                held.push(pool.checkout().await.expect("warm-up checkout"));
            }
            drop(held);
            pool
        });
        let st = pool.status();
        assert_eq!((st.idle, st.active), (POOL_SIZE, 0), "warm pool: {st:?}");
        assert_eq!(pool.inner.metrics.opened.get(), POOL_SIZE as u64);
        Fixture {
            rt,
            pool,
            tracker,
            stop,
        }
    }

    /// Close the pool (every connection gets a clean shutdown), stop the closer, and check
    /// that the measured loop never opened, lost or leaked a connection.
    fn shutdown(self) {
        let Fixture {
            rt,
            pool,
            tracker,
            stop,
        } = self;
        let st = pool.status();
        assert_eq!(
            (st.idle, st.active, st.waiting),
            (POOL_SIZE, 0, 0),
            "after the benchmark: {st:?}"
        );
        let m = pool.inner.metrics.clone();
        let (clean, hard) = rt.block_on(async {
            let closed = pool.close(CloseReason::drain).await;
            stop.cancel();
            tracker.close();
            tokio::time::timeout(Duration::from_secs(10), tracker.wait())
                .await
                .expect("closer and login tasks finish");
            closed
        });
        drop(pool);
        drop(rt);
        assert_eq!((clean, hard), (POOL_SIZE, 0), "pool close outcomes");
        assert_eq!(m.opened.get(), POOL_SIZE as u64, "connections opened");
        assert_eq!(m.leaked.get(), 0, "connections leaked");
        assert_eq!(m.checkout_timeouts.get(), 0, "checkout timeouts");
    }
}

/// The benchmark's cluster, started on first use.
fn cluster(pg: &mut Option<PgCluster>) -> &PgCluster {
    pg.get_or_insert_with(|| PgCluster::start_dedicated(&[]))
}

/// One task: `iters` checkout+return pairs, each finding an idle connection. With `sync`, the
/// checkout is `Pool::checkout_idle`, the synchronous path a transaction-mode session takes
/// first for every transaction; else the general `Pool::checkout`.
fn uncontended(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    pg: &mut Option<PgCluster>,
    sync: bool,
) {
    let mut fixture: Option<Fixture> = None;
    let name = if sync {
        "uncontended_checkout_idle"
    } else {
        "uncontended"
    };
    group.bench_function(name, |b| {
        let fx = fixture.get_or_insert_with(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("current_thread runtime");
            Fixture::new(rt, cluster(pg))
        });
        let pool = &fx.pool;
        b.iter_custom(|iters| {
            fx.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let c = if sync {
                        pool.checkout_idle().expect("an idle connection")
                    } else {
                        pool.checkout().await.expect("checkout")
                    };
                    black_box(&c);
                    drop(c);
                }
                start.elapsed()
            })
        });
    });
    if let Some(fx) = fixture {
        fx.shutdown();
    }
}

/// [`TASKS`] tasks on [`WORKERS`] threads: `iters` checkout+return pairs between them, each
/// holding its connection across a yield so the pool runs out of slots.
fn contended(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    pg: &mut Option<PgCluster>,
) {
    let mut fixture: Option<Fixture> = None;
    group.bench_function("contended", |b| {
        let fx = fixture.get_or_insert_with(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(WORKERS)
                .enable_all()
                .build()
                .expect("multi-thread runtime");
            Fixture::new(rt, cluster(pg))
        });
        let pool = &fx.pool;
        b.iter_custom(|iters| {
            fx.rt.block_on(async {
                let start = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for t in 0..TASKS {
                    let n = iters / TASKS + u64::from(t < iters % TASKS);
                    if n == 0 {
                        continue;
                    }
                    let pool = pool.clone();
                    tasks.spawn(async move {
                        for _ in 0..n {
                            let c = pool.checkout().await.expect("checkout");
                            tokio::task::yield_now().await;
                            drop(c);
                        }
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r.expect("benchmark task");
                }
                start.elapsed()
            })
        });
    });
    if let Some(fx) = fixture {
        fx.shutdown();
    }
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    // Outlives the group; dropped (the cluster stopped) on the way out, also when a benchmark
    // panics.
    let mut pg: Option<PgCluster> = None;
    {
        let mut group = criterion.benchmark_group("checkout_return");
        group.throughput(Throughput::Elements(1));
        uncontended(&mut group, &mut pg, false);
        uncontended(&mut group, &mut pg, true);
        contended(&mut group, &mut pg);
        group.finish();
    }
    criterion.final_summary();
    // A dedicated cluster stops (and its directory goes) on drop.
    drop(pg);
}
