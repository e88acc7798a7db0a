//! tidepool: a PostgreSQL connection pooler built for the sidecar container.
//!
//! Module map, in layers: a module imports only from its own layer's neighbours below it and
//! from lower layers, never from above (`tests/layers.rs` keeps it so; the README's
//! architecture section has the table).
//!
//! 0. foundations, importing no other tidepool module but each other:
//!    - [`config`]: the TOML contract, defaults, validation, `--upstream`.
//!    - [`protocol`]: wire-protocol framing and the messages tidepool writes.
//!    - [`metrics`]: Prometheus metrics.
//!    - [`tls`]: rustls configs for both sides and the plain-or-TLS stream type.
//!    - [`auth`]: the server half of client authentication (md5, SCRAM-SHA-256), and the
//!      client half of pass-through (SCRAM keys, md5 hashes).
//!    - [`shutdown`]: phases, drain tokens and signals.
//!    - [`sql`]: a cheap look at SQL text for statements that leave session state behind.
//!    - [`unix_socket`]: the client listener on a Unix-domain socket.
//! 1. [`backend`]: server connections: login, protocol state, recovery, explicit shutdown and
//!    the `Drop` leak detector; session parameters and the statements a server has prepared.
//! 2. [`pool`]: per (database, user) pools, the checkout guard, the closer task, upkeep, the
//!    cached greeting; [`cancel`]: tidepool's cancel keys mapped to the server a client holds;
//!    [`lookup`]: users looked up in Postgres (`auth.lookup_user`), over a connection of its own;
//!    [`budget`]: the fleet-wide server-connection budget (the control connection, its
//!    advisory-lock slots and the fair-share rule), which the pool consults.
//! 3. [`state`]: what every task shares: config snapshot, pools, metrics, phase; reload.
//! 4. [`frontend`]: startup, login and the relay; [`admin`]: the HTTP endpoint (`/livez`,
//!    `/readyz`, `/metrics`, `/status`); [`console`]: the PgBouncer-compatible admin console
//!    (the virtual databases `pgbouncer` and `tidepool`), which `frontend` hands a login to.
//! 5. [`server`]: the wiring: listeners, accept loop, upkeep, readiness, the drain sequence.
//! 6. the binary, `main.rs`.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod budget;
pub mod cancel;
pub mod config;
pub mod console;
pub mod frontend;
pub mod lookup;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod sql;
pub mod state;
pub mod tls;
pub mod unix_socket;
