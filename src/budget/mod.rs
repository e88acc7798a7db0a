//! The fleet budget (DESIGN.md section 12): every tidepool with the same `[budget] name`
//! holds at most `max_server_connections` server connections together, coordinated through
//! Postgres itself.
//!
//! A *slot* is a session-level advisory lock, `pg_try_advisory_lock(key1, n)` with `n` in
//! `0..max_server_connections`, taken on this instance's *control connection* (one
//! tokio-postgres connection, in no pool, `application_name = 'tidepool budget NAME'`). An
//! instance opens a server connection only while it holds a slot for it ([`Slot`], taken
//! before the connect), and gives the slot back only after that connection has really closed
//! (the slot is dropped after the explicit shutdown). Postgres releases every session-level
//! advisory lock when the session ends, so the slots of an instance that dies go with its
//! control connection: nothing to expire, no heartbeat ("Session-level advisory locks ... are
//! held until explicitly released or the session ends", PostgreSQL 15 docs, section 13.3.5,
//! Advisory Locks).
//!
//! Keys: `key1` is derived from the name: the first four bytes of its SHA-256, big-endian,
//! with the lowest bit cleared and the sign bit cleared (a positive `int4`, so `pg_locks`
//! shows it unchanged in `classid`); slots are `(key1, n)`. The *wanting* mark is
//! `(key1 | 1, pid of the control connection)`, one lock per wanting instance. `pg_locks`
//! shows two-`int4` advisory keys with the first in `classid`, the second in `objid` and
//! `objsubid = 2` (docs, section 54.12, `pg_locks`); advisory locks are per database, which
//! is why every instance must use the same `control_database`.
//!
//! The decisions (how many to take, give back, keep) are [`policy::decide`], a pure
//! function that `tests/budget_sim.rs` also drives. The control task is `control.rs`.
//!
//! Cost when no `[budget]` is configured: pools hold `None` and test it on the connect path
//! and on return; nothing else.

mod control;
pub mod policy;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::ServerTarget;
use crate::config::BudgetConfig;
use crate::metrics::{BudgetGauges, ServerCloseCounters};

/// What the control task needs from the config; replaced on reload.
#[derive(Clone, Debug)]
pub struct BudgetSettings {
    pub name: String,
    pub max: usize,
    /// Where the control connection goes (the `control_database` entry).
    pub target: ServerTarget,
    /// The pool label its closes are counted under: `control_database/user`.
    pub label: String,
    pub connect_timeout: std::time::Duration,
    pub server_close_timeout: std::time::Duration,
}

impl BudgetSettings {
    pub fn new(
        cfg: &BudgetConfig,
        target: ServerTarget,
        connect_timeout: std::time::Duration,
        server_close_timeout: std::time::Duration,
    ) -> BudgetSettings {
        BudgetSettings {
            name: cfg.name.clone(),
            max: cfg.max_server_connections,
            label: format!("{}/{}", cfg.control_database, target.user),
            target,
            connect_timeout,
            server_close_timeout,
        }
    }

    /// `key1` of the slots (see the module docs); the wanting mark uses `key1 | 1`.
    pub fn key(&self) -> i32 {
        key_for(&self.name)
    }

    /// The control connection's `application_name`.
    pub fn application_name(&self) -> String {
        format!("tidepool budget {}", self.name)
    }

    /// Changing these needs a new control connection (new keys or another server).
    fn connection_differs(&self, other: &BudgetSettings) -> bool {
        self.name != other.name || self.target != other.target || self.label != other.label
    }
}

/// `key1` for a budget name: the first four bytes of SHA-256(name), big-endian, with the
/// sign bit and the lowest bit cleared.
pub fn key_for(name: &str) -> i32 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    let k = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0x7fff_fffe;
    k as i32
}

/// The local side of the budget, shared by the pools and the control task.
pub struct Budget {
    state: Mutex<State>,
    settings: Mutex<Arc<BudgetSettings>>,
    /// Wakes the control task: a client waits, a slot came back, the settings changed.
    wake: Notify,
    /// Wakes clients waiting for a slot: one may be free.
    granted: Notify,
    /// Wakes upkeep: idle connections above the cap should close now.
    shed_idle: Notify,
    /// Mirrors of `State::used` and `State::cap` for the lock-free check on return.
    used: AtomicUsize,
    cap: AtomicUsize,
    /// Connections claimed for shedding whose slot has not come back yet.
    shed_inflight: AtomicUsize,
    /// The control connection is up and answered its last round trip (readiness).
    control_ok: AtomicBool,
    /// Ends the control task (the last step of the drain).
    stop: CancellationToken,
    gauges: BudgetGauges,
    counters: Mutex<ServerCloseCounters>,
}

#[derive(Debug)]
struct State {
    /// Slot numbers this instance holds.
    held: BTreeSet<i32>,
    /// Slots backing a server connection (open, opening or closing).
    used: usize,
    /// Clients waiting for a slot.
    waiting: usize,
    /// The most connections to keep (see `policy::Decision::cap`).
    cap: usize,
    /// The control connection is up: slots can be granted.
    connected: bool,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("name", &self.settings().name)
            .finish()
    }
}

/// A snapshot for `/status` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BudgetStatus {
    pub held: usize,
    pub used: usize,
    pub waiting: usize,
    pub connected: bool,
}

impl Budget {
    pub fn new(
        settings: BudgetSettings,
        gauges: BudgetGauges,
        counters: ServerCloseCounters,
    ) -> Arc<Budget> {
        Arc::new(Budget {
            state: Mutex::new(State {
                held: BTreeSet::new(),
                used: 0,
                waiting: 0,
                cap: usize::MAX,
                connected: false,
            }),
            settings: Mutex::new(Arc::new(settings)),
            wake: Notify::new(),
            granted: Notify::new(),
            shed_idle: Notify::new(),
            used: AtomicUsize::new(0),
            cap: AtomicUsize::new(usize::MAX),
            shed_inflight: AtomicUsize::new(0),
            control_ok: AtomicBool::new(false),
            stop: CancellationToken::new(),
            gauges,
            counters: Mutex::new(counters),
        })
    }

    /// Start the control task on `tracker`. It runs until [`stop`](Self::stop).
    pub fn start(self: &Arc<Self>, tracker: &TaskTracker) {
        tracker.spawn(control::run(self.clone(), tracker.clone()));
    }

    /// The last step of a drain: give back what is left and close the control connection.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn settings(&self) -> Arc<BudgetSettings> {
        lock(&self.settings).clone()
    }

    /// Reload: apply changed settings. A new `max` applies at the next decision; a new name
    /// or control server reconnects the control connection (what a loss does).
    pub fn reconfigure(&self, settings: BudgetSettings, counters: ServerCloseCounters) {
        *lock(&self.settings) = Arc::new(settings);
        *lock(&self.counters) = counters;
        self.wake.notify_one();
    }

    /// The control connection is up and answered its last round trip.
    pub fn control_ok(&self) -> bool {
        self.control_ok.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> BudgetStatus {
        let s = lock(&self.state);
        BudgetStatus {
            held: s.held.len(),
            used: s.used,
            waiting: s.waiting,
            connected: s.connected,
        }
    }

    /// A slot for a new server connection, if one is held and unused right now.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let mut s = lock(&self.state);
        if s.connected && s.used < s.held.len() && s.used < s.cap {
            s.used += 1;
            self.used.store(s.used, Ordering::Relaxed);
            Some(Slot {
                budget: self.clone(),
                shed: false,
            })
        } else {
            None
        }
    }

    /// Wait until a slot is ours, up to `deadline` (`None` then). While it waits, the client
    /// counts in this instance's demand and the control task is asked for a slot.
    ///
    /// # Cancel safety
    /// Cancel safe: a slot is taken only inside a poll that returns it.
    pub async fn take(self: &Arc<Self>, deadline: Instant) -> Option<Slot> {
        if let Some(s) = self.try_take() {
            return Some(s);
        }
        let _w = Waiting::new(self);
        loop {
            let notified = self.granted.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(s) = self.try_take() {
                return Some(s);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => return self.try_take(),
            }
        }
    }

    /// Above the cap (two atomic loads): connections should close as they come back.
    pub fn over_cap(&self) -> bool {
        self.used.load(Ordering::Relaxed) > self.cap.load(Ordering::Relaxed)
    }

    /// On return of a connection holding `slot`: should it close instead of going back to
    /// the idle list, to bring this instance down to its cap? Claims one such close.
    pub fn claim_shed(&self, slot: &mut Slot) -> bool {
        if !self.over_cap() || slot.shed {
            return false;
        }
        let s = lock(&self.state);
        let inflight = self.shed_inflight.load(Ordering::Relaxed);
        if s.used.saturating_sub(inflight) > s.cap {
            self.shed_inflight.fetch_add(1, Ordering::Relaxed);
            slot.shed = true;
            true
        } else {
            false
        }
    }

    /// Resolves when idle connections should be checked against the cap (upkeep).
    pub async fn shed_wanted(&self) {
        self.shed_idle.notified().await
    }

    fn release_slot(&self, shed: bool) {
        let wake_waiters = {
            let mut s = lock(&self.state);
            s.used = s.used.saturating_sub(1);
            self.used.store(s.used, Ordering::Relaxed);
            if shed {
                self.shed_inflight.fetch_sub(1, Ordering::Relaxed);
            }
            s.waiting > 0 && s.connected && s.used < s.held.len() && s.used < s.cap
        };
        if wake_waiters {
            self.granted.notify_waiters();
        }
        self.wake.notify_one();
    }
}

/// The right to one server connection under the budget.
///
/// # Drop behaviour
///
/// Synchronous bookkeeping only: the slot stops counting as used, a waiting client may take
/// it, and the control task is woken to give it back if no one here needs it. It never
/// awaits or spawns. The pool drops it after the connection's explicit shutdown (or when a
/// connect failed), never before, so the slot outlives the server connection it backs.
pub struct Slot {
    budget: Arc<Budget>,
    /// Claimed for shedding (`Budget::claim_shed`).
    shed: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("shed", &self.shed).finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.budget.release_slot(self.shed);
    }
}

/// Counts a client waiting for a slot for as long as it lives.
struct Waiting<'a>(&'a Budget);
impl<'a> Waiting<'a> {
    fn new(b: &'a Budget) -> Self {
        lock(&b.state).waiting += 1;
        b.wake.notify_one();
        Waiting(b)
    }
}
impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.0.state);
        s.waiting = s.waiting.saturating_sub(1);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_positive_and_even() {
        let k = key_for("orders-api");
        assert_eq!(k, key_for("orders-api"));
        assert!(k >= 0 && k % 2 == 0);
        assert_ne!(k, key_for("orders-api2"));
    }
}
