//! Prometheus metrics (DESIGN.md section 5), kept in one registry.
//!
//! Hot-path counting is lock-free: each pool resolves its own labelled handles once, when it is
//! created ([`PoolMetrics`]), and from then on only touches atomics. Histograms are our own
//! [`AtomicHistogram`] because prometheus-client's histogram takes a lock per observation.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

mod histogram;
mod labels;

pub use self::histogram::AtomicHistogram;
pub use self::labels::*;

fn new_latency_histogram() -> AtomicHistogram {
    AtomicHistogram::latency()
}

/// A family member's handle. The read guard `get_or_create` returns must be dropped before the
/// next `get_or_create` on the same family (which may take the write lock), so never hold two.
fn handle<S, M, C>(family: &Family<S, M, C>, labels: &S) -> M
where
    S: Clone + std::hash::Hash + Eq,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    family.get_or_create(labels).clone()
}

/// Every metric family of the process.
pub struct Metrics {
    pub registry: Registry,
    pub leaked: Family<PoolLabel, Counter>,
    pub server_conns: Family<PoolStateLabel, Gauge>,
    pub opened: Family<PoolLabel, Counter>,
    pub closed: Family<PoolReasonLabel, Counter>,
    pub clients: Family<ClientStateLabel, Gauge>,
    pub rejected: Family<RejectLabel, Counter>,
    pub auth_lookups: Family<LookupLabel, Counter>,
    pub checkout_wait: Family<PoolLabel, AtomicHistogram, fn() -> AtomicHistogram>,
    pub checkout_timeouts: Family<PoolLabel, Counter>,
    pub transactions: Family<PoolLabel, Counter>,
    pub transaction_duration: Family<PoolLabel, AtomicHistogram, fn() -> AtomicHistogram>,
    pub queries: Family<PoolLabel, Counter>,
    pub bytes_received: Family<PoolLabel, Counter>,
    pub bytes_sent: Family<PoolLabel, Counter>,
    pub shutdowns: Family<PoolOutcomeLabel, Counter>,
    pub parses: Family<PoolParseLabel, Counter>,
    pub pinned: Family<PoolLabel, Gauge>,
    pub session_state: Family<SessionStateLabel, Counter>,
    pub timeouts: Family<PoolTimeoutLabel, Counter>,
    pub server_checks: Family<PoolCheckLabel, Counter>,
    pub paused: Family<PoolLabel, Gauge>,
    pub draining: Gauge,
    pub client_gauges: ClientGauges,
    /// `tidepool_budget_slots{state}` and `tidepool_budget_members` (DESIGN.md section 12).
    pub budget: BudgetGauges,
}

/// The fleet budget's gauges, resolved once.
#[derive(Clone, Debug)]
pub struct BudgetGauges {
    pub held: Gauge,
    pub wanted: Gauge,
    /// Instances sharing the budget (holding or wanting a slot), as last seen.
    pub members: Gauge,
}

/// Client-state gauges, resolved once.
#[derive(Clone)]
pub struct ClientGauges {
    pub active: Gauge,
    pub idle: Gauge,
    pub waiting: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let leaked = Family::<PoolLabel, Counter>::default();
        registry.register(
            "tidepool_server_connections_leaked",
            "Server connections dropped without an explicit shutdown (should stay 0)",
            leaked.clone(),
        );
        let server_conns = Family::<PoolStateLabel, Gauge>::default();
        registry.register(
            "tidepool_server_connections",
            "Server connections by state",
            server_conns.clone(),
        );
        let opened = Family::<PoolLabel, Counter>::default();
        registry.register(
            "tidepool_server_connections_opened",
            "Server connections opened",
            opened.clone(),
        );
        let closed = Family::<PoolReasonLabel, Counter>::default();
        registry.register(
            "tidepool_server_connections_closed",
            "Server connections closed, by reason",
            closed.clone(),
        );
        let clients = Family::<ClientStateLabel, Gauge>::default();
        registry.register(
            "tidepool_client_connections",
            "Client connections by state",
            clients.clone(),
        );
        let rejected = Family::<RejectLabel, Counter>::default();
        registry.register(
            "tidepool_client_connections_rejected",
            "Client connections rejected, by reason",
            rejected.clone(),
        );
        let auth_lookups = Family::<LookupLabel, Counter>::default();
        registry.register(
            "tidepool_auth_lookups",
            "Users looked up in Postgres (auth.lookup_user), by outcome",
            auth_lookups.clone(),
        );
        for outcome in [
            LookupOutcome::found,
            LookupOutcome::not_found,
            LookupOutcome::error,
            LookupOutcome::cached,
        ] {
            drop(auth_lookups.get_or_create(&LookupLabel { outcome }));
        }
        let checkout_wait =
            Family::<PoolLabel, AtomicHistogram, fn() -> AtomicHistogram>::new_with_constructor(
                new_latency_histogram,
            );
        registry.register(
            "tidepool_checkout_wait_seconds",
            "Time a client waited for a server connection",
            checkout_wait.clone(),
        );
        let checkout_timeouts = Family::<PoolLabel, Counter>::default();
        registry.register(
            "tidepool_checkout_timeouts",
            "Checkouts that ended in checkout_timeout",
            checkout_timeouts.clone(),
        );
        let transactions = Family::<PoolLabel, Counter>::default();
        registry.register(
            "tidepool_transactions",
            "Transactions (server checkouts in transaction mode, sessions in session mode)",
            transactions.clone(),
        );
        let transaction_duration =
            Family::<PoolLabel, AtomicHistogram, fn() -> AtomicHistogram>::new_with_constructor(
                new_latency_histogram,
            );
        registry.register(
            "tidepool_transaction_duration_seconds",
            "How long a client held a server connection",
            transaction_duration.clone(),
        );
        let queries = Family::<PoolLabel, Counter>::default();
        registry.register(
            "tidepool_queries",
            "Requests forwarded (simple queries, extended-protocol syncs, function calls)",
            queries.clone(),
        );
        let bytes_received = Family::<PoolLabel, Counter>::default();
        registry.register(
            "tidepool_client_bytes_received",
            "Bytes received from clients and forwarded to servers",
            bytes_received.clone(),
        );
        let bytes_sent = Family::<PoolLabel, Counter>::default();
        registry.register(
            "tidepool_client_bytes_sent",
            "Bytes received from servers and sent to clients",
            bytes_sent.clone(),
        );
        let shutdowns = Family::<PoolOutcomeLabel, Counter>::default();
        registry.register(
            "tidepool_server_shutdowns",
            "Server connection closes by outcome: clean (Terminate sent, server closed) or hard",
            shutdowns.clone(),
        );
        let parses = Family::<PoolParseLabel, Counter>::default();
        registry.register(
            "tidepool_prepared_parses",
            "Transaction mode: Parse messages sent to servers (forwarded) or answered from the statement cache (avoided)",
            parses.clone(),
        );
        let pinned = Family::<PoolLabel, Gauge>::default();
        registry.register(
            "tidepool_pinned_clients",
            "Transaction mode: clients pinned to their server by session state (temporary tables, PREPARE, LISTEN, advisory locks, WITH HOLD cursors)",
            pinned.clone(),
        );
        let session_state = Family::<SessionStateLabel, Counter>::default();
        registry.register(
            "tidepool_session_state",
            "Transaction mode: session state handled, by kind and action (carried, cleaned, pinned, rejected)",
            session_state.clone(),
        );
        let timeouts = Family::<PoolTimeoutLabel, Counter>::default();
        registry.register(
            "tidepool_timeouts",
            "Clients ended or requests cancelled by query_timeout, idle_transaction_timeout or client_idle_timeout",
            timeouts.clone(),
        );
        let server_checks = Family::<PoolCheckLabel, Counter>::default();
        registry.register(
            "tidepool_server_checks",
            "Idle server connections checked with a round trip before they were lent (server_check_delay)",
            server_checks.clone(),
        );
        let paused = Family::<PoolLabel, Gauge>::default();
        registry.register(
            "tidepool_paused",
            "1 while the pool is paused by the console's PAUSE (or KILL): it lends no server until RESUME",
            paused.clone(),
        );
        let draining = Gauge::default();
        registry.register(
            "tidepool_draining",
            "1 while the process drains",
            draining.clone(),
        );
        let client_gauges = ClientGauges {
            active: handle(
                &clients,
                &ClientStateLabel {
                    state: ClientState::active,
                },
            ),
            idle: handle(
                &clients,
                &ClientStateLabel {
                    state: ClientState::idle,
                },
            ),
            waiting: handle(
                &clients,
                &ClientStateLabel {
                    state: ClientState::waiting,
                },
            ),
        };
        let budget_slots = Family::<BudgetSlotLabel, Gauge>::default();
        registry.register(
            "tidepool_budget_slots",
            "Fleet budget: slots (advisory locks) this instance holds, and slots its demand needs beyond them",
            budget_slots.clone(),
        );
        let members = Gauge::default();
        registry.register(
            "tidepool_budget_members",
            "Fleet budget: instances sharing the budget (holding or wanting a slot), as last seen",
            members.clone(),
        );
        let budget = BudgetGauges {
            held: handle(
                &budget_slots,
                &BudgetSlotLabel {
                    state: BudgetSlotState::held,
                },
            ),
            wanted: handle(
                &budget_slots,
                &BudgetSlotLabel {
                    state: BudgetSlotState::wanted,
                },
            ),
            members,
        };
        for reason in [
            RejectReason::max_clients,
            RejectReason::auth,
            RejectReason::draining,
            RejectReason::protocol,
        ] {
            let _ = handle(&rejected, &RejectLabel { reason });
        }
        Metrics {
            registry,
            leaked,
            server_conns,
            opened,
            closed,
            clients,
            rejected,
            auth_lookups,
            checkout_wait,
            checkout_timeouts,
            transactions,
            transaction_duration,
            queries,
            bytes_received,
            bytes_sent,
            shutdowns,
            parses,
            pinned,
            session_state,
            timeouts,
            server_checks,
            paused,
            draining,
            client_gauges,
            budget,
        }
    }

    /// Resolve the labelled handles of one pool (registers its series at zero).
    pub fn pool(&self, pool: &str) -> PoolMetrics {
        let l = PoolLabel {
            pool: pool.to_string(),
        };
        let st = |state| PoolStateLabel {
            pool: pool.to_string(),
            state,
        };
        // The series every server connection's close counts in, pool or not.
        let close = self.server_close_counters(pool);
        PoolMetrics {
            leaked: close.leaked,
            idle: handle(&self.server_conns, &st(ServerState::idle)),
            active: handle(&self.server_conns, &st(ServerState::active)),
            closing: handle(&self.server_conns, &st(ServerState::closing)),
            opened: close.opened,
            closed: close.closed,
            checkout_wait: handle(&self.checkout_wait, &l),
            checkout_timeouts: handle(&self.checkout_timeouts, &l),
            transactions: handle(&self.transactions, &l),
            transaction_duration: handle(&self.transaction_duration, &l),
            queries: handle(&self.queries, &l),
            bytes_received: handle(&self.bytes_received, &l),
            bytes_sent: handle(&self.bytes_sent, &l),
            shutdown_clean: close.shutdown_clean,
            shutdown_hard: close.shutdown_hard,
            parses_forwarded: handle(
                &self.parses,
                &PoolParseLabel {
                    pool: pool.to_string(),
                    outcome: ParseOutcome::forwarded,
                },
            ),
            parses_avoided: handle(
                &self.parses,
                &PoolParseLabel {
                    pool: pool.to_string(),
                    outcome: ParseOutcome::avoided,
                },
            ),
            pinned: handle(&self.pinned, &l),
            timeouts: [
                TimeoutKind::query,
                TimeoutKind::idle_transaction,
                TimeoutKind::client_idle,
            ]
            .map(|kind| {
                handle(
                    &self.timeouts,
                    &PoolTimeoutLabel {
                        pool: pool.to_string(),
                        kind,
                    },
                )
            }),
            server_checks: [CheckOutcome::ok, CheckOutcome::failed].map(|outcome| {
                handle(
                    &self.server_checks,
                    &PoolCheckLabel {
                        pool: pool.to_string(),
                        outcome,
                    },
                )
            }),
            paused: handle(&self.paused, &l),
            session_state: SessionStateCounters {
                pool: l.pool.clone(),
                family: self.session_state.clone(),
            },
        }
    }

    /// The leak counter of pool `pool` (for a server connection outside the pools, such as
    /// the readiness check's).
    pub fn leaked_counter(&self, pool: &str) -> Counter {
        handle(
            &self.leaked,
            &PoolLabel {
                pool: pool.to_string(),
            },
        )
    }

    pub fn auth_lookup(&self, outcome: LookupOutcome) {
        handle(&self.auth_lookups, &LookupLabel { outcome }).inc();
    }

    /// The close counters of a server connection, counted under `pool`: a pool's own
    /// ([`pool`](Self::pool)) and those outside the pools (the auth lookup's, the budget's
    /// control connection).
    pub fn server_close_counters(&self, pool: &str) -> ServerCloseCounters {
        ServerCloseCounters {
            leaked: self.leaked_counter(pool),
            opened: handle(
                &self.opened,
                &PoolLabel {
                    pool: pool.to_string(),
                },
            ),
            closed: CloseReason::ALL.map(|reason| {
                handle(
                    &self.closed,
                    &PoolReasonLabel {
                        pool: pool.to_string(),
                        reason,
                    },
                )
            }),
            shutdown_clean: handle(
                &self.shutdowns,
                &PoolOutcomeLabel {
                    pool: pool.to_string(),
                    outcome: ShutdownOutcomeLabel::clean,
                },
            ),
            shutdown_hard: handle(
                &self.shutdowns,
                &PoolOutcomeLabel {
                    pool: pool.to_string(),
                    outcome: ShutdownOutcomeLabel::hard,
                },
            ),
        }
    }

    pub fn reject(&self, reason: RejectReason) {
        handle(&self.rejected, &RejectLabel { reason }).inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// The classic Prometheus text format (0.0.4), for scrapers and tools that do not ask for
    /// OpenMetrics (promtool, older agents). prometheus-client writes OpenMetrics, where a
    /// counter family `x` has samples `x_total`; in the classic format the family is named
    /// `x_total` itself, and there is no `# EOF`.
    pub fn encode_prometheus_text(&self) -> String {
        to_prometheus_text(&self.encode())
    }

    /// Sum of the leak counter over every pool.
    pub fn leaked_total(&self) -> u64 {
        self.total("tidepool_server_connections_leaked_total")
    }

    /// Sum of every sample of one series name (the drain report, tests).
    pub fn total(&self, name: &str) -> u64 {
        sum_series(&self.encode(), name)
    }

    /// Server shutdowns so far: (clean, hard).
    pub fn shutdown_totals(&self) -> (u64, u64) {
        let text = self.encode();
        let mut clean = 0;
        let mut hard = 0;
        for l in text
            .lines()
            .filter(|l| l.starts_with("tidepool_server_shutdowns_total{"))
        {
            let v = l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
            if l.contains("outcome=\"clean\"") {
                clean += v;
            } else {
                hard += v;
            }
        }
        (clean, hard)
    }
}

/// Convert an OpenMetrics exposition to the classic Prometheus text format.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, t)| *t == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        if let Some((kind, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(kind);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Sum every sample of `name` in a text exposition (tests and the drain report use it).
pub fn sum_series(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// One pool's labelled metric handles. Cloning shares the underlying atomics.
#[derive(Clone, Debug)]
pub struct PoolMetrics {
    pub leaked: Counter,
    pub idle: Gauge,
    pub active: Gauge,
    pub closing: Gauge,
    pub opened: Counter,
    pub closed: [Counter; 8],
    pub checkout_wait: AtomicHistogram,
    pub checkout_timeouts: Counter,
    pub transactions: Counter,
    pub transaction_duration: AtomicHistogram,
    pub queries: Counter,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub shutdown_clean: Counter,
    pub shutdown_hard: Counter,
    pub parses_forwarded: Counter,
    pub parses_avoided: Counter,
    pub pinned: Gauge,
    /// 1 while the console keeps the pool paused.
    pub paused: Gauge,
    pub session_state: SessionStateCounters,
    /// `tidepool_timeouts_total`, indexed by `TimeoutKind`.
    pub timeouts: [Counter; 3],
    /// `tidepool_server_checks_total`, indexed by `CheckOutcome`.
    pub server_checks: [Counter; 2],
}

/// The opened, closed, shutdown-outcome and leak counters of one server connection outside the
/// pools.
#[derive(Clone, Debug)]
pub struct ServerCloseCounters {
    pub leaked: Counter,
    pub opened: Counter,
    pub closed: [Counter; 8],
    pub shutdown_clean: Counter,
    pub shutdown_hard: Counter,
}

impl ServerCloseCounters {
    /// One explicit shutdown ended: why, and whether cleanly.
    pub fn count_close(&self, reason: CloseReason, clean: bool) {
        self.closed[reason as usize].inc();
        if clean {
            self.shutdown_clean.inc();
        } else {
            self.shutdown_hard.inc();
        }
    }
}

/// One pool's `tidepool_session_state_total` series, created on first use (a cold path: a
/// client set something or was pinned).
#[derive(Clone, Debug)]
pub struct SessionStateCounters {
    pool: String,
    family: Family<SessionStateLabel, Counter>,
}

impl SessionStateCounters {
    pub fn count(&self, kind: &'static str, action: SessionStateAction) {
        handle(
            &self.family,
            &SessionStateLabel {
                pool: self.pool.clone(),
                kind,
                action,
            },
        )
        .inc();
    }
}

impl PoolMetrics {
    pub fn closed(&self, reason: CloseReason) -> &Counter {
        &self.closed[reason as usize]
    }

    pub fn timeout(&self, kind: TimeoutKind) -> &Counter {
        &self.timeouts[kind as usize]
    }

    pub fn server_check(&self, outcome: CheckOutcome) -> &Counter {
        &self.server_checks[outcome as usize]
    }

    /// Handles not registered anywhere (unit tests).
    pub fn detached() -> Self {
        Metrics::new().pool("test")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pool_series_exist_at_zero_and_count() {
        let m = Metrics::new();
        let p = m.pool("app/app");
        p.leaked.inc();
        p.closed(CloseReason::lifetime).inc();
        p.transaction_duration.observe(Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains("tidepool_server_connections_leaked_total{pool=\"app/app\"} 1"),
            "{text}"
        );
        assert!(text.contains("reason=\"lifetime\"} 1"), "{text}");
        assert!(text.contains("reason=\"drain\"} 0"), "{text}");
        assert!(
            text.contains("tidepool_transaction_duration_seconds_count{pool=\"app/app\"} 1"),
            "{text}"
        );
        assert!(text.contains("state=\"closing\""), "{text}");
        assert_eq!(m.leaked_total(), 1);
    }

    #[test]
    fn histogram_buckets_are_cumulative_in_text() {
        let m = Metrics::new();
        let p = m.pool("p");
        p.checkout_wait.observe(Duration::from_micros(50));
        p.checkout_wait.observe(Duration::from_secs(100));
        let text = m.encode();
        assert!(
            text.contains("tidepool_checkout_wait_seconds_bucket{le=\"0.0001\",pool=\"p\"} 1")
                || text
                    .contains("tidepool_checkout_wait_seconds_bucket{pool=\"p\",le=\"0.0001\"} 1"),
            "{text}"
        );
        assert!(text.contains("le=\"+Inf\",pool=\"p\"} 2"), "{text}");
    }
}
