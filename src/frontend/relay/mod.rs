//! The relay: moves bytes between a client and the server it holds, parsing only message
//! headers, and decides when a server goes back to the pool.
//!
//! One buffer per direction. Each step polls both directions: if the direction has framed
//! bytes waiting, write them; else read more. So a peer that stops reading stalls only its
//! own direction (as on a direct connection) and each write carries every complete message
//! read so far (batched writes, no allocation per message). One poll of the sockets
//! ([`Session::pump`]) takes step after step, framing what it reads in place, until the
//! sockets have nothing more to give or the session's loop must act (a server to borrow or
//! give back, a drain signal, the timer): a transaction costs a few polls, not a trip
//! through the loop per socket call.
//!
//! Transaction mode releases the server on ReadyForQuery with status `I` when no request is
//! outstanding (every Query, Sync and FunctionCall sent has been answered), nothing of the
//! client's is half-sent and every byte from the server has been framed.
//!
//! This file is the byte pump and the session's life (idle wait, borrowing a server, giving
//! it back); the rest is split by concern:
//! - [`tracking`]: framing, protocol state and the request/reply queue that decides
//!   transaction boundaries;
//! - [`prepared`]: named protocol-level statements rewritten across servers;
//! - [`exit`]: drain signals, forced close, the session's last words and hand-off;
//! - [`buffers`]: spare read buffers and in-place splicing.

mod buffers;
mod exit;
mod isolation;
pub mod prepared;
mod timeouts;
pub mod tracking;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use self::buffers as spare;
pub use self::exit::ADMIN_SHUTDOWN;
use self::exit::{DrainWatch, Exit};
use self::isolation as iso;
use self::prepared::ClientExtras;
use self::tracking::Pending;
use crate::backend::params;
use crate::config::PoolMode;
use crate::frontend::{Attached, LoggedIn};
use crate::metrics::{ClientGauges, ClientState};
use crate::pool::Checkout;
use crate::protocol;
use crate::state::Shared;
use crate::tls::ClientStream;

/// Stop reading a direction once this much is buffered (backpressure).
const BUF_LIMIT: usize = 256 * 1024;
/// Read granularity.
const READ_CHUNK: usize = 16 * 1024;

/// What [`Session::pump`] hands back to the session's loop.
enum Ev {
    /// Progress was made; the loop's checks run again (a server to borrow, the idle wait).
    Stepped,
    /// The transaction is over: give the server back.
    Release,
    Exit(Exit),
    Boundary,
    Force,
    ForceDeadline,
    /// The session's timer fired (see `timeouts`).
    Timer(timeouts::Armed),
}

/// The result of one socket call (see [`Session::step`]).
enum Step {
    ClientRead(std::io::Result<usize>),
    ServerWrote(std::io::Result<usize>),
    ServerRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    /// Nothing in flight any more: the session may go back to its idle wait.
    Idle,
}

struct Session {
    shared: Arc<Shared>,
    login: Attached,
    server: Option<Checkout>,
    /// Client → server bytes; `[..c_ready]` is framed and may be written.
    cbuf: BytesMut,
    c_ready: usize,
    /// Bytes of the current client message not yet received (streamed message).
    c_rem: usize,
    c_tag: u8,
    /// Server → client bytes; `[..s_ready]` is framed and may be written.
    sbuf: BytesMut,
    s_ready: usize,
    s_rem: usize,
    /// Tag of the last server message framed.
    s_last_tag: u8,
    /// The last ErrorResponse from the server was FATAL or PANIC.
    s_last_fatal: bool,
    max_msg: usize,
    /// Close the client at its next transaction boundary (SIGINT drain).
    close_at_boundary: bool,
    /// Forced close in progress: give up waiting for the server at this instant.
    force_deadline: Option<tokio::time::Instant>,
    /// The session was forced (drain deadline, second signal, SIGQUIT).
    forced: bool,
    /// Session mode: when the current transaction's first request was framed.
    txn_started: Option<std::time::Instant>,
    /// Which `tidepool_client_connections{state}` gauge counts this client now.
    gauge: ClientState,
    /// Transaction mode: requests sent and the replies they wait for (see `tracking`); the
    /// requests are tracked when `iso` has `isolation::TRACK`.
    pending: VecDeque<Pending>,
    /// Transaction mode: the client's statement names and other rarely used state.
    extras: ClientExtras,
    /// Bytes `cbuf` must hold before the message being framed can be handled (0: none).
    c_need: usize,
    /// Transaction mode: the `sql::pin` kinds of session state the client holds on its
    /// server; while any, the server is not released (DESIGN.md section 8).
    pins: u8,
    /// Flags (`isolation::TRACK`, `PIN_LOGGED`, `REJECTING`, `DDL`, `UNREAD`): one byte for
    /// all, so the session stays within its size (see `size_tests`).
    iso: u8,
}

/// Drop the first `n` bytes, which were written. All of them (the usual case): the buffer is
/// cleared and keeps its start, so giving it back to the spares or reading into it again
/// needs no reclaiming of the space before its start (`BytesMut::reserve`).
fn consume(buf: &mut BytesMut, n: usize) {
    if n == buf.len() {
        buf.clear();
    } else {
        buf.advance(n);
    }
}

fn gauge_of(g: &ClientGauges, state: ClientState) -> &prometheus_client::metrics::gauge::Gauge {
    match state {
        ClientState::active => &g.active,
        ClientState::idle => &g.idle,
        ClientState::waiting => &g.waiting,
    }
}

/// # Drop behaviour
///
/// Settles the client's gauge and unregisters its cancel key, so that a session task that
/// panics leaves the metrics and the cancel registry right. (The server it held, if any, is
/// returned by the `Checkout`'s own `Drop`.)
impl Drop for Session {
    fn drop(&mut self) {
        gauge_of(&self.shared.metrics.client_gauges, self.gauge).dec();
        if self.pins != 0 {
            self.pool_metrics().pinned.dec();
        }
        self.shared.cancels.unregister(self.login.key);
        // Whatever is left unsent dies with the session (a client's Terminate, usually): the
        // buffers are emptied so that they go back to the spares, not to the allocator; a
        // login per transaction (pgbench -C) would otherwise allocate a 16 KiB buffer each.
        self.cbuf.clear();
        self.sbuf.clear();
        spare::give(std::mem::take(&mut self.cbuf));
        spare::give(std::mem::take(&mut self.sbuf));
    }
}

/// Relay a logged-in client until it leaves, then settle its server and cancel key.
///
/// Not an `async fn`: the session is built here, synchronously, and the returned future holds
/// only it and the client stream. (An `async fn` would keep its arguments in the future next
/// to the session built from them: bytes paid by every idle client.)
pub fn run(
    shared: Arc<Shared>,
    client: ClientStream,
    login: LoggedIn,
) -> impl std::future::Future<Output = ()> + Send {
    let mut s = Session::new(shared, login);
    let mut client = client;
    // Captured by the block and used in place: one copy of each in the future.
    async move { s.run(&mut client).await }
}

impl Session {
    fn new(shared: Arc<Shared>, login: LoggedIn) -> Session {
        let LoggedIn {
            client: login,
            server,
        } = login;
        let rt = shared.runtime();
        let max_msg = rt.config.listen.max_message_size;
        let timers =
            timeouts::Timers::new(&login.pool.settings(), rt.config.drain.server_close_timeout);
        drop(rt);
        let mut extras = ClientExtras::default();
        let mut flags = if login.mode == PoolMode::Transaction {
            iso::TRACK
        } else {
            0
        };
        if let Some(t) = timers {
            extras.set_timers(t);
            flags |= iso::TIMED;
        }
        let gauge = if server.is_some() {
            ClientState::active
        } else {
            ClientState::idle
        };
        gauge_of(&shared.metrics.client_gauges, gauge).inc();
        Session {
            gauge,
            pending: VecDeque::new(),
            extras,
            c_need: 0,
            pins: 0,
            iso: flags,
            shared,
            server,
            login,
            cbuf: BytesMut::new(),
            c_ready: 0,
            c_rem: 0,
            c_tag: 0,
            sbuf: BytesMut::new(),
            s_ready: 0,
            s_rem: 0,
            s_last_tag: 0,
            s_last_fatal: false,
            max_msg,
            close_at_boundary: false,
            force_deadline: None,
            forced: false,
            txn_started: None,
        }
    }

    async fn run(&mut self, client: &mut ClientStream) {
        let s = self;
        let exit = s.relay(client).await;
        tracing::debug!(?exit, "client session ended");
        if s.shared.shutdown.is_draining() {
            let stats = &s.shared.shutdown.stats;
            let counter = match exit {
                Exit::Shutdown if s.forced => &stats.clients_forced,
                Exit::Shutdown => &stats.clients_closed_at_boundary,
                _ => &stats.clients_left,
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Cold paths are boxed to keep the session future (and so every idle client) small;
        // a client that just left (the usual end) is owed no last words, and one that held no
        // server hands nothing off: neither costs an allocation then.
        if !matches!(exit, Exit::ClientGone) {
            Box::pin(s.finish(client, exit)).await;
        }
        if s.server.is_some() {
            Box::pin(s.hand_off()).await;
        }
        // Dropping the session settles its gauge and cancel key (also when the task panics).
        tracing::info!(pool = s.login.pool.name(), "client disconnected");
    }
}

impl Session {
    /// The session alternates between idle (no server, no buffers: it waits in a small
    /// future for the client's next bytes) and active (a boxed future that relays until the
    /// session is idle again). The task of an idle client is then only as large as the idle
    /// state; the active state is allocated once per transaction.
    async fn relay(&mut self, client: &mut ClientStream) -> Exit {
        // Drain signals. One `cancelled()` future at a time (see `DrainWatch`), pinned here
        // and polled only to register this task's waker with its token (again only if the
        // waker changes); every relay step tests the shutdown flags instead, an atomic load
        // each. Polling the future on every step would lock the token's mutex, which all
        // sessions share. The flags are set before the tokens are cancelled, so the wake-up
        // a cancellation sends finds them set. (One handle on the shared state keeps the
        // tokens alive for the waiter: smaller than a clone of each token.)
        let shared = self.shared.clone();
        let waiter = std::pin::pin!(shared.shutdown.boundary_token_ref().cancelled());
        let mut drain = DrainWatch {
            waiter,
            shutdown: &shared.shutdown,
            me: self.login.shared.clone(),
            waits_for_force: false,
            registered: None,
            boundary_seen: false,
            force_seen: false,
        };
        loop {
            if self.is_idle() {
                if self.iso & iso::TIMED != 0 {
                    self.update_timer();
                }
                let mut timers = self.extras.timers_mut();
                let ev = std::future::poll_fn(|cx| {
                    if let Some(ev) = drain.poll(cx) {
                        return Poll::Ready(Err(ev));
                    }
                    if let Some(t) = timers.as_mut() {
                        if let Poll::Ready(fired) = t.poll_fired(cx) {
                            return Poll::Ready(Err(Ev::Timer(fired)));
                        }
                    }
                    client.poll_read_ready(cx).map(Ok)
                })
                .await;
                match ev {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Exit::ClientGone,
                    Err(Ev::Timer(fired)) => {
                        if let Some(kind) = self.timer_fired(fired) {
                            return Exit::Timeout(kind);
                        }
                        continue;
                    }
                    // An idle client is at a transaction boundary: any drain closes it now.
                    Err(_) => return Exit::Shutdown,
                }
            }
            if let Some(exit) = Box::pin(self.active(client, &mut drain)).await {
                return exit;
            }
        }
    }

    /// No server, no bytes buffered either way, no drain in progress for this session.
    fn is_idle(&self) -> bool {
        self.server.is_none()
            && self.cbuf.capacity() == 0
            && self.sbuf.capacity() == 0
            && !self.close_at_boundary
            && self.force_deadline.is_none()
    }

    /// Relay until the session exits (`Some`) or is idle again (`None`).
    ///
    /// Each iteration does what needs the session's own await points (a server to borrow, a
    /// server to give back, a drain signal or timer to act on) and then polls the sockets
    /// with [`pump`](Self::pump), which relays for as long as it can without them.
    async fn active(
        &mut self,
        client: &mut ClientStream,
        drain: &mut DrainWatch<'_, '_>,
    ) -> Option<Exit> {
        let mut stepped = false;
        loop {
            // Closing: leave as soon as the client is at a transaction boundary.
            if (self.close_at_boundary || self.force_deadline.is_some()) && self.at_boundary() {
                return Some(Exit::Shutdown);
            }
            if let Some(d) = self.force_deadline {
                if tokio::time::Instant::now() >= d {
                    return Some(Exit::Shutdown);
                }
            }
            if self.server.is_none() && !self.cbuf.is_empty() && self.force_deadline.is_none() {
                let tag = self.cbuf[0];
                if tag == b'X' {
                    return Some(Exit::ClientGone);
                }
                if !protocol::is_frontend_tag(tag) {
                    return Some(Exit::Protocol(format!(
                        "invalid frontend message type {tag}"
                    )));
                }
                // A bad length is refused before a server is borrowed for it.
                if let Err(e) = protocol::header(&self.cbuf, self.max_msg) {
                    return Some(Exit::Protocol(e.to_string()));
                }
                // Hot path, no await: an idle server whose parameters already match. Anything
                // else (flushing, waiting, connecting, a parameter sync) is boxed, to keep the
                // session future (and so every idle client) small.
                let ready = if self.s_ready == 0 {
                    self.login.pool.checkout_idle()
                } else {
                    None
                };
                let exit = match ready {
                    Some(mut server) => match params::check(&mut server, &self.login.params) {
                        None => {
                            self.set_gauge(ClientState::active);
                            self.start(server);
                            None
                        }
                        Some(sql) => {
                            self.set_gauge(ClientState::active);
                            Box::pin(self.sync_and_start(server, sql)).await
                        }
                    },
                    None => Box::pin(self.acquire(client)).await,
                };
                if let Some(exit) = exit {
                    return Some(exit);
                }
            }
            self.shed_buffers();
            // Back to the idle wait once a step has left nothing in flight (not before the
            // first step: the idle wait only ran because the client is readable).
            if stepped && self.is_idle() {
                return None;
            }
            stepped = true;
            if self.server.is_some() {
                match self.frame_client() {
                    Err(exit) => return Some(exit),
                    Ok(true) => self.release().await,
                    Ok(false) => {}
                }
            }

            let ev = match self.force_deadline {
                None => std::future::poll_fn(|cx| self.pump(client, drain, cx)).await,
                Some(deadline) => {
                    let io = std::future::poll_fn(|cx| self.pump(client, drain, cx));
                    tokio::select! {
                        biased;
                        ev = io => ev,
                        _ = tokio::time::sleep_until(deadline) => Ev::ForceDeadline,
                    }
                }
            };
            match ev {
                Ev::Stepped => {}
                Ev::Release => self.release().await,
                Ev::Exit(exit) => return Some(exit),
                Ev::Boundary => {
                    drain.boundary_seen = true;
                    self.close_at_boundary = true;
                }
                Ev::Force => {
                    drain.force_seen = true;
                    drain.boundary_seen = true;
                    Box::pin(self.start_force()).await;
                }
                Ev::ForceDeadline => return Some(Exit::Shutdown),
                Ev::Timer(fired) => {
                    if let Some(kind) = self.timer_fired(fired) {
                        return Some(Exit::Timeout(kind));
                    }
                }
            }
        }
    }

    /// Poll the drain signals, the session's timer and the sockets, and relay: framed client
    /// bytes to the server, framed server bytes to the client, new bytes framed as they
    /// arrive. While the session is in its plain state (no close pending) it goes on step
    /// after step within this one poll until the sockets have nothing more to give, so a
    /// transaction costs a few polls rather than a trip through [`active`](Self::active)'s
    /// loop per socket call; it returns what needs that loop (a server to give back, a client
    /// with no server, an exit, a signal, the timer). Pending only once every direction that
    /// can move waits on its socket (its waker registered), as before.
    fn pump(
        &mut self,
        client: &mut ClientStream,
        drain: &mut DrainWatch<'_, '_>,
        cx: &mut Context<'_>,
    ) -> Poll<Ev> {
        if let Some(ev) = drain.poll(cx) {
            return Poll::Ready(ev);
        }
        if self.server.is_some() && self.shared.take_test_panic() {
            panic!("test hook: session task panics while holding a server");
        }
        // With a close pending, every step goes back to `active`, which checks for a
        // transaction boundary before anything more is relayed.
        let local = !self.close_at_boundary && self.force_deadline.is_none();
        loop {
            if self.iso & iso::TIMED != 0 {
                self.update_timer();
                if let Some(t) = self.extras.timers_mut() {
                    if let Poll::Ready(fired) = t.poll_fired(cx) {
                        return Poll::Ready(Ev::Timer(fired));
                    }
                }
            }
            let Poll::Ready(step) = self.step(client, cx) else {
                return Poll::Pending;
            };
            if let Some(ev) = self.absorb(step) {
                return Poll::Ready(ev);
            }
            // Without a server, `active` borrows one (or goes back to the idle wait).
            if !local || self.server.is_none() {
                return Poll::Ready(Ev::Stepped);
            }
        }
    }

    /// Account for one socket call's result; `Some` when `active` must act on it.
    fn absorb(&mut self, step: Step) -> Option<Ev> {
        match step {
            Step::ServerWrote(Ok(n)) if n > 0 => {
                consume(&mut self.cbuf, n);
                self.c_ready -= n;
                None
            }
            // (A write of zero bytes from a non-empty buffer: the socket is gone.)
            Step::ServerWrote(_) => {
                self.mark_broken();
                Some(Ev::Exit(Exit::ServerLost {
                    server_said_error: false,
                }))
            }
            Step::ClientWrote(Ok(n)) if n > 0 => {
                self.pool_metrics().bytes_sent.inc_by(n as u64);
                consume(&mut self.sbuf, n);
                self.s_ready -= n;
                None
            }
            Step::ClientWrote(_) | Step::ClientRead(Ok(0)) | Step::ClientRead(Err(_)) => {
                Some(Ev::Exit(Exit::ClientGone))
            }
            Step::ClientRead(Ok(n)) => {
                self.pool_metrics().bytes_received.inc_by(n as u64);
                // Without a server, `active` borrows one and frames the bytes then.
                self.server.as_ref()?;
                match self.frame_client() {
                    Err(exit) => Some(Ev::Exit(exit)),
                    Ok(release) => release.then_some(Ev::Release),
                }
            }
            Step::ServerRead(Ok(0)) | Step::ServerRead(Err(_)) => {
                // Forward what was framed (e.g. the server's FATAL) before reporting.
                let _ = self.scan_server();
                self.mark_broken();
                Some(Ev::Exit(Exit::ServerLost {
                    server_said_error: self.s_last_tag == b'E' && self.s_last_fatal,
                }))
            }
            Step::ServerRead(Ok(_)) => {
                if let Err(e) = self.scan_server() {
                    tracing::warn!(error = %e, "server protocol error");
                    self.mark_broken();
                    return Some(Ev::Exit(Exit::ServerLost {
                        server_said_error: false,
                    }));
                }
                self.releasable().then_some(Ev::Release)
            }
            Step::Idle => Some(Ev::Stepped),
        }
    }

    /// Frame the client's new bytes (the session holds a server); `Ok(true)` when the server
    /// can go back at once: a refused statement sent nothing, so no reply will end the
    /// transaction.
    fn frame_client(&mut self) -> Result<bool, Exit> {
        match self.scan_client() {
            Ok(true) => Ok(self.c_ready == 0 && self.releasable()),
            Ok(false) => Err(Exit::ClientGone),
            Err(e) => Err(Exit::Protocol(e)),
        }
    }

    /// One socket call per direction: write what is framed, else read more. Both directions
    /// are polled (each registers its waker when it cannot move), so a peer that stops
    /// reading stalls only its own direction. Polling by hand (rather than splitting the
    /// streams) works for TLS streams as well as plain TCP and costs nothing per step.
    fn step(&mut self, client: &mut ClientStream, cx: &mut Context<'_>) -> Poll<Step> {
        let c_ready = self.c_ready;
        let s_ready = self.s_ready;
        // Past the backpressure limit only while a message that must be seen whole (a
        // tracked Parse/Bind with large parameters) is still incomplete.
        let reading_client =
            self.force_deadline.is_none() && self.cbuf.len() < BUF_LIMIT.max(self.c_need);
        // A session holding no server and no bytes keeps no buffers: an idle client costs no
        // read buffer until it sends something (see `shed_buffers`).
        let idle = self.server.is_none() && self.cbuf.capacity() == 0;
        let cbuf = &mut self.cbuf;
        let sbuf = &mut self.sbuf;
        let mut server = self.server.as_mut().map(|s| s.stream());
        // Without a server, the end of the last transaction goes to the client first: the
        // usual case, after which the session is idle again (no read needed to know that).
        let mut client_blocked = false;
        if server.is_none() && s_ready > 0 {
            match Pin::new(&mut *client).poll_write(cx, &sbuf[..s_ready]) {
                Poll::Ready(r) => return Poll::Ready(Step::ClientWrote(r)),
                Poll::Pending => client_blocked = true,
            }
        }
        if c_ready > 0 {
            if let Some(sw) = server.as_mut() {
                if let Poll::Ready(r) = Pin::new(&mut **sw).poll_write(cx, &cbuf[..c_ready]) {
                    return Poll::Ready(Step::ServerWrote(r));
                }
            }
        } else if reading_client {
            // An idle session takes a spare buffer only for the read (a thread-local pop).
            spare::make_room(cbuf);
            if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut *client), cx, cbuf) {
                return Poll::Ready(Step::ClientRead(r));
            }
            // Nothing to read (tokio remembers "readable" until a read finds nothing): an
            // idle session gives the buffer back, and goes back to the idle wait if nothing
            // else is in flight. (Not under TLS, where readiness is always reported: the
            // session waits here, holding its buffer.)
            if idle && cbuf.is_empty() && !client.is_tls() {
                spare::give(std::mem::take(cbuf));
                if server.is_none() && s_ready == 0 && sbuf.is_empty() {
                    return Poll::Ready(Step::Idle);
                }
            }
        }
        if s_ready > 0 {
            if !client_blocked {
                if let Poll::Ready(r) = Pin::new(&mut *client).poll_write(cx, &sbuf[..s_ready]) {
                    return Poll::Ready(Step::ClientWrote(r));
                }
            }
        } else if let Some(sr) = server.as_mut() {
            spare::make_room(sbuf);
            if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut **sr), cx, sbuf) {
                return Poll::Ready(Step::ServerRead(r));
            }
        }
        Poll::Pending
    }

    fn mark_broken(&mut self) {
        if let Some(s) = self.server.as_mut() {
            s.state.broken = true;
        }
    }

    /// Borrow a server for the client's next request (transaction mode), keeping an eye on the
    /// client meanwhile. Returns an exit if the session must end.
    async fn acquire(&mut self, client: &mut ClientStream) -> Option<Exit> {
        // Flush what the client has not been sent yet; it is small and the client is reading.
        if self.s_ready > 0 {
            if client.write_all(&self.sbuf[..self.s_ready]).await.is_err() {
                return Some(Exit::ClientGone);
            }
            self.pool_metrics().bytes_sent.inc_by(self.s_ready as u64);
            consume(&mut self.sbuf, self.s_ready);
            self.s_ready = 0;
        }
        self.set_gauge(ClientState::waiting);
        // The console's SHOW CLIENTS and SHOW POOLS (maxwait) see the wait; KILL ends it.
        let me = &*self.login.shared;
        me.set_waiting(Some(self.shared.started.elapsed()));
        let result = {
            let checkout = self.login.pool.checkout();
            tokio::pin!(checkout);
            // KILL sets the client's flag and wakes the waker stored for this task
            // (`ClientShared::set_waker`, as the drain watch does): a flag test per poll
            // instead of a notification future registered and dropped per wait.
            let mut waker_stored = false;
            loop {
                let room = self.cbuf.len() < BUF_LIMIT;
                spare::make_room(&mut self.cbuf);
                let killed = std::future::poll_fn(|cx| {
                    if !waker_stored {
                        me.set_waker(cx.waker());
                        waker_stored = true;
                    }
                    if me.is_killed() {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                });
                // Biased: the server first (no random start, which costs a draw per poll).
                tokio::select! {
                    biased;
                    r = &mut checkout => break Ok(r),
                    _ = killed => break Err(Exit::Shutdown),
                    r = client.read_buf(&mut self.cbuf), if room => match r {
                        Ok(0) | Err(_) => break Err(Exit::ClientGone),
                        Ok(n) => {
                            self.pool_metrics().bytes_received.inc_by(n as u64);
                        }
                    },
                }
            }
        };
        me.set_waiting(None);
        let mut server = match result {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.set_gauge(ClientState::idle);
                if matches!(e, crate::pool::CheckoutError::TooManyWaiting) {
                    // The bound on waiting clients is a capacity refusal, like max_clients.
                    self.shared
                        .metrics
                        .reject(crate::metrics::RejectReason::max_clients);
                }
                let (code, msg) = super::checkout_error_for_client(&e);
                return Some(Exit::Checkout(code.to_string(), msg));
            }
            Err(exit) => {
                self.set_gauge(ClientState::idle);
                return Some(exit);
            }
        };
        self.set_gauge(ClientState::active);
        match params::check(&mut server, &self.login.params) {
            None => {
                self.start(server);
                None
            }
            Some(sql) => self.sync_and_start(server, sql).await,
        }
    }

    /// Bring a new server's parameters in line with the client's, then start using it.
    async fn sync_and_start(&mut self, mut server: Checkout, sql: String) -> Option<Exit> {
        let timeout = self.shared.runtime().config.drain.server_close_timeout;
        if let Err((code, msg)) =
            params::apply(&mut server, &mut self.login.params, &sql, timeout).await
        {
            self.server = Some(server);
            return Some(Exit::Sync(code, msg));
        }
        if sql.contains("RESET ") {
            // Another client's session settings, removed before this one runs.
            self.pool_metrics()
                .session_state
                .count("parameter", crate::metrics::SessionStateAction::cleaned);
        }
        self.start(server);
        None
    }

    /// The client now holds `server` (its parameters are in sync).
    fn start(&mut self, mut server: Checkout) {
        if self.login.mode == PoolMode::Session {
            server.set_reset_on_return(true);
        }
        self.login.shared.hold(server.addr.clone(), server.key);
        self.server = Some(server);
    }

    /// Return the server after a transaction (transaction mode).
    async fn release(&mut self) {
        if self.iso & (iso::UNREAD | iso::DDL) != 0 {
            Box::pin(self.after_transaction()).await;
        }
        let Some(server) = self.server.take() else {
            return;
        };
        // Usually no cancel is in flight and this does not wait.
        if !self.login.shared.try_release() {
            Box::pin(self.login.shared.wait_released()).await;
        }
        let now = std::time::Instant::now();
        self.count_transaction(now.saturating_duration_since(server.since));
        self.set_gauge(ClientState::idle);
        server.return_at(now);
    }

    /// Between transactions, give the buffers back: thousands of idle clients then cost only
    /// their session state (the memory goal of the benchmark issue).
    fn shed_buffers(&mut self) {
        if self.server.is_none() {
            if self.cbuf.is_empty() && self.cbuf.capacity() > 0 {
                spare::give(std::mem::take(&mut self.cbuf));
            }
            if self.sbuf.is_empty() && self.sbuf.capacity() > 0 {
                spare::give(std::mem::take(&mut self.sbuf));
            }
        }
    }

    /// The pool's metrics (one set per pool, shared by its sessions).
    fn pool_metrics(&self) -> &crate::metrics::PoolMetrics {
        &self.login.pool.inner.metrics
    }

    fn count_transaction(&self, duration: std::time::Duration) {
        let m = self.pool_metrics();
        m.transactions.inc();
        m.transaction_duration.observe(duration);
    }

    fn set_gauge(&mut self, to: ClientState) {
        let g = &self.shared.metrics.client_gauges;
        gauge_of(g, self.gauge).dec();
        gauge_of(g, to).inc();
        self.gauge = to;
    }
}

#[cfg(test)]
mod size_tests {
    use std::mem::size_of;

    fn future_size<A, B, C, D, Fut, F: FnOnce(A, B, C, D) -> Fut>(_: F) -> usize {
        size_of::<Fut>()
    }

    /// Every connected client's task is as large as this future, idle or not (the memory
    /// goal of bench/RESULTS.md: under 2 KiB per idle client in all). tokio allocates a task
    /// as one cell aligned to 128 bytes: the future plus about 140 bytes of its own, rounded
    /// up to a multiple of 128. Measured with valgrind's DHAT on a release build, a 776-byte
    /// future made 1,024-byte cells and a 736-byte one 896-byte cells, 128 bytes less per
    /// client (this one is 720 bytes in `cargo test --release`, so 896 too). The bound is
    /// the debug build's size (16 bytes over release) with a little slack: growing past it
    /// means some state crossed an await point that should be boxed or built outside the
    /// future, and likely a bigger cell.
    #[test]
    fn client_task_future_stays_small() {
        let client = future_size(|a, b, c, d: ()| crate::frontend::serve_client(a, b, c, d));
        let session = size_of::<super::Session>();
        eprintln!("client task future: {client} bytes, session state: {session} bytes");
        assert!(client <= 760, "client task future is {client} bytes");
        assert!(session <= 352, "session state is {session} bytes");
    }
}
