//! The pool's side of the fleet budget (`crate::budget`, DESIGN.md section 12): a slot is
//! taken before a server connection is opened, kept with the connection while it is open,
//! and dropped after its explicit shutdown; above the instance's cap, a connection coming
//! back is closed instead of parked (its transaction is over: a boundary, never a cut), and
//! idle ones are closed by upkeep.
//!
//! Without `[budget]` none of this runs: the callers test `budget.is_some()` first.

use std::sync::Arc;
use std::time::Instant;

use super::{lock, CheckoutError, Conn, PoolInner};
use crate::budget::{Budget, Slot};
use crate::metrics::CloseReason;

impl PoolInner {
    /// Wait for a budget slot, up to `deadline`. `Ok(None)`: a connection was parked
    /// meanwhile (or is idle already): look at the idle list again instead of connecting.
    ///
    /// # Cancel safety
    /// Cancel safe: the slot is returned by the poll that takes it.
    pub(super) async fn budget_slot(
        &self,
        budget: &Arc<Budget>,
        deadline: Instant,
    ) -> Result<Option<Slot>, CheckoutError> {
        if let Some(s) = budget.try_take() {
            return Ok(Some(s));
        }
        let parked = self.parked.notified();
        tokio::pin!(parked);
        parked.as_mut().enable();
        if !lock(&self.idle).is_empty() {
            return Ok(None);
        }
        tokio::select! {
            s = budget.take(deadline) => match s {
                Some(s) => Ok(Some(s)),
                None => Err(CheckoutError::Timeout(self.settings().checkout_timeout)),
            },
            _ = parked => Ok(None),
        }
    }

    /// Keep a new connection's slot until the connection is shut down.
    pub(super) fn keep_slot(&self, id: u64, slot: Option<Slot>) {
        if let Some(s) = slot {
            lock(&self.slots).insert(id, s);
        }
    }

    /// The slot of connection `id`, taken out to be dropped once it has closed.
    pub(super) fn take_slot(&self, id: u64) -> Option<Slot> {
        self.budget.as_ref()?;
        lock(&self.slots).remove(&id)
    }

    /// A clean connection came back: close it rather than park it, to bring the instance
    /// down to its cap? (Claims the close with the budget.)
    pub(super) fn shed_for_budget(&self, conn: &Conn) -> bool {
        let Some(b) = &self.budget else {
            return false;
        };
        if !b.over_cap() {
            return false;
        }
        lock(&self.slots)
            .get_mut(&conn.id)
            .is_some_and(|s| b.claim_shed(s))
    }

    /// Upkeep, and whenever the cap falls: close idle connections, oldest first, while the
    /// instance is above its cap.
    pub(super) fn shed_idle(self: &Arc<Self>) {
        let mut closed = 0;
        loop {
            let conn = lock(&self.idle).pop_front();
            let Some(conn) = conn else { break };
            if self.shed_for_budget(&conn) {
                self.metrics.idle.dec();
                self.send_close(conn, CloseReason::budget);
                closed += 1;
            } else {
                lock(&self.idle).push_front(conn);
                break;
            }
        }
        if closed > 0 {
            tracing::debug!(pool = %self.name, closed, "idle server connections closed to give budget slots back");
        }
    }
}
