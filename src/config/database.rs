//! `[databases.<name>]`: one upstream database, its hosts (libpq's multiple hosts and
//! ports, `target_session_attrs`) and its overrides of `[pool]`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{PoolMode, SessionStatePolicy};

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(default = "default_host")]
    pub host: String,
    /// One port for every host, or one per host (`"5432,5433"`), as libpq's `port`.
    #[serde(default = "default_port")]
    pub port: Ports,
    /// Server-side database name; default: the table's key (for `"*"`: the client's).
    pub dbname: Option<String>,
    /// Server-side user; default: the client's own.
    pub user: Option<String>,
    #[serde(skip_serializing)]
    pub password: Option<String>,
    pub size: Option<usize>,
    pub mode: Option<PoolMode>,
    pub min_idle: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub checkout_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub server_lifetime: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub server_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    pub reset_query: Option<String>,
    pub session_state: Option<SessionStatePolicy>,
    #[serde(default, with = "humantime_serde")]
    pub idle_transaction_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub query_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub client_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub server_check_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub server_login_retry: Option<Duration>,
    /// With several hosts, which server to use (libpq's `target_session_attrs`).
    #[serde(default)]
    pub target_session_attrs: TargetSessionAttrs,
    /// TLS towards this server: disable | prefer | require | verify-ca | verify-full.
    #[serde(default)]
    pub sslmode: crate::tls::SslMode,
    /// CA certificates (PEM) for verify-ca and verify-full.
    pub sslrootcert: Option<PathBuf>,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("size", &self.size)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn default_host() -> String {
    "127.0.0.1".to_string()
}
fn default_port() -> Ports {
    Ports(vec![5432])
}

/// `port`: an integer, or a string of comma-separated ports (libpq's syntax).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Ports(pub Vec<u16>);

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl From<Ports> for String {
    fn from(p: Ports) -> String {
        p.0.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
    }
}

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Ports, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(u16),
            List(String),
        }
        match Raw::deserialize(d)? {
            Raw::One(p) => Ok(Ports(vec![p])),
            Raw::List(s) => s
                .split(',')
                .map(|p| p.trim().parse::<u16>())
                .collect::<Result<Vec<_>, _>>()
                .map(Ports)
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "invalid port list \"{s}\": comma-separated numbers expected"
                    ))
                }),
        }
    }
}

/// `target_session_attrs`: which servers of a database's hosts may be used (libpq's
/// meanings; DESIGN.md section 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSessionAttrs {
    /// The first host that accepts a login.
    #[default]
    Any,
    /// A server that accepts writes: not in hot standby, `default_transaction_read_only` off.
    ReadWrite,
    /// A server that is not in hot standby.
    Primary,
}

impl TargetSessionAttrs {
    /// Whether a server in this state may be used (libpq's rule): `read-write` wants one
    /// neither in hot standby nor read-only by default, `primary` one not in hot standby.
    pub fn admits(self, standby: bool, read_only: bool) -> bool {
        match self {
            TargetSessionAttrs::Any => true,
            TargetSessionAttrs::Primary => !standby,
            TargetSessionAttrs::ReadWrite => !standby && !read_only,
        }
    }
}

impl DatabaseConfig {
    /// The servers to try, in order: `host` split at commas, each with its port (one port for
    /// all, or one each).
    pub fn hosts(&self) -> Result<Vec<(String, u16)>, String> {
        let hosts: Vec<&str> = self.host.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty()) {
            return Err(format!("empty host in \"{}\"", self.host));
        }
        let ports = &self.port.0;
        let port_of = |i: usize| match ports.len() {
            1 => Some(ports[0]),
            n if n == hosts.len() => Some(ports[i]),
            _ => None,
        };
        hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                port_of(i).map(|p| (h.to_string(), p)).ok_or_else(|| {
                    format!(
                        "{} ports for {} hosts: give one port, or one per host",
                        ports.len(),
                        hosts.len()
                    )
                })
            })
            .collect()
    }
}
