//! The application's event queues: one per shard
//! ([`ServerOptions::event_shards`]), each under a lock of its own, so that
//! taking an event never waits for the server's state, and a server whose
//! application handles sessions on several tasks has no one queue they all
//! take from.
//!
//! The state appends each event to the shard of the session it concerns
//! (events of a connection that carries no session go to shard 0), so the
//! events of one session keep their order. A [`ServerEvents`] stream takes
//! a shard's whole queue at once and hands the events out one by one; the
//! count of events not yet handed out ([`ServerShared::event_backlog`])
//! bounds them all together: connection tasks stop reading while it is at
//! [`ServerOptions::event_buffer`], and the stream that takes one below it
//! lets them read again. Lock order: the state's lock, then a shard's; a
//! stream takes a shard's lock alone.
//!
//! [`ServerOptions::event_shards`]: super::ServerOptions::event_shards
//! [`ServerOptions::event_buffer`]: super::ServerOptions::event_buffer

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use kitestring_core::server::{Server, ServerEvent};

use super::shared::{ServerShared, Wakes};

/// One shard's queue.
#[derive(Default)]
pub(super) struct Shard {
    queue: Mutex<ShardQueue>,
}

#[derive(Default)]
struct ShardQueue {
    events: VecDeque<ServerEvent>,
    /// The stream taking this shard, while it waits.
    waker: Option<Waker>,
    /// The stream taking this shard was dropped: events are discarded.
    dropped: bool,
    /// The server stopped: the stream ends once the queue is empty.
    stopped: bool,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, ShardQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The shard of `event` among `n`: its session's, else its connection's
/// session's, else 0.
pub(super) fn shard_of(event: &ServerEvent, server: &Server, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let session = event
        .session()
        .or_else(|| event.connection().and_then(|c| server.session_of(c)));
    match session {
        // Session ids are 128 random bits: any 8 of them spread evenly.
        Some(s) => {
            let mut word = [0u8; 8];
            word.copy_from_slice(&s.0[..8]);
            (u64::from_le_bytes(word) % n as u64) as usize
        }
        None => 0,
    }
}

impl ServerShared {
    /// Under the state's lock: queues `event` on shard `shard` (unless its
    /// stream was dropped) and collects the stream's waker.
    pub(super) fn queue_event(&self, shard: usize, event: ServerEvent, wakes: &mut Wakes) {
        let Some(s) = self.events.get(shard) else {
            return;
        };
        let mut q = s.lock();
        if q.dropped {
            return;
        }
        q.events.push_back(event);
        self.event_backlog.fetch_add(1, Ordering::SeqCst);
        wakes.take(&mut q.waker);
    }

    /// Under the state's lock: the server stopped; every stream ends once
    /// it has handed out what is queued.
    pub(super) fn stop_events(&self, wakes: &mut Wakes) {
        for s in self.events.iter() {
            let mut q = s.lock();
            q.stopped = true;
            wakes.take(&mut q.waker);
        }
    }

    /// Whether connection tasks may read: the application has room for the
    /// events that reading causes.
    pub(super) fn events_have_room(&self) -> bool {
        self.event_backlog.load(Ordering::SeqCst) < self.event_room
    }

    /// `n` events were handed out (or discarded): lets paused connection
    /// tasks read again if there is room now.
    fn taken(&self, n: usize) {
        if n == 0 {
            return;
        }
        let left = self.event_backlog.fetch_sub(n, Ordering::SeqCst) - n;
        if left < self.event_room && self.readers_paused.load(Ordering::SeqCst) {
            let mut wakes = Wakes::default();
            {
                let mut st = self.lock();
                if self.events_have_room() {
                    st.resume_readers(self, &mut wakes);
                }
            }
            wakes.wake(self);
        }
    }
}

/// The stream of [`ServerEvent`]s: every shard's, or one shard's after
/// [`split`](Self::split). Ends when the server stops.
///
/// While [`ServerOptions::event_buffer`] events wait unread (in all shards
/// together), connection tasks stop reading their sockets, so an
/// application that falls behind slows its clients (TCP pushes back on
/// peers). Events caused by timers and by handle calls are still queued,
/// so the queues can exceed the bound by what those produce (a few per
/// session at most). Dropping a stream discards its shards' events from
/// then on.
///
/// [`ServerOptions::event_buffer`]: super::ServerOptions::event_buffer
pub struct ServerEvents {
    shared: Arc<ServerShared>,
    /// The shards this stream takes.
    shards: Vec<usize>,
    /// The shard to look at first next time (round robin).
    next: usize,
    /// Events taken from a shard, not yet handed out.
    taken: VecDeque<ServerEvent>,
}

impl fmt::Debug for ServerEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerEvents")
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl ServerEvents {
    /// The stream of every shard.
    pub(super) fn new(shared: Arc<ServerShared>) -> ServerEvents {
        let shards = (0..shared.events.len()).collect();
        ServerEvents {
            shared,
            shards,
            next: 0,
            taken: VecDeque::new(),
        }
    }

    /// One stream per shard ([`ServerOptions::event_shards`]), for an
    /// application that handles sessions on as many tasks: each session's
    /// events arrive on one of them, in order, and events of connections
    /// that carry no session (refused handshakes, say) on the first. With
    /// one shard, a vector of this stream alone. Events this stream had
    /// taken but not handed out go back to their shards first.
    ///
    /// [`ServerOptions::event_shards`]: super::ServerOptions::event_shards
    pub fn split(mut self) -> Vec<ServerEvents> {
        let shared = self.shared.clone();
        let shards = std::mem::take(&mut self.shards);
        if !self.taken.is_empty() {
            let st = shared.lock();
            let n = shared.events.len();
            // Back to the front of their queues, in order.
            for event in std::mem::take(&mut self.taken).into_iter().rev() {
                let i = shard_of(&event, &st.server, n);
                shared.events[i].lock().events.push_front(event);
            }
        }
        shards
            .into_iter()
            .map(|i| ServerEvents {
                shared: shared.clone(),
                shards: vec![i],
                next: 0,
                taken: VecDeque::new(),
            })
            .collect()
    }

    /// The shards this stream takes events from.
    pub fn shards(&self) -> &[usize] {
        &self.shards
    }
}

impl Stream for ServerEvents {
    type Item = ServerEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ServerEvent>> {
        let this = &mut *self;
        if let Some(event) = this.taken.pop_front() {
            this.shared.taken(1);
            return Poll::Ready(Some(event));
        }
        let n = this.shards.len();
        let mut ended = true;
        for k in 0..n {
            let i = this.shards[(this.next + k) % n];
            let mut q = this.shared.events[i].lock();
            if !q.events.is_empty() {
                std::mem::swap(&mut this.taken, &mut q.events);
                drop(q);
                this.next = (this.next + k + 1) % n;
                let event = this.taken.pop_front();
                this.shared.taken(1);
                return Poll::Ready(event);
            }
            if !q.stopped {
                ended = false;
                match &q.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => q.waker = Some(cx.waker().clone()),
                }
            }
        }
        if ended {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

impl Drop for ServerEvents {
    fn drop(&mut self) {
        let mut discarded = self.taken.len();
        self.taken.clear();
        for &i in &self.shards {
            let mut q = self.shared.events[i].lock();
            q.dropped = true;
            discarded += q.events.len();
            q.events.clear();
            q.waker = None;
        }
        self.shared.taken(discarded);
    }
}
