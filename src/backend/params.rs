//! Session parameters: what a client's session has, and making a server connection match it
//! (transaction mode, DESIGN.md sections 6 and 8).
//!
//! A client's view of its session (client_encoding, DateStyle, TimeZone, application_name, ...)
//! must not change when its next transaction lands on another server connection. tidepool
//! tracks what the client believes, what each server has, and before lending a server to a
//! client sends one `SET ...; RESET ...` batch for the differences (PgBouncer does the same for
//! its tracked parameters).
//!
//! Two kinds of parameters: *reported* ones (Postgres sends ParameterStatus when they change,
//! so the server's value is known exactly, normalised by Postgres) and others that a client set
//! at startup (`options=-c statement_timeout=...`), whose value on each server is what tidepool
//! applied there (`ServerConn::applied`).

use std::sync::Arc;
use std::time::Duration;

use super::{Params, ServerConn};
use crate::protocol::{quote_ident, quote_literal};

/// Parameters tracked for every client (DESIGN.md section 6).
pub const TRACKED: [&str; 7] = [
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "standard_conforming_strings",
    "application_name",
    "IntervalStyle",
    "search_path",
];

/// Startup-packet keys that are not settings.
fn is_special(key: &str) -> bool {
    matches!(key, "user" | "database" | "options" | "replication") || key.starts_with("_pq_.")
}

/// The settings a client asked for in its startup packet, `options` included.
pub fn desired_settings(startup: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut push = |k: String, v: String| {
        if let Some(slot) = out.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(&k)) {
            slot.1 = v;
        } else {
            out.push((k, v));
        }
    };
    for (k, v) in startup {
        if k == "options" {
            for (ok, ov) in crate::protocol::parse_options(v)? {
                push(ok, ov);
            }
        } else if !is_special(k) {
            push(k.clone(), v.clone());
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
        for k in TRACKED {
            if let Some(v) = base.get(k) {
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
        let tracked =
            self.values.get(name).is_some() || TRACKED.iter().any(|t| t.eq_ignore_ascii_case(name));
        if tracked && self.values.get(name) != Some(value) {
            Arc::make_mut(&mut self.values).set(name, value);
            self.fp = self.values.fingerprint();
        }
    }

    /// After a sync, take the server's normalised value for every reported parameter.
    pub fn adopt_reported(&mut self, server: &Params) {
        if self.values.update_from_would_change(server) {
            Arc::make_mut(&mut self.values).update_from(server);
            self.fp = self.values.fingerprint();
        }
    }

    /// The statement that makes `server` match this client, if any difference exists.
    pub fn diff(&self, server: &ServerConn) -> Option<String> {
        let mut sql = String::new();
        for (k, v) in self.values.iter() {
            let current = match server.params.get(k) {
                Some(reported) => Some(reported),
                None => server.applied.get(k),
            };
            if current != Some(v) {
                sql.push_str(&format!("SET {} = {};", quote_ident(k), quote_literal(v)));
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
pub async fn sync(
    server: &mut ServerConn,
    client: &mut ClientParams,
    timeout: Duration,
) -> Result<(), (String, String)> {
    match check(server, client) {
        None => Ok(()),
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

/// Run the SQL [`check`] returned and record what the server now has.
pub async fn apply(
    server: &mut ServerConn,
    client: &mut ClientParams,
    sql: &str,
    timeout: Duration,
) -> Result<(), (String, String)> {
    match server.exec(sql, timeout).await {
        Ok(o) => {
            if let Some(err) = o.error {
                return Err(err);
            }
        }
        Err(e) => return Err((e.sqlstate().to_string(), e.to_string())),
    }
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
    Ok(())
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
        let d = desired_settings(&startup).unwrap();
        assert_eq!(
            d,
            vec![
                ("application_name".to_string(), "app".to_string()),
                ("statement_timeout".to_string(), "5s".to_string())
            ]
        );
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
