//! The relay: moves bytes between a client and the server it holds, parsing only message
//! headers, and decides when a server goes back to the pool.
//!
//! One buffer per direction. Each loop iteration runs one step per direction concurrently: if
//! the direction has framed bytes waiting, write them; else read more. So a peer that stops
//! reading stalls only its own direction (as on a direct connection) and each write carries
//! every complete message read so far (batched writes, no allocation per message).
//!
//! Transaction mode releases the server on ReadyForQuery with status `I` when no request is
//! outstanding (every Query, Sync and FunctionCall sent has been answered), nothing of the
//! client's is half-sent and every byte from the server has been framed.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use crate::tls::ClientStream;

use crate::config::PoolMode;
use std::collections::{HashMap, VecDeque};

use bytes::BufMut;

use crate::frontend::params;
use crate::frontend::prepared::{self, Action, Kind, Pending, Stmt};
use crate::frontend::{Attached, LoggedIn};
use crate::metrics::{ClientGauges, ClientState};
use crate::pool::Checkout;
use crate::protocol::{self, Severity};
use crate::server::Shared;

/// Stop reading a direction once this much is buffered (backpressure).
const BUF_LIMIT: usize = 256 * 1024;
/// Read granularity.
const READ_CHUNK: usize = 16 * 1024;
/// Largest server message tidepool inspects whole (ParameterStatus, ReadyForQuery).
const MAX_INSPECTED: usize = 64 * 1024;

/// Postgres's wording for a terminated session (SQLSTATE 57P01, admin_shutdown).
pub const ADMIN_SHUTDOWN: &str = "terminating connection due to administrator command";

/// Why a session ended.
#[derive(Debug)]
enum Exit {
    /// EOF, reset or Terminate from the client.
    ClientGone,
    /// The client broke the protocol.
    Protocol(String),
    /// The server connection died under the client.
    ServerLost { server_said_error: bool },
    /// No server could be had for the client's next request.
    Checkout(String, String),
    /// Drain: closed at a transaction boundary or forced.
    Shutdown,
    /// Parameter sync failed on a new server.
    Sync(String, String),
}

enum Ev {
    ClientRead(std::io::Result<usize>),
    ServerWrote(std::io::Result<usize>),
    ServerRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    Boundary,
    Force,
    ForceDeadline,
    /// Nothing in flight any more: the session may go back to its idle wait.
    Idle,
}

/// A session's view of the drain signals (see `Session::relay`).
///
/// One token future at a time, to keep every client's task small: the boundary token until
/// the session has seen the boundary signal, then the force token. Forcing cancels the boundary
/// token too (`Shutdown::force_now`), so waiting on the boundary token alone misses nothing;
/// the flags say which signal it was.
struct DrainWatch<'a, 't> {
    waiter: Pin<&'a mut tokio_util::sync::WaitForCancellationFuture<'t>>,
    force_token: &'t tokio_util::sync::CancellationToken,
    /// `waiter` waits on the force token.
    waits_for_force: bool,
    /// The waker `waiter` was last polled with.
    registered: Option<std::task::Waker>,
    boundary_seen: bool,
    force_seen: bool,
}

impl<'t> DrainWatch<'_, 't> {
    /// A drain signal not yet handled, if any. Cheap enough for every relay step: two atomic
    /// loads, and a poll of the token future only when the task's waker changed.
    fn poll(&mut self, shutdown: &crate::shutdown::Shutdown, cx: &mut Context<'_>) -> Option<Ev> {
        if !self.force_seen && shutdown.is_forced() {
            return Some(Ev::Force);
        }
        if !self.boundary_seen && shutdown.is_boundary() {
            return Some(Ev::Boundary);
        }
        if self.force_seen {
            return None;
        }
        if self.boundary_seen && !self.waits_for_force {
            let force_token: &'t tokio_util::sync::CancellationToken = self.force_token;
            self.waiter.set(force_token.cancelled());
            self.waits_for_force = true;
            self.registered = None;
        }
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            // Ready here means cancelled, and the flags, set before the cancel, say which.
            if self.waiter.as_mut().poll(cx).is_ready() {
                if shutdown.is_forced() {
                    return Some(Ev::Force);
                }
                if !self.boundary_seen {
                    return Some(Ev::Boundary);
                }
            }
            self.registered = Some(cx.waker().clone());
        }
        None
    }
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
    /// Transaction mode: requests sent and the replies they wait for (see `prepared`).
    track: bool,
    pending: VecDeque<Pending>,
    /// Transaction mode: the client's statement names.
    stmts: ClientStmts,
    /// Bytes `cbuf` must hold before the message being framed can be handled (0: none).
    c_need: usize,
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
        self.shared.cancels.unregister(self.login.key);
        spare::give(std::mem::take(&mut self.cbuf));
        spare::give(std::mem::take(&mut self.sbuf));
    }
}

/// A transaction-mode client's statement names. Boxed and made on the first named statement:
/// an empty `HashMap` inline would cost every session, idle or not, 40 bytes more, and most
/// clients never name a statement.
#[derive(Default)]
#[allow(clippy::box_collection)] // the box is the point: 8 bytes inline instead of 48
struct ClientStmts(Option<Box<HashMap<Vec<u8>, Arc<Stmt>>>>);

impl ClientStmts {
    fn get(&self, name: &[u8]) -> Option<&Arc<Stmt>> {
        self.0.as_ref()?.get(name)
    }

    fn insert(&mut self, name: Vec<u8>, stmt: Arc<Stmt>) {
        self.0.get_or_insert_default().insert(name, stmt);
    }

    fn remove(&mut self, name: &[u8]) {
        if let Some(m) = self.0.as_mut() {
            m.remove(name);
        }
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

/// Read buffers between transactions. An idle session holds no buffer (the memory goal: a
/// thousand idle clients must not hold a thousand read buffers), so a transaction-mode session
/// takes two buffers per transaction and gives them back after it. Taking them from a small
/// per-thread stack of spares instead of the allocator saves a `malloc`/`free` pair of 16 KiB
/// each (which glibc serves from its bins, not its per-thread cache, and trims with `madvise`)
/// on every transaction. The stack is bounded, so it costs at most `MAX * READ_CHUNK` per
/// runtime thread, whatever the number of clients.
mod spare {
    use std::cell::RefCell;

    use bytes::BytesMut;

    use super::READ_CHUNK;

    /// Spares kept per thread: about the number of sessions one thread has mid-transaction.
    const MAX: usize = 16;

    thread_local! {
        static SPARES: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// Make room to read into `buf`: take a spare buffer if it has none, else grow it when
    /// less than 1 KiB is free.
    pub(super) fn make_room(buf: &mut BytesMut) {
        if buf.capacity() == 0 {
            *buf = SPARES
                .with(|s| s.borrow_mut().pop())
                .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK));
        } else if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
    }

    /// Keep an empty buffer of the standard size as a spare; free anything else.
    pub(super) fn give(mut buf: BytesMut) {
        if !buf.is_empty() || buf.capacity() == 0 {
            return;
        }
        // An empty buffer that was advanced into reclaims its whole allocation here, without
        // allocating (it is the sole owner); grown buffers are not kept.
        buf.reserve(READ_CHUNK);
        if buf.capacity() != READ_CHUNK {
            return;
        }
        let _ = SPARES.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < MAX {
                s.push(buf);
            }
        });
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
        let max_msg = shared.runtime().config.listen.max_message_size;
        let gauge = if server.is_some() {
            ClientState::active
        } else {
            ClientState::idle
        };
        gauge_of(&shared.metrics.client_gauges, gauge).inc();
        let track = login.mode == PoolMode::Transaction;
        Session {
            gauge,
            track,
            pending: VecDeque::new(),
            stmts: ClientStmts::default(),
            c_need: 0,
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
        // Cold paths are boxed to keep the session future (and so every idle client) small.
        Box::pin(s.finish(client, exit)).await;
        Box::pin(s.hand_off()).await;
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
        // a cancellation sends finds them set.
        let boundary_token = self.shared.shutdown.boundary_token();
        let force_token = self.shared.shutdown.force_token();
        let waiter = std::pin::pin!(boundary_token.cancelled());
        let mut drain = DrainWatch {
            waiter,
            force_token: &force_token,
            waits_for_force: false,
            registered: None,
            boundary_seen: false,
            force_seen: false,
        };
        loop {
            if self.is_idle() {
                let shutdown = &self.shared.shutdown;
                let ev = std::future::poll_fn(|cx| {
                    if let Some(ev) = drain.poll(shutdown, cx) {
                        return Poll::Ready(Err(ev));
                    }
                    client.poll_read_ready(cx).map(Ok)
                })
                .await;
                match ev {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Exit::ClientGone,
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
    async fn active(
        &mut self,
        client: &mut ClientStream,
        drain: &mut DrainWatch<'_, '_>,
    ) -> Option<Exit> {
        let mut stepped = false;
        loop {
            if self.server.is_some() && self.shared.take_test_panic() {
                panic!("test hook: session task panics while holding a server");
            }
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
                match self.scan_client() {
                    Ok(true) => {}
                    Ok(false) => return Some(Exit::ClientGone),
                    Err(e) => return Some(Exit::Protocol(e)),
                }
            }

            let ev = {
                let c_ready = self.c_ready;
                let s_ready = self.s_ready;
                // Past the backpressure limit only while a message that must be seen whole
                // (a tracked Parse/Bind with large parameters) is still incomplete.
                let reading_client =
                    self.force_deadline.is_none() && self.cbuf.len() < BUF_LIMIT.max(self.c_need);
                // A session holding no server and no bytes keeps no buffers: an idle client
                // costs no read buffer until it sends something (see `shed_buffers`).
                let idle = self.server.is_none() && self.cbuf.capacity() == 0;
                let cbuf = &mut self.cbuf;
                let sbuf = &mut self.sbuf;
                if reading_client && !idle && c_ready == 0 {
                    spare::make_room(cbuf);
                }
                let mut server = self.server.as_mut().map(|s| s.stream());
                if server.is_some() && s_ready == 0 {
                    spare::make_room(sbuf);
                }
                let client = &mut *client;
                // One step per direction, polled together: write what is framed, else read.
                // Polling by hand (rather than splitting the streams) works for TLS streams
                // as well as plain TCP and costs nothing per iteration.
                let shutdown = &self.shared.shutdown;
                let drain = &mut *drain;
                let io = std::future::poll_fn(|cx| {
                    if let Some(ev) = drain.poll(shutdown, cx) {
                        return Poll::Ready(ev);
                    }
                    if c_ready > 0 {
                        if let Some(sw) = server.as_mut() {
                            if let Poll::Ready(r) =
                                Pin::new(&mut **sw).poll_write(cx, &cbuf[..c_ready])
                            {
                                return Poll::Ready(Ev::ServerWrote(r));
                            }
                        }
                    } else if reading_client {
                        let ready = if cbuf.capacity() == 0 {
                            match client.poll_read_ready(cx) {
                                Poll::Ready(Ok(())) => {
                                    spare::make_room(cbuf);
                                    true
                                }
                                Poll::Ready(Err(e)) => return Poll::Ready(Ev::ClientRead(Err(e))),
                                Poll::Pending => false,
                            }
                        } else {
                            true
                        };
                        if ready {
                            if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut *client), cx, cbuf)
                            {
                                return Poll::Ready(Ev::ClientRead(r));
                            }
                            // Readiness was stale (tokio remembers "readable" until a read
                            // finds nothing, which just happened): give the buffer back, and
                            // go back to the idle wait if nothing else is in flight.
                            // (Not under TLS, where readiness is always reported: the
                            // session waits here, holding its buffer.)
                            if idle && cbuf.is_empty() && !client.is_tls() {
                                spare::give(std::mem::take(cbuf));
                                if server.is_none() && s_ready == 0 && sbuf.is_empty() {
                                    return Poll::Ready(Ev::Idle);
                                }
                            }
                        }
                    }
                    if s_ready > 0 {
                        if let Poll::Ready(r) =
                            Pin::new(&mut *client).poll_write(cx, &sbuf[..s_ready])
                        {
                            return Poll::Ready(Ev::ClientWrote(r));
                        }
                    } else if let Some(sr) = server.as_mut() {
                        if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut **sr), cx, sbuf) {
                            return Poll::Ready(Ev::ServerRead(r));
                        }
                    }
                    Poll::Pending
                });
                let deadline = self.force_deadline;
                tokio::select! {
                    biased;
                    ev = io => ev,
                    _ = sleep_until_opt(deadline), if deadline.is_some() => Ev::ForceDeadline,
                }
            };

            match ev {
                Ev::ClientRead(Ok(0)) | Ev::ClientRead(Err(_)) => return Some(Exit::ClientGone),
                Ev::ClientRead(Ok(n)) => {
                    self.pool_metrics().bytes_received.inc_by(n as u64);
                }
                Ev::ServerWrote(Ok(n)) => {
                    self.cbuf.advance(n);
                    self.c_ready -= n;
                }
                Ev::ServerWrote(Err(_)) => {
                    self.mark_broken();
                    return Some(Exit::ServerLost {
                        server_said_error: false,
                    });
                }
                Ev::ServerRead(Ok(0)) | Ev::ServerRead(Err(_)) => {
                    // Forward what was framed (e.g. the server's FATAL) before reporting.
                    let _ = self.scan_server();
                    self.mark_broken();
                    return Some(Exit::ServerLost {
                        server_said_error: self.s_last_tag == b'E' && self.s_last_fatal,
                    });
                }
                Ev::ServerRead(Ok(_)) => {
                    if let Err(e) = self.scan_server() {
                        tracing::warn!(error = %e, "server protocol error");
                        self.mark_broken();
                        return Some(Exit::ServerLost {
                            server_said_error: false,
                        });
                    }
                    if self.releasable() {
                        self.release().await;
                    }
                }
                Ev::ClientWrote(Ok(n)) => {
                    self.pool_metrics().bytes_sent.inc_by(n as u64);
                    self.sbuf.advance(n);
                    self.s_ready -= n;
                }
                Ev::ClientWrote(Err(_)) => return Some(Exit::ClientGone),
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
                Ev::Idle => {}
            }
        }
    }

    /// True when closing now cannot cut a transaction or a message in half.
    fn at_boundary(&self) -> bool {
        let server_idle = self.server.as_ref().is_none_or(|s| s.is_clean());
        server_idle && self.c_rem == 0 && self.s_rem == 0 && self.s_ready == self.sbuf.len()
    }

    /// Forced close: cancel the running query, then give the server `server_close_timeout` to
    /// answer (so an acknowledged COMMIT still reaches the client) before closing.
    async fn start_force(&mut self) {
        let timeout = self.shared.runtime().config.drain.server_close_timeout;
        // A client already at a transaction boundary is closed at one; only a client cut off
        // mid-transaction counts as forced.
        self.forced = !self.at_boundary();
        self.force_deadline = Some(tokio::time::Instant::now() + timeout);
        if let Some(s) = self.server.as_ref() {
            if s.state.expected_rfq > 0 {
                let cs = self.login.shared.clone();
                // Deliver the cancel concurrently: the relay must keep reading the answer.
                self.shared.tracker.spawn(async move { cs.cancel().await });
            }
        }
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
            self.sbuf.advance(self.s_ready);
            self.s_ready = 0;
        }
        self.set_gauge(ClientState::waiting);
        let result = {
            let checkout = self.login.pool.checkout();
            tokio::pin!(checkout);
            loop {
                let room = self.cbuf.len() < BUF_LIMIT;
                spare::make_room(&mut self.cbuf);
                tokio::select! {
                    r = &mut checkout => break Ok(r),
                    r = client.read_buf(&mut self.cbuf), if room => match r {
                        Ok(0) | Err(_) => break Err(Exit::ClientGone),
                        Ok(n) => {
                            self.pool_metrics().bytes_received.inc_by(n as u64);
                        }
                    },
                }
            }
        };
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
        self.start(server);
        None
    }

    /// The client now holds `server` (its parameters are in sync).
    fn start(&mut self, mut server: Checkout) {
        if self.login.mode == PoolMode::Session {
            server.set_reset_on_return(true);
        }
        self.login.shared.hold(server.addr, server.key);
        self.server = Some(server);
    }

    /// Return the server after a transaction (transaction mode).
    async fn release(&mut self) {
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

    fn releasable(&self) -> bool {
        self.login.mode == PoolMode::Transaction
            && self.pending.is_empty()
            && self.server.as_ref().is_some_and(|s| s.is_clean())
            && self.c_ready == 0
            && self.c_rem == 0
            && self.s_rem == 0
            && self.sbuf.len() == self.s_ready
    }

    /// Frame client bytes from `c_ready` on; update the server's protocol state. Returns
    /// Ok(false) on Terminate.
    fn scan_client(&mut self) -> Result<bool, String> {
        if self.server.is_none() {
            return Ok(true);
        }
        loop {
            let avail = self.cbuf.len() - self.c_ready;
            if self.c_rem > 0 {
                let n = self.c_rem.min(avail);
                self.c_ready += n;
                self.c_rem -= n;
                if self.c_rem > 0 {
                    return Ok(true);
                }
                continue;
            }
            let h = match protocol::header(&self.cbuf[self.c_ready..], self.max_msg) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(true),
                Err(e) => return Err(e.to_string()),
            };
            if self.track {
                match self.track_client(h, avail)? {
                    Tracked::NeedMore => return Ok(true),
                    Tracked::Rewritten(len) => {
                        self.c_tag = h.tag;
                        self.c_ready += len;
                        if self.txn_started.is_none() {
                            self.txn_started = Some(std::time::Instant::now());
                        }
                        if let Some(server) = self.server.as_mut() {
                            server.state.in_extended = true;
                        }
                        self.emit_synths();
                        continue;
                    }
                    Tracked::PassOn => {}
                }
            }
            let Some(server) = self.server.as_mut() else {
                return Ok(true);
            };
            let st = &mut server.state;
            match h.tag {
                b'Q' => {
                    st.expected_rfq += 1;
                    self.pool_metrics().queries.inc();
                    if self.txn_started.is_none() {
                        self.txn_started = Some(std::time::Instant::now());
                    }
                }
                b'S' => {
                    st.expected_rfq += 1;
                    st.in_extended = false;
                    self.pool_metrics().queries.inc();
                }
                b'F' => {
                    st.expected_rfq += 1;
                    self.pool_metrics().queries.inc();
                }
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                    st.in_extended = true;
                    if self.txn_started.is_none() {
                        self.txn_started = Some(std::time::Instant::now());
                    }
                }
                b'd' => {}
                b'c' | b'f' => st.copy_in = false,
                b'X' => {
                    // Terminate is never forwarded: the server stays ours to reuse or close.
                    self.cbuf.truncate(self.c_ready);
                    return Ok(false);
                }
                b'p' => {}
                t => return Err(format!("invalid frontend message type {t}")),
            }
            self.c_tag = h.tag;
            let n = h.total.min(avail);
            self.c_ready += n;
            self.c_rem = h.total - n;
            if self.c_rem > 0 {
                return Ok(true);
            }
        }
    }

    /// Frame server bytes from `s_ready` on, tracking ReadyForQuery, COPY and ParameterStatus.
    fn scan_server(&mut self) -> Result<(), String> {
        if self.server.is_none() {
            return Ok(());
        }
        loop {
            let avail = self.sbuf.len() - self.s_ready;
            if self.s_rem > 0 {
                let n = self.s_rem.min(avail);
                self.s_ready += n;
                self.s_rem -= n;
                if self.s_rem > 0 {
                    return Ok(());
                }
                continue;
            }
            let h = match protocol::header(&self.sbuf[self.s_ready..], usize::MAX) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            if self.track && !matches!(h.tag, b'N' | b'S' | b'A') {
                match self.track_server(h, avail)? {
                    Tracked::NeedMore => return Ok(()),
                    // Synthesised replies were inserted, or a hidden one removed: look again.
                    Tracked::Rewritten(_) => continue,
                    Tracked::PassOn => {}
                }
            }
            let Some(server) = self.server.as_mut() else {
                return Ok(());
            };
            let st = &mut server.state;
            match h.tag {
                b'Z' | b'S' => {
                    if h.total > MAX_INSPECTED {
                        return Err(format!("oversized message '{}'", h.tag as char));
                    }
                    if avail < h.total {
                        self.sbuf.reserve(h.total - avail);
                        return Ok(());
                    }
                    let body = &self.sbuf[self.s_ready + 5..self.s_ready + h.total];
                    if h.tag == b'Z' {
                        st.expected_rfq = st.expected_rfq.saturating_sub(1);
                        st.txn_status = body.first().copied().unwrap_or(b'I');
                        st.copy_in = false;
                        st.copy_out = false;
                        // Session mode: a transaction ends whenever the server is idle again
                        // (transaction mode counts at release instead).
                        if self.login.mode == PoolMode::Session
                            && st.expected_rfq == 0
                            && st.txn_status == b'I'
                        {
                            if let Some(t0) = self.txn_started.take() {
                                self.count_transaction(t0.elapsed());
                            }
                        }
                    } else if let Some((k, v)) = protocol::parse_parameter_status(body) {
                        server.params.set(k, v);
                        server.synced_fp = None;
                        self.login.params.observe(k, v);
                    }
                }
                b'G' => st.copy_in = true,
                b'H' => st.copy_out = true,
                b'W' => {
                    st.copy_in = true;
                    st.copy_out = true;
                }
                b'c' => st.copy_out = false,
                b'E' => {
                    st.copy_out = false;
                    // Remember whether the server said goodbye itself (FATAL/PANIC), so a
                    // following disconnect needs no FATAL of ours.
                    self.s_last_fatal = avail >= h.total
                        && error_is_fatal(&self.sbuf[self.s_ready + 5..self.s_ready + h.total]);
                }
                _ => {}
            }
            self.s_last_tag = h.tag;
            let n = h.total.min(avail);
            self.s_ready += n;
            self.s_rem = h.total - n;
            if self.s_rem > 0 {
                return Ok(());
            }
        }
    }

    /// Transaction mode: queue every request with the reply that completes it, and handle
    /// named statements (see `prepared`). Parse/Bind/Describe/Close are rewritten in place.
    fn track_client(&mut self, h: protocol::Header, avail: usize) -> Result<Tracked, String> {
        let at = self.c_ready;
        let kind = match h.tag {
            b'Q' | b'F' => {
                if h.tag == b'Q' {
                    let want = h.total.min(5 + 64);
                    if avail < want {
                        self.cbuf.reserve(want - avail);
                        return Ok(Tracked::NeedMore);
                    }
                    if prepared::drops_all_statements(&self.cbuf[at + 5..at + want]) {
                        self.stmts.clear();
                        if let Some(server) = self.server.as_mut() {
                            server.stmts.clear();
                        }
                    }
                }
                Kind::Query
            }
            b'S' => Kind::Sync,
            b'E' => Kind::Execute,
            b'P' | b'B' | b'D' | b'C' => {
                if avail < h.total {
                    self.cbuf.reserve(h.total - avail);
                    self.c_need = at + h.total;
                    return Ok(Tracked::NeedMore);
                }
                self.c_need = 0;
                let len = self.rewrite_named(h)?;
                return Ok(Tracked::Rewritten(len));
            }
            _ => return Ok(Tracked::PassOn),
        };
        self.pending.push_back(Pending::forward(kind));
        Ok(Tracked::PassOn)
    }

    /// Rewrite one whole Parse/Bind/Describe/Close at `c_ready`; returns the length of what
    /// replaces it (0 when nothing is sent).
    fn rewrite_named(&mut self, h: protocol::Header) -> Result<usize, String> {
        let at = self.c_ready;
        let msg = &self.cbuf[at..at + h.total];
        let bad = || format!("malformed message '{}'", h.tag as char);
        let cap = self.login.pool.settings().max_prepared_statements;
        let mut out = BytesMut::new();
        match h.tag {
            b'P' => {
                let (name, after) = prepared::cstr(msg, 5).ok_or_else(bad)?;
                if name.is_empty() {
                    self.pending.push_back(Pending::forward(Kind::Parse));
                    return Ok(h.total);
                }
                let stmt = self.shared.statements.intern(&msg[after..]);
                let name = name.to_vec();
                let server = self.server.as_mut().ok_or_else(bad)?;
                if server.stmts.has(stmt.id) {
                    self.pool_metrics().parses_avoided.inc();
                    self.pending.push_back(Pending {
                        kind: Kind::Parse,
                        action: Action::Synth(b'1'),
                        parsed: None,
                        uses: None,
                    });
                } else {
                    // (A field path: `server` borrows `self.server` mutably.)
                    self.login.pool.inner.metrics.parses_forwarded.inc();
                    prepare_on(server, &stmt, cap, &mut out, &mut self.pending, false);
                }
                self.stmts.insert(name, stmt);
            }
            b'B' | b'D' => {
                // Bind: portal, statement. Describe: 'S' or 'P', then the name.
                let (name, name_at, name_end) = if h.tag == b'B' {
                    let (_, after_portal) = prepared::cstr(msg, 5).ok_or_else(bad)?;
                    let (n, end) = prepared::cstr(msg, after_portal).ok_or_else(bad)?;
                    (n, after_portal, end)
                } else {
                    if msg.get(5) != Some(&b'S') {
                        self.pending.push_back(Pending::forward(Kind::Describe));
                        return Ok(h.total);
                    }
                    let (n, end) = prepared::cstr(msg, 6).ok_or_else(bad)?;
                    (n, 6, end)
                };
                let kind = if h.tag == b'B' {
                    Kind::Bind
                } else {
                    Kind::Describe
                };
                let Some(stmt) = (!name.is_empty())
                    .then(|| self.stmts.get(name))
                    .flatten()
                    .cloned()
                else {
                    // Unnamed or unknown to us: as is (Postgres answers for an unknown name).
                    self.pending.push_back(Pending::forward(kind));
                    return Ok(h.total);
                };
                let server = self.server.as_mut().ok_or_else(bad)?;
                if !server.stmts.has(stmt.id) {
                    // (A field path: `server` borrows `self.server` mutably.)
                    self.login.pool.inner.metrics.parses_forwarded.inc();
                    prepare_on(server, &stmt, cap, &mut out, &mut self.pending, true);
                }
                // The message with the server-side name.
                let new_len = h.total - (name_end - name_at) + stmt.name.len() + 1;
                out.put_u8(h.tag);
                out.put_u32((new_len - 1) as u32);
                out.put_slice(&msg[5..name_at]);
                out.put_slice(stmt.name.as_bytes());
                out.put_u8(0);
                out.put_slice(&msg[name_end..]);
                self.pending.push_back(Pending {
                    kind,
                    action: Action::Forward,
                    parsed: None,
                    uses: Some(stmt.id),
                });
            }
            b'C' => {
                if msg.get(5) != Some(&b'S') {
                    self.pending.push_back(Pending::forward(Kind::Close));
                    return Ok(h.total);
                }
                let (name, _) = prepared::cstr(msg, 6).ok_or_else(bad)?;
                if name.is_empty() {
                    self.pending.push_back(Pending::forward(Kind::Close));
                    return Ok(h.total);
                }
                // The server keeps it for other clients; the client's name is gone.
                self.stmts.remove(name);
                self.pending.push_back(Pending {
                    kind: Kind::Close,
                    action: Action::Synth(b'3'),
                    parsed: None,
                    uses: None,
                });
            }
            _ => return Ok(h.total),
        }
        splice(&mut self.cbuf, at, h.total, &out);
        Ok(out.len())
    }

    /// Transaction mode, one server message at `s_ready` (not an asynchronous one): place
    /// synthesised replies before it, hide replies to tidepool's own requests, and keep the
    /// request queue in step, including the skip-to-Sync after an error.
    fn track_server(&mut self, h: protocol::Header, avail: usize) -> Result<Tracked, String> {
        if self.emit_synths() {
            return Ok(Tracked::Rewritten(0));
        }
        let Some(head) = self.pending.front() else {
            return Ok(Tracked::PassOn);
        };
        if h.tag == b'E' {
            if head.kind == Kind::Query {
                return Ok(Tracked::PassOn);
            }
            if avail < h.total {
                self.sbuf.reserve(h.total - avail);
                return Ok(Tracked::NeedMore);
            }
            let (code, _) =
                protocol::parse_error_fields(&self.sbuf[self.s_ready + 5..self.s_ready + h.total]);
            let server = self.server.as_mut().ok_or("no server")?;
            // The server now skips everything up to the next Sync (55.2.3).
            while let Some(p) = self.pending.front() {
                if p.kind == Kind::Sync {
                    break;
                }
                let p = self.pending.pop_front().expect("front exists");
                if let Some(id) = p.parsed {
                    server.stmts.remove(id);
                }
                if let Action::Hide(Some(id)) = p.action {
                    server.stmts.remove(id);
                }
                // A stale plan (0A000) or a statement the server lost (26000): prepare it
                // afresh next time.
                if let (Some(id), "0A000" | "26000") = (p.uses, code.as_str()) {
                    server.stmts.remove(id);
                }
            }
            return Ok(Tracked::PassOn);
        }
        if !head.kind.completed_by(h.tag) {
            return Ok(Tracked::PassOn);
        }
        let head = self.pending.pop_front().expect("front exists");
        if let Action::Hide(_) = head.action {
            if avail < h.total {
                // Put it back and wait for the whole (5-byte) reply.
                self.pending.push_front(head);
                self.sbuf.reserve(h.total - avail);
                return Ok(Tracked::NeedMore);
            }
            splice(&mut self.sbuf, self.s_ready, h.total, &[]);
            return Ok(Tracked::Rewritten(0));
        }
        Ok(Tracked::PassOn)
    }

    /// Emit the synthesised replies at the head of the queue (their turn has come: every
    /// earlier reply has been framed). Returns true if any was emitted.
    fn emit_synths(&mut self) -> bool {
        let mut out = [0u8; 5 * 8];
        let mut n = 0;
        while n < 8 {
            match self.pending.front() {
                Some(Pending {
                    action: Action::Synth(tag),
                    ..
                }) => {
                    out[n * 5..n * 5 + 5].copy_from_slice(&[*tag, 0, 0, 0, 4]);
                    n += 1;
                    self.pending.pop_front();
                }
                _ => break,
            }
        }
        if n == 0 {
            return false;
        }
        splice(&mut self.sbuf, self.s_ready, 0, &out[..n * 5]);
        self.s_ready += n * 5;
        true
    }

    /// Tell the client why the session ends, after everything it is owed.
    async fn finish(&mut self, client: &mut ClientStream, exit: Exit) {
        let mut out = BytesMut::new();
        match &exit {
            Exit::ClientGone => return,
            Exit::Protocol(m) => protocol::error_response(&mut out, Severity::Fatal, "08P01", m),
            Exit::ServerLost { server_said_error } => {
                if !server_said_error {
                    protocol::error_response(
                        &mut out,
                        Severity::Fatal,
                        "08006",
                        "tidepool: server connection lost",
                    );
                }
            }
            Exit::Checkout(code, m) | Exit::Sync(code, m) => {
                protocol::error_response(&mut out, Severity::Fatal, code, m)
            }
            Exit::Shutdown => {
                protocol::error_response(&mut out, Severity::Fatal, "57P01", ADMIN_SHUTDOWN)
            }
        }
        if matches!(exit, Exit::Protocol(_)) {
            self.shared
                .metrics
                .reject(crate::metrics::RejectReason::protocol);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            // Complete messages the client is owed (an acknowledged COMMIT) go first.
            if self.s_ready > 0 {
                client.write_all(&self.sbuf[..self.s_ready]).await?;
                self.sbuf.advance(self.s_ready);
                self.s_ready = 0;
            }
            // An incomplete message the client never saw part of is dropped; our error can
            // follow. After half a message was forwarded, nothing more can be said cleanly.
            if self.s_rem == 0 {
                self.sbuf.clear();
                client.write_all(&out).await?;
            }
            client.flush().await
        })
        .await;
    }

    /// Give the server back: clean ones to the idle list, anything else to the closer along
    /// with the client bytes it had framed but not written.
    async fn hand_off(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        self.login.shared.release().await;
        if self.c_ready > 0 {
            server.pending = Some(self.cbuf.split_to(self.c_ready));
            self.c_ready = 0;
        }
        if self.c_rem > 0 {
            server.state.partial_to_server = Some((self.c_tag, self.c_rem));
        }
        if !self.pending.is_empty() {
            // Replies never seen: what the server prepared is uncertain. Forgetting is safe
            // (every Parse tidepool sends is preceded by a Close of the same name).
            server.stmts.clear();
            self.pending.clear();
        }
        if self.forced {
            server.set_close_reason(crate::metrics::CloseReason::forced);
        }
        if self.s_rem > 0 || self.sbuf.len() > self.s_ready {
            // Unframed server bytes are lost with the client; the stream position is unknown.
            if self.s_rem > 0 {
                server.state.broken = true;
            }
        }
        if self.login.mode == PoolMode::Transaction {
            self.pool_metrics().transactions.inc();
            self.pool_metrics()
                .transaction_duration
                .observe(server.since.elapsed());
        }
        drop(server);
    }
}

async fn sleep_until_opt(d: Option<tokio::time::Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Does an ErrorResponse body carry severity FATAL or PANIC?
fn error_is_fatal(body: &[u8]) -> bool {
    body.split(|&b| b == 0)
        .filter_map(|f| f.split_first())
        .any(|(&t, v)| (t == b'S' || t == b'V') && (v == b"FATAL" || v == b"PANIC"))
}

/// What tracking made of a message.
enum Tracked {
    /// The whole message is needed and not there yet.
    NeedMore,
    /// Replaced by this many bytes (already accounted for).
    Rewritten(usize),
    /// Handle as usual.
    PassOn,
}

/// Queue `Close` + `Parse` of `stmt` on `server` (evicting the least recently used statement
/// beyond `cap` with a Close). The Close first makes the Parse safe even if the server still
/// holds a stale copy under that name (a Close of a missing statement is not an error).
fn prepare_on(
    server: &mut crate::pool::Checkout,
    stmt: &Arc<Stmt>,
    cap: usize,
    out: &mut BytesMut,
    pending: &mut VecDeque<Pending>,
    hidden: bool,
) {
    let hide = |kind| Pending {
        kind,
        action: Action::Hide(None),
        parsed: None,
        uses: None,
    };
    if let Some(evicted) = server.stmts.add(stmt.clone(), cap) {
        prepared::put_close_stmt(out, &evicted.name);
        pending.push_back(hide(Kind::Close));
    }
    prepared::put_close_stmt(out, &stmt.name);
    pending.push_back(hide(Kind::Close));
    prepared::put_parse(out, stmt);
    pending.push_back(Pending {
        kind: Kind::Parse,
        action: if hidden {
            Action::Hide(Some(stmt.id))
        } else {
            Action::Forward
        },
        parsed: Some(stmt.id),
        uses: None,
    });
}

/// Replace `remove` bytes at `at` with `insert`, moving the tail in place (no allocation
/// unless the buffer must grow).
fn splice(buf: &mut BytesMut, at: usize, remove: usize, insert: &[u8]) {
    let old_len = buf.len();
    let tail = at + remove;
    if insert.len() > remove {
        let grow = insert.len() - remove;
        buf.resize(old_len + grow, 0);
        buf.copy_within(tail..old_len, tail + grow);
    } else if insert.len() < remove {
        let shrink = remove - insert.len();
        buf.copy_within(tail..old_len, tail - shrink);
        buf.truncate(old_len - shrink);
    }
    buf[at..at + insert.len()].copy_from_slice(insert);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_grows_shrinks_and_replaces() {
        let mut b = BytesMut::from(&b"abcdef"[..]);
        splice(&mut b, 2, 1, b"XYZ");
        assert_eq!(&b[..], b"abXYZdef");
        splice(&mut b, 2, 3, b"Q");
        assert_eq!(&b[..], b"abQdef");
        splice(&mut b, 0, 0, b"__");
        assert_eq!(&b[..], b"__abQdef");
        splice(&mut b, 6, 2, b"");
        assert_eq!(&b[..], b"__abQd");
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
    /// future made 1,024-byte cells and a 736-byte one (this one) 896-byte cells, 128 bytes
    /// less per client. The bound is the debug build's size (16 bytes over release) with a
    /// little slack: growing past it means some state crossed an await point that should be
    /// boxed or built outside the future, and likely a bigger cell.
    #[test]
    fn client_task_future_stays_small() {
        let client = future_size(|a, b, c, d: ()| crate::frontend::serve_client(a, b, c, d));
        let session = size_of::<super::Session>();
        eprintln!("client task future: {client} bytes, session state: {session} bytes");
        assert!(client <= 760, "client task future is {client} bytes");
        assert!(session <= 352, "session state is {session} bytes");
    }
}
