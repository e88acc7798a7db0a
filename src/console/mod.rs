//! The admin console (DESIGN.md section 10): the virtual databases `pgbouncer` and `tidepool`
//! on the client port, speaking the simple query protocol as PgBouncer's console does, so its
//! tools and habits (`psql -p 6432 pgbouncer -c 'SHOW POOLS'`, pgbouncer_exporter) work
//! unchanged.
//!
//! - this file: who may use it, the session (greeting, message loop, errors) and the parsing
//!   of a command;
//! - [`show`]: the SHOW commands, with PgBouncer 1.25's columns and units;
//! - [`commands`]: PAUSE, RESUME, RECONNECT, KILL, KILL_CLIENT, WAIT_CLOSE, RELOAD and
//!   SHUTDOWN, each mapped onto tidepool's own mechanism (the pool's pause, generation bump
//!   and explicit server shutdown; [`Shared::reload`]; [`Shutdown::begin`]).
//!
//! A console session holds no server. Anything it does not understand is answered with an
//! ErrorResponse and ReadyForQuery, never a disconnect; only a broken message frame ends it.
//!
//! [`Shutdown::begin`]: crate::shutdown::Shutdown::begin

mod commands;
mod show;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cancel::{ClientInfo, ClientShared};
use crate::config::Config;
use crate::protocol::{self, Severity};
use crate::state::Shared;
use crate::tls::ClientStream;

/// The databases that are the console.
pub const DATABASES: [&str; 2] = ["pgbouncer", "tidepool"];

/// The PgBouncer release whose console this one follows (columns, commands, messages).
pub const PGBOUNCER_VERSION: &str = "1.25.2";

/// Postgres's wording for a terminated session (SQLSTATE 57P01).
const ADMIN_SHUTDOWN: &str = "terminating connection due to administrator command";

/// Is `database` one of the console's names?
pub fn is_console_database(database: &str) -> bool {
    DATABASES.contains(&database)
}

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `admin.console_users`: every command.
    Admin,
    /// `admin.stats_users`: SHOW only.
    Stats,
}

/// The user's console role, if any.
pub fn role_of(config: &Config, user: &str) -> Option<Role> {
    if config.admin.console_users.iter().any(|u| u == user) {
        Some(Role::Admin)
    } else if config.admin.stats_users.iter().any(|u| u == user) {
        Some(Role::Stats)
    } else {
        None
    }
}

/// An authenticated console login.
pub struct ConsoleLogin {
    pub user: String,
    pub database: String,
    pub role: Role,
}

/// A command's failure: an ErrorResponse, and the session goes on.
#[derive(Debug)]
pub(crate) struct CmdError {
    code: &'static str,
    message: String,
}

impl CmdError {
    fn new(code: &'static str, message: impl Into<String>) -> CmdError {
        CmdError {
            code,
            message: message.into(),
        }
    }

    fn syntax(query: &str) -> CmdError {
        // PgBouncer's wording (admin.c, syntax_error).
        CmdError::new(
            "42601",
            format!("invalid command '{query}', use SHOW HELP;"),
        )
    }
}

type CmdResult = Result<(), CmdError>;

/// How a session ended.
enum End {
    ClientGone,
    /// A drain began (the console holds nothing to finish: it closes at once).
    Drain,
    Killed,
    Protocol,
}

/// One console session.
pub(crate) struct Session {
    shared: Arc<Shared>,
    me: Arc<ClientShared>,
    login: ConsoleLogin,
    /// The query being run, for error messages.
    query: String,
}

/// Serve a console session until the client leaves (or a drain or KILL_CLIENT ends it).
pub async fn serve(shared: Arc<Shared>, mut sock: ClientStream, login: ConsoleLogin) {
    let info = ClientInfo {
        id: shared.cancels.next_client_id(),
        addr: sock
            .tcp()
            .and_then(|t| t.peer_addr().ok())
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
        local_port: sock
            .tcp()
            .and_then(|t| t.local_addr().ok())
            .map_or(0, |a| a.port()),
        connected: SystemTime::now(),
        tls: sock.is_tls(),
        pool: None,
        console: Some(Box::new((login.user.clone(), login.database.clone()))),
        params: None,
    };
    let me = Arc::new(ClientShared::new(info));
    // Registered like any client: SHOW CLIENTS lists it, KILL_CLIENT ends it, and a cancel
    // request with its key finds it (and does nothing: it holds no server).
    let key = shared.cancels.register(None, me.clone());
    tracing::info!(user = %login.user, database = %login.database, role = ?login.role, "console session started");
    let mut session = Session {
        shared: shared.clone(),
        me,
        login,
        query: String::new(),
    };
    let end = session.run(&mut sock, key).await;
    shared.cancels.unregister(key);
    let mut out = BytesMut::new();
    match end {
        End::Drain | End::Killed => {
            protocol::error_response(&mut out, Severity::Fatal, "57P01", ADMIN_SHUTDOWN)
        }
        End::Protocol | End::ClientGone => {}
    }
    if !out.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(1), sock.write_all(&out)).await;
    }
    if shared.shutdown.is_draining() {
        let stats = &shared.shutdown.stats;
        let counter = match end {
            End::Drain => &stats.clients_closed_at_boundary,
            _ => &stats.clients_left,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    tracing::info!("console session ended");
}

impl Session {
    async fn run(&mut self, sock: &mut ClientStream, key: crate::backend::BackendKey) -> End {
        let mut out = BytesMut::with_capacity(1024);
        protocol::auth_ok(&mut out);
        // PgBouncer's console greeting (admin.c, admin_setup), with tidepool's name.
        for (k, v) in [
            (
                "server_version",
                format!("{PGBOUNCER_VERSION}/tidepool").as_str(),
            ),
            ("client_encoding", "UTF8"),
            ("server_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "GMT"),
            ("standard_conforming_strings", "on"),
            ("is_superuser", "on"),
        ] {
            protocol::parameter_status(&mut out, k, v);
        }
        protocol::backend_key_data(&mut out, key.pid, key.secret);
        protocol::ready_for_query(&mut out, b'I');
        if sock.write_all(&out).await.is_err() {
            return End::ClientGone;
        }
        let drain = self.shared.shutdown.drain_token();
        let max = self.shared.runtime().config.listen.max_message_size;
        // After an extended-protocol message: everything up to the next Sync is skipped, as
        // Postgres does after an error.
        let mut skipping = false;
        loop {
            let msg = tokio::select! {
                biased;
                m = read_message(sock, max) => m,
                _ = drain.cancelled() => return End::Drain,
                _ = self.me.killed() => return End::Killed,
            };
            let (tag, body) = match msg {
                Ok(Some(m)) => m,
                Ok(None) => return End::ClientGone,
                Err(e) => {
                    out.clear();
                    protocol::error_response(&mut out, Severity::Fatal, "08P01", &e);
                    let _ = sock.write_all(&out).await;
                    return End::Protocol;
                }
            };
            out.clear();
            match tag {
                b'X' => return End::ClientGone,
                _ if skipping && tag != b'S' => continue,
                b'Q' => {
                    let sql = body.strip_suffix(&[0]).unwrap_or(&body);
                    let sql = String::from_utf8_lossy(sql).into_owned();
                    self.query(&sql, &mut out).await;
                    protocol::ready_for_query(&mut out, b'I');
                }
                b'S' => {
                    skipping = false;
                    protocol::ready_for_query(&mut out, b'I');
                }
                // Flush, and copy data outside a COPY: nothing to do (Postgres ignores the
                // latter too).
                b'H' | b'd' | b'c' | b'f' => continue,
                b'P' | b'B' | b'E' | b'D' | b'C' => {
                    skipping = true;
                    protocol::error_response(
                        &mut out,
                        Severity::Error,
                        "0A000",
                        "extended query protocol not supported by the console: use the simple query protocol",
                    );
                }
                other => {
                    protocol::error_response(
                        &mut out,
                        Severity::Error,
                        "0A000",
                        &format!(
                            "unsupported message type for the console: {:?}",
                            other as char
                        ),
                    );
                    protocol::ready_for_query(&mut out, b'I');
                }
            }
            if sock.write_all(&out).await.is_err() {
                return End::ClientGone;
            }
        }
    }

    /// Run one simple query; its results (or error) go to `out`, ReadyForQuery not included.
    async fn query(&mut self, sql: &str, out: &mut BytesMut) {
        tracing::debug!(user = %self.login.user, query = sql, "console query");
        self.query = sql.trim().to_string();
        let mark = out.len();
        let result = match parse(sql) {
            Parsed::Empty => {
                protocol::empty_query_response(out);
                Ok(())
            }
            Parsed::Invalid => Err(CmdError::syntax(&self.query)),
            Parsed::Set(key, value) => self.set(&key, &value, out),
            Parsed::Command(cmd, arg) => self.dispatch(&cmd, arg.as_deref(), out).await,
        };
        if let Err(e) = result {
            out.truncate(mark);
            tracing::info!(user = %self.login.user, query = %self.query, code = e.code, "console command failed: {}", e.message);
            protocol::error_response(out, Severity::Error, e.code, &e.message);
        }
    }

    async fn dispatch(&mut self, cmd: &str, arg: Option<&str>, out: &mut BytesMut) -> CmdResult {
        let admin = |s: &Session| {
            if s.login.role == Role::Admin {
                Ok(())
            } else {
                // PgBouncer's wording.
                Err(CmdError::new("42501", "admin access needed"))
            }
        };
        match cmd {
            "show" => match arg {
                Some(what) => show::show(self, what, out),
                None => Err(CmdError::syntax(&self.query)),
            },
            "pause" | "resume" | "reconnect" | "kill" | "kill_client" | "wait_close" | "reload"
            | "shutdown" | "suspend" | "enable" | "disable" => {
                admin(self)?;
                let tag = commands::run(self, cmd, arg).await?;
                protocol::command_complete(out, tag);
                Ok(())
            }
            _ => Err(CmdError::syntax(&self.query)),
        }
    }

    /// `SET key = value`: PgBouncer changes its settings at run time; tidepool's come from the
    /// config file (RELOAD). The client-side settings drivers send are acknowledged.
    fn set(&self, key: &str, _value: &str, out: &mut BytesMut) -> CmdResult {
        if show::FAKE_PARAMS
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(key))
        {
            protocol::notice_response(out, "00000", "SET ignored");
            protocol::command_complete(out, "SET");
            return Ok(());
        }
        if self.login.role != Role::Admin {
            return Err(CmdError::new("42501", "admin access needed"));
        }
        Err(CmdError::new(
            "0A000",
            format!("SET {key} is not supported: tidepool's settings come from its config file (change it and RELOAD)"),
        ))
    }
}

/// A console query, parsed as PgBouncer's regular expressions do (admin.c): `CMD [ARG] [;]` or
/// `SET key = value`. Words are case-insensitive keywords or `"quoted"`; an argument keeps
/// its case.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Empty,
    Invalid,
    /// Lower-case command, and its argument.
    Command(String, Option<String>),
    Set(String, String),
}

fn parse(sql: &str) -> Parsed {
    let mut s = sql.trim();
    if let Some(rest) = s.strip_suffix(';') {
        s = rest.trim_end();
    }
    if s.is_empty() {
        return Parsed::Empty;
    }
    let mut words = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let Some((w, tail)) = word(rest) else {
            return parse_set(s).unwrap_or(Parsed::Invalid);
        };
        words.push(w);
        rest = tail.trim_start();
    }
    match words.as_slice() {
        [cmd] => Parsed::Command(cmd.to_ascii_lowercase(), None),
        [cmd, arg] if !cmd.eq_ignore_ascii_case("set") => {
            Parsed::Command(cmd.to_ascii_lowercase(), Some(arg.clone()))
        }
        _ => parse_set(s).unwrap_or(Parsed::Invalid),
    }
}

/// One word at the start of `s`: `"quoted"` (`""` inside is a quote) or a run of characters
/// other than space, quotes, `;` and `=`.
fn word(s: &str) -> Option<(String, &str)> {
    if let Some(q) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = q.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if q[i + 1..].starts_with('"') {
                    out.push('"');
                    chars.next();
                } else {
                    return (!out.is_empty()).then(|| (out, &q[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        return None;
    }
    let end = s
        .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ';' | '='))
        .unwrap_or(s.len());
    (end > 0).then(|| (s[..end].to_string(), &s[end..]))
}

/// `SET key = value` / `SET key TO value`, the value a word or a `'string'`.
fn parse_set(s: &str) -> Option<Parsed> {
    let (set, rest) = word(s)?;
    if !set.eq_ignore_ascii_case("set") {
        return None;
    }
    let (key, rest) = word(rest.trim_start())?;
    let rest = rest.trim_start();
    let rest = if let Some(r) = rest.strip_prefix('=') {
        r
    } else {
        let (to, r) = word(rest)?;
        if !to.eq_ignore_ascii_case("to") {
            return None;
        }
        r
    }
    .trim();
    let value = if let Some(q) = rest.strip_prefix('\'') {
        let body = q.strip_suffix('\'')?;
        body.replace("''", "'")
    } else {
        let (v, tail) = word(rest)?;
        if !tail.trim().is_empty() {
            return None;
        }
        v
    };
    Some(Parsed::Set(key, value))
}

/// Read one message: `Ok(None)` when the client has gone, `Err` for a frame that cannot be
/// read past (the session must end).
async fn read_message(
    sock: &mut ClientStream,
    max: usize,
) -> Result<Option<(u8, Vec<u8>)>, String> {
    let mut head = [0u8; 5];
    if sock.read_exact(&mut head).await.is_err() {
        return Ok(None);
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len < 4 || len + 1 > max {
        return Err(format!("invalid message length {len}"));
    }
    let mut body = vec![0u8; len - 4];
    if sock.read_exact(&mut body).await.is_err() {
        return Ok(None);
    }
    Ok(Some((head[0], body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(c: &str, a: Option<&str>) -> Parsed {
        Parsed::Command(c.into(), a.map(str::to_string))
    }

    #[test]
    fn parses_like_pgbouncer() {
        assert_eq!(parse("SHOW POOLS"), cmd("show", Some("POOLS")));
        assert_eq!(parse("  show pools ;  "), cmd("show", Some("pools")));
        assert_eq!(parse("PAUSE"), cmd("pause", None));
        assert_eq!(parse("pause \"My Db\";"), cmd("pause", Some("My Db")));
        assert_eq!(parse("KILL_CLIENT 42"), cmd("kill_client", Some("42")));
        assert_eq!(parse(""), Parsed::Empty);
        assert_eq!(parse(" ; "), Parsed::Empty);
        assert_eq!(parse("SHOW POOLS extra"), Parsed::Invalid);
        assert_eq!(parse("SELECT 'x'"), Parsed::Invalid);
        assert_eq!(parse("show \"unterminated"), Parsed::Invalid);
        assert_eq!(
            parse("SET client_encoding = 'UTF8'"),
            Parsed::Set("client_encoding".into(), "UTF8".into())
        );
        assert_eq!(
            parse("set DateStyle to ISO;"),
            Parsed::Set("DateStyle".into(), "ISO".into())
        );
        assert_eq!(
            parse("SET a = 'it''s'"),
            Parsed::Set("a".into(), "it's".into())
        );
        assert_eq!(parse("SET a b"), Parsed::Invalid);
    }

    #[test]
    fn roles() {
        let mut c = Config::default();
        c.admin.console_users = vec!["ops".into()];
        c.admin.stats_users = vec!["mon".into(), "ops".into()];
        assert_eq!(role_of(&c, "ops"), Some(Role::Admin));
        assert_eq!(role_of(&c, "mon"), Some(Role::Stats));
        assert_eq!(role_of(&c, "app"), None);
        assert!(is_console_database("pgbouncer") && is_console_database("tidepool"));
        assert!(!is_console_database("PgBouncer"));
    }
}
