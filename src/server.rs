//! Wiring: binding the listeners, the accept loop, upkeep, readiness checks and the drain
//! sequence. The state they share is [`crate::state`].
//!
//! [`Server::bind`] opens the listeners; [`Server::run`] serves until a drain completes and
//! returns the [`DrainReport`]. Tests drive it in-process and trigger shutdown through
//! [`Shared::shutdown`]; the binary connects signals to the same handle.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::config::{Config, ConfigError, ConfigSource};
use crate::metrics::{CloseReason, RejectReason};
use crate::shutdown::{DrainReport, Phase};
use crate::state::{Runtime, Shared};

/// A bound, not yet running tidepool.
pub struct Server {
    pub shared: Arc<Shared>,
    listener: TcpListener,
    admin: Option<std::net::TcpListener>,
}

impl Server {
    /// Bind the client and admin listeners. `admin = false` skips the HTTP endpoint (tests).
    pub async fn bind(
        config: Config,
        source: Option<ConfigSource>,
        admin: bool,
    ) -> Result<Server, ServeError> {
        let rt = Runtime::new(config).map_err(ServeError::Config)?;
        let listener = TcpListener::bind(rt.config.listen.addr)
            .await
            .map_err(|e| ServeError::Bind(rt.config.listen.addr, e))?;
        let admin = if admin {
            let l = std::net::TcpListener::bind(rt.config.admin.addr)
                .map_err(|e| ServeError::Bind(rt.config.admin.addr, e))?;
            l.set_nonblocking(true)
                .map_err(|e| ServeError::Bind(rt.config.admin.addr, e))?;
            Some(l)
        } else {
            None
        };
        let shared = Arc::new(Shared::new(rt, source));
        Ok(Server {
            shared,
            listener,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serve until a drain completes. Returns the drain report.
    pub async fn run(self) -> DrainReport {
        let Server {
            shared,
            listener,
            admin,
        } = self;
        // The admin endpoint runs outside the tracker: it must answer until the very end.
        let admin_stop = tokio_util::sync::CancellationToken::new();
        let admin_task = admin.map(|l| {
            let shared = shared.clone();
            let stop = admin_stop.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(l, shared, stop).await {
                    tracing::error!(error = %e, "admin endpoint failed");
                }
            })
        });
        shared.tracker.spawn(upkeep(shared.clone()));
        shared.tracker.spawn(upstream_check(shared.clone()));
        let accept = tokio::spawn(accept_loop(shared.clone(), listener));
        shared.shutdown.set_phase(Phase::Running);
        tracing::info!("tidepool ready");

        shared.shutdown.drain_token().cancelled().await;
        let report = drain(&shared, accept).await;
        shared.shutdown.set_phase(Phase::Stopped);
        admin_stop.cancel();
        if let Some(t) = admin_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        report
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(ConfigError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let drain = shared.shutdown.drain_token();
    let force = shared.shutdown.force_token();
    let mut draining = false;
    let mut window: std::pin::Pin<Box<tokio::time::Sleep>> =
        Box::pin(tokio::time::sleep(Duration::from_secs(86400 * 365)));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => spawn_client(&shared, sock, peer),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = drain.cancelled(), if !draining => {
                draining = true;
                let accept_for = shared.runtime().config.drain.accept_for;
                if accept_for.is_zero() {
                    break;
                }
                window.as_mut().reset(tokio::time::Instant::now() + accept_for);
            }
            _ = &mut window, if draining => break,
            _ = force.cancelled() => break,
        }
    }
    shared.shutdown.stop_accepting();
    drop(listener);
    tracing::info!("listener closed");
}

fn spawn_client(shared: &Arc<Shared>, sock: TcpStream, peer: SocketAddr) {
    // Up to `max_clients` connections over the limit are served far enough to be told
    // `53300 sorry, too many clients already` once they send their startup packet. Past twice
    // the limit a connection is closed at once, unread: a flood of connections that send
    // nothing must not hold a task and a descriptor each until `login_timeout` ends them.
    let max = shared.runtime().config.listen.max_clients;
    let Some(slot) = shared.admit_client(max.saturating_mul(2)) else {
        shared.metrics.reject(RejectReason::max_clients);
        tracing::debug!(client.addr = %peer, "connection closed at accept: twice max_clients");
        drop(sock);
        return;
    };
    let shared = shared.clone();
    shared
        .tracker
        .clone()
        .spawn(crate::frontend::serve_client(shared, sock, peer, slot));
}

/// Idle timeouts, lifetimes, min_idle: once a second.
async fn upkeep(shared: Arc<Shared>) {
    let drain = shared.shutdown.drain_token();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = drain.cancelled() => return,
        }
        for pool in shared.pools() {
            pool.maintain().await;
        }
    }
}

/// Readiness: can the upstream be reached? A TCP connect per configured server, once a second,
/// bounded by `connect_timeout`; it uses no pool slot. (Postgres logs nothing for a connection
/// that sends no data, see ProcessStartupPacket in postmaster.c.)
async fn upstream_check(shared: Arc<Shared>) {
    let drain = shared.shutdown.drain_token();
    loop {
        let rt = shared.runtime();
        let timeout = rt.config.pool.connect_timeout;
        let mut ok = true;
        let mut seen = std::collections::HashSet::new();
        for entry in rt.config.databases.values() {
            if !seen.insert((entry.host.clone(), entry.port)) {
                continue;
            }
            let r = tokio::time::timeout(
                timeout,
                TcpStream::connect((entry.host.as_str(), entry.port)),
            )
            .await;
            if !matches!(r, Ok(Ok(_))) {
                ok = false;
            }
        }
        let was = shared.upstream_ok.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!("upstream reachable");
            } else {
                tracing::warn!("upstream unreachable");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = drain.cancelled() => return,
        }
    }
}

/// The drain, DESIGN.md section 4: wait for clients (bounded by `drain.timeout`), force the
/// rest, then shut every server connection down explicitly and report.
async fn drain(shared: &Arc<Shared>, accept: tokio::task::JoinHandle<()>) -> DrainReport {
    let start = Instant::now();
    let rt = shared.runtime();
    let cfg = &rt.config.drain;
    shared.metrics.draining.set(1);
    let clients_at_start = shared.client_count() as u64;
    let (clean_before, hard_before) = shared.metrics.shutdown_totals();
    let deadline = tokio::time::Instant::now() + cfg.timeout;
    let force = shared.shutdown.force_token();
    let mut deadline_reached = false;

    // Wait for clients to leave, or the deadline, or a forced stop.
    loop {
        if shared.client_count() == 0
            && (accept.is_finished() || shared.shutdown.refuse_new_clients())
        {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = tokio::time::sleep_until(deadline), if !deadline_reached => {
                deadline_reached = true;
                tracing::warn!(timeout = ?cfg.timeout, clients = shared.client_count(), "drain timeout reached: closing remaining clients");
                shared.shutdown.force_now();
            }
            _ = force.cancelled(), if !deadline_reached && !shared.shutdown.is_forced() => {}
        }
        if deadline_reached || shared.shutdown.is_forced() {
            // Forced sessions need at most server_close_timeout plus their writes.
            let grace = cfg.server_close_timeout + Duration::from_secs(1);
            let until = tokio::time::Instant::now() + grace;
            while shared.client_count() > 0 && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            break;
        }
    }
    let _ = accept.await;

    // Every server connection: idle ones now, returning ones as they come back.
    for pool in shared.pools() {
        pool.close(CloseReason::drain).await;
    }
    // Jobs already handed to the closer (recoveries, resets) finish, then it stops.
    let until = tokio::time::Instant::now() + cfg.server_close_timeout * 2 + Duration::from_secs(1);
    while shared.closer.pending() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shared.stop_closer();
    shared.tracker.close();
    if tokio::time::timeout(
        cfg.server_close_timeout + Duration::from_secs(2),
        shared.tracker.wait(),
    )
    .await
    .is_err()
    {
        tracing::warn!("some tasks did not finish within the drain bound");
    }
    let (clean_after, hard_after) = shared.metrics.shutdown_totals();
    let stats = &shared.shutdown.stats;
    let report = DrainReport {
        kind: shared.shutdown.kind(),
        duration_ms: start.elapsed().as_millis() as u64,
        clients_at_start,
        clients_left: stats.clients_left.load(Ordering::Relaxed),
        clients_closed_at_boundary: stats.clients_closed_at_boundary.load(Ordering::Relaxed),
        clients_forced: stats.clients_forced.load(Ordering::Relaxed),
        servers_closed_clean: clean_after - clean_before,
        servers_closed_hard: hard_after - hard_before,
        leaked: shared.metrics.leaked_total(),
        deadline_reached,
    };
    shared.metrics.draining.set(0);
    report
}
