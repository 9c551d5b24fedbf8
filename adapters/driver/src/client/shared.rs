//! What a client's handles and its driver task share: [`ClientShared`], which
//! holds the locked [`Inner`] (the core [`Client`] machine, the waiters for
//! acknowledgments, responses and closes, and the application's event
//! queue) beside the counters read without the lock.
//!
//! The lock is held for one call into the core and the bookkeeping around
//! it, never across an `.await` or a socket call. Nothing here touches a
//! socket.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use futures_channel::oneshot;
use futures_util::task::AtomicWaker;
use kitestring_core::client::{Client, Event, Received, RequestError, State};
use kitestring_core::reliable::MessageId;
use kitestring_core::wire::Codec;

use crate::drive::Clock;
use crate::error::ClientError;
use crate::runtime::Runtime;

pub(super) type AckReply = oneshot::Sender<Result<(), ClientError>>;
pub(super) type CloseReply = oneshot::Sender<Result<(), ClientError>>;
pub(super) type ResponseReply = oneshot::Sender<Result<Received, ClientError>>;

const CODEC_JSON: u8 = 0;
pub(super) const CODEC_MSGPACK: u8 = 1;

pub(super) fn codec_tag(c: Codec) -> u8 {
    match c {
        Codec::MsgPack => CODEC_MSGPACK,
        _ => CODEC_JSON,
    }
}

/// What the handles and the driver task share.
pub(super) struct ClientShared {
    pub(super) inner: Mutex<Inner>,
    /// Wakes the driver task after a handle call, so it carries out what the
    /// call made the core produce (outside the mutex: waking never locks).
    pub(super) driver: AtomicWaker,
    /// Live [`ClientHandle`]s; the last one going wakes the driver, which
    /// then closes the session.
    ///
    /// [`ClientHandle`]: super::ClientHandle
    pub(super) handles: AtomicUsize,
    pub(super) runtime: Arc<dyn Runtime>,
    pub(super) clock: Clock,
    /// The codec typed sends use (see [`ClientHandle::codec`]).
    ///
    /// [`ClientHandle::codec`]: super::ClientHandle::codec
    pub(super) codec: AtomicU8,
    /// Frames waiting for the socket after the driver's last step; datagrams
    /// are refused while there are [`DATAGRAM_BACKLOG`] or more.
    ///
    /// [`DATAGRAM_BACKLOG`]: super::DATAGRAM_BACKLOG
    pub(super) unsent: AtomicUsize,
    /// The driver's span; later log lines carry the session id.
    pub(super) span: tracing::Span,
    /// Events waiting before the driver stops reading the socket
    /// ([`ClientOptions::event_buffer`]).
    ///
    /// [`ClientOptions::event_buffer`]: super::ClientOptions::event_buffer
    pub(super) event_room: usize,
    /// Events waiting, as of the last change under the lock: the driver
    /// looks at it before reading, without the lock.
    pub(super) queued: AtomicUsize,
    /// What carries the current connection: 0 none, 1 WebSocket, 2 the
    /// HTTP fallback (see [`ClientHandle::transport`]).
    ///
    /// [`ClientHandle::transport`]: super::ClientHandle::transport
    pub(super) transport: AtomicU8,
}

impl ClientShared {
    /// The state, even if a thread panicked while holding it: every change
    /// under the lock is one call into the core plus map updates, so the
    /// state stays usable.
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn now(&self) -> kitestring_core::Instant {
        self.clock.now(&*self.runtime)
    }
}

/// The machine and the bookkeeping handle calls touch.
pub(super) struct Inner {
    pub(super) client: Client,
    /// Messages whose sender waits for the acknowledgment. Bounded by the
    /// core's queue and window: only accepted messages get an entry.
    pub(super) waiters: BTreeMap<MessageId, AckReply>,
    /// Requests whose sender waits for the response. Bounded by the core's
    /// `max_pending_requests`: only accepted requests get an entry, and an
    /// entry leaves with the core's `Response` or `RequestFailed`.
    pub(super) requests: BTreeMap<MessageId, ResponseReply>,
    /// `close()` calls waiting for the close to complete.
    pub(super) close_replies: Vec<CloseReply>,
    /// A handle asked to close: the driver stops once the core is closed.
    pub(super) stop_when_closed: bool,
    /// The driver task has stopped (or is stopping): calls fail with
    /// [`ClientError::Stopped`].
    pub(super) stopped: bool,
    /// Events for the application, bounded by `event_room` (see the module
    /// documentation).
    pub(super) events: VecDeque<Event>,
    /// How many of `events` are [`Event::Latest`]: with none, a new one is
    /// queued without looking for one of its key.
    pub(super) latest_queued: usize,
    pub(super) events_waker: Option<Waker>,
    /// The event stream was dropped: events are discarded.
    pub(super) events_dropped: bool,
    /// The driver task is gone: once `events` is empty the stream ends.
    pub(super) events_ended: bool,
    /// The driver stopped reading because `events` was full; the stream
    /// wakes it when there is room again.
    pub(super) reader_paused: bool,
    /// Callers of [`ClientHandle::ready`] waiting for room in the send
    /// window: woken by every acknowledgment and state change. One entry
    /// per waiting task.
    ///
    /// [`ClientHandle::ready`]: super::ClientHandle::ready
    pub(super) room_waiters: Vec<Waker>,
}

impl Inner {
    /// Queues an event for the application; returns the stream's waker.
    ///
    /// A latest value ([`Event::Latest`]) whose room and key already have
    /// one waiting takes that one's place: the application reads the
    /// newest value of a key where it would have read the older one, and
    /// the queue holds at most one per key however slowly it is read.
    pub(super) fn push_event(&mut self, shared: &ClientShared, event: Event) -> Option<Waker> {
        if self.events_dropped {
            return None;
        }
        if let Event::Latest { room, key, .. } = &event {
            if self.latest_queued > 0 {
                let waiting = self.events.iter_mut().rev().find(
                    |e| matches!(e, Event::Latest { room: r, key: k, .. } if r == room && k == key),
                );
                if let Some(waiting) = waiting {
                    *waiting = event;
                    return None;
                }
            }
            self.latest_queued += 1;
        }
        self.events.push_back(event);
        shared.queued.store(self.events.len(), Ordering::Relaxed);
        self.events_waker.take()
    }

    pub(super) fn finished(&self, handles_gone: bool) -> bool {
        let terminal = matches!(
            self.client.state(),
            State::Closed { .. } | State::Failed { .. } | State::Disconnected
        );
        terminal && (self.stop_when_closed || handles_gone)
    }
}

pub(super) fn fail_waiters(
    waiters: &mut BTreeMap<MessageId, AckReply>,
    error: impl Fn(MessageId) -> ClientError,
) {
    for (id, w) in std::mem::take(waiters) {
        let _ = w.send(Err(error(id)));
    }
}

pub(super) fn fail_requests(
    requests: &mut BTreeMap<MessageId, ResponseReply>,
    error: RequestError,
) {
    for (id, w) in std::mem::take(requests) {
        let _ = w.send(Err(ClientError::Request { id, error }));
    }
}
