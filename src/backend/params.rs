//! Session parameters: what a client's session has, and making a server connection match it
//! (transaction mode, DESIGN.md sections 6 and 8).
//!
//! A client's view of its session must not change when its next transaction lands on another
//! server connection, and nothing it sets may reach another client. tidepool tracks what the
//! client's session has, what each server has, and before lending a server to a client sends
//! one batch of `set_config(...)` and `RESET ...` for the differences, so the server both
//! takes the client's values and loses whatever the previous client left.
//!
//! Two kinds of settings:
//! - *reported* ones: every parameter the server sends ParameterStatus for, whatever the
//!   server version (Postgres 15: application_name, client_encoding, DateStyle,
//!   default_transaction_read_only, IntervalStyle, session_authorization,
//!   standard_conforming_strings, TimeZone, ...). Their value on a server is known exactly. A
//!   client carries all of them (the pool's defaults plus what it set), except the
//!   [`READ_ONLY`] ones, which describe the server and are never set.
//! - *session-level settings* of anything else (`SET statement_timeout`, `SET ROLE`, custom
//!   `app.tenant`, startup `options=-c ...`): after a transaction that may have set one
//!   (`sql::scan`), tidepool reads the server's session-level settings back
//!   ([`reread_sql`], [`ClientParams::capture`]); the client carries them, and the server
//!   records them in `ServerConn::applied`, so that the next client's sync resets them.
//!
//! Values are applied with `set_config(name, value, false)`, which takes a setting's text
//! exactly as `current_setting` gives it (a `SET search_path = '...'` would make a list one
//! quoted element).

use std::sync::Arc;
use std::time::Duration;

use super::{Params, ServerConn};
use crate::protocol::{quote_ident, quote_literal};

/// Reported parameters that describe the server and cannot be set: never SET or RESET, never
/// carried (Postgres 15 docs, 55.2.7 "ParameterStatus", and 20.15 "Preset Options").
pub const READ_ONLY: [&str; 5] = [
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "in_hot_standby",
    "is_superuser",
];

/// Is `name` a reported parameter no client can set?
pub fn is_read_only(name: &str) -> bool {
    READ_ONLY.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// Set by `SET SESSION AUTHORIZATION`, which also resets `role`: applied first.
const SESSION_AUTHORIZATION: &str = "session_authorization";

/// Startup-packet keys that are not settings.
fn is_special(key: &str) -> bool {
    matches!(key, "user" | "database" | "options" | "replication") || key.starts_with("_pq_.")
}

/// The settings a client asked for in its startup packet, `options` included.
pub fn desired_settings(
    mut startup: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, String> {
    // Consumes the startup list: its strings move, they are not copied (a login's hot path).
    // Usually there is no `options` and no name twice (in any case): then the list itself is
    // the answer, with the special names filtered out in place (no allocation).
    let plain = startup.iter().enumerate().all(|(i, (k, _))| {
        k != "options" && !startup[..i].iter().any(|(n, _)| n.eq_ignore_ascii_case(k))
    });
    if plain {
        startup.retain(|(k, _)| !is_special(k));
        return Ok(startup);
    }
    let mut out: Vec<(String, String)> = Vec::with_capacity(startup.len());
    let mut push = |k: String, v: String| {
        if let Some(slot) = out.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(&k)) {
            slot.1 = v;
        } else {
            out.push((k, v));
        }
    };
    for (k, v) in startup {
        if k == "options" {
            for (ok, ov) in crate::protocol::parse_options(&v)? {
                push(ok, ov);
            }
        } else if !is_special(&k) {
            push(k, v);
        }
    }
    Ok(out)
}

/// What one client believes its session parameters are.
#[derive(Debug, Clone, Default)]
pub struct ClientParams {
    /// Shared, copy-on-write: the clients of one pool usually have identical values, and
    /// [`intern`](Self::intern) lets them share one copy (an idle client then costs a
    /// pointer here, not a dozen strings).
    values: Arc<Params>,
    /// `values.fingerprint()`, kept current: compared with a server's `synced_fp` to skip the
    /// comparison on the hot path (clients of one application usually share all values).
    fp: u64,
}

impl ClientParams {
    /// Initial values: a fresh server's value for each tracked parameter, overlaid with what
    /// the client asked for. `server` stands in for the baseline when none is known.
    pub fn initial(
        baseline: Option<&Params>,
        server: &Params,
        desired: Vec<(String, String)>,
    ) -> Self {
        let base = baseline.unwrap_or(server);
        let mut values = Params::default();
        for (k, v) in base.iter() {
            if !is_read_only(k) {
                values.set(k, v);
            }
        }
        for (k, v) in desired {
            values.set(&k, &v);
        }
        let fp = values.fingerprint();
        ClientParams {
            values: Arc::new(values),
            fp,
        }
    }

    /// Share the values with other clients that have the same ones: `shared` returns the
    /// copy to keep (see `Pool::intern_params`).
    pub fn share_with(&mut self, shared: impl FnOnce(Arc<Params>) -> Arc<Params>) {
        self.values = shared(self.values.clone());
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name)
    }

    /// A reported parameter changed on the client's server (the client ran SET): it is now
    /// part of the client's session.
    pub fn observe(&mut self, name: &str, value: &str) {
        if self.values.get(name) != Some(value) && !is_read_only(name) {
            Arc::make_mut(&mut self.values).set(name, value);
            self.fp = self.values.fingerprint();
        }
    }

    /// Names of custom settings (`app.tenant`) the client has: they are not in `pg_settings`,
    /// so [`reread_sql`] asks for them by name.
    pub fn custom_names(&self) -> impl Iterator<Item = &str> {
        self.values
            .iter()
            .map(|(k, _)| k)
            .filter(|k| k.contains('.'))
    }

    /// After a transaction that may have changed session-level settings: `rows` are the
    /// answer to [`reread_sql`] on the client's `server`. The client now carries exactly those
    /// settings (its reported parameters stay as ParameterStatus told), and the server records
    /// them as applied. Returns how many settings the client carries beyond the reported ones.
    pub fn capture(&mut self, server: &mut ServerConn, rows: &[Vec<Option<String>>]) -> usize {
        let mut applied = Params::default();
        for row in rows {
            let (Some(Some(name)), Some(Some(value))) = (row.first(), row.get(1)) else {
                continue;
            };
            // Reported ones are followed through ParameterStatus; `role` is `none` and a custom
            // setting empty when not set (current_setting's answers after RESET).
            let unset =
                (name == "role" && value == "none") || (name.contains('.') && value.is_empty());
            if unset || server.params.get(name).is_some() || is_read_only(name) {
                continue;
            }
            applied.set(name, value);
        }
        let mut values = Params::default();
        for (k, v) in self.values.iter() {
            if server.params.get(k).is_some() {
                values.set(k, v);
            }
        }
        for (k, v) in applied.iter() {
            values.set(k, v);
        }
        let carried = applied.iter().count();
        self.fp = values.fingerprint();
        self.values = Arc::new(values);
        server.applied = applied;
        server.synced_fp = Some(self.fp);
        carried
    }

    /// After a sync, take the server's normalised value for every reported parameter.
    pub fn adopt_reported(&mut self, server: &Params) {
        if self.values.update_from_would_change(server) {
            Arc::make_mut(&mut self.values).update_from(server);
            self.fp = self.values.fingerprint();
        }
    }

    /// The statements that make `server` match this client, if any difference exists: a
    /// `set_config` for each value that differs (`session_authorization` first, as it resets
    /// `role`), and a `RESET` for each setting another client left that this one lacks.
    pub fn diff(&self, server: &ServerConn) -> Option<String> {
        let mut sql = String::new();
        let auth = self
            .values
            .get(SESSION_AUTHORIZATION)
            .map(|v| (SESSION_AUTHORIZATION, v));
        let rest = self
            .values
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case(SESSION_AUTHORIZATION));
        for (k, v) in auth.into_iter().chain(rest) {
            let current = match server.params.get(k) {
                Some(reported) => Some(reported),
                None => server.applied.get(k),
            };
            if current != Some(v) {
                sql.push_str(&format!(
                    "SELECT pg_catalog.set_config({}, {}, false);",
                    quote_literal(k),
                    quote_literal(v)
                ));
            }
        }
        for (k, _) in server.applied.iter() {
            if self.values.get(k).is_none() {
                sql.push_str(&format!("RESET {};", quote_ident(k)));
            }
        }
        (!sql.is_empty()).then_some(sql)
    }
}

/// The query that reads a server's session-level settings back (see
/// [`ClientParams::capture`]): every `pg_settings` entry set in this session, `role` (which
/// `pg_settings` does not list), and the custom settings named in `custom` (neither does it).
pub fn reread_sql<'a>(custom: impl Iterator<Item = &'a str>) -> String {
    let mut names = String::new();
    for n in custom {
        if !names.is_empty() {
            names.push(',');
        }
        names.push_str(&quote_literal(n));
    }
    format!(
        "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
         WHERE source = 'session' \
         UNION ALL SELECT 'role', pg_catalog.current_setting('role') \
         UNION ALL SELECT n, pg_catalog.current_setting(n, true) \
         FROM pg_catalog.unnest(ARRAY[{names}]::pg_catalog.text[]) AS n"
    )
}

/// One ParameterStatus per parameter the server reports, with the client's value where it
/// has its own.
pub fn parameter_status(reported: &Params, client: &ClientParams) -> bytes::Bytes {
    let mut out = bytes::BytesMut::with_capacity(512);
    for (k, v) in reported.iter() {
        crate::protocol::parameter_status(&mut out, k, client.get(k).unwrap_or(v));
    }
    out.freeze()
}

/// Make `server`'s session match `client`. On a server error returns Postgres's SQLSTATE and
/// message, for the client.
/// Returns the server's notices (e.g. a too long `application_name` truncated), for a client
/// that logs in on this server.
pub async fn sync(
    server: &mut ServerConn,
    client: &mut ClientParams,
    timeout: Duration,
) -> Result<Vec<bytes::Bytes>, (String, String)> {
    match check(server, client) {
        None => Ok(Vec::new()),
        Some(sql) => apply(server, client, &sql, timeout).await,
    }
}

/// The synchronous half of [`sync`]: `None` when the server already has the client's values
/// (the common case, decided by fingerprint), else the SQL that [`apply`] must run.
pub fn check(server: &mut ServerConn, client: &ClientParams) -> Option<String> {
    if server.synced_fp == Some(client.fp) {
        return None;
    }
    let Some(sql) = client.diff(server) else {
        server.synced_fp = Some(client.fp);
        return None;
    };
    Some(sql)
}

/// Run the SQL [`check`] returned and record what the server now has. Returns the server's
/// notices.
pub async fn apply(
    server: &mut ServerConn,
    client: &mut ClientParams,
    sql: &str,
    timeout: Duration,
) -> Result<Vec<bytes::Bytes>, (String, String)> {
    let notices = match server.exec(sql, timeout).await {
        Ok(o) => {
            if let Some(err) = o.error {
                return Err(err);
            }
            o.notices
        }
        Err(e) => return Err((e.sqlstate().to_string(), e.to_string())),
    };
    // Record non-reported values we applied; drop ones we reset.
    let mut applied = Params::default();
    for (k, v) in client.values.iter() {
        if server.params.get(k).is_none() {
            applied.set(k, v);
        }
    }
    server.applied = applied;
    // Take Postgres's normalised spelling of what was set (e.g. `utc` → `UTC`).
    client.adopt_reported(&server.params);
    server.synced_fp = Some(client.fp);
    Ok(notices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        let mut p = Params::default();
        for (k, v) in pairs {
            p.set(k, v);
        }
        p
    }

    #[test]
    fn desired_merges_options() {
        let startup = vec![
            ("user".to_string(), "u".to_string()),
            ("application_name".to_string(), "app".to_string()),
            ("options".to_string(), "-c statement_timeout=5s".to_string()),
        ];
        let d = desired_settings(startup.clone()).unwrap();
        assert_eq!(
            d,
            vec![
                ("application_name".to_string(), "app".to_string()),
                ("statement_timeout".to_string(), "5s".to_string())
            ]
        );
    }

    #[test]
    fn desired_filters_special_names_and_merges_repeats() {
        let s = |k: &str, v: &str| (k.to_string(), v.to_string());
        // The usual packet: filtered in place.
        let d = desired_settings(vec![
            s("user", ""),
            s("database", ""),
            s("application_name", "pgbench"),
            s("_pq_.x", "1"),
            s("client_encoding", "UTF8"),
        ])
        .unwrap();
        assert_eq!(
            d,
            vec![
                s("application_name", "pgbench"),
                s("client_encoding", "UTF8")
            ]
        );
        // A name given twice, in any case: the last value wins, in the first one's place.
        let d = desired_settings(vec![
            s("DateStyle", "ISO"),
            s("user", "u"),
            s("datestyle", "German"),
        ])
        .unwrap();
        assert_eq!(d, vec![s("DateStyle", "German")]);
    }

    #[test]
    fn initial_overlays_baseline() {
        let base = params(&[
            ("TimeZone", "UTC"),
            ("application_name", ""),
            ("server_version", "15"),
        ]);
        let c = ClientParams::initial(
            Some(&base),
            &Params::default(),
            vec![("TimeZone".into(), "Europe/Paris".into())],
        );
        assert_eq!(c.get("timezone"), Some("Europe/Paris"));
        assert_eq!(c.get("application_name"), Some(""));
        assert_eq!(c.get("server_version"), None);
    }
}
