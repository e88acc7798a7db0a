//! Opening a server connection: TCP (each of the target's hosts in turn), TLS negotiation,
//! the startup message and authentication (cleartext, md5, SCRAM-SHA-256), up to the first
//! ReadyForQuery, and the `target_session_attrs` check.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::{
    read_message, unix_socket_path, BackendError, BackendKey, Params, ProtoState, ServerAddr,
    ServerConn, ServerTarget, NEXT_CONN_ID,
};
use crate::auth::{md5_answer_from_hash, AuthError, ScramClient, ServerCredential};
use crate::protocol;
use crate::tls::{MaybeTls, ServerStream, SslMode};

fn set_socket_options(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    sock.set_tcp_keepalive(&ka)?;
    Ok(())
}

/// Connect to `target`, log in and wait for the first ReadyForQuery.
///
/// # Cancel safety
/// Not cancel safe in the sense that matters here: cancelling drops a half-logged-in socket,
/// which Postgres logs as an unexpected EOF. The pool therefore runs every login in a task of
/// its own that always completes (`Pool::with_permit`).
///
/// The hosts are tried in order, each bounded by `timeout` (libpq's `connect_timeout` is per
/// host too); with `target_session_attrs` other than `any`, a server that turns out read-only
/// at login is shut down explicitly and the next host tried.
pub async fn connect(
    target: &ServerTarget,
    pool: Arc<str>,
    leaked: Counter,
    timeout: Duration,
) -> Result<ServerConn, BackendError> {
    let mut last = None;
    for (host, port) in &target.hosts {
        let r = tokio::time::timeout(
            timeout,
            connect_inner(target, host, *port, pool.clone(), leaked.clone()),
        )
        .await
        .unwrap_or_else(|_| Err(BackendError::ConnectTimeout(format!("{host}:{port}"))));
        let mut conn = match r {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%host, port, error = %e, "server login failed");
                last = Some(e);
                continue;
            }
        };
        match conn.accepts(target.attrs, timeout).await {
            Ok(true) => return Ok(conn),
            Ok(false) => {
                tracing::info!(%host, port, attrs = ?target.attrs, "server does not match target_session_attrs: next host");
                last = Some(BackendError::Server {
                    code: "25006".into(),
                    message: format!(
                        "server at {host}:{port} is read-only or in hot standby, and target_session_attrs is {:?}",
                        target.attrs
                    ),
                });
                conn.shutdown(timeout).await;
            }
            Err(e) => {
                last = Some(e);
                conn.shutdown(timeout).await;
            }
        }
    }
    Err(last.unwrap_or(BackendError::Closed))
}

/// A connection to one of the target's servers, TLS negotiated as `sslmode` asks, before
/// any startup message: what a login, or a client of our own (the auth lookup), goes on with.
pub async fn open_stream(
    target: &ServerTarget,
    host: &str,
    port: u16,
) -> Result<(ServerAddr, ServerStream), BackendError> {
    let opened = match unix_socket_path(host, port) {
        // A server's Unix socket: no TLS over it, as with libpq.
        Some(path) => {
            let stream =
                UnixStream::connect(&path)
                    .await
                    .map_err(|source| BackendError::Connect {
                        addr: path.display().to_string(),
                        source,
                    })?;
            (
                ServerAddr::Unix(Arc::from(path)),
                MaybeTls::Unix(Box::new(stream)),
            )
        }
        None => {
            let stream =
                TcpStream::connect((host, port))
                    .await
                    .map_err(|source| BackendError::Connect {
                        addr: format!("{host}:{port}"),
                        source,
                    })?;
            set_socket_options(&stream)?;
            let addr = ServerAddr::Tcp(stream.peer_addr()?);
            (addr, negotiate_tls(stream, target, host).await?)
        }
    };
    Ok(opened)
}

async fn connect_inner(
    target: &ServerTarget,
    host: &str,
    port: u16,
    pool: Arc<str>,
    leaked: Counter,
) -> Result<ServerConn, BackendError> {
    let (addr, mut stream) = open_stream(target, host, port).await?;

    let mut out = BytesMut::with_capacity(256);
    frontend::startup_message(
        [
            ("user", target.user.as_str()),
            ("database", target.dbname.as_str()),
        ],
        &mut out,
    )?;
    stream.write_all(&out).await?;
    out.clear();

    let mut buf = BytesMut::with_capacity(1024);
    let mut params = Params::default();
    let mut key = BackendKey::default();
    let mut scram: Option<Scram> = None;
    loop {
        let (tag, body) = read_message(&mut stream, &mut buf).await?;
        match tag {
            b'R' => {
                if body.len() < 4 {
                    return Err(BackendError::Protocol(
                        "short authentication message".into(),
                    ));
                }
                let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                let data = &body[4..];
                match code {
                    0 => {}
                    3 => match credential(target)? {
                        ServerCredential::Password(pw) => {
                            frontend::password_message(pw.as_bytes(), &mut out)?
                        }
                        _ => return Err(cannot_answer(target, "a cleartext password")),
                    },
                    5 => {
                        if data.len() < 4 {
                            return Err(BackendError::Protocol("short md5 salt".into()));
                        }
                        let salt = [data[0], data[1], data[2], data[3]];
                        let answer = match credential(target)? {
                            ServerCredential::Password(pw) => {
                                postgres_protocol::authentication::md5_hash(
                                    target.user.as_bytes(),
                                    pw.as_bytes(),
                                    salt,
                                )
                            }
                            ServerCredential::Md5Hash(hash) => md5_answer_from_hash(hash, salt),
                            ServerCredential::Scram(_) => return Err(cannot_answer(target, "md5")),
                        };
                        frontend::password_message(answer.as_bytes(), &mut out)?;
                    }
                    10 => {
                        let offers_scram = data.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256");
                        if !offers_scram {
                            return Err(BackendError::UnsupportedAuth("SASL (non SCRAM-SHA-256)"));
                        }
                        let (s, first) = match credential(target)? {
                            ServerCredential::Password(pw) => {
                                let s =
                                    ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                                let first = s.message().to_vec();
                                (Scram::Password(s), first)
                            }
                            ServerCredential::Scram(keys) => {
                                let (s, first) = ScramClient::start(keys.clone());
                                (Scram::Keys(s), first)
                            }
                            ServerCredential::Md5Hash(_) => {
                                return Err(cannot_answer(target, "SCRAM-SHA-256"))
                            }
                        };
                        frontend::sasl_initial_response("SCRAM-SHA-256", &first, &mut out)?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or_else(|| {
                            BackendError::Protocol("unexpected SASLContinue".into())
                        })?;
                        let reply = s.server_first(data)?;
                        frontend::sasl_response(&reply, &mut out)?;
                    }
                    12 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| BackendError::Protocol("unexpected SASLFinal".into()))?;
                        s.server_final(data)?;
                    }
                    2 => return Err(BackendError::UnsupportedAuth("Kerberos")),
                    6 => return Err(BackendError::UnsupportedAuth("SCM credentials")),
                    7 | 8 => return Err(BackendError::UnsupportedAuth("GSSAPI")),
                    9 => return Err(BackendError::UnsupportedAuth("SSPI")),
                    _ => return Err(BackendError::Protocol(format!("auth code {code}"))),
                }
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                    out.clear();
                }
            }
            b'S' => {
                if let Some((k, v)) = protocol::parse_parameter_status(&body) {
                    params.set(k, v);
                }
            }
            b'K' => {
                if body.len() >= 8 {
                    key = BackendKey {
                        pid: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                        secret: i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    };
                }
            }
            b'E' => {
                let (code, message) = protocol::parse_error_fields(&body);
                return Err(BackendError::Server { code, message });
            }
            b'N' => {}
            b'Z' => {
                let now = Instant::now();
                return Ok(ServerConn {
                    stream,
                    closed: false,
                    id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
                    pool,
                    created: now,
                    idle_since: now,
                    state: ProtoState::default(),
                    key,
                    addr,
                    params,
                    applied: Params::default(),
                    synced_fp: None,
                    pending: None,
                    stmts: Default::default(),
                    leaked,
                });
            }
            other => {
                return Err(BackendError::Protocol(format!(
                    "unexpected message '{}' during login",
                    other as char
                )))
            }
        }
    }
}

/// SSLRequest, then a TLS handshake if the server answers `S` (protocol docs 55.2.10).
async fn negotiate_tls(
    mut tcp: TcpStream,
    target: &ServerTarget,
    host: &str,
) -> Result<ServerStream, BackendError> {
    let Some(config) = target.tls.clone() else {
        return Ok(MaybeTls::Plain(tcp));
    };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| BackendError::Tls(std::io::Error::other(e.to_string())))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(BackendError::Tls)?;
            Ok(MaybeTls::Tls(Box::new(tls)))
        }
        b'N' if target.sslmode == SslMode::Prefer => Ok(MaybeTls::Plain(tcp)),
        b'N' => Err(BackendError::TlsRefused(target.sslmode)),
        other => Err(BackendError::Protocol(format!(
            "unexpected answer to SSLRequest: {other}"
        ))),
    }
}

fn credential(target: &ServerTarget) -> Result<&ServerCredential, BackendError> {
    target
        .credential
        .as_ref()
        .ok_or_else(|| BackendError::NoPassword(target.user.clone()))
}

fn cannot_answer(target: &ServerTarget, method: &str) -> BackendError {
    BackendError::Server {
        code: "28P01".into(),
        message: format!(
            "the server asks for {method} authentication for user \"{}\", which the secret \
             tidepool holds for it cannot answer",
            target.user
        ),
    }
}

/// The client half of a SCRAM exchange with the server: with a password (postgres-protocol's,
/// which applies SASLprep as libpq does), or with pass-through keys.
enum Scram {
    Password(ScramSha256),
    Keys(ScramClient),
}

impl Scram {
    fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, BackendError> {
        match self {
            Scram::Password(s) => {
                s.update(data)
                    .map_err(|e| BackendError::Protocol(format!("SCRAM: {e}")))?;
                Ok(s.message().to_vec())
            }
            Scram::Keys(s) => s.server_first(data).map_err(scram_error),
        }
    }

    fn server_final(&mut self, data: &[u8]) -> Result<(), BackendError> {
        match self {
            Scram::Password(s) => s
                .finish(data)
                .map_err(|e| BackendError::Protocol(format!("SCRAM: {e}"))),
            Scram::Keys(s) => s.server_final(data).map_err(scram_error),
        }
    }
}

/// A pass-through exchange the server's verifier no longer matches reads as the server's own
/// refusal would (28P01), so the client is told its login failed.
fn scram_error(e: AuthError) -> BackendError {
    match e {
        AuthError::StaleSecret | AuthError::WrongPassword => BackendError::Server {
            code: "28P01".into(),
            message: format!("password authentication failed: {e}"),
        },
        e => BackendError::Protocol(format!("SCRAM: {e}")),
    }
}
