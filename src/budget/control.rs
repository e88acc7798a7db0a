//! The control task: one control connection, the slots taken on it, and the loop that reads
//! `pg_locks`, asks [`policy::decide`] and applies the decision.
//!
//! The loop wakes when a client starts waiting for a slot, when a slot comes back, when the
//! settings change, and on a tick: every 100 ms while anyone wants a slot, else every
//! second. Each pass costs one round trip (the `pg_locks` read) plus one per change.
//!
//! Losing the control connection (an error, `pg_terminate_backend`, a restart): the locks
//! are gone with the session, so no new server connection is opened; the ones open are
//! kept. The task reconnects (backoff 100 ms doubling to 2 s) and takes slots again for the
//! connections it kept, before anything else; those it cannot get back are shed at their
//! transaction boundaries (the cap is what it holds). A reconnect that fails sets the cap to
//! zero: every server connection then closes at its next transaction boundary, and idle ones
//! at once, until the control connection is back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::policy::{self, Input, Member};
use super::{lock, Budget, BudgetSettings};
use crate::backend::client::{connect_own_client, end, OwnClient};
use crate::metrics::{CloseReason, ServerCloseCounters};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Decision interval while someone (here or elsewhere) wants a slot.
const FAST: Duration = Duration::from_millis(100);
/// Decision interval otherwise (members gauge, giving back what is spare).
const SLOW: Duration = Duration::from_secs(1);

/// Why a control connection was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The drain is over.
    Stopped,
    /// A reload changed the name or the control server.
    Reconfigured,
    /// An error: the connection (and with it every slot) is gone.
    Lost,
}

pub(super) async fn run(budget: Arc<Budget>, tasks: TaskTracker) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if budget.stop.is_cancelled() {
            break;
        }
        let settings = budget.settings();
        let counters = lock(&budget.counters).clone();
        match ControlConn::open(&settings, counters, &tasks).await {
            Ok(mut conn) => {
                backoff = BACKOFF_MIN;
                tracing::info!(budget = %settings.name, pid = conn.pid, "budget control connection opened");
                let end = serve(&budget, &mut conn, &settings).await;
                budget.disconnected();
                let reason = match end {
                    End::Stopped => CloseReason::drain,
                    End::Reconfigured => CloseReason::reload,
                    End::Lost => CloseReason::error,
                };
                if end == End::Lost {
                    tracing::warn!(budget = %settings.name, "budget control connection lost: no new server connection until it is back");
                }
                conn.close(reason, settings.server_close_timeout).await;
                match end {
                    End::Stopped => break,
                    End::Reconfigured => continue,
                    End::Lost => {}
                }
            }
            Err(e) => {
                tracing::warn!(budget = %settings.name, error = %e, "budget control connection failed: server connections close at their transaction boundaries");
                budget.shrink_all();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = budget.stop.cancelled() => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    budget.gauges.held.set(0);
    budget.gauges.wanted.set(0);
    budget.gauges.members.set(0);
}

/// One control connection's life: decide, apply, wait; until it is lost, reconfigured or
/// the drain ends.
async fn serve(budget: &Arc<Budget>, conn: &mut ControlConn, settings: &BudgetSettings) -> End {
    let key = settings.key();
    let want_key = key | 1;
    let timeout = settings.connect_timeout;
    let mut wanting = false;
    let mut stop_deadline: Option<Instant> = None;
    budget.connected();
    loop {
        let current = budget.settings();
        if current.connection_differs(settings) {
            return End::Reconfigured;
        }
        let max = current.max;
        let Ok(snap) = within(timeout, conn.snapshot(key, want_key)).await else {
            return End::Lost;
        };
        budget.control_ok.store(true, Ordering::Relaxed);
        let others: Vec<Member> = snap
            .iter()
            .filter(|m| m.pid != conn.pid)
            .map(|m| m.member)
            .collect();
        let (mine, used, waiting) = {
            let s = lock(&budget.state);
            (s.held.clone(), s.used, s.waiting)
        };
        let stopping = budget.stop.is_cancelled();
        let mut d = policy::decide(&Input {
            max,
            held: mine.len(),
            used,
            waiting,
            others: &others,
        });
        if stopping {
            // The drain: give back each slot as its connection closes, take nothing.
            d.take = 0;
            d.want = false;
            d.release = mine.len().saturating_sub(used);
        }
        if d.release > 0 {
            // Numbers beyond a lowered max first, then the highest.
            let give: Vec<i32> = mine.iter().rev().take(d.release).copied().collect();
            if within(timeout, conn.unlock(key, &give)).await.is_err() {
                return End::Lost;
            }
            budget.remove_held(&give);
        }
        if d.take > 0 {
            let taken: std::collections::HashSet<i32> =
                snap.iter().flat_map(|m| m.slots.iter().copied()).collect();
            let start = (conn.pid.unsigned_abs() as usize).wrapping_mul(7919) % max.max(1);
            let candidates: Vec<i32> = (0..max)
                .map(|i| ((start + i) % max) as i32)
                .filter(|n| !taken.contains(n) && !mine.contains(n))
                .take(d.take)
                .collect();
            if !candidates.is_empty() {
                let Ok(got) = within(timeout, conn.try_lock(key, &candidates)).await else {
                    return End::Lost;
                };
                budget.add_held(&got);
            }
        }
        if d.want != wanting {
            if within(timeout, conn.set_want(want_key, d.want))
                .await
                .is_err()
            {
                return End::Lost;
            }
            wanting = d.want;
        }
        let (held, demand) = {
            let s = lock(&budget.state);
            (s.held.len(), s.used + s.waiting)
        };
        budget.set_cap(d.cap.min(held));
        budget.gauges.held.set(held as i64);
        budget.gauges.wanted.set(demand.saturating_sub(held) as i64);
        budget
            .gauges
            .members
            .set(policy::members(&others, held, wanting) as i64);
        if stopping {
            let until = *stop_deadline
                .get_or_insert_with(|| Instant::now() + settings.server_close_timeout);
            if (held == 0 && used == 0) || Instant::now() >= until {
                return End::Stopped;
            }
        }
        let busy = wanting || waiting > 0 || others.iter().any(|o| o.wanting);
        let interval = if busy || stopping { FAST } else { SLOW };
        tokio::select! {
            _ = budget.wake.notified() => {}
            _ = tokio::time::sleep(interval) => {}
            _ = budget.stop.cancelled(), if !stopping => {}
            _ = conn.lost.cancelled() => return End::Lost,
        }
    }
}

async fn within<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, ()> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "budget control query failed");
            Err(())
        }
        Err(_) => {
            tracing::debug!("budget control query timed out");
            Err(())
        }
    }
}

impl Budget {
    fn connected(&self) {
        lock(&self.state).connected = true;
        self.granted.notify_waiters();
    }

    /// The control connection is gone: its locks with it.
    fn disconnected(&self) {
        let mut s = lock(&self.state);
        s.connected = false;
        s.held.clear();
        self.control_ok.store(false, Ordering::Relaxed);
        self.gauges.held.set(0);
    }

    /// No control connection could be opened: shrink to nothing at transaction boundaries.
    fn shrink_all(&self) {
        self.set_cap(0);
    }

    fn set_cap(&self, cap: usize) {
        let (lowered, grant) = {
            let mut s = lock(&self.state);
            let lowered = cap < s.cap;
            s.cap = cap;
            self.cap.store(cap, Ordering::Relaxed);
            (
                lowered && s.used > cap,
                s.waiting > 0 && s.used < cap.min(s.held.len()),
            )
        };
        if lowered {
            self.shed_idle.notify_one();
        }
        if grant {
            self.granted.notify_waiters();
        }
    }

    fn add_held(&self, slots: &[i32]) {
        if slots.is_empty() {
            return;
        }
        lock(&self.state).held.extend(slots.iter().copied());
        self.granted.notify_waiters();
    }

    fn remove_held(&self, slots: &[i32]) {
        let mut s = lock(&self.state);
        for n in slots {
            s.held.remove(n);
        }
    }
}

/// A member as `pg_locks` shows it.
struct Seen {
    pid: i32,
    member: Member,
    /// Its slot numbers.
    slots: Vec<i32>,
}

/// The control connection: a tokio-postgres client and the task that drives its socket.
///
/// # Drop behaviour
///
/// Detects only: dropped without [`close`](Self::close) it counts a leak in
/// `tidepool_server_connections_leaked_total` and logs a warning (the client's drop still
/// makes the connection task send Terminate, but nobody waits for it). It never awaits.
struct ControlConn {
    /// The client and its connection task; None once closed.
    own: Option<OwnClient>,
    /// Cancelled when the connection task ends (the server closed, an I/O error).
    lost: CancellationToken,
    /// The control connection's backend pid: the wanting lock's second key.
    pid: i32,
    counters: ServerCloseCounters,
}

impl ControlConn {
    async fn open(
        s: &BudgetSettings,
        counters: ServerCloseCounters,
        tasks: &TaskTracker,
    ) -> Result<ControlConn, String> {
        let lost = CancellationToken::new();
        let done = lost.clone();
        // The same connect path as the pools and the auth lookup (hosts, TLS as sslmode
        // says, target_session_attrs): backend::client.
        let own = connect_own_client(
            &s.target,
            &s.application_name(),
            None,
            s.connect_timeout,
            move || done.cancel(),
            tasks,
        )
        .await?;
        counters.opened.inc();
        let mut c = ControlConn {
            own: Some(own),
            lost,
            pid: 0,
            counters,
        };
        match within(s.connect_timeout, c.rows("SELECT pg_backend_pid()")).await {
            Ok(rows) => {
                c.pid = rows
                    .first()
                    .and_then(|r| r.first())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                Ok(c)
            }
            Err(()) => {
                c.close(CloseReason::error, s.server_close_timeout).await;
                Err("no answer to the first statement".into())
            }
        }
    }

    fn client(&self) -> &Client {
        &self
            .own
            .as_ref()
            .expect("the client lives until close")
            .client
    }

    /// One simple-protocol statement (one round trip); its rows as text.
    async fn rows(&self, sql: &str) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
        let msgs = self.client().simple_query(sql).await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("").to_string())
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    /// Every member of the budget: who holds which slots, who wants. Only this database's
    /// locks count (advisory locks are per database).
    async fn snapshot(&self, key: i32, want_key: i32) -> Result<Vec<Seen>, tokio_postgres::Error> {
        let sql = format!(
            "SELECT pid, count(*) FILTER (WHERE classid = {key}::oid), \
             bool_or(classid = {want_key}::oid), \
             coalesce(string_agg(objid::text, ',') FILTER (WHERE classid = {key}::oid), '') \
             FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
             AND classid IN ({key}::oid, {want_key}::oid) \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             GROUP BY pid"
        );
        let rows = self.rows(&sql).await?;
        Ok(rows
            .into_iter()
            .map(|r| Seen {
                pid: r[0].parse().unwrap_or(0),
                member: Member {
                    held: r[1].parse().unwrap_or(0),
                    wanting: r[2] == "t",
                },
                slots: r[3].split(',').filter_map(|n| n.parse().ok()).collect(),
            })
            .collect())
    }

    /// Try each slot; the ones taken. Session-level, so they stay until unlocked or the
    /// session ends (docs, "Advisory Locks").
    async fn try_lock(&self, key: i32, slots: &[i32]) -> Result<Vec<i32>, tokio_postgres::Error> {
        let sql = format!(
            "SELECT n FROM unnest('{{{}}}'::int4[]) AS n WHERE pg_try_advisory_lock({key}, n)",
            join(slots)
        );
        let rows = self.rows(&sql).await?;
        Ok(rows.iter().filter_map(|r| r[0].parse().ok()).collect())
    }

    async fn unlock(&self, key: i32, slots: &[i32]) -> Result<(), tokio_postgres::Error> {
        let sql = format!(
            "SELECT n FROM unnest('{{{}}}'::int4[]) AS n WHERE NOT pg_advisory_unlock({key}, n)",
            join(slots)
        );
        let rows = self.rows(&sql).await?;
        if !rows.is_empty() {
            tracing::warn!(?rows, "budget slots were not held when given back");
        }
        Ok(())
    }

    /// Take or drop the wanting mark, `(key1 | 1, own pid)`.
    async fn set_want(&self, want_key: i32, on: bool) -> Result<(), tokio_postgres::Error> {
        let f = if on {
            "pg_try_advisory_lock"
        } else {
            "pg_advisory_unlock"
        };
        self.rows(&format!("SELECT {f}({want_key}, pg_backend_pid())"))
            .await
            .map(drop)
    }

    /// The explicit shutdown: give every lock back (unless the connection is already lost),
    /// drop the client so its task sends Terminate and closes the socket, and wait for that
    /// task, bounded by `timeout`. Counted like a pool connection's close.
    async fn close(mut self, reason: CloseReason, timeout: Duration) {
        let clean = match self.own.take() {
            Some(own) => {
                if reason != CloseReason::error {
                    let _ = tokio::time::timeout(
                        timeout,
                        own.client.simple_query("SELECT pg_advisory_unlock_all()"),
                    )
                    .await;
                }
                end(own, timeout).await
            }
            None => false,
        };
        self.counters.count_close(reason, clean);
        tracing::debug!(
            pid = self.pid,
            ?reason,
            clean,
            "budget control connection closed"
        );
    }
}

impl Drop for ControlConn {
    fn drop(&mut self) {
        if self.own.is_none() {
            return;
        }
        self.counters.leaked.inc();
        tracing::warn!(
            pid = self.pid,
            "budget control connection dropped without shutdown (leak)"
        );
    }
}

fn join(slots: &[i32]) -> String {
    slots
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
