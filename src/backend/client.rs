//! tokio-postgres clients for the queries tidepool issues itself: the auth lookup and the
//! fleet budget's control connection. The stream is opened as a pool connection's is
//! ([`open_stream`]: each of the target's hosts in turn, TLS as `sslmode` says, Unix-socket
//! hosts), then tokio-postgres logs in over it (`connect_raw`), so both share one TLS and
//! one connect path with the pools.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Connection, NoTls, SimpleQueryMessage};
use tokio_util::task::TaskTracker;

use super::{open_stream, ServerTarget};
use crate::auth::ServerCredential;
use crate::config::TargetSessionAttrs;
use crate::tls::ServerStream;

type ClientConnection = Connection<ServerStream, NoTlsStream>;

/// A logged-in client and the task driving its connection (it ends once the client is
/// dropped and Terminate is sent, or when the connection is lost).
pub struct OwnClient {
    pub client: Client,
    pub task: JoinHandle<Result<(), tokio_postgres::Error>>,
}

/// Log in to the first of `target`'s hosts that accepts and matches its
/// `target_session_attrs`, as `target.user` with its password (if any), with
/// `application_name` and the server `options` given. Each login is bounded by `timeout`
/// and runs in a task of its own, so a timeout does not cut it off half way: one that
/// succeeds late is ended properly (Terminate). `on_end` runs when the connection task ends.
/// Every task is spawned on `tasks`, the process's tracker, so the drain waits for a login
/// that is still under way (and for its Terminate) instead of dropping it at runtime shutdown.
pub async fn connect_own_client(
    target: &ServerTarget,
    application_name: &str,
    options: Option<&str>,
    timeout: Duration,
    on_end: impl Fn() + Clone + Send + 'static,
    tasks: &TaskTracker,
) -> Result<OwnClient, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .user(&target.user)
        .dbname(&target.dbname)
        .application_name(application_name)
        // TLS, if any, is negotiated by open_stream as sslmode says.
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    if let Some(o) = options {
        config.options(o);
    }
    match &target.credential {
        Some(ServerCredential::Password(p)) => {
            config.password(p);
        }
        Some(_) => return Err("only a password can log this connection in".into()),
        None => {}
    }
    let mut last = String::from("no host to connect to");
    for (host, port) in &target.hosts {
        let (config, t, h, port) = (config.clone(), target.clone(), host.clone(), *port);
        let mut login = tasks.spawn(async move {
            let (_, stream) = open_stream(&t, &h, port).await.map_err(|e| e.to_string())?;
            config
                .connect_raw(stream, NoTls)
                .await
                .map_err(|e| e.to_string())
        });
        let (client, connection) = match tokio::time::timeout(timeout, &mut login).await {
            Ok(Ok(Ok(pair))) => pair,
            Ok(Ok(Err(e))) => {
                last = e;
                continue;
            }
            Ok(Err(e)) => {
                last = e.to_string();
                continue;
            }
            Err(_) => {
                // Let it finish, and end it properly if it logged in after all.
                tasks.spawn(async move {
                    if let Ok(Ok((client, connection))) = login.await {
                        drop(client);
                        let _ = connection.await;
                    }
                });
                last = format!("timed out after {timeout:?}");
                continue;
            }
        };
        let own = drive(client, connection, on_end.clone(), tasks);
        match accepts(&own.client, target.attrs, timeout).await {
            Ok(true) => return Ok(own),
            Ok(false) => last = format!("{host}:{port} does not match target_session_attrs"),
            Err(e) => last = e,
        }
        end(own, timeout).await;
    }
    Err(last)
}

fn drive(
    client: Client,
    connection: ClientConnection,
    on_end: impl FnOnce() + Send + 'static,
    tasks: &TaskTracker,
) -> OwnClient {
    let task = tasks.spawn(async move {
        let r = connection.await;
        on_end();
        r
    });
    OwnClient { client, task }
}

/// Drop the client (its connection then sends Terminate and closes) and wait for the
/// connection task, bounded by `timeout`. True if it ended cleanly.
pub async fn end(own: OwnClient, timeout: Duration) -> bool {
    let OwnClient { client, mut task } = own;
    drop(client);
    match tokio::time::timeout(timeout, &mut task).await {
        Ok(Ok(Ok(()))) => true,
        Ok(_) => false,
        Err(_) => {
            task.abort();
            false
        }
    }
}

/// `target_session_attrs` as libpq checks it ([`TargetSessionAttrs::admits`]).
async fn accepts(
    client: &Client,
    attrs: TargetSessionAttrs,
    timeout: Duration,
) -> Result<bool, String> {
    if attrs == TargetSessionAttrs::Any {
        return Ok(true);
    }
    let sql = "SELECT pg_catalog.pg_is_in_recovery()::text, \
               pg_catalog.current_setting('transaction_read_only')";
    let msgs = tokio::time::timeout(timeout, client.simple_query(sql))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let row = msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some((r.get(0) == Some("true"), r.get(1) == Some("on"))),
        _ => None,
    });
    let (standby, read_only) = row.ok_or("no answer to the target_session_attrs check")?;
    Ok(attrs.admits(standby, read_only))
}
