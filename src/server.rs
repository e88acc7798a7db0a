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
use crate::frontend::Peer;
use crate::metrics::{CloseReason, RejectReason};
use crate::shutdown::{DrainReport, Phase};
use crate::state::{Runtime, Shared};
use crate::tls::{ClientStream, MaybeTls};
use crate::unix_socket::{UnixSocket, UnixSocketError};

/// A bound, not yet running tidepool.
pub struct Server {
    pub shared: Arc<Shared>,
    listener: TcpListener,
    /// `listen.unix_socket_dir`: the Unix-socket listener, if configured.
    unix: Option<UnixSocket>,
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
        if rt.config.listen.tcp_defer_accept {
            defer_accept(&listener);
        }
        // The Unix socket is named after the TCP port actually bound (libpq's naming).
        let port = listener
            .local_addr()
            .map_err(|e| ServeError::Bind(rt.config.listen.addr, e))?
            .port();
        let unix = match rt.config.listen.unix_socket_path(port) {
            Some(path) => {
                let mode = rt
                    .config
                    .listen
                    .unix_socket_mode_bits()
                    .map_err(|e| ServeError::Config(ConfigError(e)))?;
                Some(UnixSocket::bind(&path, mode).map_err(ServeError::Unix)?)
            }
            None => None,
        };
        let admin = if admin {
            let l = std::net::TcpListener::bind(rt.config.admin.addr)
                .map_err(|e| ServeError::Bind(rt.config.admin.addr, e))?;
            l.set_nonblocking(true)
                .map_err(|e| ServeError::Bind(rt.config.admin.addr, e))?;
            Some(l)
        } else {
            None
        };
        let shared = Arc::new(Shared::new(rt, source, port));
        Ok(Server {
            shared,
            listener,
            unix,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The Unix socket's path, if one is listened on.
    pub fn unix_socket_path(&self) -> Option<&std::path::Path> {
        self.unix.as_ref().map(UnixSocket::path)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serve until a drain completes. Returns the drain report.
    pub async fn run(self) -> DrainReport {
        let Server {
            shared,
            listener,
            unix,
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
        if let Some(b) = &shared.budget {
            b.start(&shared.tracker);
        }
        shared.tracker.spawn(upkeep(shared.clone()));
        shared.tracker.spawn(upstream_check(shared.clone()));
        let accept = tokio::spawn(accept_loop(shared.clone(), listener, unix));
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

/// `TCP_DEFER_ACCEPT`, which neither std (unstable there), socket2 nor rustix expose: nix's
/// documented macro for options it does not define itself generates the `setsockopt` call (its
/// `unsafe` block is nix's; this crate keeps `unsafe_code = "forbid"`).
#[cfg(target_os = "linux")]
mod sockopt {
    use nix::libc;
    use nix::{setsockopt_impl, sockopt_impl};
    sockopt_impl!(
        /// `TCP_DEFER_ACCEPT` (tcp(7)): seconds to hold a connection whose client has sent
        /// nothing.
        DeferAccept,
        SetOnly,
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        i32
    );
}

/// `listen.tcp_defer_accept` (PgBouncer's `tcp_defer_accept`, on by default there on Linux,
/// doc/config.md): the kernel wakes the accept loop only once a client's first bytes have
/// arrived, so the accept, the first read and the reply take one wake-up instead of two, and
/// a read that would find nothing yet is not tried (3-7 % less CPU per login). But the
/// accept's own work then comes after the client's first bytes instead of overlapping with the
/// client preparing them, so a login takes longer (about 10 µs here; -2 to -5 % throughput with
/// a login per transaction), which is why it is off by default (bench/RESULTS.md). Every
/// Postgres client speaks first (an SSLRequest or its startup packet); one that sends nothing
/// is accepted anyway after about a second, when the kernel retransmits its SYN-ACK and the
/// client acknowledges it, and `login_timeout` then runs as usual. A connection closed without
/// a byte (a TCP health probe) is accepted at its FIN. Best effort: a failure is logged.
#[cfg(target_os = "linux")]
fn defer_accept(listener: &TcpListener) {
    if let Err(e) = nix::sys::socket::setsockopt(listener, sockopt::DeferAccept, &1) {
        tracing::warn!(error = %e, "could not set TCP_DEFER_ACCEPT on the listener");
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_accept(_listener: &TcpListener) {
    tracing::warn!("listen.tcp_defer_accept is Linux only: ignored");
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(ConfigError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("{0}")]
    Unix(UnixSocketError),
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, unix: Option<UnixSocket>) {
    let drain = shared.shutdown.drain_token();
    let force = shared.shutdown.force_token();
    // Made once, not per accepted connection: a fresh `cancelled()` future per loop
    // registers with its token (a lock) every time it is first polled.
    let mut drained = std::pin::pin!(drain.cancelled());
    let mut forced = std::pin::pin!(force.cancelled());
    let mut draining = false;
    let mut window: std::pin::Pin<Box<tokio::time::Sleep>> =
        Box::pin(tokio::time::sleep(Duration::from_secs(86400 * 365)));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, peer)) => spawn_client(&shared, MaybeTls::Plain(sock), Peer::Tcp(peer)),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            r = async { unix.as_ref().expect("guarded").listener.accept().await }, if unix.is_some() => match r {
                Ok((sock, _)) => spawn_client(&shared, MaybeTls::Unix(Box::new(sock)), Peer::Unix),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed (Unix socket)");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut drained, if !draining => {
                draining = true;
                let accept_for = shared.runtime().config.drain.accept_for;
                if accept_for.is_zero() {
                    break;
                }
                window.as_mut().reset(tokio::time::Instant::now() + accept_for);
            }
            _ = &mut window, if draining => break,
            _ = &mut forced => break,
        }
    }
    shared.shutdown.stop_accepting();
    drop(listener);
    // The Unix socket closes with the TCP listener, and its file goes with it.
    drop(unix);
    tracing::info!("listener closed");
}

fn spawn_client(shared: &Arc<Shared>, sock: ClientStream, peer: Peer) {
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

/// Idle timeouts, lifetimes, min_idle: once a second; and at once when the fleet budget's
/// cap falls (idle connections above it close).
async fn upkeep(shared: Arc<Shared>) {
    let drain = shared.shutdown.drain_token();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let budget = shared.budget.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = async { budget.as_ref().expect("guarded").shed_wanted().await }, if budget.is_some() => {}
            _ = drain.cancelled() => return,
        }
        for pool in shared.pools() {
            pool.maintain().await;
        }
        let rt = shared.runtime();
        shared
            .lookup
            .close_idle(
                rt.config.pool.server_idle_timeout,
                rt.config.drain.server_close_timeout,
            )
            .await;
    }
}

/// How often readiness is checked.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// Readiness (DESIGN.md section 5): ready when the upstream accepted a real login at the last
/// check, or a server connection answered since the one before (a transaction completed: no
/// login needed then). Under a fleet budget the control connection stands in for the login
/// (it is a real login that answers a round trip at least every second, and a login outside
/// the budget would break it). The login uses no pool slot, runs as each pool's server user (or a
/// database entry's configured `user`), and ends with the explicit shutdown. Only when no
/// credentials are known yet (no pool, no configured user) does a TCP connect stand in.
async fn upstream_check(shared: Arc<Shared>) {
    let drain = shared.shutdown.drain_token();
    let mut last_transactions = 0;
    loop {
        let transactions = shared.metrics.total("tidepool_transactions_total");
        let answered = transactions > last_transactions;
        last_transactions = transactions;
        let ok = answered
            || match &shared.budget {
                Some(b) => b.control_ok(),
                None => login_check(&shared).await,
            };
        let was = shared.upstream_ok.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!("upstream ready: it accepted a login");
            } else {
                tracing::warn!("upstream not ready: no login accepted");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(READINESS_INTERVAL) => {}
            _ = drain.cancelled() => return,
        }
    }
}

/// One real login per distinct server (the pools' targets, else the database entries that
/// name a user); true if every one succeeded.
async fn login_check(shared: &Arc<Shared>) -> bool {
    let rt = shared.runtime();
    let timeout = rt.config.pool.connect_timeout;
    // (target, its pool's name: the leak detector counts under it)
    let mut targets: Vec<(crate::backend::ServerTarget, String)> = shared
        .pools()
        .iter()
        .map(|p| ((*p.target()).clone(), p.name().to_string()))
        .collect();
    if targets.is_empty() {
        targets = rt.login_targets();
    }
    if targets.is_empty() {
        return tcp_check(&rt, timeout).await;
    }
    let mut seen = std::collections::HashSet::new();
    for (t, pool) in targets {
        if !seen.insert((t.hosts.clone(), t.dbname.clone(), t.user.clone())) {
            continue;
        }
        let leaked = shared.metrics.leaked_counter(&pool);
        match crate::backend::connect(&t, Arc::from(pool.as_str()), leaked, timeout).await {
            Ok(conn) => {
                conn.shutdown(rt.config.drain.server_close_timeout).await;
            }
            Err(e) => {
                tracing::debug!(target = ?t, error = %e, "readiness login failed");
                return false;
            }
        }
    }
    true
}

/// Without credentials: can each configured server be reached over TCP? (Postgres logs nothing
/// for a connection that sends no data: ProcessStartupPacket in postmaster.c.)
async fn tcp_check(rt: &Runtime, timeout: Duration) -> bool {
    // Per database entry: one of its hosts answers.
    for entry in rt.config.databases.values() {
        let mut any = false;
        for (host, port) in entry.hosts().unwrap_or_default() {
            let r = tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port))).await;
            if matches!(r, Ok(Ok(_))) {
                any = true;
                break;
            }
        }
        if !any {
            return false;
        }
    }
    true
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
    // The auth lookup's connections (no client needs a lookup any more).
    shared.lookup.close(cfg.server_close_timeout).await;
    // Jobs already handed to the closer (recoveries, resets) finish, then it stops.
    let until = tokio::time::Instant::now() + cfg.server_close_timeout * 2 + Duration::from_secs(1);
    while shared.closer.pending() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shared.stop_closer();
    // The budget's control connection closes last: every slot has come back by now.
    if let Some(b) = &shared.budget {
        b.stop();
    }
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
