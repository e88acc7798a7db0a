//! A pool's totals in the terms of PgBouncer's SHOW STATS, and the window its averages run
//! over (the console). Read from the counters the relay keeps anyway.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Pool;

impl Pool {
    /// The pool's counters as PgBouncer's SHOW STATS has them (the console). Read from the
    /// counters the relay keeps anyway; nothing is added to its path.
    pub fn stats(&self) -> PoolStats {
        let m = &self.inner.metrics;
        let xact_time = m.transaction_duration.sum_micros();
        let forwarded = m.parses_forwarded.get();
        PoolStats {
            server_assignment_count: m.checkout_wait.count(),
            xact_count: m.transactions.get(),
            query_count: m.queries.get(),
            bytes_received: m.bytes_received.get(),
            bytes_sent: m.bytes_sent.get(),
            xact_time,
            // Individual queries are not timed (two clock reads per query on the relay's
            // path): the time servers were held stands in for it, exact for autocommit
            // statements, an upper bound otherwise.
            query_time: xact_time,
            wait_time: m.checkout_wait.sum_micros(),
            client_parse_count: forwarded + m.parses_avoided.get(),
            server_parse_count: forwarded,
            bind_count: 0,
        }
    }
}

/// A pool's totals in the terms of PgBouncer's SHOW STATS (times in microseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub server_assignment_count: u64,
    pub xact_count: u64,
    pub query_count: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
    pub client_parse_count: u64,
    pub server_parse_count: u64,
    pub bind_count: u64,
}

impl PoolStats {
    pub fn add(&mut self, o: &PoolStats) {
        self.server_assignment_count += o.server_assignment_count;
        self.xact_count += o.xact_count;
        self.query_count += o.query_count;
        self.bytes_received += o.bytes_received;
        self.bytes_sent += o.bytes_sent;
        self.xact_time += o.xact_time;
        self.query_time += o.query_time;
        self.wait_time += o.wait_time;
        self.client_parse_count += o.client_parse_count;
        self.server_parse_count += o.server_parse_count;
        self.bind_count += o.bind_count;
    }

    /// PgBouncer's averages (`calc_average` in its stats.c) between `old` and `self`, taken
    /// `dur` apart: counts and bytes per second, times per transaction, query and assignment.
    pub fn average(&self, old: &PoolStats, dur: Duration) -> PoolStats {
        let us = dur.as_micros() as u64;
        if us == 0 {
            return PoolStats::default();
        }
        let d = |c: u64, o: u64| c.saturating_sub(o);
        let rate = |c: u64, o: u64| d(c, o).saturating_mul(1_000_000) / us;
        let per = |t: u64, ot: u64, n: u64| d(t, ot).checked_div(n).unwrap_or(0);
        let queries = d(self.query_count, old.query_count);
        let xacts = d(self.xact_count, old.xact_count);
        let assignments = d(self.server_assignment_count, old.server_assignment_count);
        PoolStats {
            server_assignment_count: rate(
                self.server_assignment_count,
                old.server_assignment_count,
            ),
            xact_count: rate(self.xact_count, old.xact_count),
            query_count: rate(self.query_count, old.query_count),
            bytes_received: rate(self.bytes_received, old.bytes_received),
            bytes_sent: rate(self.bytes_sent, old.bytes_sent),
            xact_time: per(self.xact_time, old.xact_time, xacts),
            query_time: per(self.query_time, old.query_time, queries),
            wait_time: per(self.wait_time, old.wait_time, assignments),
            client_parse_count: rate(self.client_parse_count, old.client_parse_count),
            server_parse_count: rate(self.server_parse_count, old.server_parse_count),
            bind_count: rate(self.bind_count, old.bind_count),
        }
    }
}

/// The window SHOW STATS averages over, as PgBouncer's `stats_period` (60 s): two snapshots
/// of every pool's totals, refreshed when the newer one is a period old; the averages run
/// from the older one to now (between one and two periods, when asked at least once a
/// period). Refreshed when asked, so nothing runs in the background for it.
pub struct StatsWindow {
    older: (Instant, HashMap<String, PoolStats>),
    newer: (Instant, HashMap<String, PoolStats>),
}

impl StatsWindow {
    pub const PERIOD: Duration = Duration::from_secs(60);

    pub fn new(start: Instant) -> StatsWindow {
        StatsWindow {
            older: (start, Default::default()),
            newer: (start, Default::default()),
        }
    }

    /// Refresh if due, then return where the averages start: the older snapshot's time and
    /// each pool's totals then (a pool missing from it was created since: zero).
    pub fn baseline(
        &mut self,
        now: Instant,
        current: &HashMap<String, PoolStats>,
    ) -> (Instant, &HashMap<String, PoolStats>) {
        if now.saturating_duration_since(self.newer.0) >= Self::PERIOD {
            self.older = std::mem::replace(&mut self.newer, (now, current.clone()));
        }
        (self.older.0, &self.older.1)
    }
}
