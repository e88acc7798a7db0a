//! PAUSE and RESUME (the console, DESIGN.md section 10): a paused pool lends no server.
//!
//! Pausing takes every slot of the pool's semaphore, queued like a client that waits for a
//! server: transactions in flight finish and give their slots back, and each slot freed goes
//! to the pause instead of to the next client. Once the pause holds all of them, every server
//! is idle and none is lent; clients queue behind the pause (bounded by `checkout_timeout`, as
//! any wait for a server). Resuming drops the slots and the waiting clients get them in FIFO
//! order. Nothing on the hot path changes: `checkout_idle` already finds no free slot, and
//! `checkout` already waits for one.
//!
//! The slots are held by a task on the process's tracker, which ends at RESUME or when a drain
//! begins (a drain ends every pause, so waiting clients finish instead of timing out).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{lock, Pool, PoolInner};

/// Where a pool stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PausePhase {
    /// Lending as usual.
    Running,
    /// PAUSE asked: no new server is lent; transactions in flight are finishing.
    Pausing,
    /// Every server is back and idle; none is lent until RESUME.
    Paused,
}

/// A pool's pause state.
pub(super) struct PauseCtl {
    phase: watch::Sender<PausePhase>,
    /// Ends the current pause task (RESUME); a child of the drain token.
    stop: Option<CancellationToken>,
    /// Which pause task is the current one (a RESUME and a new PAUSE may overlap the old
    /// task's last moments).
    epoch: u64,
    /// Slots a reload added while paused: given to the semaphore when the pause ends.
    deferred: usize,
}

impl PauseCtl {
    pub(super) fn new() -> PauseCtl {
        PauseCtl {
            phase: watch::channel(PausePhase::Running).0,
            stop: None,
            epoch: 0,
            deferred: 0,
        }
    }

    fn active(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| !s.is_cancelled())
    }
}

impl Pool {
    /// Stop lending servers: from now on no checkout gets one, and once every server lent out
    /// has come back the phase turns `Paused`. `drain` ends the pause when a drain begins.
    /// Idempotent; returns a receiver of the pool's phase.
    pub fn pause(&self, drain: &CancellationToken) -> watch::Receiver<PausePhase> {
        let inner = &self.inner;
        let mut ctl = lock(&inner.pause);
        let rx = ctl.phase.subscribe();
        if ctl.active() {
            return rx;
        }
        let stop = drain.child_token();
        ctl.stop = Some(stop.clone());
        ctl.epoch += 1;
        let epoch = ctl.epoch;
        ctl.phase.send_replace(PausePhase::Pausing);
        inner.metrics.paused.set(1);
        // Every slot the semaphore has now (slots a reload added while paused are not in it).
        let slots = inner
            .size
            .load(Ordering::Acquire)
            .saturating_sub(ctl.deferred);
        drop(ctl);
        tracing::info!(pool = %inner.name, "pausing: no server is lent until RESUME");
        let pool = self.clone();
        inner.tracker.spawn(async move {
            let inner = &pool.inner;
            let acquire = inner.sem.clone().acquire_many_owned(slots as u32);
            let held = tokio::select! {
                biased;
                _ = stop.cancelled() => None,
                p = acquire => p.ok(),
            };
            if held.is_some() {
                {
                    let ctl = lock(&inner.pause);
                    if ctl.epoch == epoch {
                        ctl.phase.send_replace(PausePhase::Paused);
                    }
                }
                tracing::info!(pool = %inner.name, "paused: every server is idle");
                stop.cancelled().await;
            }
            inner.end_pause(epoch, held);
        });
        rx
    }

    /// End the pause, if any: waiting clients get their servers in FIFO order. Returns whether
    /// the pool was paused (or pausing).
    pub fn resume(&self) -> bool {
        let ctl = lock(&self.inner.pause);
        match &ctl.stop {
            Some(stop) if !stop.is_cancelled() => {
                stop.cancel();
                true
            }
            _ => false,
        }
    }

    pub fn pause_phase(&self) -> PausePhase {
        let ctl = lock(&self.inner.pause);
        if ctl.active() {
            *ctl.phase.borrow()
        } else {
            PausePhase::Running
        }
    }
}

impl PoolInner {
    /// The pause task of `epoch` is ending: give its slots back (and the ones a reload added
    /// meanwhile, unless a newer pause has begun).
    fn end_pause(&self, epoch: u64, held: Option<tokio::sync::OwnedSemaphorePermit>) {
        let mut ctl = lock(&self.pause);
        drop(held);
        if ctl.epoch != epoch {
            return;
        }
        if ctl.deferred > 0 {
            self.sem.add_permits(ctl.deferred);
            ctl.deferred = 0;
        }
        ctl.stop = None;
        ctl.phase.send_replace(PausePhase::Running);
        self.metrics.paused.set(0);
        tracing::info!(pool = %self.name, "resumed");
    }

    /// A reload made the pool bigger: new slots, or, while paused, slots for later.
    pub(super) fn add_slots(&self, n: usize) {
        let mut ctl = lock(&self.pause);
        if ctl.stop.is_some() {
            ctl.deferred += n;
        } else {
            self.sem.add_permits(n);
        }
    }
}

/// Which databases the console paused: every one (`PAUSE`), or by name (`PAUSE db`, `KILL
/// db`), as PgBouncer keeps its global pause mode apart from each database's paused flag. A
/// pool created while its database is paused starts paused.
#[derive(Default)]
pub struct PauseSet {
    inner: Mutex<(bool, BTreeSet<String>)>,
}

impl PauseSet {
    /// Is `database` paused, globally or by name?
    pub fn covers(&self, database: &str) -> bool {
        let s = lock(&self.inner);
        s.0 || s.1.contains(database)
    }

    /// The global pause (`PAUSE` without a database).
    pub fn all(&self) -> bool {
        lock(&self.inner).0
    }

    /// Set the global pause; returns the previous value.
    pub fn set_all(&self, on: bool) -> bool {
        std::mem::replace(&mut lock(&self.inner).0, on)
    }

    /// Is `database` paused by name?
    pub fn has(&self, database: &str) -> bool {
        lock(&self.inner).1.contains(database)
    }

    /// Pause or resume `database` by name; returns whether it was paused by name.
    pub fn set(&self, database: &str, on: bool) -> bool {
        let mut s = lock(&self.inner);
        if on {
            !s.1.insert(database.to_string())
        } else {
            s.1.remove(database)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::backend::ServerTarget;
    use crate::config::{Config, PoolMode};
    use crate::metrics::PoolMetrics;
    use crate::pool::Closer;

    /// A pool that never needs to connect (nothing here checks a server out).
    fn pool(size: usize, tracker: &TaskTracker, stop: &CancellationToken) -> Pool {
        let mut settings = Config::default().pool_settings("x");
        settings.size = size;
        settings.mode = PoolMode::Transaction;
        Pool::new(
            "x/x",
            target(),
            settings,
            PoolMetrics::detached(),
            Closer::start(tracker, stop.clone()),
            tracker.clone(),
            Duration::from_secs(1),
        )
    }

    fn target() -> ServerTarget {
        ServerTarget {
            hosts: vec![("127.0.0.1".into(), 9)],
            attrs: Default::default(),
            dbname: "x".into(),
            user: "x".into(),
            credential: None,
            sslmode: crate::tls::SslMode::Disable,
            tls: None,
            tls_id: String::new(),
        }
    }

    async fn phase_becomes(rx: &mut watch::Receiver<PausePhase>, want: PausePhase) {
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|p| *p == want))
            .await
            .expect("phase in time")
            .expect("sender alive");
    }

    #[tokio::test]
    async fn pause_holds_every_slot_and_reload_growth_waits_for_resume() {
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let drain = CancellationToken::new();
        let p = pool(2, &tracker, &stop);
        // A slot in use: the pause waits for it.
        let held = p.inner.sem.clone().try_acquire_owned().unwrap();
        let mut rx = p.pause(&drain);
        assert_eq!(*rx.borrow(), PausePhase::Pausing);
        assert_eq!(p.inner.metrics.paused.get(), 1);
        assert!(p.status().paused);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(p.pause_phase(), PausePhase::Pausing);
        // Pausing already: a second PAUSE joins it.
        let _again = p.pause(&drain);
        drop(held);
        phase_becomes(&mut rx, PausePhase::Paused).await;
        assert_eq!(p.inner.sem.available_permits(), 0);
        assert!(p.checkout_idle().is_none(), "a paused pool lends nothing");
        // A reload that grows the pool while paused: the new slots wait for RESUME.
        let mut bigger = p.settings().as_ref().clone();
        bigger.size = 5;
        p.reconfigure(target(), bigger);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(p.inner.sem.available_permits(), 0);
        assert!(p.resume());
        phase_becomes(&mut rx, PausePhase::Running).await;
        let t0 = std::time::Instant::now();
        while p.inner.sem.available_permits() != 5 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "slots not given back"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(p.inner.metrics.paused.get(), 0);
        assert!(!p.resume(), "not paused any more");
        // A drain ends a pause.
        let mut rx = p.pause(&drain);
        phase_becomes(&mut rx, PausePhase::Paused).await;
        drain.cancel();
        phase_becomes(&mut rx, PausePhase::Running).await;
        assert_eq!(p.pause_phase(), PausePhase::Running);
        stop.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("the pause task ends");
    }

    #[test]
    fn pause_set_keeps_global_and_named_apart() {
        let s = PauseSet::default();
        assert!(!s.covers("a"));
        assert!(!s.set("a", true));
        assert!(s.set("a", true), "already paused by name");
        assert!(s.covers("a") && !s.covers("b") && !s.all());
        assert!(!s.set_all(true));
        assert!(s.covers("b"));
        assert!(s.set_all(false));
        assert!(s.has("a") && s.set("a", false) && !s.covers("a"));
    }
}
