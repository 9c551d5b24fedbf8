//! Coalescing of high-frequency updates: at most one per key per interval.
//!
//! This module owns [`Coalescer`], which sits between an application that
//! produces updates faster than they are worth sending (pointer positions,
//! cursors, sliders) and the connection. For each key it lets one update
//! through per interval; updates arriving in between replace each other, and
//! only the latest is delivered once the interval has passed. Intermediate
//! values that were superseded are never delivered, and the last value pushed
//! for a key is always delivered eventually (or by [`Coalescer::flush`]).
//!
//! It never reads a clock and never arms a timer: the caller passes the time
//! to every call, asks [`Coalescer::poll_timeout`] when the next held value
//! falls due, and drains due values with [`Coalescer::poll_ready`]. It holds at
//! most [`max_keys`](Coalescer::max_keys) keys and refuses new ones past that
//! with [`CoalesceError::Full`].
//!
//! # Run loop
//!
//! ```
//! use core::time::Duration;
//! use kitestring_core::coalesce::{Coalescer, Pushed};
//! use kitestring_core::Instant;
//!
//! let mut c = Coalescer::new(Duration::from_millis(50), 64);
//! let t0 = Instant::from_secs(1);
//! // The first update for a key goes out at once.
//! assert!(matches!(c.push(t0, "cursor", (1, 1)), Ok(Pushed::Emit(_))));
//! // The next two arrive within the interval: held, the second replaces the first.
//! let t1 = t0 + Duration::from_millis(10);
//! assert!(matches!(c.push(t1, "cursor", (2, 2)), Ok(Pushed::Deferred { .. })));
//! assert!(matches!(c.push(t1, "cursor", (3, 3)), Ok(Pushed::Replaced { .. })));
//! // The driver sleeps until the deadline, then drains.
//! let due = c.poll_timeout().unwrap();
//! assert_eq!(due, t0 + Duration::from_millis(50));
//! let out = c.poll_ready(due).unwrap();
//! assert_eq!((out.key, out.value), ("cursor", (3, 3)));
//! assert!(c.poll_ready(due).is_none());
//! ```
//!
//! # Ordering guarantees
//!
//! Every pushed value gets a sequence number, increasing across the whole
//! coalescer, and delivered values carry it in [`Coalesced::seq`]. For each key,
//! delivered sequence numbers strictly increase, and a value held for a key is
//! always the key's latest. Two deliveries of one key through
//! [`push`](Coalescer::push) or [`poll_ready`](Coalescer::poll_ready) are at
//! least one interval apart in the caller's time, as long as that time does
//! not go backwards (if it does, values are held longer, never sent sooner).
//! [`flush`](Coalescer::flush) is the exception: it delivers everything held,
//! at once.

use core::time::Duration;

use crate::time::Instant;
use crate::vecmap::VecMap;

/// One sixtieth of a second, rounded up to the nanosecond so that no more than
/// 60 updates per key fit in any one second.
pub const DEFAULT_INTERVAL: Duration = Duration::from_nanos(16_666_667);

/// A value to deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coalesced<K, V> {
    /// The key it belongs to.
    pub key: K,
    /// The latest value pushed for the key.
    pub value: V,
    /// The sequence number given to the value when it was pushed; greater
    /// than that of every value pushed before it, for any key.
    pub seq: u64,
}

/// What [`Coalescer::push`] did with a value.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Pushed<K, V> {
    /// The key's interval had passed: deliver this now. Any value that was
    /// held for the key was older and has been discarded.
    Emit(Coalesced<K, V>),
    /// Held until `due`; nothing was held for the key before.
    Deferred {
        /// When [`Coalescer::poll_ready`] will release it.
        due: Instant,
    },
    /// Held until `due`, replacing an older held value that will now never be
    /// delivered.
    Replaced {
        /// When [`Coalescer::poll_ready`] will release it.
        due: Instant,
    },
}

/// Why [`Coalescer::push`] refused a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoalesceError {
    /// The key is new, the coalescer already tracks `max_keys` keys, and none
    /// of them can be forgotten yet (each was delivered less than an interval
    /// ago or has a value held).
    #[error("coalescer is full: {max_keys} keys")]
    Full {
        /// The configured limit.
        max_keys: usize,
    },
}

#[derive(Clone, Debug)]
struct KeySlot<V> {
    /// When the key may next be delivered: last delivery plus the interval.
    ready_at: Instant,
    /// Tie-break among keys with the same `ready_at` in the indexes, unique
    /// per slot, so their order is deterministic and independent of `K`.
    token: u64,
    /// The value held for delivery at `ready_at`, with its sequence number.
    held: Option<(V, u64)>,
}

/// Per-key rate limiting of updates, latest value wins; see the
/// [module docs](self).
///
/// Every tracked key sits in exactly one of two indexes ordered by
/// `(ready_at, token)`: `due` if it has a held value, `idle` if not. The first
/// gives [`poll_timeout`](Self::poll_timeout) and
/// [`poll_ready`](Self::poll_ready) without scanning keys; the second lets a
/// full coalescer forget the key that has been idle longest. The indexes
/// are sorted vectors, not B-trees: a coalescer tracks at most `max_keys`
/// keys (the client's default is 1 024), and a B-tree's code per key and
/// value type costs the browser package more than the moves cost here.
#[derive(Clone, Debug)]
pub struct Coalescer<K, V> {
    interval: Duration,
    max_keys: usize,
    slots: VecMap<K, KeySlot<V>>,
    due: VecMap<(Instant, u64), K>,
    idle: VecMap<(Instant, u64), K>,
    next_seq: u64,
    next_token: u64,
}

impl<K, V> Coalescer<K, V> {
    /// A coalescer that delivers at most one value per key per `interval`
    /// and tracks at most `max_keys` keys. A zero interval delivers every
    /// value at once.
    pub const fn new(interval: Duration, max_keys: usize) -> Self {
        Coalescer {
            interval,
            max_keys,
            slots: VecMap::new(),
            due: VecMap::new(),
            idle: VecMap::new(),
            next_seq: 0,
            next_token: 0,
        }
    }

    /// The minimum time between two deliveries of one key.
    pub const fn interval(&self) -> Duration {
        self.interval
    }

    /// The most keys tracked at once.
    pub const fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Keys tracked: those with a held value, and those delivered recently
    /// enough that their next value would have to wait.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Number of values held for later delivery.
    pub fn held(&self) -> usize {
        self.due.len()
    }

    /// When the next held value falls due, or `None` if nothing is held.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due.first_key_value().map(|(&(at, _), _)| at)
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        // 2^64 pushes is out of reach; saturating keeps this panic-free.
        self.next_seq = self.next_seq.saturating_add(1);
        seq
    }
}

impl<K: Ord + Clone, V> Coalescer<K, V> {
    /// Offers a new value for `key` at `now`.
    ///
    /// If the key's interval has passed (or the key is new), the value is
    /// returned for delivery at once, and any value held for the key is
    /// discarded as older. Otherwise the value is held until the interval
    /// passes, replacing any value already held.
    ///
    /// # Errors
    ///
    /// [`CoalesceError::Full`] if the key is new and `max_keys` keys are
    /// tracked, none of which can be forgotten (see the error). Nothing
    /// changes and the value is dropped; the caller decides whether to send
    /// its data unthrottled, drop it, or retry once a key frees up.
    pub fn push(&mut self, now: Instant, key: K, value: V) -> Result<Pushed<K, V>, CoalesceError> {
        if !self.slots.contains_key(&key) {
            self.make_room(now)?;
        }
        let seq = self.take_seq();
        let interval = self.interval;
        let Some(slot) = self.slots.get_mut(&key) else {
            let token = self.next_token;
            self.next_token = self.next_token.saturating_add(1);
            let ready_at = now + interval;
            self.idle.insert((ready_at, token), key.clone());
            self.slots.insert(
                key.clone(),
                KeySlot {
                    ready_at,
                    token,
                    held: None,
                },
            );
            return Ok(Pushed::Emit(Coalesced { key, value, seq }));
        };

        let index = (slot.ready_at, slot.token);
        if now >= slot.ready_at {
            // Whatever was held is older than this value: drop it unsent.
            if slot.held.take().is_some() {
                self.due.remove(&index);
            } else {
                self.idle.remove(&index);
            }
            slot.ready_at = now + interval;
            self.idle.insert((slot.ready_at, slot.token), key.clone());
            return Ok(Pushed::Emit(Coalesced { key, value, seq }));
        }

        let due = slot.ready_at;
        if slot.held.replace((value, seq)).is_some() {
            Ok(Pushed::Replaced { due })
        } else {
            if let Some(k) = self.idle.remove(&index) {
                self.due.insert(index, k);
            }
            Ok(Pushed::Deferred { due })
        }
    }

    /// The next held value whose time has come at `now`, earliest first.
    /// Call until it returns `None`. A delivered key may next be delivered
    /// one interval after `now`.
    #[must_use]
    pub fn poll_ready(&mut self, now: Instant) -> Option<Coalesced<K, V>> {
        let (&(at, _), _) = self.due.first_key_value()?;
        if at > now {
            return None;
        }
        self.pop_due(Some(now))
    }

    /// Releases every held value, earliest due first, without waiting for
    /// their intervals; meant for closing. Values not taken from the iterator
    /// stay held. Keys keep their last regular delivery time.
    pub fn flush(&mut self) -> impl Iterator<Item = Coalesced<K, V>> + '_ {
        core::iter::from_fn(move || self.pop_due(None))
    }

    /// Stops tracking `key`, returning the value held for it, if any, so the
    /// caller can decide whether it still matters (for example, the entity
    /// it describes is gone).
    pub fn remove(&mut self, key: &K) -> Option<Coalesced<K, V>> {
        let slot = self.slots.remove(key)?;
        let index = (slot.ready_at, slot.token);
        match slot.held {
            Some((value, seq)) => {
                let key = self.due.remove(&index)?;
                Some(Coalesced { key, value, seq })
            }
            None => {
                self.idle.remove(&index);
                None
            }
        }
    }

    /// Takes the earliest held value. With `Some(now)`, the key's next
    /// delivery is allowed one interval after `now`; with `None` (flush) its
    /// schedule is left alone.
    fn pop_due(&mut self, now: Option<Instant>) -> Option<Coalesced<K, V>> {
        // A due entry always has a slot with a held value; the loop only
        // guards against that invariant being broken, skipping such entries
        // rather than panicking.
        loop {
            let ((_, token), key) = self.due.pop_first()?;
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            let Some((value, seq)) = slot.held.take() else {
                continue;
            };
            if let Some(now) = now {
                slot.ready_at = now + self.interval;
            }
            self.idle.insert((slot.ready_at, token), key.clone());
            return Some(Coalesced { key, value, seq });
        }
    }

    /// Forgets the longest-idle key if the coalescer is full and that key
    /// could be delivered at `now` anyway, so forgetting it changes nothing.
    fn make_room(&mut self, now: Instant) -> Result<(), CoalesceError> {
        if self.slots.len() < self.max_keys {
            return Ok(());
        }
        let full = CoalesceError::Full {
            max_keys: self.max_keys,
        };
        match self.idle.first_key_value() {
            Some((&(ready_at, _), _)) if ready_at <= now => {}
            _ => return Err(full),
        }
        if let Some((_, key)) = self.idle.pop_first() {
            self.slots.remove(&key);
        }
        if self.slots.len() < self.max_keys {
            Ok(())
        } else {
            Err(full)
        }
    }
}

impl<K, V> Default for Coalescer<K, V> {
    /// [`DEFAULT_INTERVAL`] (60 per second) and up to 1024 keys.
    fn default() -> Self {
        Coalescer::new(DEFAULT_INTERVAL, 1024)
    }
}

#[cfg(test)]
// A failed unwrap is a failed test, which is what a test should do.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn ms(millis: u64) -> Instant {
        Instant::from_millis(millis)
    }

    fn emitted<K, V>(pushed: Result<Pushed<K, V>, CoalesceError>) -> Coalesced<K, V> {
        match pushed {
            Ok(Pushed::Emit(c)) => c,
            Ok(_) => panic!("expected Emit, got a deferral"),
            Err(e) => panic!("expected Emit, got {e}"),
        }
    }

    #[test]
    fn first_value_goes_out_at_once() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        let out = emitted(c.push(ms(100), "a", 1));
        assert_eq!(
            out,
            Coalesced {
                key: "a",
                value: 1,
                seq: 0
            }
        );
        assert_eq!(c.poll_timeout(), None);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn values_within_the_interval_are_held_and_replaced() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        let _ = emitted(c.push(ms(100), "a", 1));
        assert_eq!(
            c.push(ms(101), "a", 2),
            Ok(Pushed::Deferred { due: ms(110) })
        );
        assert_eq!(
            c.push(ms(105), "a", 3),
            Ok(Pushed::Replaced { due: ms(110) })
        );
        assert_eq!(c.held(), 1);
        assert_eq!(c.poll_timeout(), Some(ms(110)));
        assert_eq!(c.poll_ready(ms(109)), None);
        let out = c.poll_ready(ms(110)).unwrap();
        assert_eq!(
            out,
            Coalesced {
                key: "a",
                value: 3,
                seq: 2
            }
        );
        assert_eq!(c.poll_ready(ms(110)), None);
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn exactly_at_the_interval_boundary_the_value_goes_out() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        let _ = emitted(c.push(ms(100), "a", 1));
        let just_before = ms(110) - Duration::from_nanos(1);
        assert_eq!(
            c.push(just_before, "a", 2),
            Ok(Pushed::Deferred { due: ms(110) })
        );
        // At exactly the boundary, a new push supersedes the held value and
        // goes out itself.
        let out = emitted(c.push(ms(110), "a", 3));
        assert_eq!(out.value, 3);
        assert_eq!(c.held(), 0);
        assert_eq!(c.poll_ready(ms(1_000)), None);
        // And the next boundary is one interval after that delivery.
        assert_eq!(
            c.push(ms(119), "a", 4),
            Ok(Pushed::Deferred { due: ms(120) })
        );
        assert_eq!(c.poll_ready(ms(120)).map(|o| o.value), Some(4));
    }

    #[test]
    fn a_late_poll_restarts_the_interval_from_the_delivery() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        let _ = emitted(c.push(ms(0), "a", 1));
        let _ = c.push(ms(1), "a", 2);
        // The driver polls late.
        assert_eq!(c.poll_ready(ms(25)).map(|o| o.value), Some(2));
        // Next delivery no sooner than 35 ms, not 20 or 30.
        assert_eq!(c.push(ms(30), "a", 3), Ok(Pushed::Deferred { due: ms(35) }));
    }

    #[test]
    fn keys_are_independent_and_released_in_due_order() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        let _ = emitted(c.push(ms(5), "b", 1));
        let _ = emitted(c.push(ms(0), "a", 1));
        let _ = c.push(ms(6), "b", 2);
        let _ = c.push(ms(7), "a", 2);
        assert_eq!(c.poll_timeout(), Some(ms(10)));
        assert_eq!(c.poll_ready(ms(20)).map(|o| o.key), Some("a"));
        assert_eq!(c.poll_ready(ms(20)).map(|o| o.key), Some("b"));
        assert_eq!(c.poll_ready(ms(20)), None);
    }

    #[test]
    fn same_due_time_releases_in_first_seen_order() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        let _ = emitted(c.push(ms(0), "z", 1));
        let _ = emitted(c.push(ms(0), "a", 1));
        let _ = c.push(ms(1), "a", 2);
        let _ = c.push(ms(1), "z", 2);
        assert_eq!(c.poll_ready(ms(10)).map(|o| o.key), Some("z"));
        assert_eq!(c.poll_ready(ms(10)).map(|o| o.key), Some("a"));
    }

    #[test]
    fn time_going_backwards_holds_values_longer() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        let _ = emitted(c.push(ms(100), "a", 1));
        assert_eq!(
            c.push(ms(50), "a", 2),
            Ok(Pushed::Deferred { due: ms(110) })
        );
        assert_eq!(c.poll_ready(ms(60)), None);
        assert_eq!(c.poll_ready(ms(110)).map(|o| o.value), Some(2));
    }

    #[test]
    fn full_coalescer_refuses_new_keys_until_one_goes_idle() {
        let mut c = Coalescer::new(Duration::from_millis(10), 2);
        let _ = emitted(c.push(ms(0), "a", 1));
        let _ = emitted(c.push(ms(5), "b", 1));
        assert_eq!(
            c.push(ms(9), "c", 1),
            Err(CoalesceError::Full { max_keys: 2 })
        );
        // Existing keys still work.
        assert_eq!(c.push(ms(9), "b", 2), Ok(Pushed::Deferred { due: ms(15) }));
        // At 10 ms "a" could be delivered again at once: it can be forgotten.
        let out = emitted(c.push(ms(10), "c", 1));
        assert_eq!(out.key, "c");
        assert_eq!(c.len(), 2);
        // "b" has a held value and "c" was just delivered: nothing to forget.
        assert_eq!(
            c.push(ms(12), "d", 1),
            Err(CoalesceError::Full { max_keys: 2 })
        );
        // Delivering "b" does not free it either: it could not take a new
        // value at once until 25 ms.
        assert_eq!(c.poll_ready(ms(15)).map(|o| o.key), Some("b"));
        assert_eq!(
            c.push(ms(15), "d", 1),
            Err(CoalesceError::Full { max_keys: 2 })
        );
        // "c" (delivered at 10 ms) goes idle at 20 ms.
        let _ = emitted(c.push(ms(20), "d", 1));
        assert_eq!(c.push(ms(21), "b", 3), Ok(Pushed::Deferred { due: ms(25) }));
    }

    #[test]
    fn zero_max_keys_refuses_everything() {
        let mut c: Coalescer<&str, i32> = Coalescer::new(Duration::from_millis(10), 0);
        assert_eq!(
            c.push(ms(0), "a", 1),
            Err(CoalesceError::Full { max_keys: 0 })
        );
        assert!(c.is_empty());
    }

    #[test]
    fn zero_interval_delivers_everything_at_once() {
        let mut c = Coalescer::new(Duration::ZERO, 4);
        for i in 0..5 {
            assert_eq!(emitted(c.push(ms(0), "a", i)).value, i);
        }
    }

    #[test]
    fn flush_releases_every_held_value_in_due_order() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        let _ = emitted(c.push(ms(3), "b", 1));
        let _ = emitted(c.push(ms(0), "a", 1));
        let _ = emitted(c.push(ms(0), "idle", 1));
        let _ = c.push(ms(4), "b", 2);
        let _ = c.push(ms(4), "a", 2);
        let _ = c.push(ms(5), "a", 3);
        let out: Vec<_> = c.flush().map(|o| (o.key, o.value)).collect();
        assert_eq!(out, vec![("a", 3), ("b", 2)]);
        assert_eq!(c.held(), 0);
        assert_eq!(c.poll_timeout(), None);
        assert_eq!(c.flush().count(), 0);
    }

    #[test]
    fn a_partly_consumed_flush_leaves_the_rest_held() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        let _ = emitted(c.push(ms(0), "a", 1));
        let _ = emitted(c.push(ms(0), "b", 1));
        let _ = c.push(ms(1), "a", 2);
        let _ = c.push(ms(1), "b", 2);
        assert_eq!(c.flush().next().map(|o| o.key), Some("a"));
        assert_eq!(c.held(), 1);
        assert_eq!(c.poll_ready(ms(10)).map(|o| o.key), Some("b"));
    }

    #[test]
    fn remove_returns_the_held_value() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        let _ = emitted(c.push(ms(0), "a", 1));
        let _ = emitted(c.push(ms(0), "b", 1));
        let _ = c.push(ms(1), "a", 2);
        assert_eq!(
            c.remove(&"a"),
            Some(Coalesced {
                key: "a",
                value: 2,
                seq: 2
            })
        );
        assert_eq!(c.remove(&"b"), None);
        assert_eq!(c.remove(&"b"), None);
        assert!(c.is_empty());
        assert_eq!(c.poll_timeout(), None);
        // A removed key starts afresh.
        assert_eq!(emitted(c.push(ms(2), "a", 3)).value, 3);
    }

    #[test]
    fn sequence_numbers_grow_across_keys() {
        let mut c = Coalescer::new(Duration::from_millis(10), 4);
        assert_eq!(emitted(c.push(ms(0), "a", ())).seq, 0);
        assert_eq!(emitted(c.push(ms(0), "b", ())).seq, 1);
        let _ = c.push(ms(1), "a", ());
        assert_eq!(c.poll_ready(ms(10)).map(|o| o.seq), Some(2));
    }

    #[test]
    fn default_interval_allows_at_most_sixty_per_second() {
        let mut c = Coalescer::default();
        let mut delivered = 0;
        // Offer a value every 100 microseconds for one second.
        for i in 0..10_000u64 {
            let now = Instant::from_micros(i * 100);
            if let Ok(Pushed::Emit(_)) = c.push(now, "a", i) {
                delivered += 1;
            }
            while c.poll_ready(now).is_some() {
                delivered += 1;
            }
        }
        assert_eq!(delivered, 60);
        assert_eq!(DEFAULT_INTERVAL * 60, Duration::from_nanos(1_000_000_020));
    }
}
