//! tidepool: a PostgreSQL connection pooler built for the sidecar container.
//!
//! Module map:
//! - [`config`]: the TOML contract, defaults, validation, `--upstream`.
//! - [`protocol`]: wire-protocol framing and the messages tidepool writes.
//! - [`auth`]: the server half of client authentication (md5, SCRAM-SHA-256).
//! - [`backend`]: server connections: login, protocol state, recovery, explicit shutdown and
//!   the `Drop` leak detector.
//! - [`pool`]: per (database, user) pools, the checkout guard, the closer task, upkeep.
//! - [`frontend`]: the client listener, startup and login, the relay, cancel requests.
//! - [`metrics`]: Prometheus metrics.
//! - [`admin`]: the HTTP endpoint (`/livez`, `/readyz`, `/metrics`, `/status`).
//! - [`shutdown`]: phases, signals and the drain.
//! - [`tls`]: rustls configs for both sides and the plain-or-TLS stream type.
//! - [`server`]: wires it all together: [`server::run`].

pub mod admin;
pub mod auth;
pub mod backend;
pub mod config;
pub mod frontend;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod tls;
