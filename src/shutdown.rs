//! When to stop, telling everyone, and the drain report (DESIGN.md section 4).
//!
//! Three concerns kept apart, as in tokio's graceful-shutdown guide: *when* (signals, or a
//! test calling [`Shutdown::begin`]), *telling* (a phase watch and cancellation tokens the
//! listener and every session select on), and *waiting* (the drain in `server.rs`, bounded by
//! one deadline). Shutdown is a value passed around, never a global.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Process phase, as `/readyz` and `/status` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting,
    Running,
    Draining,
    Stopped,
}

/// Which drain was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainKind {
    /// SIGTERM: wait for clients to leave.
    Graceful,
    /// SIGINT: close each client at its next transaction boundary.
    Boundary,
    /// SIGQUIT or a second signal: close everything now.
    Forced,
}

/// Counters for the drain report.
#[derive(Debug, Default)]
pub struct DrainStats {
    pub clients_left: AtomicU64,
    pub clients_closed_at_boundary: AtomicU64,
    pub clients_forced: AtomicU64,
}

/// The shutdown state shared by every task.
pub struct Shutdown {
    phase: watch::Sender<Phase>,
    /// Any drain has begun.
    drain: CancellationToken,
    /// Sessions close at their next transaction boundary.
    boundary: CancellationToken,
    /// Sessions close now (after cancelling a running query and a short grace).
    force: CancellationToken,
    /// Mirrors of the three tokens, set just before each is cancelled: sessions test these on
    /// every relay step (an atomic load), where `CancellationToken::is_cancelled` would lock a
    /// mutex shared by every session.
    draining: AtomicBool,
    boundary_flag: AtomicBool,
    force_flag: AtomicBool,
    /// The listener has closed or the accept window is over: refuse logins.
    refuse: AtomicBool,
    kind: Mutex<Option<DrainKind>>,
    pub stats: DrainStats,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown {
            phase: watch::channel(Phase::Starting).0,
            drain: CancellationToken::new(),
            boundary: CancellationToken::new(),
            force: CancellationToken::new(),
            draining: AtomicBool::new(false),
            boundary_flag: AtomicBool::new(false),
            force_flag: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            kind: Mutex::new(None),
            stats: DrainStats::default(),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.send_replace(p);
    }

    /// Ask for a drain. A second request while draining, or `Forced`, forces.
    pub fn begin(&self, kind: DrainKind) {
        let mut k = self.kind.lock().unwrap_or_else(|e| e.into_inner());
        match *k {
            None => {
                *k = Some(kind);
                self.set_phase(Phase::Draining);
                // The drain token first: sessions woken below must already see a drain.
                self.draining.store(true, Ordering::SeqCst);
                self.drain.cancel();
                match kind {
                    DrainKind::Graceful => {}
                    DrainKind::Boundary => {
                        self.boundary_flag.store(true, Ordering::SeqCst);
                        self.boundary.cancel();
                    }
                    DrainKind::Forced => self.force_now(),
                }
                tracing::info!(kind = ?kind, "drain started");
            }
            Some(_) => {
                *k = Some(DrainKind::Forced);
                tracing::warn!("second shutdown request: forcing");
                self.force_now();
            }
        }
    }

    /// Close every client now (deadline reached or forced).
    pub fn force_now(&self) {
        self.refuse.store(true, Ordering::Release);
        self.boundary_flag.store(true, Ordering::SeqCst);
        self.force_flag.store(true, Ordering::SeqCst);
        self.boundary.cancel();
        self.force.cancel();
    }

    pub fn kind(&self) -> Option<DrainKind> {
        *self.kind.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Sessions must close at their next transaction boundary (set before the boundary
    /// token is cancelled, so a task woken by the token sees it).
    pub fn is_boundary(&self) -> bool {
        self.boundary_flag.load(Ordering::SeqCst)
    }

    pub fn is_forced(&self) -> bool {
        self.force_flag.load(Ordering::SeqCst)
    }

    pub fn drain_token(&self) -> CancellationToken {
        self.drain.clone()
    }

    pub fn boundary_token(&self) -> CancellationToken {
        self.boundary.clone()
    }

    pub fn force_token(&self) -> CancellationToken {
        self.force.clone()
    }

    /// The boundary token itself, for a waiter that lives no longer than this `Shutdown`.
    pub fn boundary_token_ref(&self) -> &CancellationToken {
        &self.boundary
    }

    /// The force token itself (see [`boundary_token_ref`](Self::boundary_token_ref)).
    pub fn force_token_ref(&self) -> &CancellationToken {
        &self.force
    }

    /// Logins are refused once the accept window after a drain is over.
    pub fn refuse_new_clients(&self) -> bool {
        self.refuse.load(Ordering::Acquire)
    }

    pub fn stop_accepting(&self) {
        self.refuse.store(true, Ordering::Release);
    }
}

/// The structured summary logged as the last line of a drain.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DrainReport {
    pub kind: Option<DrainKind>,
    pub duration_ms: u64,
    pub clients_at_start: u64,
    pub clients_left: u64,
    pub clients_closed_at_boundary: u64,
    pub clients_forced: u64,
    pub servers_closed_clean: u64,
    pub servers_closed_hard: u64,
    pub leaked: u64,
    pub deadline_reached: bool,
}

impl DrainReport {
    /// Exit code per DESIGN.md section 2: 0 clean, 1 with forced closes or leaks.
    pub fn exit_code(&self) -> i32 {
        if self.leaked > 0 || self.servers_closed_hard > 0 || self.clients_forced > 0 {
            1
        } else {
            0
        }
    }
}

/// Signal handling (signal-hook-tokio): SIGTERM graceful drain, SIGINT boundary drain, a second
/// one or SIGQUIT forces, SIGHUP reloads via `on_reload`.
pub mod signals {
    use std::sync::Arc;

    use futures_util::stream::StreamExt;
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    use signal_hook_tokio::Signals;

    use super::{DrainKind, Shutdown};

    /// Listen for signals until the process ends.
    pub async fn listen(
        shutdown: Arc<Shutdown>,
        on_reload: impl Fn() + Send + 'static,
    ) -> std::io::Result<()> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGHUP])?;
        while let Some(sig) = signals.next().await {
            match sig {
                SIGTERM => {
                    tracing::info!("SIGTERM received");
                    shutdown.begin(DrainKind::Graceful);
                }
                SIGINT => {
                    tracing::info!("SIGINT received");
                    shutdown.begin(DrainKind::Boundary);
                }
                SIGQUIT => {
                    tracing::info!("SIGQUIT received");
                    shutdown.begin(DrainKind::Forced);
                }
                SIGHUP => {
                    tracing::info!("SIGHUP received: reloading configuration");
                    on_reload();
                }
                _ => {}
            }
        }
        Ok(())
    }
}
