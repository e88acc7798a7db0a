//! The console's commands, with PgBouncer's semantics (its admin.c) mapped onto tidepool's own
//! mechanisms rather than a second code path:
//!
//! | command | tidepool |
//! |---|---|
//! | `PAUSE [db]` | the pool's pause (`pool/pause.rs`): it takes every slot, so no server is lent and every one comes back idle; waits for that, bounded by `drain.timeout` |
//! | `RESUME [db]` | ends the pause: waiting clients get servers in FIFO order |
//! | `RECONNECT [db]` | the generation bump a reload does when the target changes: idle servers are shut down now, the others as they come back |
//! | `KILL [db]` | pauses the database (as PgBouncer does), ends its clients as a forced drain ends them (query cancelled, then `57P01`) and replaces its servers |
//! | `KILL_CLIENT id` | the same for one client |
//! | `WAIT_CLOSE [db]` | waits until no server of db is marked `close_needed` |
//! | `RELOAD` | [`Shared::reload`], SIGHUP's path |
//! | `SHUTDOWN`, `SHUTDOWN WAIT_FOR_CLIENTS` | SIGTERM's drain |
//! | `SHUTDOWN WAIT_FOR_SERVERS` | SIGINT's drain |
//!
//! Every server connection these end goes through the pool's closer, i.e. the explicit
//! shutdown; none is dropped.

use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::watch;

use super::{show, CmdError, Session};
use crate::metrics::CloseReason;
use crate::pool::{PausePhase, Pool};
use crate::protocol::oid::TEXT;
use crate::shutdown::DrainKind;
use crate::state::Shared;

fn not_paused_err() -> CmdError {
    CmdError::new("55000", "already suspended/paused")
}

fn shutting_down() -> CmdError {
    CmdError::new("57P03", "pooler is shutting down")
}

/// Run an admin command; returns its CommandComplete tag.
pub(super) async fn run(
    s: &mut Session,
    cmd: &str,
    arg: Option<&str>,
) -> Result<&'static str, CmdError> {
    let shared = s.shared.clone();
    match cmd {
        "pause" => pause(&shared, arg).await.map(|_| "PAUSE"),
        "resume" => resume(&shared, arg).map(|_| "RESUME"),
        "reconnect" => {
            let pools = pools_of(&shared, arg, "reconnect")?;
            tracing::info!(database = ?arg, "RECONNECT command issued");
            for p in pools {
                p.replace_servers(CloseReason::reload);
            }
            Ok("RECONNECT")
        }
        "kill" => kill(&shared, arg).map(|_| "KILL"),
        "kill_client" => {
            let id: u64 = arg
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| CmdError::new("22023", "invalid client pointer supplied"))?;
            let client = shared
                .cancels
                .clients()
                .into_iter()
                .find(|c| c.info.id == id)
                .ok_or_else(|| CmdError::new("42704", "client not found"))?;
            tracing::info!(client = id, "KILL_CLIENT command issued");
            client.kill();
            Ok("KILL_CLIENT")
        }
        "wait_close" => wait_close(&shared, arg).await.map(|_| "WAIT_CLOSE"),
        "reload" => {
            if arg.is_some() {
                return Err(CmdError::syntax(&s.query));
            }
            tracing::info!("RELOAD command issued");
            shared.reload().map_err(|e| {
                tracing::error!("reload rejected, keeping the old configuration: {e}");
                CmdError::new("F0000", format!("RELOAD failed: {e}"))
            })?;
            Ok("RELOAD")
        }
        "shutdown" => {
            let kind = match arg.map(str::to_ascii_lowercase).as_deref() {
                None | Some("wait_for_clients") => DrainKind::Graceful,
                Some("wait_for_servers") => DrainKind::Boundary,
                Some(_) => return Err(CmdError::syntax(&s.query)),
            };
            tracing::info!(?kind, "SHUTDOWN command issued");
            // Exactly what the signal handler does (shutdown::signals::listen).
            shared.shutdown.begin(kind);
            Ok("SHUTDOWN")
        }
        _ => Err(CmdError::new(
            "0A000",
            format!(
                "{} is not supported by tidepool's console",
                cmd.to_uppercase()
            ),
        )),
    }
}

/// The pools of database `arg` (every pool without one). Refuses the console's own database
/// and unknown ones, with PgBouncer's wording.
fn pools_of(shared: &Shared, arg: Option<&str>, verb: &str) -> Result<Vec<Pool>, CmdError> {
    if let Some(db) = arg {
        check_db(shared, db, verb)?;
    }
    Ok(shared
        .pool_entries()
        .into_iter()
        .filter(|(d, _, _)| arg.is_none_or(|a| a == d))
        .map(|(_, _, p)| p)
        .collect())
}

fn check_db(shared: &Shared, db: &str, verb: &str) -> Result<(), CmdError> {
    if super::is_console_database(db) {
        return Err(CmdError::new(
            "55000",
            format!("cannot {verb} admin db: {db}"),
        ));
    }
    if shared.runtime().config.database_entry(db).is_none() {
        return Err(CmdError::new("3D000", format!("no such database: {db}")));
    }
    Ok(())
}

/// Bring every pool in line with the pause set: pause those whose database it covers (their
/// phase receivers are returned, by database), resume the others.
fn sync_pauses(shared: &Shared) -> Vec<(String, Pool, watch::Receiver<PausePhase>)> {
    let drain = shared.shutdown.drain_token();
    let mut paused = Vec::new();
    for (db, _, pool) in shared.pool_entries() {
        if shared.pauses.covers(&db) {
            let rx = pool.pause(&drain);
            paused.push((db, pool, rx));
        } else {
            pool.resume();
        }
    }
    paused
}

/// PAUSE [db]: no server is lent from now on; answers once every server of db is idle, or
/// fails (and resumes) if that takes longer than `drain.timeout`.
async fn pause(shared: &Shared, arg: Option<&str>) -> Result<(), CmdError> {
    if shared.shutdown.is_draining() {
        return Err(shutting_down());
    }
    if shared.pauses.all() {
        return Err(not_paused_err());
    }
    match arg {
        None => {
            tracing::info!("PAUSE command issued");
            shared.pauses.set_all(true);
        }
        Some(db) => {
            check_db(shared, db, "pause")?;
            tracing::info!(database = db, "PAUSE command issued");
            shared.pauses.set(db, true);
        }
    }
    let waiting: Vec<_> = sync_pauses(shared)
        .into_iter()
        .filter(|(db, _, _)| arg.is_none_or(|a| a == db))
        .collect();
    let timeout = shared.runtime().config.drain.timeout;
    let drain = shared.shutdown.drain_token();
    let all_idle = async {
        for (_, _, mut rx) in waiting.iter().map(|(d, p, r)| (d, p, r.clone())) {
            if rx.wait_for(|p| *p != PausePhase::Pausing).await.is_err() {
                return false;
            }
        }
        waiting
            .iter()
            .all(|(_, p, _)| p.pause_phase() == PausePhase::Paused)
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, all_idle) => r.ok(),
        _ = drain.cancelled() => return Err(shutting_down()),
    };
    match outcome {
        Some(true) => {
            tracing::info!(database = ?arg, "PAUSE done: every server is idle");
            Ok(())
        }
        failed => {
            let busy: usize = waiting
                .iter()
                .map(|(_, p, _)| {
                    let st = p.status();
                    st.active + p.inner.metrics.closing.get().max(0) as usize
                })
                .sum();
            match arg {
                None => {
                    shared.pauses.set_all(false);
                }
                Some(db) => {
                    shared.pauses.set(db, false);
                }
            }
            sync_pauses(shared);
            Err(match failed {
                None => CmdError::new(
                    "57014",
                    format!(
                        "PAUSE did not complete within drain.timeout ({}): {busy} server connections still in use; not paused",
                        humantime::format_duration(timeout)
                    ),
                ),
                _ => CmdError::new("55000", "PAUSE interrupted by RESUME; not paused"),
            })
        }
    }
}

/// RESUME [db], with PgBouncer's rules: without a database it ends the global pause only.
fn resume(shared: &Shared, arg: Option<&str>) -> Result<(), CmdError> {
    if shared.shutdown.is_draining() {
        return Err(shutting_down());
    }
    match arg {
        None => {
            tracing::info!("RESUME command issued");
            if !shared.pauses.set_all(false) {
                return Err(CmdError::new("55000", "pooler is not paused/suspended"));
            }
        }
        Some(db) => {
            tracing::info!(database = db, "RESUME command issued");
            if shared.runtime().config.database_entry(db).is_none() {
                return Err(CmdError::new("3D000", format!("no such database: {db}")));
            }
            if !shared.pauses.set(db, false) {
                return Err(CmdError::new(
                    "55000",
                    format!("database {db} is not paused"),
                ));
            }
        }
    }
    sync_pauses(shared);
    Ok(())
}

/// KILL [db]: as PgBouncer, the database is paused (new clients wait until RESUME db), its
/// clients are ended and its servers closed.
fn kill(shared: &Shared, arg: Option<&str>) -> Result<(), CmdError> {
    if shared.pauses.all() {
        return Err(not_paused_err());
    }
    let pools = pools_of(shared, arg, "kill")?;
    tracing::info!(database = ?arg, "KILL command issued");
    match arg {
        Some(db) => {
            shared.pauses.set(db, true);
        }
        None => {
            for (db, _, _) in shared.pool_entries() {
                shared.pauses.set(&db, true);
            }
        }
    }
    sync_pauses(shared);
    let keys: Vec<usize> = pools
        .iter()
        .map(|p| std::sync::Arc::as_ptr(&p.inner) as usize)
        .collect();
    for c in shared.cancels.clients() {
        if c.info
            .pool
            .as_ref()
            .is_some_and(|p| keys.contains(&(std::sync::Arc::as_ptr(&p.inner) as usize)))
        {
            c.kill();
        }
    }
    for p in &pools {
        p.replace_servers(CloseReason::forced);
    }
    Ok(())
}

/// WAIT_CLOSE [db]: until no server of db is marked close_needed (after RECONNECT or a
/// reload), bounded by `drain.timeout`.
async fn wait_close(shared: &Shared, arg: Option<&str>) -> Result<(), CmdError> {
    let pools = pools_of(shared, arg, "wait in")?;
    tracing::info!(database = ?arg, "WAIT_CLOSE command issued");
    let timeout = shared.runtime().config.drain.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let drain = shared.shutdown.drain_token();
    loop {
        let pending: usize = pools
            .iter()
            .map(|p| p.server_rows().iter().filter(|r| r.close_needed).count())
            .sum();
        if pending == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CmdError::new(
                "57014",
                format!(
                    "WAIT_CLOSE did not complete within drain.timeout ({}): {pending} server connections still to close",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = drain.cancelled() => return Err(shutting_down()),
        }
    }
}

/// SHOW CONFIG: PgBouncer's names for the settings tidepool has an equivalent of (what tools
/// such as pgbouncer_exporter read), then every tidepool key by its own name.
pub(super) fn config(shared: &Shared, out: &mut BytesMut) {
    let rt = shared.runtime();
    let c = &rt.config;
    let d = crate::config::Config::default();
    let secs = |x: Duration| x.as_secs().to_string();
    let list = |v: &[String]| v.join(",");
    let auth = |m: crate::config::AuthMethod| {
        serde_json::to_value(m)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let mut rows: Vec<(String, String, String, bool)> = vec![
        (
            "listen_addr".into(),
            c.listen.addr.ip().to_string(),
            d.listen.addr.ip().to_string(),
            false,
        ),
        (
            "listen_port".into(),
            c.listen.addr.port().to_string(),
            d.listen.addr.port().to_string(),
            false,
        ),
        (
            "tcp_defer_accept".into(),
            u8::from(c.listen.tcp_defer_accept).to_string(),
            u8::from(d.listen.tcp_defer_accept).to_string(),
            false,
        ),
        (
            "max_client_conn".into(),
            c.listen.max_clients.to_string(),
            d.listen.max_clients.to_string(),
            true,
        ),
        (
            "default_pool_size".into(),
            c.pool.size.to_string(),
            d.pool.size.to_string(),
            true,
        ),
        (
            "min_pool_size".into(),
            c.pool.min_idle.to_string(),
            d.pool.min_idle.to_string(),
            true,
        ),
        ("reserve_pool_size".into(), "0".into(), "0".into(), true),
        ("max_db_connections".into(), "0".into(), "0".into(), true),
        (
            "max_db_client_connections".into(),
            "0".into(),
            "0".into(),
            true,
        ),
        ("max_user_connections".into(), "0".into(), "0".into(), true),
        (
            "max_user_client_connections".into(),
            "0".into(),
            "0".into(),
            true,
        ),
        (
            "pool_mode".into(),
            c.pool.mode.as_str().into(),
            d.pool.mode.as_str().into(),
            true,
        ),
        (
            "server_lifetime".into(),
            secs(c.pool.server_lifetime),
            secs(d.pool.server_lifetime),
            true,
        ),
        (
            "server_idle_timeout".into(),
            secs(c.pool.server_idle_timeout),
            secs(d.pool.server_idle_timeout),
            true,
        ),
        (
            "server_connect_timeout".into(),
            secs(c.pool.connect_timeout),
            secs(d.pool.connect_timeout),
            true,
        ),
        (
            "query_wait_timeout".into(),
            secs(c.pool.checkout_timeout),
            secs(d.pool.checkout_timeout),
            true,
        ),
        (
            "server_reset_query".into(),
            c.pool.reset_query.clone(),
            d.pool.reset_query.clone(),
            true,
        ),
        (
            "max_prepared_statements".into(),
            c.pool.max_prepared_statements.to_string(),
            d.pool.max_prepared_statements.to_string(),
            true,
        ),
        (
            "auth_type".into(),
            auth(c.auth.method),
            auth(d.auth.method),
            true,
        ),
        (
            "admin_users".into(),
            list(&c.admin.console_users),
            String::new(),
            true,
        ),
        (
            "stats_users".into(),
            list(&c.admin.stats_users),
            String::new(),
            true,
        ),
        (
            "stats_period".into(),
            secs(crate::pool::StatsWindow::PERIOD),
            secs(crate::pool::StatsWindow::PERIOD),
            false,
        ),
    ];
    let fixed = crate::config::Config::RESTART_ONLY;
    let defaults = flatten(&d);
    for (k, val) in flatten(c) {
        let default = defaults
            .iter()
            .find(|(dk, _)| *dk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let changeable = !fixed.contains(&k.as_str());
        rows.push((k, val, default, changeable));
    }
    let mut table = show::Rows::new(
        out,
        &[
            ("key", TEXT),
            ("value", TEXT),
            ("default", TEXT),
            ("changeable", TEXT),
        ],
    );
    for (k, val, default, changeable) in rows {
        let yes = if changeable { "yes" } else { "no" };
        table.row(&[Some(k), Some(val), Some(default), Some(yes.to_string())]);
    }
    table.done();
}

/// The config's keys as `section.key` = text (lists joined with commas), without the
/// databases and users (SHOW DATABASES and SHOW USERS list those) or anything secret.
fn flatten(c: &crate::config::Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(serde_json::Value::Object(top)) = serde_json::to_value(c) else {
        return out;
    };
    for (section, v) in top {
        if section == "databases" {
            continue;
        }
        let serde_json::Value::Object(keys) = v else {
            continue;
        };
        for (k, v) in keys {
            if section == "auth" && k == "users" {
                continue;
            }
            let text = match v {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s,
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            out.push((format!("{section}.{k}"), text));
        }
    }
    out
}
