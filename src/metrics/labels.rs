//! Label sets and label values of the metric families.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};

/// Why a server connection was closed (`reason` label of `tidepool_server_connections_closed_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CloseReason {
    drain,
    idle_timeout,
    lifetime,
    error,
    reset_failed,
    reload,
    forced,
    /// Closed at its transaction boundary (or while idle) to give a fleet budget's slot back
    /// to an instance below its fair share (DESIGN.md section 12).
    budget,
}

impl CloseReason {
    pub const ALL: [CloseReason; 8] = [
        CloseReason::drain,
        CloseReason::idle_timeout,
        CloseReason::lifetime,
        CloseReason::error,
        CloseReason::reset_failed,
        CloseReason::reload,
        CloseReason::forced,
        CloseReason::budget,
    ];
}

/// `state` label of `tidepool_server_connections`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ServerState {
    idle,
    active,
    closing,
}

/// `state` label of `tidepool_client_connections`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ClientState {
    active,
    idle,
    waiting,
}

/// `reason` label of `tidepool_client_connections_rejected_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RejectReason {
    max_clients,
    auth,
    draining,
    protocol,
}

/// `outcome` label of `tidepool_auth_lookups_total` (DESIGN.md section 11).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LookupOutcome {
    /// Looked up in Postgres: a secret was found.
    found,
    /// Looked up: no such user, or one that cannot log in (NOLOGIN, expired, no password).
    not_found,
    /// The lookup itself failed (connection, permission, query): the login was refused.
    error,
    /// A secret found earlier was reused (`auth.lookup_cache`).
    cached,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabel {
    pub outcome: LookupOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolReasonLabel {
    pub pool: String,
    pub reason: CloseReason,
}

/// `outcome` label of `tidepool_server_shutdowns_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ShutdownOutcomeLabel {
    clean,
    hard,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolOutcomeLabel {
    pub pool: String,
    pub outcome: ShutdownOutcomeLabel,
}

/// `outcome` label of `tidepool_prepared_parses_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ParseOutcome {
    forwarded,
    avoided,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolParseLabel {
    pub pool: String,
    pub outcome: ParseOutcome,
}

/// `kind` label of `tidepool_timeouts_total` (DESIGN.md section 9).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TimeoutKind {
    query,
    idle_transaction,
    client_idle,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolTimeoutLabel {
    pub pool: String,
    pub kind: TimeoutKind,
}

/// `outcome` label of `tidepool_server_checks_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CheckOutcome {
    ok,
    failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolCheckLabel {
    pub pool: String,
    pub outcome: CheckOutcome,
}

/// `action` label of `tidepool_session_state_total` (DESIGN.md section 8).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SessionStateAction {
    /// A client's session-level setting was captured, to follow it to other servers.
    carried,
    /// A server was returned to its defaults before another client used it.
    cleaned,
    /// A client was pinned to its server.
    pinned,
    /// A statement was refused (`session_state = "reject"`).
    rejected,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionStateLabel {
    pub pool: String,
    pub kind: &'static str,
    pub action: SessionStateAction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabel {
    pub pool: String,
    pub state: ServerState,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientStateLabel {
    pub state: ClientState,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabel {
    pub reason: RejectReason,
}

/// `state` label of `tidepool_budget_slots`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum BudgetSlotState {
    /// Advisory locks this instance holds.
    held,
    /// Slots its demand needs beyond those it holds.
    wanted,
}

/// Labels of `tidepool_budget_slots`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetSlotLabel {
    pub state: BudgetSlotState,
}
