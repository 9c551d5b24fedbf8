//! Room feeds: a broadcast written once for all the members of a room that
//! read it, instead of once into each member's queue.
//!
//! The core serves room-stream members through feeds (it was told so with
//! [`Server::set_room_feeds`]): a broadcast becomes one
//! [`FeedOutput::Publish`], which the state appends to the room's [`Feed`]
//! under the state's lock, waking only the followers that wait for it. Each
//! connection task that follows the room ([`Following`]) copies what is new
//! under the feed's lock alone, and writes it in order with its own frames:
//! every frame in a connection's queue carries the count of entries
//! published (and follows begun) before it, its stamp, and an entry goes
//! out before a frame whose stamp is at least its own; entries a follower
//! catches up on count as stamped when its follow began. So a connection writes exactly what the
//! core's outputs give it, in their order, without the state touching its
//! queue once per member.
//!
//! A feed holds at least what the room's history holds (trimmed by the
//! same bounds, [`HistoryConfig`], but never to fewer entries than a
//! connection's queue holds frames), so a member that resumes is started
//! from its position in the feed, and its catching up goes through no
//! queue either. A follower that falls further behind than the feed holds
//! is a slow consumer and is closed (4009); its session stays, and when it
//! resumes it is told which offsets it missed. Nothing here decides who
//! follows what: that comes from the core.
//!
//! Lock order: the state's lock, then a feed's; a connection task takes a
//! feed's lock alone, never with its slot's or the state's, and only when
//! the feed's count of appends (read without the lock) moved since it
//! left its waker there. The task that
//! answers an upgrade takes its new connection's slot's lock, then the
//! feeds' it follows (`upgrade::take_queued`): nothing takes a slot's lock
//! with a feed's held.
//!
//! [`Server::set_room_feeds`]: kitestring_core::server::Server::set_room_feeds
//! [`FeedOutput::Publish`]: kitestring_core::server::FeedOutput::Publish
//! [`HistoryConfig`]: kitestring_core::stream::HistoryConfig

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};

use async_tungstenite::tungstenite::Message;
use kitestring_core::server::RoomEntry;
use kitestring_core::stream::HistoryConfig;
use kitestring_core::wire::{Codec, SessionId};

use crate::ws;

/// Tasks to wake once a lock is released: a few without an allocation.
pub(super) type WakeList = smallvec::SmallVec<[Waker; 4]>;

/// A room's feed, shared by the state (which appends) and its followers.
pub(super) type FeedRef = Arc<SharedFeed>;

/// A [`Feed`] under its lock, and its count of appends readable without
/// the lock.
pub(super) struct SharedFeed {
    feed: Mutex<Feed>,
    /// [`Feed::round`] as of the last append finished. A follower that
    /// left its waker with the feed in this round has nothing new to copy
    /// and need not take the lock to learn it: an append under way takes
    /// that waker before the count moves, so the follower hears of it.
    rounds: AtomicU64,
}

impl SharedFeed {
    /// An empty feed whose first entry will have offset `first`.
    pub(super) fn new(epoch: u64, first: u64) -> FeedRef {
        Arc::new(SharedFeed {
            feed: Mutex::new(Feed {
                epoch,
                first,
                entries: VecDeque::new(),
                bytes: 0,
                waiters: Vec::new(),
                round: 0,
            }),
            rounds: AtomicU64::new(0),
        })
    }

    /// Appends under the feed's lock ([`Feed::push`]), then publishes the
    /// new round.
    pub(super) fn push(
        &self,
        stamp: u64,
        entry: RoomEntry,
        bounds: &HistoryConfig,
        wake: &mut WakeList,
    ) {
        let mut feed = lock_feed(self);
        feed.push(stamp, entry, bounds, wake);
        self.rounds.store(feed.round, Ordering::Release);
    }
}

/// Locks a feed; a panic under its lock leaves nothing half-done.
pub(super) fn lock_feed(feed: &SharedFeed) -> MutexGuard<'_, Feed> {
    feed.feed.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One published entry.
struct FeedEntry {
    /// Entries published before it and it: frames stamped at least this go
    /// out after it.
    stamp: u64,
    entry: RoomEntry,
    /// The entry as a WebSocket message, per codec (`[JSON, MessagePack]`),
    /// and its `skip` likewise, made by the first follower that needs it;
    /// `Err` when it does not encode (a bug).
    messages: [Option<Result<Message, ()>>; 4],
}

impl FeedEntry {
    /// What `session` writes for this entry as `codec` encodes it.
    fn message(&mut self, session: SessionId, codec: Codec) -> Result<Message, ()> {
        let skip = self.entry.except() == Some(session);
        let i = usize::from(codec == Codec::MsgPack) + 2 * usize::from(skip);
        let entry = &self.entry;
        self.messages[i]
            .get_or_insert_with(|| {
                entry
                    .transmit_for(session, codec)
                    .map(ws::to_message)
                    .ok_or(())
            })
            .clone()
    }
}

/// A room's entries, in offset order, while its followers may still need
/// them.
pub(super) struct Feed {
    epoch: u64,
    /// The offset of `entries[0]` (the next one's, when empty).
    first: u64,
    entries: VecDeque<FeedEntry>,
    bytes: usize,
    /// Followers waiting for the next entry.
    waiters: Vec<Waker>,
    /// Appends so far: a follower registered in an earlier round was woken.
    round: u64,
}

impl Feed {
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The offset the next entry gets.
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// The last offset published (`first - 1` when none is held).
    pub(super) fn last(&self) -> u64 {
        self.next() - 1
    }

    /// Appends an entry, trims as the room's history is trimmed (`bounds`),
    /// and hands over the waiting followers' wakers (through
    /// [`SharedFeed::push`], which publishes the round). An offset out of
    /// sequence (a bug) starts the feed again from it: followers behind it
    /// then find themselves behind the feed and are closed rather than skip
    /// entries.
    fn push(&mut self, stamp: u64, entry: RoomEntry, bounds: &HistoryConfig, wake: &mut WakeList) {
        let offset = entry.offset();
        if offset != self.next() {
            self.entries.clear();
            self.bytes = 0;
            self.first = offset;
        }
        self.bytes += entry.payload_len();
        self.entries.push_back(FeedEntry {
            stamp,
            entry,
            messages: [None, None, None, None],
        });
        while self.entries.len() > 1
            && (self.entries.len() > bounds.max_entries.max(1) || self.bytes > bounds.max_bytes)
        {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.entry.payload_len();
                self.first += 1;
            }
        }
        self.round += 1;
        wake.extend(self.waiters.drain(..));
    }
}

/// What the state tells a connection task about the feeds it follows, in
/// the order the core said it.
pub(super) enum FollowOp {
    /// Write the feed's entries from offset `next` on, as `session`; those
    /// published before the follow began count as stamped `start`.
    Follow {
        room: Arc<str>,
        feed: FeedRef,
        next: u64,
        start: u64,
        session: SessionId,
        codec: Codec,
    },
    /// Stop after offset `through` (what was published when the member left).
    Unfollow { room: Arc<str>, through: u64 },
}

/// The next entry a follower writes.
pub(super) struct Pending {
    pub(super) stamp: u64,
    pub(super) message: Message,
}

/// Why a follower cannot go on.
pub(super) enum FeedError {
    /// It fell further behind than the feed holds.
    Behind,
    /// An entry did not encode (a bug).
    Encode,
}

/// A connection task's hold on one feed.
pub(super) struct Following {
    room: Arc<str>,
    feed: FeedRef,
    /// The offset written next.
    next: u64,
    /// The stamp of the follow's beginning: entries published before it
    /// go out as if published then.
    start: u64,
    session: SessionId,
    codec: Codec,
    /// The last offset to write, once the member left.
    through: Option<u64>,
    /// Entries copied out of the feed, not yet written.
    buf: VecDeque<Pending>,
    /// The round in which this task's waker was left with the feed.
    waiting: Option<u64>,
}

/// Entries copied out of a feed at a time.
const REFILL: usize = 64;

impl Following {
    /// Whether it is done: the member left and everything up to its leave
    /// was written.
    fn done(&self) -> bool {
        self.buf.is_empty() && self.through.is_some_and(|t| self.next > t)
    }

    /// Copies the next entries out of the feed if nothing is buffered;
    /// with nothing new, leaves the task's waker with the feed (once per
    /// round). Returns how many entries were copied and their bytes.
    fn refill(&mut self, cx: &mut Context<'_>) -> Result<(u64, u64), FeedError> {
        if !self.buf.is_empty() || self.through.is_some_and(|t| self.next > t) {
            return Ok((0, 0));
        }
        // Waiting, and nothing appended since: the append to come wakes
        // this task (its waker is with the feed).
        if self
            .waiting
            .is_some_and(|round| round == self.feed.rounds.load(Ordering::Acquire))
        {
            return Ok((0, 0));
        }
        let mut feed = lock_feed(&self.feed);
        if self.next < feed.first {
            return Err(FeedError::Behind);
        }
        let start = usize::try_from(self.next - feed.first).unwrap_or(usize::MAX);
        let end = feed.entries.len().min(start.saturating_add(REFILL));
        let end = match self.through {
            Some(t) => end.min(usize::try_from(t + 1 - feed.first).unwrap_or(usize::MAX)),
            None => end,
        };
        if start >= end {
            if self.waiting != Some(feed.round) {
                self.waiting = Some(feed.round);
                feed.waiters.push(cx.waker().clone());
            }
            return Ok((0, 0));
        }
        let (mut frames, mut bytes) = (0, 0);
        // One allocation for the batch (the buffer is empty here, and
        // freed again once written): not one per doubling.
        self.buf.reserve(end - start);
        for e in feed.entries.range_mut(start..end) {
            let message = e
                .message(self.session, self.codec)
                .map_err(|()| FeedError::Encode)?;
            frames += 1;
            bytes += message.len() as u64;
            self.buf.push_back(Pending {
                stamp: e.stamp.max(self.start),
                message,
            });
        }
        self.next += (end - start) as u64;
        Ok((frames, bytes))
    }
}

/// The feeds one connection task follows.
#[derive(Default)]
pub(super) struct Followed {
    list: Vec<Following>,
    /// Frames and bytes copied out for writing, not yet counted.
    pub(super) frames: u64,
    pub(super) bytes: u64,
}

impl Followed {
    /// Carries out what the state said, in order.
    pub(super) fn apply(&mut self, ops: impl Iterator<Item = FollowOp>) {
        for op in ops {
            match op {
                FollowOp::Follow {
                    room,
                    feed,
                    next,
                    start,
                    session,
                    codec,
                } => {
                    self.list.retain(|f| f.room != room);
                    // One more at a time: most connections follow a room or
                    // two, and an idle one should hold no spare room.
                    self.list.reserve_exact(1);
                    self.list.push(Following {
                        room,
                        feed,
                        next,
                        start,
                        session,
                        codec,
                        through: None,
                        buf: VecDeque::new(),
                        waiting: None,
                    });
                }
                FollowOp::Unfollow { room, through } => {
                    for f in self.list.iter_mut().filter(|f| f.room == room) {
                        f.through = Some(f.through.map_or(through, |t| t.min(through)));
                    }
                }
            }
        }
        self.list.retain(|f| !f.done());
    }

    /// Whether entries were copied out and not yet written.
    pub(super) fn holds_any(&self) -> bool {
        self.list.iter().any(|f| !f.buf.is_empty())
    }

    /// The next entry to write before a frame stamped `before` (every
    /// entry, with `u64::MAX`): the oldest published of the followed
    /// feeds' next entries, if it was published before that frame.
    pub(super) fn next_before(
        &mut self,
        before: u64,
        cx: &mut Context<'_>,
    ) -> Result<Option<Pending>, FeedError> {
        if self.list.is_empty() {
            return Ok(None);
        }
        let mut best: Option<usize> = None;
        for i in 0..self.list.len() {
            let f = &mut self.list[i];
            let (frames, bytes) = f.refill(cx)?;
            self.frames += frames;
            self.bytes += bytes;
            let Some(head) = self.list[i].buf.front() else {
                continue;
            };
            if head.stamp <= before
                && best.is_none_or(|b| {
                    self.list[b]
                        .buf
                        .front()
                        .is_some_and(|o| head.stamp < o.stamp)
                })
            {
                best = Some(i);
            }
        }
        let Some(i) = best else {
            self.list.retain(|f| !f.done());
            return Ok(None);
        };
        let f = &mut self.list[i];
        let next = f.buf.pop_front();
        if f.buf.is_empty() && f.buf.capacity() > 16 {
            // After a burst: a quiet member holds no copied-out batch.
            f.buf = VecDeque::new();
        }
        if f.done() {
            self.list.swap_remove(i);
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kitestring_core::wire::{MsgKind, Payload, StreamEntry};

    /// A room's feed, fed as the state feeds it.
    struct Room {
        name: Arc<str>,
        last: u64,
        feed: FeedRef,
        stamp: u64,
        bounds: HistoryConfig,
    }

    impl Room {
        fn new(max_entries: usize) -> Room {
            Room {
                name: Arc::from("lobby"),
                last: 0,
                feed: SharedFeed::new(7, 1),
                stamp: 0,
                bounds: HistoryConfig {
                    max_entries,
                    max_bytes: 1 << 20,
                },
            }
        }

        fn entry(&mut self, n: u8, except: Option<SessionId>) -> RoomEntry {
            self.last += 1;
            let frame = StreamEntry {
                room: self.name.clone(),
                offset: self.last,
                kind: MsgKind::Plain,
                ts: None,
                payload: Payload::binary(vec![n]),
            };
            RoomEntry::new(frame, except)
        }

        /// Publishes entry `n` (for everyone but `except`); returns its stamp.
        fn publish(&mut self, n: u8, except: Option<SessionId>) -> u64 {
            let entry = self.entry(n, except);
            self.stamp += 1;
            let mut wake = WakeList::new();
            self.feed.push(self.stamp, entry, &self.bounds, &mut wake);
            self.stamp
        }

        fn follow(&mut self, followed: &mut Followed, session: SessionId, after: u64) {
            self.stamp += 1;
            followed.apply(std::iter::once(FollowOp::Follow {
                room: self.name.clone(),
                feed: self.feed.clone(),
                next: after + 1,
                start: self.stamp,
                session,
                codec: Codec::MsgPack,
            }));
        }
    }

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    /// What a message carries: the payload byte of an entry, or `None` for
    /// a `skip`.
    fn payload_of(m: &Message) -> Option<u8> {
        let limits = kitestring_core::wire::Limits {
            max_message: 1 << 20,
            version: 1,
        };
        match kitestring_core::wire::decode(
            kitestring_core::wire::Incoming::Binary(&m.clone().into_data()),
            &limits,
        )
        .unwrap()
        {
            kitestring_core::wire::Frame::Pub(e) => Some(e.payload.data()[0]),
            kitestring_core::wire::Frame::Skip { .. } => None,
            f => panic!("not an entry: {f:?}"),
        }
    }

    /// Writes everything due before `before`.
    fn drain(f: &mut Followed, before: u64) -> Vec<(u64, Option<u8>)> {
        let mut out = Vec::new();
        while let Some(p) = f.next_before(before, &mut cx()).ok().flatten() {
            out.push((p.stamp, payload_of(&p.message)));
        }
        out
    }

    const ME: SessionId = SessionId([1; 16]);
    const OTHER: SessionId = SessionId([2; 16]);

    #[test]
    fn a_follower_writes_in_stamp_order_and_skips_what_is_not_for_it() {
        let mut room = Room::new(100);
        let mut f = Followed::default();
        room.follow(&mut f, ME, 0);
        let a = room.publish(1, None);
        let b = room.publish(2, Some(ME));
        let c = room.publish(3, Some(OTHER));
        // A frame queued after `a` and before `b`: only `a` goes first.
        assert_eq!(drain(&mut f, a), vec![(a, Some(1))]);
        assert_eq!(drain(&mut f, u64::MAX), vec![(b, None), (c, Some(3))]);
        assert!(!f.holds_any());
        assert_eq!((f.frames, f.bytes > 0), (3, true));
    }

    #[test]
    fn catching_up_goes_after_the_frames_before_the_follow() {
        let mut room = Room::new(100);
        for n in 1..=5 {
            room.publish(n, None);
        }
        let mut f = Followed::default();
        // Resumed at offset 2: its `sub` was queued with the stamp before
        // the follow began.
        let sub = room.stamp;
        room.follow(&mut f, ME, 2);
        let start = room.stamp;
        assert!(drain(&mut f, sub).is_empty(), "nothing before the sub");
        let live = room.publish(6, None);
        assert_eq!(
            drain(&mut f, u64::MAX),
            vec![
                (start, Some(3)),
                (start, Some(4)),
                (start, Some(5)),
                (live, Some(6))
            ]
        );
    }

    #[test]
    fn a_follower_behind_the_feed_is_told_and_never_skips() {
        let mut room = Room::new(4);
        let mut f = Followed::default();
        room.follow(&mut f, ME, 0);
        room.publish(1, None);
        assert_eq!(drain(&mut f, u64::MAX).len(), 1);
        for n in 2..=9 {
            room.publish(n, None);
        }
        // Offsets 2..=5 are gone from the feed: the follower is behind.
        assert!(matches!(
            f.next_before(u64::MAX, &mut cx()),
            Err(FeedError::Behind)
        ));
    }

    #[test]
    fn unfollow_writes_through_the_leave_and_no_further() {
        let mut room = Room::new(100);
        let mut f = Followed::default();
        room.follow(&mut f, ME, 0);
        room.publish(1, None);
        room.publish(2, None);
        let through = lock_feed(&room.feed).last();
        f.apply(std::iter::once(FollowOp::Unfollow {
            room: room.name.clone(),
            through,
        }));
        room.publish(3, None);
        let got: Vec<Option<u8>> = drain(&mut f, u64::MAX).into_iter().map(|p| p.1).collect();
        assert_eq!(got, vec![Some(1), Some(2)]);
        assert!(f.list.is_empty(), "done with the room");
    }

    #[test]
    fn a_waiting_follower_is_woken_once_per_entry() {
        let (count, waker) = crate::drive::tests::CountingWaker::new();
        let mut cx = Context::from_waker(&waker);
        let mut room = Room::new(100);
        let mut f = Followed::default();
        room.follow(&mut f, ME, 0);
        // Caught up, asked twice: registered once.
        assert!(f.next_before(u64::MAX, &mut cx).ok().flatten().is_none());
        assert!(f.next_before(u64::MAX, &mut cx).ok().flatten().is_none());
        assert_eq!(lock_feed(&room.feed).waiters.len(), 1);
        let mut wake = WakeList::new();
        let entry = room.entry(1, None);
        room.feed.push(1, entry, &room.bounds, &mut wake);
        assert_eq!(wake.len(), 1);
        wake.into_iter().for_each(Waker::wake);
        assert_eq!(count.count(), 1);
    }

    #[test]
    fn a_caught_up_follower_checks_for_entries_without_the_lock() {
        let (_count, waker) = crate::drive::tests::CountingWaker::new();
        let mut cx = Context::from_waker(&waker);
        let mut room = Room::new(100);
        let mut f = Followed::default();
        room.follow(&mut f, ME, 0);
        assert!(f.next_before(u64::MAX, &mut cx).ok().flatten().is_none());
        // With the feed's lock held elsewhere, asking again answers at
        // once: nothing was appended since its waker was left.
        let feed = room.feed.clone();
        let (held, release) = (
            std::sync::mpsc::channel::<()>(),
            std::sync::mpsc::channel::<()>(),
        );
        let holder = std::thread::spawn(move || {
            let _guard = lock_feed(&feed);
            held.0.send(()).unwrap();
            let _ = release.1.recv_timeout(std::time::Duration::from_secs(10));
        });
        held.1.recv().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let asker = std::thread::spawn(move || {
            let (_count, waker) = crate::drive::tests::CountingWaker::new();
            let mut cx = Context::from_waker(&waker);
            let none = f.next_before(u64::MAX, &mut cx).ok().flatten().is_none();
            done_tx.send(none).unwrap();
        });
        let answered = done_rx.recv_timeout(std::time::Duration::from_secs(5));
        release.0.send(()).unwrap();
        holder.join().unwrap();
        asker.join().unwrap();
        assert_eq!(answered, Ok(true), "the check waited for the feed's lock");
    }

    /// A waker that unparks the thread that made it.
    struct Unpark(std::thread::Thread);

    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    #[test]
    fn a_follower_racing_the_appends_misses_no_entry_and_no_wake() {
        const ENTRIES: u64 = 20_000;
        let mut room = Room::new(64);
        let mut f = Followed::default();
        room.follow(&mut f, ME, 0);
        let progress = Arc::new(AtomicU64::new(0));
        let read = progress.clone();
        let reader = std::thread::spawn(move || {
            let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
            let mut cx = Context::from_waker(&waker);
            let mut got = 0u64;
            let mut last_progress = std::time::Instant::now();
            while got < ENTRIES {
                match f.next_before(u64::MAX, &mut cx) {
                    Ok(Some(p)) => {
                        got += 1;
                        assert_eq!(payload_of(&p.message), Some((got % 251) as u8));
                        read.store(got, Ordering::Release);
                        last_progress = std::time::Instant::now();
                    }
                    Ok(None) => {
                        // Parked until an append wakes it; a lost wake-up
                        // leaves it parked, which the deadline turns into
                        // a failure.
                        std::thread::park_timeout(std::time::Duration::from_secs(1));
                        assert!(
                            last_progress.elapsed() < std::time::Duration::from_secs(5),
                            "no entry for 5 s after {got}: a wake-up was lost"
                        );
                    }
                    Err(_) => panic!("behind after {got}"),
                }
            }
        });
        for n in 1..=ENTRIES {
            let entry = room.entry((n % 251) as u8, None);
            room.stamp += 1;
            let mut wake = WakeList::new();
            room.feed.push(room.stamp, entry, &room.bounds, &mut wake);
            wake.into_iter().for_each(Waker::wake);
            // Never further ahead of the reader than the feed holds.
            while n >= progress.load(Ordering::Acquire) + 32 && !reader.is_finished() {
                std::thread::yield_now();
            }
        }
        reader.join().unwrap();
    }
}
