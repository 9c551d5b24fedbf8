//! Timers as data: a fixed table of optional deadlines, one slot per kind.
//!
//! The machine sets and clears slots; the driver learns the earliest one
//! through `poll_timeout`. A slot holds one deadline, so re-arming replaces,
//! and clearing every connection-scoped slot when a connection ends is what
//! keeps a stale heartbeat from killing the next connection.

use crate::time::Instant;

/// A timer kind that indexes a [`TimerTable`].
pub(crate) trait TimerKind: Copy + 'static {
    /// Number of kinds.
    const COUNT: usize;
    /// Every kind, in index order.
    const ALL: &'static [Self];
    /// This kind's slot.
    fn index(self) -> usize;
}

/// One optional deadline per timer kind.
#[derive(Clone, Debug)]
pub(crate) struct TimerTable<T: TimerKind, const N: usize> {
    slots: [Option<Instant>; N],
    _kind: core::marker::PhantomData<T>,
}

impl<T: TimerKind, const N: usize> TimerTable<T, N> {
    pub(crate) fn new() -> Self {
        debug_assert_eq!(T::COUNT, N);
        TimerTable {
            slots: [None; N],
            _kind: core::marker::PhantomData,
        }
    }

    pub(crate) fn set(&mut self, kind: T, at: Instant) {
        self.slots[kind.index()] = Some(at);
    }

    pub(crate) fn stop(&mut self, kind: T) {
        self.slots[kind.index()] = None;
    }

    pub(crate) fn is_set(&self, kind: T) -> bool {
        self.slots[kind.index()].is_some()
    }

    /// The earliest deadline and its kind; ties go to the kind listed first.
    pub(crate) fn next(&self) -> Option<(Instant, T)> {
        let mut best: Option<(Instant, T)> = None;
        for &kind in T::ALL {
            if let Some(at) = self.slots[kind.index()] {
                if best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, kind));
                }
            }
        }
        best
    }

    /// Clears and returns the earliest deadline at or before `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<T> {
        let (at, kind) = self.next()?;
        if at <= now {
            self.stop(kind);
            Some(kind)
        } else {
            None
        }
    }
}
