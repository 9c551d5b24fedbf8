//! What the server's tasks and handles share: [`ServerShared`], which holds the
//! locked state ([`LockedState`]: the core machine and the driver's
//! bookkeeping beside it) and what never changes after start, and each
//! connection's [`ConnSlot`], where the state leaves frames and close orders for
//! the connection's task. Running the core and carrying out its outputs
//! ([`ServerShared::run`], [`LockedState::drain`]) happens here.
//!
//! Lock order: the state's lock first, then a slot's; never the other way
//! round. A lock is held only while the core runs and its outputs are
//! queued, never across an `.await` or a socket call; connection tasks, the
//! event stream and the server task are woken through [`Wakes`] once it is
//! released. Code under the lock must not call back into the server.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::task::Waker;
use std::time::Duration;

use async_tungstenite::tungstenite::http::{HeaderMap, HeaderValue};
use async_tungstenite::tungstenite::Message;
use futures_channel::oneshot;
use futures_util::task::AtomicWaker;
use kitestring_core::close::CloseCode;
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::server::{
    ConnectionId, FeedOutput, LatestOut, Server, ServerEvent, ServerMetrics, ServerOutput,
    SessionEnd,
};
use kitestring_core::stream::HistoryConfig;
use kitestring_core::wire::{Payload, SessionId};
use tracing::{debug, error, trace, warn};

use crate::drive::Clock;
use crate::error::ServerError;
use crate::runtime::Runtime;
use crate::ws;

use super::auth::{AuthReject, AuthRequest, AuthResult, Verdict};
use super::cluster::Location;
use super::events::{shard_of, Shard};
use super::feed::{lock_feed, FeedRef, FollowOp, SharedFeed, WakeList};
use super::ServerOptions;

/// Hash maps keyed by ids the server made up (FxHash: fast, and nothing to
/// flood since peers do not choose the keys).
pub(super) type FxHashMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

/// How a connection task is told to close.
pub(super) struct CloseOrder {
    pub(super) code: CloseCode,
    pub(super) reason: &'static str,
    /// Write the queued frames first (a `goaway` before its close).
    pub(super) flush: bool,
    /// Drop the transport at once: no close frame, nothing flushed.
    pub(super) abort: bool,
}

/// What every task and handle shares: the locked state, and what never
/// changes after start.
pub(super) struct ServerShared {
    pub(super) state: Mutex<LockedState>,
    /// The server task (listener, the core's deadline, shutdown).
    pub(super) task: AtomicWaker,
    /// The server task must look at the state again: the core's deadline
    /// moved before the one its timer is armed for, a re-authentication
    /// check waits to be started, or shutdown began or may end. Set before
    /// the task is woken ([`wake_task`](Self::wake_task)): the wake-ups of
    /// its listener alone (a connection to accept) leave the state's lock
    /// to the connections.
    pub(super) look: AtomicBool,
    /// Set once shutdown began: the server task drops its listener.
    pub(super) stop_listening: AtomicBool,
    pub(super) runtime: Arc<dyn Runtime>,
    pub(super) clock: Clock,
    pub(super) options: Arc<ServerOptions>,
    /// Frames a connection may have waiting before it counts as a slow
    /// consumer ([`outbound_capacity`]).
    ///
    /// [`outbound_capacity`]: super::outbound_capacity
    pub(super) outbound: usize,
    /// Frames and bytes connection tasks took from feeds, and latest values
    /// from their slots, to write (the core counts the frames it hands out
    /// itself, and neither of these).
    pub(super) feed_frames: AtomicU64,
    pub(super) feed_bytes: AtomicU64,
    /// What a room's feed holds: what its history does, and at least as
    /// many entries as a connection's queue, so that a live member may
    /// fall as far behind a burst as a queue would let it.
    pub(super) feed_bounds: HistoryConfig,
    /// [`LockedState::stamp`], stored after each entry is appended: a
    /// connection task that emptied its slot's queue may write the entries
    /// published up to it.
    pub(super) published: AtomicU64,
    /// Events waiting for the application before connection tasks pause
    /// reading ([`ServerOptions::event_buffer`]).
    pub(super) event_room: usize,
    /// Events queued and not yet handed to the application, in all shards.
    pub(super) event_backlog: AtomicUsize,
    /// The event queues, one per shard (`events.rs`).
    pub(super) events: Box<[Shard]>,
    /// Some connection task stopped reading for want of room for events:
    /// a stream that hands one out takes the state's lock to wake them.
    pub(super) readers_paused: AtomicBool,
    /// This node's part of a cluster, with a backplane.
    pub(super) cluster: Option<Arc<super::cluster::Cluster>>,
    /// The HTTP fallback's open connections by id (`fallback.rs`): one
    /// entry per live connection task, removed when it ends.
    pub(super) links: Mutex<FxHashMap<String, Arc<super::fallback::Link>>>,
    /// Sends handed to the state lock's holder ([`ServerShared::send`]).
    pub(super) handed: Mutex<Handed>,
}

/// Sends an application task handed to the state lock's holder rather than
/// waiting for the lock ([`ServerShared::send`]). Bounded by the tasks that
/// hand them: each waits for its answer before it sends again.
#[derive(Default)]
pub(super) struct Handed {
    /// A [`ServerShared::run`] holds the state's lock and will take the
    /// sends handed before it releases it.
    open: bool,
    sends: Vec<HandedSend>,
}

/// A send handed to the lock's holder, and where its answer goes.
pub(super) struct HandedSend {
    session: SessionId,
    payload: Payload,
    reply: oneshot::Sender<SendResult>,
}

/// What a send comes to: the core's answer, or the server stopped.
pub(super) type SendResult = Result<Result<MessageId, SendError>, ServerError>;

/// Answers to handed sends, given once the lock is released.
type Replies = Vec<(oneshot::Sender<SendResult>, SendResult)>;

/// The state behind the lock: the core machine and what the driver keeps
/// beside it.
pub(super) struct LockedState {
    pub(super) server: Server,
    /// Connection tasks that registered and have not reported their end.
    pub(super) conns: FxHashMap<ConnectionId, SlotRef>,
    /// Connections that stopped reading because `events` was full.
    pub(super) paused: Vec<ConnectionId>,
    /// Callers of [`ServerHandle::ready`] waiting for room in a session's
    /// window, woken by its next acknowledgment, resume or end. One entry
    /// per waiting task; removed when woken.
    ///
    /// [`ServerHandle::ready`]: super::ServerHandle::ready
    pub(super) room_waiters: FxHashMap<SessionId, Vec<Waker>>,
    /// The deadline the server task's timer was last armed for.
    pub(super) armed: Option<kitestring_core::Instant>,
    pub(super) shutdown: Option<Shutdown>,
    /// The server task has ended.
    pub(super) stopped: bool,
    /// Each room's feed, while the core's stream for it lives.
    pub(super) feeds: FxHashMap<Arc<str>, FeedRef>,
    /// Entries published to feeds and follows begun so far: each frame
    /// queued for a connection carries the count at the time, so that the
    /// connection writes the entries published before it first.
    pub(super) stamp: u64,
    /// Re-authentication checks by an asynchronous validator, for the
    /// server task to start (it spawns each in a task of its own, outside
    /// the lock). At most one per connection that sent a token.
    pub(super) token_checks: Vec<TokenCheck>,
    /// Acknowledgments from clients that released messages, counted from
    /// the core's `Acked` events for the metrics (the core keeps no such
    /// counter).
    pub(super) acked: u64,
}

/// A re-authentication whose verdict is awaited outside the lock.
pub(super) struct TokenCheck {
    pub(super) connection: ConnectionId,
    pub(super) session: SessionId,
    pub(super) verdict: futures_util::future::BoxFuture<'static, AuthResult>,
}

/// A shutdown in progress: who waits for it, and when to stop waiting for
/// connections to close.
pub(super) struct Shutdown {
    pub(super) replies: Vec<oneshot::Sender<()>>,
    pub(super) give_up: std::time::Instant,
}

/// A connection's slot, shared by the state and the connection's task.
///
/// The state fills it under its own lock, then locks the slot for the few
/// instructions a push takes; the task locks only the slot to take its
/// frames and close orders, so it can write while another task holds the
/// state's lock (a broadcast to thousands of members, say). Lock order:
/// the state's lock first, then a slot's; never the other way round.
pub(super) type SlotRef = Arc<Mutex<ConnSlot>>;

/// Locks a slot; a panic under a slot's lock leaves nothing half-done.
pub(super) fn lock_slot(slot: &Mutex<ConnSlot>) -> MutexGuard<'_, ConnSlot> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Per connection: what the state hands its task.
#[derive(Default)]
pub(super) struct ConnSlot {
    /// Frames for the connection task to write, each with the count of feed
    /// entries published before it ([`LockedState::stamp`]). At most
    /// [`ServerShared::outbound`]; one more makes the connection a slow
    /// consumer.
    pub(super) out: VecDeque<(u64, Message)>,
    /// Feeds to follow and stop following, in order.
    pub(super) follows: Vec<FollowOp>,
    /// A close order the task has not picked up yet (boxed: given once,
    /// if ever, and every open connection holds a slot).
    pub(super) close: Option<Box<CloseOrder>>,
    /// A close order was given: nothing more is queued.
    pub(super) closing: bool,
    /// The order is an abort: the core was told the connection is gone.
    pub(super) aborted: bool,
    /// In [`LockedState::paused`].
    pub(super) paused: bool,
    /// The connection task, while it waits.
    pub(super) waker: Option<Waker>,
    /// Latest values not written yet, one per room and key: a newer one
    /// replaces the one waiting, so a connection that is not writable
    /// gets the newest value when it is, not a backlog. Written after
    /// `out` and the feeds; at most one per room and key the session's
    /// rooms hold (`ServerConfig::max_latest_keys` each). Only while some
    /// wait: a connection without latest values holds no queue.
    #[allow(clippy::box_collection)]
    pub(super) latest: Option<Box<VecDeque<LatestOut>>>,
}

impl ConnSlot {
    /// Drops the transport without a close handshake; overrides a close
    /// order the task has not picked up yet. Returns the task's waker, to
    /// wake once the lock is released.
    pub(super) fn abort(&mut self) -> Option<Waker> {
        self.closing = true;
        self.aborted = true;
        self.out.clear();
        self.follows.clear();
        self.latest = None;
        self.close = Some(Box::new(CloseOrder {
            code: CloseCode::ABNORMAL,
            reason: "aborted",
            flush: false,
            abort: true,
        }));
        self.waker.take()
    }

    /// Queues a latest value, replacing one waiting for the same room and
    /// key.
    fn push_latest(&mut self, value: LatestOut) {
        let queue = self.latest.get_or_insert_with(Default::default);
        match queue
            .iter_mut()
            .find(|v| v.key == value.key && v.room == value.room)
        {
            Some(waiting) => *waiting = value,
            None => queue.push_back(value),
        }
    }

    /// The oldest latest value waiting; the queue goes with the last.
    pub(super) fn pop_latest(&mut self) -> Option<LatestOut> {
        let queue = self.latest.as_mut()?;
        let value = queue.pop_front();
        if queue.is_empty() {
            self.latest = None;
        }
        value
    }

    pub(super) fn order(&mut self, order: CloseOrder, wakes: &mut Wakes) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.close = Some(Box::new(order));
        wakes.take(&mut self.waker);
    }
}

/// Wakers collected under the lock and woken after it is released, so a
/// woken task does not find the lock still held.
#[derive(Default)]
pub(super) struct Wakes {
    tasks: WakeList,
    pub(super) server_task: bool,
    /// Events were queued for an inline handler (`events.rs`).
    pub(super) handle_events: bool,
}

impl Wakes {
    pub(super) fn take(&mut self, waker: &mut Option<Waker>) {
        if let Some(w) = waker.take() {
            self.tasks.push(w);
        }
    }

    pub(super) fn wake(self, shared: &ServerShared) {
        self.wake_from(shared, None);
    }

    /// [`wake`](Self::wake) from the task of connection `current`, if it
    /// is one; then calls the inline event handler, if events wait for it.
    pub(super) fn wake_from(self, shared: &ServerShared, current: Option<ConnectionId>) {
        for w in self.tasks {
            w.wake();
        }
        if self.server_task {
            shared.wake_task();
        }
        if self.handle_events {
            shared.handle_inline(current);
        }
    }
}

/// Rounds of [`ServerShared::lock`]'s wait before it sleeps. Measured on
/// the echo of BENCHMARKS.md ("Peers in the same run"): without them
/// connection tasks on two cores slept on the lock behind one another, and
/// the echo ran 15 % slower at the same CPU per message; 80 rounds did no
/// better than these.
const SPIN_ROUNDS: u32 = 20;

impl ServerShared {
    /// Wakes the server task to look at the state ([`look`](Self::look)).
    pub(super) fn wake_task(&self) {
        self.look.store(true, Ordering::Release);
        self.task.wake();
    }

    /// Takes the state's lock. It is held for microseconds at a time, and
    /// when it is contended (connection tasks running what they read
    /// through the core on one core, the application sending on another) a
    /// thread put to sleep in the kernel and woken again costs more than
    /// the wait: so a thread that finds it taken tries again for a while,
    /// with pauses that double up to 64 ([`SPIN_ROUNDS`] rounds, about a
    /// thousand pauses, tens of microseconds), before it sleeps.
    pub(super) fn lock(&self) -> MutexGuard<'_, LockedState> {
        for round in 0..SPIN_ROUNDS {
            match self.state.try_lock() {
                Ok(guard) => return guard,
                // A panic under the lock leaves the core's state as it was
                // between two calls; carry on with it rather than poison
                // every handle.
                Err(TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    for _ in 0..1u32 << round.min(6) {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the state, carries out the outputs it caused, and wakes
    /// the tasks concerned once the lock is released. `current` is the
    /// connection task calling, which needs no wake-up.
    pub(super) fn run<T>(
        &self,
        current: Option<ConnectionId>,
        f: impl FnOnce(&mut LockedState, kitestring_core::Instant) -> T,
    ) -> T {
        self.run_locked(self.lock(), current, f)
    }

    /// [`run`](Self::run) with the lock taken. While `f` runs, application
    /// tasks that find the lock taken hand their sends over
    /// ([`send`](Self::send)); they run here after `f`, in the order they
    /// were handed, and are answered once the lock is released.
    fn run_locked<T>(
        &self,
        mut st: MutexGuard<'_, LockedState>,
        current: Option<ConnectionId>,
        f: impl FnOnce(&mut LockedState, kitestring_core::Instant) -> T,
    ) -> T {
        // Called by an inline event handler: the connection whose task
        // calls it writes what this queues once the handler returns.
        let current = current.or_else(|| self.handling_for());
        let mut wakes = Wakes::default();
        let mut replies = Replies::new();
        self.lock_handed().open = true;
        let now = self.clock.now(&*self.runtime);
        let result = f(&mut st, now);
        loop {
            let sends = {
                let mut handed = self.lock_handed();
                if handed.sends.is_empty() {
                    handed.open = false;
                    break;
                }
                std::mem::take(&mut handed.sends)
            };
            for h in sends {
                let r = st.send(now, h.session, h.payload);
                replies.push((h.reply, r));
            }
        }
        st.drain(self, now, current, &mut wakes);
        drop(st);
        for (reply, r) in replies {
            let _ = reply.send(r);
        }
        wakes.wake_from(self, current);
        result
    }

    fn lock_handed(&self) -> MutexGuard<'_, Handed> {
        self.handed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a payload to a session: at once if the state's lock is free;
    /// if it is taken by a [`run`](Self::run), handed to it, and the task
    /// waits for the answer (it goes on with other tasks meanwhile, instead
    /// of a thread asleep on the lock); otherwise once the lock is taken.
    pub(super) async fn send(&self, session: SessionId, payload: Payload) -> SendResult {
        match self.try_send(session, payload) {
            Ok(r) => r,
            // Dropped unanswered only if the holder panicked.
            Err(rx) => rx.await.unwrap_or(Err(ServerError::Stopped)),
        }
    }

    /// [`send`](Self::send) up to the wait: its answer, or where it comes
    /// once the lock's holder ran it.
    fn try_send(
        &self,
        session: SessionId,
        payload: Payload,
    ) -> Result<SendResult, oneshot::Receiver<SendResult>> {
        let guard = match self.state.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let mut handed = self.lock_handed();
                if !handed.open {
                    drop(handed);
                    return Ok(self.run(None, |st, now| st.send(now, session, payload)));
                }
                let (reply, rx) = oneshot::channel();
                handed.sends.push(HandedSend {
                    session,
                    payload,
                    reply,
                });
                return Err(rx);
            }
        };
        Ok(self.run_locked(guard, None, |st, now| st.send(now, session, payload)))
    }

    /// [`run`](Self::run) for a handle: fails once the server stopped.
    pub(super) fn call<T>(
        &self,
        f: impl FnOnce(&mut LockedState, kitestring_core::Instant) -> T,
    ) -> Result<T, ServerError> {
        self.run(None, |st, now| {
            if st.stopped {
                Err(ServerError::Stopped)
            } else {
                Ok(f(st, now))
            }
        })
    }
}

impl LockedState {
    /// A send to `session`: refused once the server stopped.
    fn send(
        &mut self,
        now: kitestring_core::Instant,
        session: SessionId,
        payload: Payload,
    ) -> SendResult {
        if self.stopped {
            Err(ServerError::Stopped)
        } else {
            Ok(self.server.send(now, session, payload))
        }
    }

    /// Carries out a feed output: appends to a room's feed, or tells a
    /// connection task to follow one or stop.
    fn feed(
        &mut self,
        env: &ServerShared,
        f: FeedOutput,
        current: Option<ConnectionId>,
        wakes: &mut Wakes,
    ) {
        let (connection, op) = match f {
            FeedOutput::Publish { entry, epoch } => {
                // Stamped before it is visible: a connection task that
                // copies it out may write it once its queue is empty.
                self.stamp += 1;
                env.published.store(self.stamp, Ordering::Release);
                let feed = self.feed_of(entry.room(), epoch, entry.offset());
                feed.push(self.stamp, entry, &env.feed_bounds, &mut wakes.tasks);
                return;
            }
            FeedOutput::Close { room } => {
                self.feeds.remove(&room);
                return;
            }
            FeedOutput::Follow {
                connection,
                session,
                room,
                epoch,
                after,
                codec,
            } => {
                // A follower may start behind the feed's newest entry (a
                // resumed member catching up): those entries go after the
                // frames queued before now (its `sub`), before those queued
                // after. A stamp of their own says so.
                self.stamp += 1;
                env.published.store(self.stamp, Ordering::Release);
                let feed = self.feed_of(&room, epoch, after + 1);
                let op = FollowOp::Follow {
                    room,
                    feed,
                    next: after + 1,
                    start: self.stamp,
                    session,
                    codec,
                };
                (connection, op)
            }
            FeedOutput::Unfollow { connection, room } => {
                let through = self.feeds.get(&room).map_or(0, |f| lock_feed(f).last());
                (connection, FollowOp::Unfollow { room, through })
            }
        };
        if let Some(slot) = self.conns.get(&connection) {
            let mut slot = lock_slot(slot);
            if !slot.closing {
                slot.follows.reserve_exact(1);
                slot.follows.push(op);
                if current != Some(connection) {
                    wakes.take(&mut slot.waker);
                }
            }
        }
    }

    /// The core's metrics, with the frames and bytes connection tasks wrote
    /// from room feeds (the core hands those out once per entry, not per
    /// member) and latest values (some are replaced before they are
    /// written).
    pub(super) fn metrics(&self, env: &ServerShared) -> ServerMetrics {
        let mut m = self.server.metrics();
        let traffic = &mut m.counters.traffic;
        traffic.frames_out += env.feed_frames.load(Ordering::Relaxed);
        traffic.bytes_out += env.feed_bytes.load(Ordering::Relaxed);
        m
    }

    /// `room`'s feed of `epoch`, made (empty, its first offset `first`)
    /// if there is none of that epoch.
    fn feed_of(&mut self, room: &Arc<str>, epoch: u64, first: u64) -> FeedRef {
        match self.feeds.get(room) {
            Some(f) if lock_feed(f).epoch() == epoch => f.clone(),
            _ => {
                let f = SharedFeed::new(epoch, first);
                self.feeds.insert(room.clone(), f.clone());
                f
            }
        }
    }

    /// Carries out every output of the core, in order: frames to their
    /// connection's queue, close orders, events to the application's queue.
    pub(super) fn drain(
        &mut self,
        env: &ServerShared,
        now: kitestring_core::Instant,
        current: Option<ConnectionId>,
        wakes: &mut Wakes,
    ) {
        while let Some(output) = self.server.poll_output() {
            match output {
                ServerOutput::Transmit(id, t) => {
                    let Some(slot) = self.conns.get(&id) else {
                        continue; // the task ended; the core knows
                    };
                    let mut slot = lock_slot(slot);
                    if slot.closing {
                        continue; // closing: nothing more goes out
                    }
                    if slot.out.len() >= env.outbound {
                        warn!(
                            connection = id.0,
                            session = self.server.session_of(id).map(|s| s.to_hex()).as_deref(),
                            "outbound queue full: closing a slow consumer with 4009"
                        );
                        slot.order(
                            CloseOrder {
                                code: CloseCode::SLOW_CONSUMER,
                                reason: "slow consumer",
                                flush: false,
                                abort: false,
                            },
                            wakes,
                        );
                        drop(slot);
                        self.server
                            .disconnect_connection(now, id, CloseCode::SLOW_CONSUMER);
                        continue;
                    }
                    slot.out.push_back((self.stamp, ws::to_message(t)));
                    if current != Some(id) {
                        wakes.take(&mut slot.waker);
                    }
                }
                ServerOutput::Disconnect(id, code, reason) => {
                    if code == CloseCode::SLOW_CONSUMER {
                        warn!(connection = id.0, %code, reason, "closing a slow consumer");
                    } else {
                        debug!(connection = id.0, %code, reason, "closing connection");
                    }
                    if let Some(slot) = self.conns.get(&id) {
                        lock_slot(slot).order(
                            CloseOrder {
                                code,
                                reason,
                                flush: true,
                                abort: false,
                            },
                            wakes,
                        );
                    }
                }
                ServerOutput::Feed(f) => self.feed(env, f, current, wakes),
                ServerOutput::Latest(id, value) => {
                    let Some(slot) = self.conns.get(&id) else {
                        continue;
                    };
                    let mut slot = lock_slot(slot);
                    if slot.closing {
                        continue;
                    }
                    slot.push_latest(value);
                    if current != Some(id) {
                        wakes.take(&mut slot.waker);
                    }
                }
                ServerOutput::Map(update) => match &env.cluster {
                    Some(cluster) => cluster.maps.push(update),
                    None => error!(?update, "a synced-map update without a cluster"),
                },
                ServerOutput::Cluster(c) => {
                    match &env.cluster {
                        Some(cluster) => {
                            if let Some(c) = cluster.rooms.push(c) {
                                warn!("too many room operations waiting for the backplane: refusing one");
                                super::shared_rooms::refuse_full(&mut self.server, now, c);
                            }
                        }
                        None => error!(?c, "a cluster output without a cluster"),
                    }
                }
                ServerOutput::Event(event) => {
                    log_event(&event);
                    self.wake_room_waiters(&event);
                    if let Some(cluster) = &env.cluster {
                        match &event {
                            ServerEvent::SessionOpened {
                                session, identity, ..
                            }
                            | ServerEvent::SessionArrived {
                                session, identity, ..
                            } => cluster.note(*session, Location::Here, identity.as_deref()),
                            ServerEvent::SessionEnded { session, .. }
                            | ServerEvent::SessionMoved { session } => {
                                cluster.note(*session, Location::Gone, None)
                            }
                            // Its record names its rooms.
                            ServerEvent::Joined { session, .. }
                            | ServerEvent::Left { session, .. } => {
                                cluster.note(*session, Location::Here, None)
                            }
                            _ => {}
                        }
                    }
                    if let ServerEvent::Acked { .. } = &event {
                        self.acked += 1;
                    }
                    if let ServerEvent::TokenReceived {
                        connection,
                        session,
                        token,
                    } = &event
                    {
                        self.check_token(env, now, *connection, *session, token, wakes);
                    }
                    let shard = shard_of(&event, &self.server, env.events.len());
                    env.queue_event(shard, event, wakes);
                }
            }
        }
        if let Some(deadline) = self.server.poll_timeout() {
            if self.armed.is_none_or(|armed| deadline.at < armed) {
                self.armed = Some(deadline.at);
                wakes.server_task = true;
            }
        }
        if self.shutdown.is_some() && self.conns.is_empty() {
            wakes.server_task = true;
        }
    }

    /// Lets paused connection tasks read again.
    pub(super) fn resume_readers(&mut self, env: &ServerShared, wakes: &mut Wakes) {
        env.readers_paused.store(false, Ordering::SeqCst);
        for id in std::mem::take(&mut self.paused) {
            if let Some(slot) = self.conns.get(&id) {
                let mut slot = lock_slot(slot);
                slot.paused = false;
                wakes.take(&mut slot.waker);
            }
        }
    }

    /// Stops accepting; the core sends every connection a `goaway` and a
    /// 1001; the server task stops once they closed (or the close timeout
    /// passed).
    pub(super) fn begin_shutdown(
        &mut self,
        env: &ServerShared,
        now: kitestring_core::Instant,
        reply: Option<oneshot::Sender<()>>,
    ) {
        if self.shutdown.is_none() {
            env.stop_listening.store(true, Ordering::Release);
            // The server task arms its timer for the end of the wait; the
            // caller wakes it, if it is not the task itself.
            env.look.store(true, Ordering::Release);
            // The core flushes pending batches and acknowledgments, then
            // sends every connection a goaway and a 1001. Sessions are
            // detached, not ended: members are not told anyone left.
            self.server.shutdown(now, None);
            self.shutdown = Some(Shutdown {
                replies: Vec::new(),
                give_up: env.runtime.now() + env.options.close_timeout + Duration::from_millis(500),
            });
        }
        if let (Some(shutdown), Some(reply)) = (&mut self.shutdown, reply) {
            shutdown.replies.push(reply);
        }
    }

    /// Room in a session's window comes with acknowledgments; an ended
    /// session's waiters learn it is gone.
    fn wake_room_waiters(&mut self, event: &ServerEvent) {
        if let ServerEvent::Acked { session, .. }
        | ServerEvent::SessionOpened { session, .. }
        | ServerEvent::SessionEnded { session, .. }
        | ServerEvent::SessionMoved { session } = event
        {
            if let Some(waiters) = self.room_waiters.remove(session) {
                for waker in waiters {
                    waker.wake();
                }
            }
        }
    }

    /// Validates a re-authentication token with the configured validator
    /// (or the authenticator, given the token as a bearer header): a
    /// synchronous one here, under the lock; an asynchronous one is left in
    /// [`token_checks`](Self::token_checks) for the server task, which
    /// awaits it outside the lock.
    fn check_token(
        &mut self,
        env: &ServerShared,
        now: kitestring_core::Instant,
        connection: ConnectionId,
        session: SessionId,
        token: &str,
        wakes: &mut Wakes,
    ) {
        let verdict = if let Some(validate) = &env.options.reauth {
            validate.check(token.to_owned())
        } else if let Some(auth) = &env.options.auth {
            match HeaderValue::from_str(&format!("Bearer {token}")) {
                Ok(v) => {
                    let mut headers = HeaderMap::new();
                    headers.insert("authorization", v);
                    auth.check(AuthRequest::new("", None, headers))
                }
                Err(_) => Verdict::Ready(Err(AuthReject::Unauthorized)),
            }
        } else {
            return; // the application decides
        };
        match verdict {
            Verdict::Ready(verdict) => self.apply_token(now, connection, session, verdict),
            Verdict::Pending(verdict) => {
                self.token_checks.push(TokenCheck {
                    connection,
                    session,
                    verdict,
                });
                wakes.server_task = true;
            }
        }
    }

    /// Carries out a re-authentication verdict: the connection goes on, or
    /// is closed with 4401, 4403 (also for a token naming another identity
    /// than the session's) or 1013.
    pub(super) fn apply_token(
        &mut self,
        now: kitestring_core::Instant,
        connection: ConnectionId,
        session: SessionId,
        verdict: AuthResult,
    ) {
        let bound = self.server.session(session).and_then(|s| s.identity);
        match verdict {
            Ok(identity) if identity.is_none() || identity == bound => {
                trace!(connection = connection.0, "fresh token accepted");
                self.server.accept_token(now, connection);
            }
            Ok(_) => {
                debug!(
                    connection = connection.0,
                    session = %session,
                    "fresh token names another identity"
                );
                self.server
                    .disconnect_connection(now, connection, CloseCode::FORBIDDEN);
            }
            Err(reject) => {
                debug!(connection = connection.0, session = %session, ?reject, "fresh token refused");
                let code = match reject {
                    AuthReject::Forbidden => CloseCode::FORBIDDEN,
                    AuthReject::Unauthorized => CloseCode::UNAUTHORIZED,
                    AuthReject::Unavailable => CloseCode::TRY_AGAIN_LATER,
                };
                self.server.disconnect_connection(now, connection, code);
            }
        }
    }
}

/// Logs what the application should see in its logs, with the ids that
/// tie a line to a client and a session.
fn log_event(event: &ServerEvent) {
    match event {
        ServerEvent::SessionOpened {
            connection,
            session,
            client,
            identity,
            resumed,
        } => {
            let verb = if *resumed {
                "session resumed"
            } else {
                "session opened"
            };
            debug!(
                connection = connection.0,
                session = %session,
                client = %client,
                identity = identity.as_deref(),
                resumed,
                "{verb}"
            );
        }
        ServerEvent::SessionDetached { session, code } => {
            debug!(session = %session, %code, "session detached; waiting for a resume");
        }
        ServerEvent::SessionMoved { session } => {
            debug!(session = %session, "session handed over to another node");
        }
        ServerEvent::SessionArrived {
            session, identity, ..
        } => {
            debug!(session = %session, identity = identity.as_deref(), "session taken over from another node");
        }
        ServerEvent::SessionEnded {
            session,
            reason,
            unconfirmed,
        } => match reason {
            SessionEnd::SlowConsumer | SessionEnd::Overflow => warn!(
                session = %session,
                ?reason,
                unconfirmed = unconfirmed.len(),
                "session ended: it could not keep up"
            ),
            _ => debug!(
                session = %session,
                ?reason,
                unconfirmed = unconfirmed.len(),
                "session ended"
            ),
        },
        ServerEvent::Rejected {
            connection,
            code,
            reason,
        } => {
            if *reason == "session_forbidden" {
                warn!(
                    connection = connection.0,
                    %code,
                    reason,
                    "resume refused: the session belongs to another identity"
                );
            } else {
                debug!(connection = connection.0, %code, reason, "hello rejected");
            }
        }
        ServerEvent::ConnectionClosed { connection, code } => {
            debug!(connection = connection.0, %code, "connection closed without a session");
        }
        ServerEvent::RateLimited {
            connection,
            session,
            delayed,
            refused,
            datagrams_dropped,
            limit,
        } => {
            warn!(
                connection = connection.0,
                session = %session,
                delayed,
                refused,
                datagrams_dropped,
                ?limit,
                "rate limited"
            );
        }
        ServerEvent::Refused {
            session,
            room,
            op,
            reason,
        } => {
            debug!(session = %session, %room, ?op, %reason, "room operation refused");
        }
        ServerEvent::Joined { session, room } => {
            trace!(session = %session, %room, "joined");
        }
        ServerEvent::Left { session, room } => {
            trace!(session = %session, %room, "left");
        }
        ServerEvent::DecodeFailed { connection, error } => {
            debug!(connection = connection.0, %error, "undecodable frame");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Instant;

    use futures_util::FutureExt;

    use super::*;
    use crate::drive::tests::Frozen;

    fn shared() -> Arc<ServerShared> {
        let (handle, _events) = crate::server::start(
            Arc::new(Frozen(Mutex::new(Instant::now()))),
            ServerOptions::default(),
        )
        .unwrap();
        handle.shared.clone()
    }

    fn payload() -> Payload {
        Payload::binary(bytes::Bytes::from_static(b"x"))
    }

    /// A `run` on another thread, held until told to go on, then doing
    /// `then`; returns once it holds the lock.
    fn hold(
        shared: &Arc<ServerShared>,
        then: impl FnOnce(&mut LockedState) + Send + 'static,
    ) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (held_tx, held_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let s = shared.clone();
        let holder = std::thread::spawn(move || {
            s.run(None, |st, _| {
                held_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                then(st);
            })
        });
        held_rx.recv().unwrap();
        (go_tx, holder)
    }

    /// `try_send` on a thread of its own, failing the test if it waits
    /// for the lock rather than handing the send over.
    fn hand_over(shared: &Arc<ServerShared>, session: SessionId) -> oneshot::Receiver<SendResult> {
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        std::thread::spawn(move || tx.send(s.try_send(session, payload())));
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Err(rx)) => rx,
            Ok(Ok(r)) => panic!("answered while the lock was held: {r:?}"),
            Err(_) => panic!("waited for the lock instead of handing the send over"),
        }
    }

    #[test]
    fn a_send_finding_the_lock_held_by_a_run_is_handed_over_and_answered() {
        let shared = shared();
        let unknown = SessionId([7; 16]);
        let (go, holder) = hold(&shared, |_| {});
        // Two sends while the lock is held: both handed over, in order,
        // neither answered before the holder ran them.
        let mut first = hand_over(&shared, unknown);
        let mut second = hand_over(&shared, unknown);
        assert_eq!(shared.lock_handed().sends.len(), 2);
        assert!(first.try_recv().unwrap().is_none());
        go.send(()).unwrap();
        holder.join().unwrap();
        for rx in [&mut first, &mut second] {
            match rx.try_recv().unwrap() {
                Some(Ok(Err(SendError::UnknownSession))) => {}
                other => panic!("a handed send's answer: {other:?}"),
            }
        }
        let handed = shared.lock_handed();
        assert!(handed.sends.is_empty() && !handed.open);
    }

    #[test]
    fn a_send_while_the_lock_is_held_outside_a_run_waits_for_it() {
        let shared = shared();
        let unknown = SessionId([7; 16]);
        let (locked_tx, locked_rx) = mpsc::channel();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = shared.clone();
        let r = released.clone();
        let holder = std::thread::spawn(move || {
            let st = s.lock();
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            // Set while the lock is still held: a send that did not wait
            // for it cannot see this set.
            r.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(st);
        });
        locked_rx.recv().unwrap();
        match shared.try_send(unknown, payload()) {
            Ok(Ok(Err(SendError::UnknownSession))) => {}
            other => panic!("{:?}", other.map_err(|_| "handed over")),
        }
        assert!(
            released.load(std::sync::atomic::Ordering::SeqCst),
            "did not wait"
        );
        holder.join().unwrap();
    }

    #[test]
    fn a_send_handed_to_a_run_that_stops_the_server_is_refused() {
        let shared = shared();
        let unknown = SessionId([7; 16]);
        let (go, holder) = hold(&shared, |st| st.stopped = true);
        let rx = hand_over(&shared, unknown);
        go.send(()).unwrap();
        holder.join().unwrap();
        match rx.now_or_never() {
            Some(Ok(Err(ServerError::Stopped))) => {}
            other => panic!("{other:?}"),
        }
        // And a send after the stop, with the lock free, is refused at once.
        match shared.try_send(unknown, payload()) {
            Ok(Err(ServerError::Stopped)) => {}
            other => panic!("{:?}", other.map_err(|_| "handed over")),
        }
    }
}
