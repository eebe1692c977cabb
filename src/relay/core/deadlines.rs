//! The core's deadlines: one ordered set, so the earliest is read in O(log n).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;

use super::{AllocationId, BindToken};

/// Something that happens at a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    Relay(AllocationId, super::Family),
    Permission(AllocationId, IpAddr),
    Channel(AllocationId, u16),
    Bind(BindToken),
}

/// Every pending deadline, ordered. Each entry mirrors the deadline stored in the
/// object it names (a relay's `expires`, a permission's or channel's expiry, a
/// pending bind's `deadline`); whoever changes one moves the other, so the set holds
/// exactly one entry per live object and never grows with refreshes.
#[derive(Default)]
pub(super) struct Deadlines(BTreeSet<(Instant, Timer)>);

impl Deadlines {
    /// Moves `timer` from `old` (if it had a deadline) to `new`.
    pub(super) fn set(&mut self, old: Option<Instant>, new: Instant, timer: Timer) {
        if let Some(old) = old {
            self.0.remove(&(old, timer));
        }
        self.0.insert((new, timer));
    }

    pub(super) fn clear(&mut self, at: Instant, timer: Timer) {
        self.0.remove(&(at, timer));
    }

    pub(super) fn first(&self) -> Option<Instant> {
        self.0.first().map(|(at, _)| *at)
    }

    /// Takes the earliest timer due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let due = matches!(self.0.first(), Some((at, _)) if *at <= now);
        if due {
            self.0.pop_first().map(|(_, t)| t)
        } else {
            None
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}
