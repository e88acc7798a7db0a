//! Server connections: connect and log in, the protocol state the relay keeps on them,
//! recovery of a connection left mid-request, and the explicit shutdown contract.
//!
//! Every [`ServerConn`] ends in [`ServerConn::shutdown`] (Terminate, flush, TCP shutdown, wait
//! for the server's EOF, all bounded) or [`ServerConn::close_hard`]. `Drop` is only a detector;
//! see the type's docs and DESIGN.md section 1.

pub mod client;
mod login;
pub mod params;
pub mod statements;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::rustls::ClientConfig;

use crate::auth::ServerCredential;
use crate::config::TargetSessionAttrs;
use crate::protocol::{self, TERMINATE};
use crate::tls::{ServerStream, SslMode};

pub use self::login::{connect, open_stream};

/// Where and as whom a pool connects.
#[derive(Clone)]
pub struct ServerTarget {
    /// The servers to try, in order (libpq's multiple hosts).
    pub hosts: Vec<(String, u16)>,
    /// Which of them may be used.
    pub attrs: TargetSessionAttrs,
    pub dbname: String,
    pub user: String,
    /// What answers the server's authentication request (None: only trust works).
    pub credential: Option<ServerCredential>,
    pub sslmode: SslMode,
    /// The rustls config for `sslmode` (None for disable).
    pub tls: Option<Arc<ClientConfig>>,
    /// Identifies the TLS settings (mode and CA file contents) so a reload can tell whether
    /// they changed.
    pub tls_id: String,
}

impl PartialEq for ServerTarget {
    fn eq(&self, o: &Self) -> bool {
        self.hosts == o.hosts
            && self.attrs == o.attrs
            && self.dbname == o.dbname
            && self.user == o.user
            && self.credential == o.credential
            && self.sslmode == o.sslmode
            && self.tls_id == o.tls_id
    }
}

impl std::fmt::Debug for ServerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@", self.user)?;
        for (i, (h, p)) in self.hosts.iter().enumerate() {
            write!(f, "{}{h}:{p}", if i > 0 { "," } else { "" })?;
        }
        write!(f, "/{}", self.dbname)
    }
}

/// Errors from a server connection.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not connect to server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(String),
    /// The server answered with an ErrorResponse; code and message are Postgres's.
    #[error("{message}")]
    Server { code: String, message: String },
    #[error("server requested {0} authentication, which tidepool does not support")]
    UnsupportedAuth(&'static str),
    #[error("server requested a password but none is configured for user \"{0}\"")]
    NoPassword(String),
    #[error("server connection I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error from server: {0}")]
    Protocol(String),
    #[error("server closed the connection unexpectedly")]
    Closed,
    #[error("timed out waiting for the server")]
    Timeout,
    #[error("server does not support SSL, but sslmode is {0:?}")]
    TlsRefused(SslMode),
    #[error("TLS handshake with the server failed: {0}")]
    Tls(std::io::Error),
}

impl BackendError {
    /// SQLSTATE to show a client for this error.
    pub fn sqlstate(&self) -> &str {
        match self {
            BackendError::Server { code, .. } => code,
            BackendError::UnsupportedAuth(_) | BackendError::NoPassword(_) => "28000",
            _ => "08006",
        }
    }
}

/// Where a server connection goes, for its CancelRequests: a TCP address, or the path of a
/// Unix-domain socket. Cloning is cheap (a copy, or a reference count).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    Unix(Arc<std::path::Path>),
}

impl ServerAddr {
    /// The address as the console shows it: the IP, or `unix` (as PgBouncer shows a Unix
    /// socket).
    pub fn ip_text(&self) -> String {
        match self {
            ServerAddr::Tcp(a) => a.ip().to_string(),
            ServerAddr::Unix(_) => "unix".to_string(),
        }
    }

    /// The port: a TCP port, or the one in the socket file's name (`.s.PGSQL.PORT`).
    pub fn port(&self) -> u16 {
        match self {
            ServerAddr::Tcp(a) => a.port(),
            ServerAddr::Unix(p) => p
                .extension()
                .and_then(|e| e.to_str())
                .and_then(|e| e.parse().ok())
                .unwrap_or(0),
        }
    }
}

/// libpq's rule: a host that starts with `/` is the directory of a server's Unix socket,
/// `DIR/.s.PGSQL.PORT`.
pub fn unix_socket_path(host: &str, port: u16) -> Option<std::path::PathBuf> {
    host.starts_with('/')
        .then(|| std::path::Path::new(host).join(format!(".s.PGSQL.{port}")))
}

/// The server's key for CancelRequest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

/// Server-reported parameters (ParameterStatus), name → value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) {
        if let Some(slot) = self
            .0
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            if slot.1 != value {
                slot.1.clear();
                slot.1.push_str(value);
            }
        } else {
            self.0.push((name.to_string(), value.to_string()));
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Take `other`'s value for every name present in both; true if anything changed.
    pub fn update_from(&mut self, other: &Params) -> bool {
        let mut changed = false;
        for (k, v) in self.0.iter_mut() {
            if let Some(o) = other.get(k) {
                if v != o {
                    v.clear();
                    v.push_str(o);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Would [`update_from`](Self::update_from) change anything?
    pub fn update_from_would_change(&self, other: &Params) -> bool {
        self.0
            .iter()
            .any(|(k, v)| other.get(k).is_some_and(|o| o != v))
    }

    /// An order-independent fingerprint of names (case-insensitive) and values.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        self.0.iter().fold(0u64, |acc, (k, v)| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            k.to_ascii_lowercase().hash(&mut h);
            v.hash(&mut h);
            acc ^ h.finish()
        })
    }
}

/// What the relay knows about the protocol exchange on a server connection. A connection is
/// reusable only when [`ProtoState::is_clean`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtoState {
    /// ReadyForQuery messages still owed by the server (one per Query, Sync, FunctionCall sent).
    pub expected_rfq: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub in_extended: bool,
    /// Transaction status of the last ReadyForQuery: `I`, `T` or `E`.
    pub txn_status: u8,
    /// The server is in COPY FROM STDIN (it sent CopyInResponse, the client has not ended it).
    pub copy_in: bool,
    /// The server is streaming COPY TO STDOUT.
    pub copy_out: bool,
    /// Bytes of a client message that were announced to the server but not yet sent (the relay
    /// streams large messages), with that message's tag.
    pub partial_to_server: Option<(u8, usize)>,
    /// An I/O error or a desynchronised stream: never reuse.
    pub broken: bool,
}

impl Default for ProtoState {
    fn default() -> Self {
        ProtoState {
            expected_rfq: 0,
            in_extended: false,
            txn_status: b'I',
            copy_in: false,
            copy_out: false,
            partial_to_server: None,
            broken: false,
        }
    }
}

impl ProtoState {
    pub fn is_clean(&self) -> bool {
        self.expected_rfq == 0
            && !self.in_extended
            && self.txn_status == b'I'
            && !self.copy_in
            && !self.copy_out
            && self.partial_to_server.is_none()
            && !self.broken
    }
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Test-only hooks that make leaks happen on purpose.
#[doc(hidden)]
pub mod test_hooks {
    use std::sync::atomic::AtomicBool;
    /// When set, the next session task that holds a server panics (see `frontend`).
    pub static PANIC_NEXT_SESSION: AtomicBool = AtomicBool::new(false);
}

/// One logged-in server connection.
///
/// # Drop behaviour
///
/// `Drop` cannot send Terminate properly: it cannot `.await` a write over an async socket, and
/// stable Rust has no async drop. So the owner must end every connection with
/// [`shutdown`](Self::shutdown) or [`close_hard`](Self::close_hard), both of which consume it.
/// If a `ServerConn` is dropped while still open, that is a bug somewhere: `Drop` adds 1 to
/// `tidepool_server_connections_leaked_total{pool}`, logs one `warn!` (connection id, pool, age,
/// protocol state, whether the thread is panicking), and makes one non-blocking attempt to write
/// the 5-byte Terminate with a plain `send(2)` when no message is half-sent. It never awaits,
/// blocks, panics or spawns, so it is safe outside a runtime and during unwinding.
pub struct ServerConn {
    stream: ServerStream,
    /// Set once the connection has been closed through `shutdown`/`close_hard`.
    closed: bool,
    pub id: u64,
    pub pool: Arc<str>,
    pub created: Instant,
    /// When the connection last went back to the idle list.
    pub idle_since: Instant,
    pub state: ProtoState,
    pub key: BackendKey,
    pub addr: ServerAddr,
    /// Current server-side values of reported parameters (ParameterStatus).
    pub params: Params,
    /// Non-reported settings tidepool applied for a client (`options=-c ...`).
    pub applied: Params,
    /// Fingerprint of the client parameters this server was last synced to, while nothing
    /// changed its parameters since: a client with the same fingerprint needs no sync.
    pub synced_fp: Option<u64>,
    /// Client bytes the relay had framed for this server but not yet written when the client
    /// went away; recovery writes them first so the server's input ends on a message boundary.
    pub pending: Option<BytesMut>,
    /// Transaction mode: the named statements tidepool prepared on this server.
    pub stmts: statements::ServerStmts,
    leaked: Counter,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("pool", &self.pool)
            .field("pid", &self.key.pid)
            .field("state", &self.state)
            .finish()
    }
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Terminate was sent and the server closed its side.
    Clean,
    /// The graceful path failed or timed out; the socket was closed anyway.
    Hard,
}

/// Read one whole message (login and control paths only; the relay has its own framing).
async fn read_message<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(u8, BytesMut), BackendError> {
    loop {
        if let Some(h) = protocol::header(buf, 64 * 1024 * 1024)
            .map_err(|e| BackendError::Protocol(e.to_string()))?
        {
            if buf.len() >= h.total {
                let mut msg = buf.split_to(h.total);
                msg.advance(5);
                return Ok((h.tag, msg));
            }
            buf.reserve(h.total - buf.len());
        } else {
            buf.reserve(4096);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(BackendError::Closed);
        }
    }
}

/// A DataRow body (protocol docs 55.7: Int16 columns, then Int32 length (-1 = NULL) and bytes
/// each), text format.
fn parse_data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut cols = Vec::new();
    let Some(n) = body.get(..2) else {
        return cols;
    };
    let n = u16::from_be_bytes([n[0], n[1]]) as usize;
    let mut at = 2;
    for _ in 0..n {
        let Some(len) = body.get(at..at + 4) else {
            break;
        };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        at += 4;
        if len < 0 {
            cols.push(None);
            continue;
        }
        let Some(v) = body.get(at..at + len as usize) else {
            break;
        };
        cols.push(Some(String::from_utf8_lossy(v).into_owned()));
        at += len as usize;
    }
    cols
}

/// Result of a statement run by tidepool itself on a server connection.
#[derive(Debug, Default)]
pub struct ExecOutcome {
    /// The first ErrorResponse, if any: (SQLSTATE, message).
    pub error: Option<(String, String)>,
    /// The DataRows, each column as text (`None` for NULL).
    pub rows: Vec<Vec<Option<String>>>,
    /// The NoticeResponses, whole (tag and length included), to pass on to a client.
    pub notices: Vec<bytes::Bytes>,
}

impl ServerConn {
    /// Does this server match `attrs` (libpq's `target_session_attrs`)? Postgres 14 and later
    /// report `in_hot_standby` and `default_transaction_read_only` at login; an older server
    /// is asked (`SHOW transaction_read_only`, as libpq does).
    pub async fn accepts(
        &mut self,
        attrs: TargetSessionAttrs,
        timeout: Duration,
    ) -> Result<bool, BackendError> {
        if attrs == TargetSessionAttrs::Any {
            return Ok(true);
        }
        let on = |k: &str| self.params.get(k).map(|v| v == "on");
        let standby = on("in_hot_standby");
        let read_only = on("default_transaction_read_only");
        let (standby, read_only) = match (standby, read_only) {
            (Some(s), Some(r)) => (s, r),
            _ => {
                let o = self.exec("SHOW transaction_read_only", timeout).await?;
                let ro = o.rows.first().and_then(|r| r.first()).cloned().flatten();
                let ro = ro.as_deref() == Some("on");
                (ro, ro)
            }
        };
        Ok(attrs.admits(standby, read_only))
    }

    pub fn stream(&mut self) -> &mut ServerStream {
        &mut self.stream
    }

    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// Reusable as is: the protocol state is clean and no client bytes wait to be written.
    pub fn is_clean(&self) -> bool {
        self.state.is_clean() && self.pending.is_none()
    }

    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// True if the server has sent nothing and not closed while idle (one non-blocking read).
    /// An idle Postgres backend sends nothing unless it is terminating (`pg_terminate_backend`,
    /// a restart), so any byte means the connection must go.
    pub fn idle_check(&self) -> bool {
        // A peek, not a read: under TLS the bytes belong to the TLS layer.
        let Some(sock) = self.stream.socket() else {
            return false;
        };
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(sock.peek(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Run one simple-protocol statement that tidepool issues itself (parameter sync, reset,
    /// rollback) and read to its ReadyForQuery, updating `params` from ParameterStatus.
    pub async fn exec(
        &mut self,
        sql: &str,
        timeout: Duration,
    ) -> Result<ExecOutcome, BackendError> {
        let mut out = BytesMut::with_capacity(sql.len() + 6);
        protocol::query(&mut out, sql);
        self.state.expected_rfq += 1;
        let r = tokio::time::timeout(timeout, async {
            self.stream.write_all(&out).await?;
            self.read_to_ready(None).await
        })
        .await;
        match r {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(e)) => {
                self.state.broken = true;
                Err(e)
            }
            Err(_) => Err(BackendError::Timeout),
        }
    }

    /// Read and discard until every owed ReadyForQuery has arrived. A COPY IN that starts
    /// meanwhile is refused with CopyFail.
    async fn read_to_ready(
        &mut self,
        mut buf: Option<BytesMut>,
    ) -> Result<ExecOutcome, BackendError> {
        let mut buf = buf.take().unwrap_or_else(|| BytesMut::with_capacity(1024));
        let mut outcome = ExecOutcome::default();
        while self.state.expected_rfq > 0 {
            let (tag, body) = match read_message(&mut self.stream, &mut buf).await {
                Ok(m) => m,
                Err(e) => {
                    self.state.broken = true;
                    return Err(e);
                }
            };
            match tag {
                b'Z' => {
                    self.state.expected_rfq -= 1;
                    self.state.txn_status = body.first().copied().unwrap_or(b'I');
                    self.state.copy_out = false;
                }
                b'S' => {
                    if let Some((k, v)) = protocol::parse_parameter_status(&body) {
                        self.params.set(k, v);
                        self.synced_fp = None;
                    }
                }
                b'E' => {
                    if outcome.error.is_none() {
                        outcome.error = Some(protocol::parse_error_fields(&body));
                    }
                    self.state.copy_in = false;
                    self.state.copy_out = false;
                }
                b'D' => outcome.rows.push(parse_data_row(&body)),
                b'N' => {
                    let mut whole = BytesMut::with_capacity(body.len() + 5);
                    whole.put_u8(b'N');
                    whole.put_u32(body.len() as u32 + 4);
                    whole.extend_from_slice(&body);
                    outcome.notices.push(whole.freeze());
                }
                b'G' => {
                    let mut f = BytesMut::new();
                    protocol::copy_fail(&mut f, "tidepool: client went away");
                    self.stream.write_all(&f).await?;
                }
                b'H' => self.state.copy_out = true,
                b'c' => self.state.copy_out = false,
                b'W' => {
                    self.state.broken = true;
                    return Err(BackendError::Protocol("unexpected CopyBothResponse".into()));
                }
                _ => {}
            }
        }
        if !buf.is_empty() {
            // Bytes after the last ReadyForQuery: the stream is no longer in step with us.
            self.state.broken = true;
        }
        Ok(outcome)
    }

    /// Bring a connection that a client left mid-request back to an idle, reusable state:
    /// finish a half-sent CopyData, fail a COPY IN, Sync an open extended exchange, cancel a
    /// running query, read to ReadyForQuery and roll back an open transaction. Returns true if
    /// the connection is clean afterwards. Bounded by `timeout`.
    pub async fn recover(&mut self, timeout: Duration) -> bool {
        if self.state.broken {
            return false;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let r = tokio::time::timeout_at(deadline, self.recover_inner()).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(conn.id = self.id, error = %e, "recovery failed");
                self.state.broken = true;
                return false;
            }
            Err(_) => {
                tracing::debug!(conn.id = self.id, "recovery timed out");
                self.state.broken = true;
                return false;
            }
        }
        if self.state.txn_status != b'I' && !self.state.broken {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.exec("ROLLBACK", left).await {
                Ok(o) if o.error.is_none() => {}
                _ => return false,
            }
        }
        self.is_clean()
    }

    async fn recover_inner(&mut self) -> Result<(), BackendError> {
        if let Some(pending) = self.pending.take() {
            self.stream.write_all(&pending).await?;
        }
        let mut out = BytesMut::new();
        if let Some((tag, remaining)) = self.state.partial_to_server {
            if tag != b'd' {
                // A half-sent message other than CopyData cannot be completed safely.
                return Err(BackendError::Protocol(format!(
                    "client left mid-message ('{}')",
                    tag as char
                )));
            }
            // Complete the CopyData with filler; the CopyFail below discards it all.
            out.resize(remaining, 0);
            self.state.partial_to_server = None;
        }
        if self.state.copy_in {
            protocol::copy_fail(&mut out, "tidepool: client went away");
            self.state.copy_in = false;
        }
        if self.state.in_extended {
            out.extend_from_slice(&protocol::SYNC);
            self.state.in_extended = false;
            self.state.expected_rfq += 1;
        }
        if !out.is_empty() {
            self.stream.write_all(&out).await?;
        }
        if self.state.expected_rfq > 0 {
            // A query may still be running: cancel it, and wait for the postmaster to close the
            // cancel connection (the signal has then been sent) so that it cannot hit a later
            // query on this connection.
            let _ = send_cancel(self.addr.clone(), self.key).await;
            self.read_to_ready(None).await?;
        }
        Ok(())
    }

    /// Explicit graceful close: Terminate, flush, TCP shutdown (after TLS close_notify), then wait for the server to
    /// close its side, all within `timeout`; on failure or timeout the socket is closed anyway.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping this future drops the connection, which the `Drop` detector
    /// reports as a leak. Callers await it to completion (it is bounded by `timeout`).
    pub async fn shutdown(mut self, timeout: Duration) -> ShutdownOutcome {
        let mid_message = self.state.partial_to_server.is_some()
            || self.pending.as_ref().is_some_and(|p| !p.is_empty());
        let r = tokio::time::timeout(timeout, async {
            if mid_message {
                return Err(std::io::Error::other("mid-message"));
            }
            self.stream.write_all(&TERMINATE).await?;
            self.stream.flush().await?;
            self.stream.shutdown().await?;
            // Drain until the server closes: closing with unread data would send a RST.
            let mut sink = [0u8; 512];
            loop {
                if self.stream.read(&mut sink).await? == 0 {
                    return Ok::<(), std::io::Error>(());
                }
            }
        })
        .await;
        self.closed = true;
        match r {
            Ok(Ok(())) => ShutdownOutcome::Clean,
            Ok(Err(e)) => {
                tracing::debug!(conn.id = self.id, error = %e, "graceful close failed; closed hard");
                ShutdownOutcome::Hard
            }
            Err(_) => {
                tracing::warn!(conn.id = self.id, pool = %self.pool, "server did not close within server_close_timeout; closed hard");
                ShutdownOutcome::Hard
            }
        }
    }

    /// Close the socket without the protocol goodbye (the server is known dead or broken).
    pub fn close_hard(mut self) {
        self.closed = true;
    }

    /// Test-only: drop the connection without shutdown, to exercise the leak detector.
    #[doc(hidden)]
    pub fn leak_for_test(self) {
        drop(self);
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        self.leaked.inc();
        let panicking = std::thread::panicking();
        tracing::warn!(
            conn.id = self.id,
            pool = %self.pool,
            age_ms = self.created.elapsed().as_millis() as u64,
            state = ?self.state,
            panicking,
            "server connection dropped without shutdown (leak)"
        );
        if self.state.partial_to_server.is_none() && self.pending.is_none() {
            // One non-blocking send(2) on plain TCP (under TLS it would corrupt the record
            // stream); whatever happens, we do not wait.
            if !self.stream.is_tls() {
                if let Some(sock) = self.stream.socket() {
                    let _ = sock.send(&TERMINATE);
                }
            }
        }
    }
}

/// Send a CancelRequest for `key` to `addr` over a new connection and wait (bounded) until the
/// postmaster closes it, which it does after signalling the backend.
pub async fn send_cancel(addr: ServerAddr, key: BackendKey) -> std::io::Result<()> {
    async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut s: S,
        key: BackendKey,
    ) -> std::io::Result<()> {
        s.write_all(&protocol::cancel_request(key.pid, key.secret))
            .await?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    }
    tokio::time::timeout(Duration::from_secs(5), async {
        match addr {
            ServerAddr::Tcp(a) => exchange(TcpStream::connect(a).await?, key).await,
            ServerAddr::Unix(p) => exchange(UnixStream::connect(&*p).await?, key).await,
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "cancel timed out",
        ))
    })
}
