//! The client side: accepting connections, the startup handshake and login, then the relay.
//!
//! Login order follows Postgres (protocol docs 55.2.1 "Start-up"): SSLRequest/GSSENCRequest
//! are answered `N` (no encryption offered yet), a CancelRequest is handled and the connection
//! closed, and a StartupMessage is authenticated, then answered with AuthenticationOk, the
//! server's ParameterStatus values, tidepool's BackendKeyData and ReadyForQuery.

pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

use crate::auth::{md5_verify, ScramKeys, ScramServer, Secret, ServerCredential};
use crate::backend::params::{self, ClientParams};
use crate::cancel::{ClientInfo, ClientShared};
use crate::config::{AuthMethod, PoolMode};
use crate::lookup::Found;
use crate::metrics::RejectReason;
use crate::pool::{CheckoutError, Pool};
use crate::protocol::{self, ProtocolError, Severity, StartupPacket};
use crate::state::{Runtime, Shared};
use crate::tls::{ClientStream, MaybeTls};

/// Where a client connected from (for its log span).
#[derive(Clone, Copy, Debug)]
pub enum Peer {
    /// A TCP client, at the address `accept` gave (no `getpeername` per login).
    Tcp(SocketAddr),
    /// The Unix-domain socket listener (its peers have no address).
    Unix,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// A login-phase failure, already worded for the client.
#[derive(Debug)]
pub struct LoginError {
    pub code: String,
    pub message: String,
    pub reason: RejectReason,
}

impl LoginError {
    fn new(code: &str, message: impl Into<String>, reason: RejectReason) -> Self {
        LoginError {
            code: code.to_string(),
            message: message.into(),
            reason,
        }
    }
}

/// Serve one accepted client connection until it leaves. `slot` is dropped when it has.
///
/// Not an `async fn`, and the login is boxed: the task's future is as large as its largest
/// await point plus the arguments it keeps, and a client spends its life in the relay, so
/// neither the one-time login nor a second copy of the arguments may size every idle client.
pub fn serve_client(
    shared: Arc<Shared>,
    sock: ClientStream,
    peer: Peer,
    slot: impl Send + 'static,
) -> impl std::future::Future<Output = ()> + Send {
    let span = tracing::info_span!("client", client.addr = %peer);
    if let MaybeTls::Plain(tcp) = &sock {
        let _ = tcp.set_nodelay(true);
    }
    // Boxed here, not in the task: the task then keeps one pointer until the login is over,
    // not the socket and the peer's address beside the boxed login.
    let login = Box::pin(login(shared.clone(), sock, peer));
    async move {
        let _slot = slot;
        let Some((sock, login)) = login.await else {
            return;
        };
        relay::run(shared, sock, login).await;
    }
    .instrument(span)
}

/// Startup, authentication and attaching to a pool; a refused client gets its FATAL here.
async fn login(
    shared: Arc<Shared>,
    sock: ClientStream,
    peer: Peer,
) -> Option<(ClientStream, LoggedIn)> {
    let shared = &shared;
    let mut sock = sock;
    let rt = shared.runtime();
    let over_limit = shared.client_count() > rt.config.listen.max_clients;
    // listen.login_timeout bounds startup and authentication; waiting for a server after
    // that is bounded by the pool's checkout_timeout.
    let deadline = tokio::time::Instant::now() + rt.config.listen.login_timeout;
    let hello = tokio::time::timeout_at(
        deadline,
        Box::pin(handshake(shared, &rt, &mut sock, over_limit)),
    )
    .await;
    let result = match hello {
        Ok(Ok(Some(h))) => match h.console {
            // The admin console (DESIGN.md section 10): its own session, no pool.
            Some(role) => {
                let login = crate::console::ConsoleLogin {
                    user: h.user,
                    database: h.database,
                    role,
                };
                Box::pin(crate::console::serve(shared.clone(), sock, login)).await;
                return None;
            }
            None => Box::pin(attach(shared, &rt, &mut sock, h, peer)).await,
        },
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => Err(e),
        Err(_) => Err(LoginError::new(
            // Postgres's wording for authentication_timeout (SQLSTATE 57014).
            "57014",
            "canceling authentication due to timeout",
            RejectReason::protocol,
        )),
    };
    match result {
        Ok(session) => Some((sock, session)),
        Err(e) => {
            shared.metrics.reject(e.reason);
            tracing::info!(code = %e.code, reason = ?e.reason, "login refused: {}", e.message);
            let mut out = BytesMut::new();
            protocol::error_response(&mut out, Severity::Fatal, &e.code, &e.message);
            let _ = tokio::time::timeout(Duration::from_secs(1), sock.write_all(&out)).await;
            None
        }
    }
}

/// What login hands to the relay.
pub struct LoggedIn {
    pub client: Attached,
    /// Session mode: the server the client keeps until logout.
    pub server: Option<crate::pool::Checkout>,
}

/// A logged-in client's pool, settings and cancel identity: what the relay keeps for the
/// whole session (the login's server moves into the relay's own slot, so the session does
/// not carry a second, always-empty one).
pub struct Attached {
    pub pool: Pool,
    pub mode: PoolMode,
    pub params: ClientParams,
    pub shared: Arc<ClientShared>,
    pub key: crate::backend::BackendKey,
}

async fn read_startup(sock: &mut ClientStream) -> Result<Option<StartupPacket>, LoginError> {
    // One read for the whole packet when it has arrived whole, as it usually has (a client
    // writes it at once and waits for the answer), instead of one read for its length and one
    // for the rest; and no allocation for a packet that fits the buffer. A client sends nothing
    // more before it is answered, so bytes past the packet are a protocol violation.
    let mut buf = [0u8; 512];
    let mut got = 0;
    while got < 4 {
        match sock.read(&mut buf[got..]).await {
            // A client that connects and leaves (a TCP health probe) is not an error.
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => got += n,
        }
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=protocol::MAX_STARTUP_PACKET).contains(&len) {
        return Err(LoginError::new(
            "08P01",
            ProtocolError::StartupLength(len).to_string(),
            RejectReason::protocol,
        ));
    }
    if got > len {
        return Err(LoginError::new(
            "08P01",
            "unexpected data after the startup packet",
            RejectReason::protocol,
        ));
    }
    let heap;
    let body: &[u8] = if len <= buf.len() {
        if got < len && sock.read_exact(&mut buf[got..len]).await.is_err() {
            return Ok(None);
        }
        &buf[4..len]
    } else {
        let mut rest = vec![0u8; len - 4];
        rest[..got - 4].copy_from_slice(&buf[4..got]);
        if sock.read_exact(&mut rest[got - 4..]).await.is_err() {
            return Ok(None);
        }
        heap = rest;
        &heap
    };
    protocol::parse_startup(body).map(Some).map_err(|e| {
        // Postgres answers an unsupported protocol version with feature_not_supported
        // (ProcessStartupPacket, src/backend/postmaster/postmaster.c in Postgres 15); other malformed
        // packets are protocol violations.
        let code = match e {
            ProtocolError::Version { .. } => "0A000",
            _ => "08P01",
        };
        LoginError::new(code, e.to_string(), RejectReason::protocol)
    })
}

/// A client that passed startup and authentication.
struct Hello {
    user: String,
    database: String,
    desired: Vec<(String, String)>,
    /// What answers the server as this user (a password, or pass-through keys).
    credential: Option<ServerCredential>,
    /// The client asked for the console's database and may use it.
    console: Option<crate::console::Role>,
}

/// Startup packet(s) and authentication.
async fn handshake(
    shared: &Arc<Shared>,
    rt: &Arc<Runtime>,
    sock: &mut ClientStream,
    over_limit: bool,
) -> Result<Option<Hello>, LoginError> {
    let io_err = |_| {
        LoginError::new(
            "08006",
            "connection lost during login",
            RejectReason::protocol,
        )
    };
    let mut negotiations = 0;
    let params = loop {
        let Some(packet) = read_startup(sock).await? else {
            return Ok(None);
        };
        match packet {
            StartupPacket::Ssl | StartupPacket::GssEnc => {
                negotiations += 1;
                if negotiations > 2 || sock.is_tls() {
                    return Err(LoginError::new(
                        "08P01",
                        "too many encryption negotiation requests",
                        RejectReason::protocol,
                    ));
                }
                match (&packet, &rt.listen_tls) {
                    // TLS over TCP only; a Unix socket is answered `N`, as Postgres does
                    // when it offers no SSL there (libpq never asks over one).
                    (StartupPacket::Ssl, Some((acceptor, _))) if !sock.is_unix() => {
                        sock.write_all(b"S").await.map_err(io_err)?;
                        let MaybeTls::Plain(tcp) = std::mem::replace(sock, MaybeTls::Taken) else {
                            return Ok(None);
                        };
                        match acceptor.accept(tcp).await {
                            Ok(tls) => *sock = MaybeTls::Tls(Box::new(tls)),
                            Err(e) => {
                                tracing::info!(error = %e, "client TLS handshake failed");
                                shared.metrics.reject(RejectReason::protocol);
                                return Ok(None);
                            }
                        }
                    }
                    // No TLS offered (or GSSAPI asked for): 'N', and the client goes on in
                    // plain text or gives up.
                    _ => sock.write_all(b"N").await.map_err(io_err)?,
                }
            }
            StartupPacket::Cancel { pid, secret } => {
                if let Some(client) = shared.cancels.lookup(pid, secret) {
                    client.cancel().await;
                }
                return Ok(None);
            }
            StartupPacket::Startup { params } => break params,
        }
    };
    if !sock.is_tls()
        && !sock.is_unix()
        && matches!(
            &rt.listen_tls,
            Some((_, crate::tls::ListenTlsMode::Require))
        )
    {
        return Err(LoginError::new(
            "28000",
            "tidepool requires SSL for this connection (listen.tls.mode = require)",
            RejectReason::auth,
        ));
    }
    if over_limit {
        return Err(LoginError::new(
            "53300",
            "sorry, too many clients already",
            RejectReason::max_clients,
        ));
    }
    if shared.shutdown.refuse_new_clients() {
        return Err(LoginError::new(
            "57P03",
            "the database system is shutting down",
            RejectReason::draining,
        ));
    }
    let mut params = params;
    // Moved out of the list, not copied (`desired_settings` skips both names).
    let mut take = |k: &str| {
        params
            .iter_mut()
            .find(|(n, _)| n == k)
            .map(|(_, v)| std::mem::take(v))
    };
    let user = take("user");
    let database = take("database");
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Err(LoginError::new(
            "28000",
            "no PostgreSQL user name specified in startup packet",
            RejectReason::protocol,
        ));
    };
    if params
        .iter()
        .any(|(n, v)| n == "replication" && v != "false" && v != "0" && v != "off")
    {
        return Err(LoginError::new(
            "08P01",
            "replication connections are not supported by tidepool",
            RejectReason::protocol,
        ));
    }
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let desired = params::desired_settings(params)
        .map_err(|m| LoginError::new("22023", m, RejectReason::protocol))?;
    let console = crate::console::is_console_database(&database);
    // Unknown database: answer before authentication, as Postgres effectively does.
    if !console && rt.config.database_entry(&database).is_none() {
        return Err(LoginError::new(
            "3D000",
            format!("database \"{database}\" does not exist"),
            RejectReason::protocol,
        ));
    }
    let credential = authenticate(shared, rt, sock, &database, &user).await?;
    let console = match console {
        false => None,
        // After authentication, as PgBouncer does: who may use the console is no secret
        // to give away to a client that cannot log in.
        true => Some(crate::console::role_of(&rt.config, &user).ok_or_else(|| {
            LoginError::new(
                "28000",
                format!(
                    "user \"{user}\" may not use the console (admin.console_users, admin.stats_users)"
                ),
                RejectReason::auth,
            )
        })?),
    };
    Ok(Some(Hello {
        user,
        database,
        desired,
        credential,
        console,
    }))
}

/// Find the client's pool and finish the login: AuthenticationOk, ParameterStatus,
/// BackendKeyData, ReadyForQuery.
///
/// In session mode a server is borrowed now when one is free (and in either mode when the pool
/// has never connected, to learn the server's parameters): its values are then exact and, in
/// session mode, the client keeps it and is told its real process id. When the pool is full the client logs in on the pool's
/// known parameters with a tidepool key, and gets its server with its first request, as with
/// PgBouncer; so more clients than servers can log in at once, in session mode too.
async fn attach(
    shared: &Arc<Shared>,
    rt: &Arc<Runtime>,
    sock: &mut ClientStream,
    hello: Hello,
    peer: Peer,
) -> Result<LoggedIn, LoginError> {
    let Hello {
        user,
        database,
        desired,
        credential,
        console: _,
    } = hello;
    let io_err = |_| {
        LoginError::new(
            "08006",
            "connection lost during login",
            RejectReason::protocol,
        )
    };
    let pool = shared
        .pool_for(rt, &database, &user, credential.as_ref())
        .map_err(|m| LoginError::new("3D000", m, RejectReason::protocol))?;
    let settings = pool.settings();
    let server = match (pool.baseline(), settings.mode) {
        (None, _) => pool.checkout().await.map(Some),
        (Some(_), PoolMode::Session) => pool.checkout_now().await,
        // Transaction mode: the first request borrows a server and applies the client's
        // settings there; logging in costs no server round trip.
        (Some(_), PoolMode::Transaction) => Ok(None),
    };
    let mut server = match server {
        Ok(s) => s,
        Err(e) => {
            let (code, message) = checkout_error_for_client(&e);
            shared.forget_pool_if_unused(&pool);
            return Err(LoginError::new(code, message, RejectReason::protocol));
        }
    };
    let baseline = pool.baseline().unwrap_or_default();
    // The server's notices while it took the client's settings reach the client as they
    // would at a direct login (e.g. a too long application_name truncated).
    let mut notices = Vec::new();
    let (mut client_params, status) = match server.as_mut() {
        // The common transaction-mode login: usually the pool's cached greeting.
        None => pool.greeting(&baseline, desired),
        Some(server) => {
            let mut client_params = ClientParams::initial(Some(&baseline), &baseline, desired);
            match params::sync(
                server,
                &mut client_params,
                rt.config.drain.server_close_timeout,
            )
            .await
            {
                Ok(n) => notices = n,
                Err((code, message)) => {
                    return Err(LoginError::new(&code, message, RejectReason::protocol))
                }
            }
            client_params.adopt_reported(&server.params);
            pool.intern(&mut client_params);
            let status = params::parameter_status(&server.params, &client_params);
            (client_params, status)
        }
    };

    // What the console shows of the client; its parameters are the pool's shared copy.
    let mut login_params = None;
    client_params.share_with(|p| {
        login_params = Some(p.clone());
        p
    });
    let cshared = Arc::new(ClientShared::new(ClientInfo {
        id: shared.cancels.next_client_id(),
        addr: match peer {
            Peer::Tcp(addr) => addr,
            Peer::Unix => SocketAddr::from(([0, 0, 0, 0], 0)),
        },
        // Every TCP client connected to the listener's port (no `getsockname` per login).
        local_port: match peer {
            Peer::Tcp(_) => shared.listen_port,
            Peer::Unix => 0,
        },
        connected: std::time::SystemTime::now(),
        tls: sock.is_tls(),
        pool: Some(pool.clone()),
        console: None,
        params: login_params,
    }));
    let real_pid = match (&server, settings.mode) {
        (Some(s), PoolMode::Session) => Some(s.key.pid),
        _ => None,
    };
    let key = shared.cancels.register(real_pid, cshared.clone());
    let mut out = BytesMut::with_capacity(512);
    protocol::auth_ok(&mut out);
    for n in &notices {
        out.extend_from_slice(n);
    }
    out.extend_from_slice(&status);
    protocol::backend_key_data(&mut out, key.pid, key.secret);
    protocol::ready_for_query(&mut out, b'I');
    if let Err(e) = sock.write_all(&out).await {
        shared.cancels.unregister(key);
        return Err(io_err(e));
    }
    let server = match (server, settings.mode) {
        (Some(mut server), PoolMode::Session) => {
            server.set_reset_on_return(true);
            cshared.hold(server.addr.clone(), server.key);
            Some(server)
        }
        (other, _) => {
            drop(other);
            None
        }
    };
    tracing::info!(%user, %database, mode = settings.mode.as_str(), "client logged in");
    Ok(LoggedIn {
        client: Attached {
            pool,
            mode: settings.mode,
            params: client_params,
            shared: cshared,
            key,
        },
        server,
    })
}

/// The FATAL a client gets when no server could be had at login.
pub fn checkout_error_for_client(e: &CheckoutError) -> (&'static str, String) {
    match e {
        CheckoutError::Timeout(d) => (
            "53300",
            format!("tidepool: no server connection available within checkout_timeout ({d:?})"),
        ),
        CheckoutError::TooManyWaiting => (
            "53300",
            "tidepool: too many clients waiting for a server connection".to_string(),
        ),
        CheckoutError::Closed => ("57P03", "the database system is shutting down".to_string()),
        CheckoutError::Connect(be) => {
            let code = match be.sqlstate() {
                "3D000" => "3D000",
                "28P01" => "28P01",
                "28000" => "28000",
                "53300" => "53300",
                "57P03" => "57P03",
                _ => "08006",
            };
            (code, format!("tidepool: server login failed: {be}"))
        }
    }
}

/// Run the configured authentication. Returns what tidepool can answer the server with as
/// this user: the password of a listed user, or what the client's login revealed
/// (pass-through: SCRAM keys or an md5 hash, DESIGN.md section 11).
///
/// A user not listed is looked up in Postgres when `auth.lookup_user` is set. The secret
/// decides the method as Postgres decides it (`CheckPWChallengeAuth` in
/// `src/backend/libpq/auth.c`): a SCRAM verifier means SCRAM even where md5 is asked for; an
/// md5 hash cannot do SCRAM, so under `scram-sha-256` such a user fails the (mock) exchange.
/// Unknown users, users that cannot log in and wrong passwords all run an exchange and get
/// the same 28P01.
async fn authenticate(
    shared: &Arc<Shared>,
    rt: &Runtime,
    sock: &mut ClientStream,
    database: &str,
    user: &str,
) -> Result<Option<ServerCredential>, LoginError> {
    let failed = || {
        LoginError::new(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
            RejectReason::auth,
        )
    };
    let entry = rt.users.get(user);
    if rt.config.auth.method == AuthMethod::Trust {
        if !rt.users.is_empty() && entry.is_none() {
            return Err(LoginError::new(
                "28000",
                format!("role \"{user}\" is not permitted to log in through tidepool"),
                RejectReason::auth,
            ));
        }
        return Ok(entry.and_then(|e| e.secret.plaintext().map(password_credential)));
    }
    // (the secret to check against, the secret the server stores if that is what it is)
    let lookup = match entry {
        Some(_) => None,
        None => rt.lookup_request(database),
    };
    let looked_up = match &lookup {
        None => None,
        Some(req) => match shared.lookup.secret(req, user).await {
            Found::Secret(secret) => Some(secret),
            Found::NotFound => None,
            Found::Failed => {
                return Err(LoginError::new(
                    "28000",
                    "authentication lookup failed; see tidepool's log",
                    RejectReason::auth,
                ))
            }
        },
    };
    // What SCRAM verifies against (a listed plaintext password: its precomputed verifier),
    // and what the md5 check uses.
    let (scram_secret, md5_secret) = match (entry, &looked_up) {
        (Some(e), _) => (Some(&e.scram_secret), Some(&e.secret)),
        (None, Some(s)) => (Some(s), Some(s)),
        (None, None) => (None, None),
    };
    let use_scram = match rt.config.auth.method {
        AuthMethod::ScramSha256 => true,
        // Postgres does SCRAM for a SCRAM verifier even where md5 is asked for.
        _ => matches!(md5_secret, Some(Secret::Scram(_))),
    };
    let result = if use_scram {
        scram_exchange(sock, user, scram_secret).await.map(|keys| {
            match md5_secret.and_then(Secret::plaintext) {
                Some(p) => Some(password_credential(p)),
                // The server's own verifier (listed or looked up): pass the keys through.
                None => keys.map(ServerCredential::Scram),
            }
        })
    } else {
        let salt: [u8; 4] = rand::random();
        let mut out = BytesMut::new();
        protocol::auth_md5(&mut out, salt);
        sock.write_all(&out).await.map_err(|_| failed())?;
        let body = read_password_message(sock).await?;
        let response = body.strip_suffix(&[0]).unwrap_or(&body);
        match md5_secret {
            Some(secret) if md5_verify(secret, user, salt, response) => Ok(match secret {
                Secret::Plain(p) => Some(password_credential(p)),
                Secret::Md5(hash) => Some(ServerCredential::Md5Hash(*hash)),
                Secret::Scram(_) => None,
            }),
            _ => Err(AuthFailure::Refused),
        }
    };
    match result {
        Ok(credential) => Ok(credential),
        Err(failure) => {
            // A looked-up secret that failed may be stale (the password changed): look the
            // user up afresh at the next login.
            if let (Some(req), Some(_)) = (&lookup, &looked_up) {
                shared.lookup.forget(req, user);
            }
            Err(match failure {
                AuthFailure::Refused => failed(),
                AuthFailure::Login(e) => e,
            })
        }
    }
}

fn password_credential(p: &str) -> ServerCredential {
    ServerCredential::Password(p.to_string())
}

enum AuthFailure {
    /// The password did not match (or the user is unknown): the uniform 28P01.
    Refused,
    /// Another refusal with its own message (protocol errors, a lost connection).
    Login(LoginError),
}

/// The SCRAM-SHA-256 exchange with the client, against `secret` (a mock one when there is
/// none, or one that cannot do SCRAM). Returns the keys the client's proof revealed.
async fn scram_exchange(
    sock: &mut ClientStream,
    user: &str,
    secret: Option<&Secret>,
) -> Result<Option<ScramKeys>, AuthFailure> {
    let mut exchange = match secret.and_then(ScramServer::new) {
        Some(s) => s,
        None => ScramServer::mock(user),
    };
    let lost = |_| {
        AuthFailure::Login(LoginError::new(
            "08006",
            "connection lost during authentication",
            RejectReason::auth,
        ))
    };
    let malformed = || {
        AuthFailure::Login(LoginError::new(
            "08P01",
            "malformed SASLInitialResponse",
            RejectReason::protocol,
        ))
    };
    let mut out = BytesMut::new();
    protocol::auth_sasl(&mut out);
    sock.write_all(&out).await.map_err(lost)?;
    let body = read_password_message(sock)
        .await
        .map_err(AuthFailure::Login)?;
    // SASLInitialResponse: mechanism (cstring), Int32 length, data.
    let nul = body.iter().position(|&b| b == 0).ok_or_else(malformed)?;
    if &body[..nul] != b"SCRAM-SHA-256" {
        return Err(AuthFailure::Login(LoginError::new(
            "28000",
            "client selected an invalid SASL authentication mechanism",
            RejectReason::auth,
        )));
    }
    let rest = &body[nul + 1..];
    if rest.len() < 4 {
        return Err(malformed());
    }
    let first = exchange.client_first(&rest[4..]).map_err(|e| {
        tracing::debug!(error = %e, "SCRAM client-first rejected");
        AuthFailure::Refused
    })?;
    out.clear();
    protocol::auth_sasl_continue(&mut out, &first);
    sock.write_all(&out).await.map_err(lost)?;
    let body = read_password_message(sock)
        .await
        .map_err(AuthFailure::Login)?;
    let last = exchange.client_final(&body).map_err(|e| {
        tracing::debug!(error = %e, "SCRAM client-final rejected");
        AuthFailure::Refused
    })?;
    out.clear();
    protocol::auth_sasl_final(&mut out, &last);
    sock.write_all(&out).await.map_err(lost)?;
    Ok(exchange.pass_through_keys())
}

/// Read a PasswordMessage / SASL response ('p') during login.
async fn read_password_message(sock: &mut ClientStream) -> Result<Vec<u8>, LoginError> {
    let lost = || {
        LoginError::new(
            "08006",
            "connection lost during authentication",
            RejectReason::auth,
        )
    };
    let mut head = [0u8; 5];
    sock.read_exact(&mut head).await.map_err(|_| lost())?;
    if head[0] != b'p' {
        return Err(LoginError::new(
            "08P01",
            format!("expected password response, got message type {}", head[0]),
            RejectReason::protocol,
        ));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=protocol::MAX_STARTUP_PACKET).contains(&len) {
        return Err(LoginError::new(
            "08P01",
            "invalid password packet size",
            RejectReason::protocol,
        ));
    }
    let mut body = vec![0u8; len - 4];
    sock.read_exact(&mut body).await.map_err(|_| lost())?;
    Ok(body)
}
