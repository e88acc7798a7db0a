//! The fair-share rule of the fleet budget, as a pure function: what one instance does with
//! what it sees. The control task (`control.rs`) drives it against Postgres's lock table and
//! `tests/budget_sim.rs` against an in-memory one, with 50 instances and controlled time, so
//! both run the same decisions.
//!
//! # The rule
//!
//! An instance's *demand* is the server connections it has (open, opening or closing) plus
//! the clients waiting for a slot. Each member of the budget is given a claim: this
//! instance its demand; another member its held slots if it is not wanting (it has what it
//! needs), unbounded if it is wanting. The *fair level* `L` is the water level that shares
//! `max_server_connections` among those claims (max-min fairness: every claim below `L` is
//! met in full, every other claim gets `L`), so it is `max / members` when everybody wants
//! more than that, and more for those who want more when some want less. In whole slots
//! the level is `lo = floor(L)` and `hi = ceil(L)`.
//!
//! - *Uncontended* (no other member wants): take free slots up to the demand, give back
//!   the ones beyond it.
//! - *Contended*: the target is `min(demand, hi)`, lowered to `lo` while some wanting
//!   member holds two or more fewer than the target. An instance above its target sheds:
//!   spare slots go back at once, and slots in use go back as their server connections
//!   close, each at its next transaction boundary (a returned connection is closed instead
//!   of parked), never by cutting a client. An instance below its target takes free slots,
//!   but only when no wanting member holds fewer than it does (the lowest go first).
//! - *Wanting*: demand above held after the take it may do. A wanting instance takes a
//!   second advisory lock, in another key space, so the others see it in `pg_locks`.
//! - Slots backing connections kept across a control-connection loss are taken back first,
//!   whatever the share (`must` below).
//!
//! # Why it converges and does not oscillate
//!
//! Slots move from one member to another only downhill: a member gives up a slot only when
//! it is above the fair level or at least two above some wanting member, and a freed slot
//! is taken by the lowest wanting member. So the sum of the squares of the wanting
//! members' holdings falls with every transfer, and it cannot fall forever: once every
//! wanting member holds `lo` or `hi` and no member holds more than its target, nobody
//! gives anything up, which is the fixed point (within one slot of fair share). Nobody
//! takes above `hi` while someone wants, so no slot goes back up the hill it came down.

/// Another member of the budget, as its locks in `pg_locks` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Slots it holds.
    pub held: usize,
    /// It holds the "wanting" lock: its clients wait and it could not take a slot.
    pub wanting: bool,
}

/// What an instance knows when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// `max_server_connections`.
    pub max: usize,
    /// Slots this instance holds.
    pub held: usize,
    /// Its server connections that need a slot: open, opening or closing.
    pub used: usize,
    /// Its clients waiting for a slot.
    pub waiting: usize,
    /// Every other member (an instance holding or wanting a slot).
    pub others: &'a [Member],
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Slots to try to take (free ones: `pg_try_advisory_lock`).
    pub take: usize,
    /// Spare slots to give back now (`pg_advisory_unlock`).
    pub release: usize,
    /// The most server connections to keep: above it, connections close at their next
    /// transaction boundary or while idle. `max` when uncontended. The caller bounds it
    /// further by the slots it really holds once the take is done.
    pub cap: usize,
    /// Hold the wanting lock.
    pub want: bool,
}

/// The fair level as whole slots, `(floor, ceil)`, or `None` when every claim fits.
fn fair_level(max: usize, demand: usize, others: &[Member]) -> Option<(usize, usize)> {
    let mut claims: Vec<usize> = others
        .iter()
        .map(|o| if o.wanting { usize::MAX } else { o.held })
        .collect();
    claims.push(demand);
    claims.sort_unstable();
    let n = claims.len();
    let mut remaining = max;
    for (i, &c) in claims.iter().enumerate() {
        let k = n - i;
        match c.checked_mul(k) {
            Some(all) if all <= remaining => remaining -= c,
            _ => return Some((remaining / k, remaining.div_ceil(k))),
        }
    }
    None
}

/// The rule (see the module docs).
pub fn decide(input: &Input) -> Decision {
    let Input {
        max,
        held,
        used,
        waiting,
        others,
    } = *input;
    let demand = used + waiting;
    let others_held: usize = others.iter().map(|o| o.held).sum();
    let free = max.saturating_sub(held + others_held);
    // Connections kept across a lost control connection get their slots back first.
    let must = used.saturating_sub(held).min(free);
    let contended = others.iter().any(|o| o.wanting);
    let level = if contended {
        fair_level(max, demand, others)
    } else {
        None
    };
    let (target, cap) = match level {
        // Alone, or nobody else short: all it needs, within the budget.
        None => (demand.min(max), max),
        Some((lo, hi)) => {
            let mut target = demand.min(hi);
            if target > lo && others.iter().any(|o| o.wanting && o.held + 2 <= target) {
                target = lo;
            }
            (target, target)
        }
    };
    let lowest = !others.iter().any(|o| o.wanting && o.held < held);
    let mut take = if held < target && (lowest || !contended) {
        (target - held).min(free)
    } else {
        0
    };
    take = take.max(must);
    let release = held.saturating_sub(target.max(used));
    let want = demand > held + take;
    Decision {
        take,
        release,
        cap,
        want,
    }
}

/// Members as the gauge counts them: the others, and this instance if it holds or wants.
pub fn members(others: &[Member], held: usize, want: bool) -> usize {
    others.len() + usize::from(held > 0 || want)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(held: usize) -> Member {
        Member {
            held,
            wanting: true,
        }
    }

    fn sated(held: usize) -> Member {
        Member {
            held,
            wanting: false,
        }
    }

    fn d(max: usize, held: usize, used: usize, waiting: usize, others: &[Member]) -> Decision {
        decide(&Input {
            max,
            held,
            used,
            waiting,
            others,
        })
    }

    #[test]
    fn alone_it_takes_what_it_needs_and_gives_back_the_rest() {
        assert_eq!(d(24, 0, 0, 5, &[]).take, 5);
        assert_eq!(d(24, 20, 20, 10, &[]).take, 4);
        assert!(d(24, 24, 24, 10, &[]).want);
        let idle = d(24, 10, 6, 0, &[]);
        assert_eq!((idle.take, idle.release, idle.cap), (0, 4, 24));
        // A lowered budget (reload): above it, connections close as they come back.
        let lowered = d(8, 16, 16, 0, &[]);
        assert_eq!((lowered.take, lowered.release, lowered.cap), (0, 0, 8));
        assert_eq!(d(8, 16, 8, 0, &[]).release, 8);
    }

    #[test]
    fn a_newcomer_makes_the_big_holder_shed_to_fair_share() {
        // Three instances wanting, one holding everything (not wanting: it has what it needs).
        let big = d(24, 24, 24, 0, &[want(0), want(0), want(0)]);
        assert_eq!(big.cap, 6);
        assert_eq!(big.release, 0, "slots in use go back as connections close");
        assert!(!big.want);
        let small = d(24, 0, 0, 16, &[sated(24), want(0), want(0)]);
        assert_eq!(small.cap, 6);
        assert_eq!(small.take, 0, "no free slot yet");
        assert!(small.want);
    }

    #[test]
    fn uneven_division_settles_within_one_slot() {
        // 25 slots, four wanting: 7,7,7,4 is not fair; the 7s give one each.
        let seven = d(25, 7, 7, 9, &[want(7), want(7), want(4)]);
        assert_eq!(seven.cap, 6);
        let four = d(25, 4, 4, 12, &[want(6), want(6), want(6)]);
        assert_eq!(four.take, 3);
        // 6,6,6,7: nobody moves.
        let six = d(25, 6, 6, 10, &[want(6), want(6), want(7)]);
        assert_eq!((six.take, six.release, six.cap), (0, 0, 7));
        let top = d(25, 7, 7, 9, &[want(6), want(6), want(6)]);
        assert_eq!((top.take, top.release, top.cap), (0, 0, 7));
    }

    #[test]
    fn the_lowest_wanting_member_takes_first() {
        let higher = d(24, 5, 5, 10, &[want(2), sated(5)]);
        assert_eq!(higher.take, 0);
        let lowest = d(24, 2, 2, 10, &[want(5), sated(5)]);
        assert!(lowest.take > 0);
    }

    #[test]
    fn small_demand_leaves_room_for_others() {
        // Demand 2 with others wanting: the fair level for the rest rises above max/members.
        let other = d(24, 0, 0, 30, &[sated(2), want(0)]);
        assert_eq!(other.cap, 11);
        assert_eq!(other.take, 11);
    }

    #[test]
    fn connections_kept_across_a_lost_control_connection_come_first() {
        let back = d(24, 0, 8, 0, &[want(10)]);
        assert_eq!(back.take, 8);
        let short = d(24, 0, 8, 0, &[want(10), sated(10)]);
        assert_eq!(short.take, 4, "only 4 are free");
    }

    #[test]
    fn members_counts_self_only_when_holding_or_wanting() {
        assert_eq!(members(&[want(1)], 0, false), 1);
        assert_eq!(members(&[want(1)], 0, true), 2);
        assert_eq!(members(&[], 3, false), 1);
    }
}
