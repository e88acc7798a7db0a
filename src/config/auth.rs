//! The `[auth]` table: how clients authenticate, the users listed in the file, and the lookup
//! of users that are not listed (DESIGN.md section 11).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// PgBouncer's default `auth_query` since 1.21 (pg_authid, so a password past its
/// `VALID UNTIL` reads as NULL and a role without LOGIN is not found): see PgBouncer's
/// documentation of `auth_query`. It runs with `search_path` pinned to `pg_catalog`.
pub const DEFAULT_LOOKUP_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END FROM pg_authid WHERE rolname = $1 AND rolcanlogin";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AuthMethod {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub method: AuthMethod,
    pub users: Vec<UserConfig>,
    /// Users not listed in `users` are looked up in Postgres, over a connection of
    /// tidepool's own as this user (whose password must be listed in `users`).
    pub lookup_user: Option<String>,
    /// Returns (name, secret) for the user name in `$1`.
    pub lookup_query: String,
    /// The database the lookup runs in (as clients name it); default: the client's.
    pub lookup_dbname: Option<String>,
    /// How long a secret found is reused.
    #[serde(with = "humantime_serde")]
    pub lookup_cache: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            method: AuthMethod::ScramSha256,
            users: Vec::new(),
            lookup_user: None,
            lookup_query: DEFAULT_LOOKUP_QUERY.to_string(),
            lookup_dbname: None,
            lookup_cache: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    #[serde(skip_serializing)]
    pub password: String,
}

impl fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl AuthConfig {
    /// The lookup user's password, if a lookup is configured (validation made sure it is a
    /// plaintext password: tidepool logs in with it).
    pub fn lookup_password(&self) -> Option<&str> {
        let name = self.lookup_user.as_deref()?;
        self.users
            .iter()
            .find(|u| u.name == name)
            .map(|u| u.password.as_str())
    }

    /// `database_exists` tells whether a database name resolves to a `[databases]` entry.
    pub(super) fn validate(
        &self,
        database_exists: impl Fn(&str) -> bool,
    ) -> Result<(), ConfigError> {
        let err = |key: &str, what: &str| Err(ConfigError(format!("key `{key}`: {what}")));
        let mut names = std::collections::HashSet::new();
        for u in &self.users {
            if u.name.is_empty() {
                return err("auth.users.name", "must not be empty");
            }
            if !names.insert(u.name.as_str()) {
                return err("auth.users", &format!("user `{}` is listed twice", u.name));
            }
        }
        if self.method != AuthMethod::Trust && self.users.is_empty() {
            return err(
                "auth.users",
                "auth.method requires passwords: list the users (or set auth.lookup_user and list \
                 it), or set auth.method = \"trust\"",
            );
        }
        let Some(lookup_user) = self.lookup_user.as_deref() else {
            return Ok(());
        };
        if self.method == AuthMethod::Trust {
            return err(
                "auth.lookup_user",
                "a lookup needs auth.method md5 or scram-sha-256 (with trust no password is \
                 checked, and none could be passed through to the server)",
            );
        }
        let Some(password) = self.lookup_password() else {
            return err(
                "auth.lookup_user",
                &format!(
                    "user `{lookup_user}` must be listed in auth.users with its password \
                     (tidepool logs in to Postgres as it)"
                ),
            );
        };
        if crate::auth::Secret::parse(password)
            .ok()
            .and_then(|s| s.plaintext().map(|_| ()))
            .is_none()
        {
            return err(
                &format!("auth.users (user \"{lookup_user}\")"),
                "the lookup user's password must be in plaintext (tidepool logs in with it; a \
                 hash or verifier cannot answer the server)",
            );
        }
        if self.lookup_query.trim().is_empty() {
            return err("auth.lookup_query", "must not be empty");
        }
        if let Some(db) = self.lookup_dbname.as_deref() {
            if !database_exists(db) {
                return err(
                    "auth.lookup_dbname",
                    &format!("database \"{db}\" is not configured in [databases]"),
                );
            }
        }
        if self.lookup_cache.is_zero() {
            return err("auth.lookup_cache", "must be greater than 0");
        }
        Ok(())
    }
}
