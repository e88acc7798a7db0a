//! Shared helpers for tidepool's integration tests.
//!
//! Each integration test binary pulls this in with `mod common;` and uses the
//! subset it needs (hence the `dead_code` allowances in the submodules).
//!
//! - [`pg`]: throwaway PostgreSQL clusters (wrapping `scripts/pgcluster`).
//! - [`tp`]: tidepool under test (in-process, or the real binary).
//! - [`raw`]: a raw wire-protocol client.
//! - [`prom`]: a real Prometheus server scraping an in-process tidepool.
//! - [`venv`]: Python virtualenvs with packages from PyPI (drivers, pgbouncer_exporter).

pub mod pg;
pub mod prom;
pub mod raw;
pub mod tp;
pub mod venv;
