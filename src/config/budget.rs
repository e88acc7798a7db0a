//! `[budget]`: one server-connection budget shared by every tidepool with the same `name`
//! (DESIGN.md section 12; the mechanism is `crate::budget`).

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};

/// The optional `[budget]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Every tidepool with this name shares the budget (the advisory-lock key is derived
    /// from it).
    pub name: String,
    /// The most server connections the instances sharing `name` may hold together.
    pub max_server_connections: usize,
    /// The `[databases]` entry whose server holds the control connection (and so the
    /// advisory locks: they are per database, so every instance must name the same one).
    pub control_database: String,
}

/// Slot numbers are the second key of `pg_try_advisory_lock(int4, int4)`.
const MAX_SLOTS: usize = 100_000;

impl BudgetConfig {
    /// The checks `Config::validate` runs when `[budget]` is present.
    pub(super) fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let err = |key: &str, what: &str| Err(ConfigError(format!("key `budget.{key}`: {what}")));
        if self.name.trim().is_empty() {
            return err("name", "must not be empty");
        }
        if self.max_server_connections == 0 || self.max_server_connections > MAX_SLOTS {
            return err(
                "max_server_connections",
                &format!("must be between 1 and {MAX_SLOTS}"),
            );
        }
        let Some(entry) = config.databases.get(&self.control_database) else {
            return err(
                "control_database",
                &format!("\"{}\" is not a [databases] entry", self.control_database),
            );
        };
        if self.control_database == "*" && entry.dbname.is_none() {
            return err(
                "control_database",
                "the \"*\" entry names no database: set its dbname, or name another entry",
            );
        }
        if entry.user.is_none() {
            return err(
                "control_database",
                &format!(
                    "databases.{}.user must be set: the control connection has no client whose user it could borrow",
                    self.control_database
                ),
            );
        }
        Ok(())
    }
}
