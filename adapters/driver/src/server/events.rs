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
//! A shard may instead have a handler ([`ServerEvents::handle_inline`]):
//! then the task whose work queued the events (a connection task that read
//! the messages, mostly) calls it, once the state's lock is released and
//! before it writes, so an answer goes out in the same write and no other
//! task is woken. One task at a time handles a shard (the flag `handling`,
//! taken under the shard's lock): a task that finds it taken leaves its
//! events to the one handling, which takes the queue again until it is
//! empty, so a session's events still reach the handler one at a time and
//! in order. The handler is never called with a lock held, nor from inside
//! itself: a server call it makes that queues events (for any shard: the
//! core's timers may end another session) leaves them to the thread's
//! handling under way, which takes them once the handler returns.
//!
//! [`ServerOptions::event_shards`]: super::ServerOptions::event_shards
//! [`ServerOptions::event_buffer`]: super::ServerOptions::event_buffer

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use kitestring_core::server::{ConnectionId, Server, ServerEvent};
use tracing::error;

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
    /// Called with each event by the task that queued it, instead of a
    /// stream ([`ServerEvents::handle_inline`]).
    handler: Option<EventHandler>,
    /// A task is calling the handler with this shard's events: others leave
    /// theirs to it.
    handling: bool,
}

/// What [`ServerEvents::handle_inline`] calls with each event.
type EventHandler = Arc<dyn Fn(ServerEvent) + Send + Sync>;

thread_local! {
    /// The servers whose inline handlers this thread is calling, innermost
    /// last (`handle_inline`).
    static HANDLING: RefCell<Vec<Handling>> = const { RefCell::new(Vec::new()) };
}

/// A server whose inline handler this thread is calling.
struct Handling {
    /// The server (its address, as an identity).
    server: usize,
    /// The connection whose task calls the handler: a server call the
    /// handler makes queues that connection's frames without waking its
    /// task, which writes them when the handler returns.
    connection: Option<ConnectionId>,
    /// A server call from within the handler queued events for it: they
    /// are handled once the handler returns, not from inside it.
    again: bool,
}

impl ServerShared {
    /// This server, as [`Handling::server`].
    fn identity(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// The connection whose task is calling this server's inline handler
    /// on this thread.
    pub(super) fn handling_for(&self) -> Option<ConnectionId> {
        let me = self.identity();
        HANDLING.with(|h| {
            h.borrow()
                .iter()
                .rev()
                .find(|f| f.server == me)
                .and_then(|f| f.connection)
        })
    }

    /// Runs `f` as this thread's handling of this server's inline handler,
    /// then handles, shard by shard, what server calls made from the
    /// handler queued, until nothing is left. `None` if this thread is
    /// already handling this server: the events are left to it, so that the
    /// handler is never called from inside itself.
    fn handling(&self, connection: Option<ConnectionId>, f: impl FnOnce()) -> Option<()> {
        let me = self.identity();
        let nested = HANDLING.with(|h| {
            let mut h = h.borrow_mut();
            match h.iter_mut().find(|f| f.server == me) {
                Some(outer) => {
                    outer.again = true;
                    true
                }
                None => {
                    h.push(Handling {
                        server: me,
                        connection,
                        again: false,
                    });
                    false
                }
            }
        });
        if nested {
            return None;
        }
        // Popped even if `f` panics (the handler's panics are caught, but
        // the thread-local must stay true whatever happens).
        struct Pop;
        impl Drop for Pop {
            fn drop(&mut self) {
                HANDLING.with(|h| h.borrow_mut().pop());
            }
        }
        let _pop = Pop;
        f();
        loop {
            let again = HANDLING.with(|h| {
                h.borrow_mut()
                    .last_mut()
                    .is_some_and(|f| std::mem::take(&mut f.again))
            });
            if !again {
                return Some(());
            }
            for shard in self.events.iter() {
                self.handle_shard(shard);
            }
        }
    }
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
        if q.handler.is_some() {
            wakes.handle_events = true;
        } else {
            wakes.take(&mut q.waker);
        }
    }

    /// With no lock held: calls each shard's inline handler with the
    /// events queued for it, unless another task is already doing so (it
    /// takes these too). `current` is the connection task calling, if it
    /// is one.
    pub(super) fn handle_inline(&self, current: Option<ConnectionId>) {
        self.handling(current, || {
            for shard in self.events.iter() {
                self.handle_shard(shard);
            }
        });
    }

    /// Calls `shard`'s handler with what its queue holds, until it is
    /// empty, unless another task is doing so.
    fn handle_shard(&self, shard: &Shard) {
        let (handler, batch) = {
            let mut q = shard.lock();
            let Some(handler) = q.handler.clone() else {
                return;
            };
            if q.handling || q.events.is_empty() {
                return;
            }
            q.handling = true;
            (handler, std::mem::take(&mut q.events))
        };
        self.handle_held(shard, &handler, batch);
    }

    /// With `shard`'s flag `handling` taken: calls `handler` with `batch`,
    /// then with what the queue holds, until it is empty; then lets go of
    /// the flag.
    fn handle_held(&self, shard: &Shard, handler: &EventHandler, mut batch: VecDeque<ServerEvent>) {
        loop {
            let n = batch.len();
            for event in batch.drain(..) {
                // A panicking handler loses that event, not the shard: the
                // task calling it (a connection's, say) goes on.
                if catch_unwind(AssertUnwindSafe(|| handler(event))).is_err() {
                    error!("the inline event handler panicked; its event is lost");
                }
            }
            self.taken(n);
            let mut q = shard.lock();
            if q.events.is_empty() {
                q.handling = false;
                return;
            }
            std::mem::swap(&mut batch, &mut q.events);
        }
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

    /// Hands this stream's events to `handler` instead, called by the task
    /// whose work caused them, as soon as it has released the server's
    /// state: a connection task calls it with the events of the messages
    /// it read, before it writes, so the answers a handler sends
    /// ([`ServerHandle::send_payload_now`]) go out in the same write, and
    /// no application task is woken. The events of one session reach it
    /// one at a time and in order, as from the stream; events of different
    /// shards ([`split`](Self::split)) may reach it at the same time on
    /// different threads. Events this stream had taken, then those queued,
    /// are handled here first.
    ///
    /// The handler runs on the server's tasks: it must not block. It
    /// answers with the handle's calls that do not await
    /// ([`send_now`](super::ServerHandle::send_now),
    /// [`respond_now`](super::ServerHandle::respond_now),
    /// [`handled_now`](super::ServerHandle::handled_now)); for the others,
    /// and for work that waits (a database, another service), it spawns a
    /// task. The bound on events ([`ServerOptions::event_buffer`]) becomes
    /// the handler's own pace: a connection task reads its next batch only
    /// once it has handled this one. A server call the handler makes never
    /// calls it again from inside: the events that call causes (even of
    /// other shards) are handled once it returns, so a handler may hold its
    /// own locks across its calls. A panicking handler loses the event it
    /// was called with (an error is logged); the server goes on. No event
    /// says that the server stopped: [`ServerHandle::shutdown`] returns
    /// once it has.
    ///
    /// [`ServerHandle::send_payload_now`]: super::ServerHandle::send_payload_now
    /// [`ServerHandle::shutdown`]: super::ServerHandle::shutdown
    /// [`ServerOptions::event_buffer`]: super::ServerOptions::event_buffer
    pub fn handle_inline(mut self, handler: impl Fn(ServerEvent) + Send + Sync + 'static) {
        let handler: EventHandler = Arc::new(handler);
        let shared = self.shared.clone();
        let shards = std::mem::take(&mut self.shards);
        let taken = std::mem::take(&mut self.taken);
        drop(self);
        // The events taken go to their shards' handling first, in order.
        let mut first: Vec<VecDeque<ServerEvent>> =
            (0..shared.events.len()).map(|_| VecDeque::new()).collect();
        if !taken.is_empty() {
            let st = shared.lock();
            let n = shared.events.len();
            for event in taken {
                first[shard_of(&event, &st.server, n)].push_back(event);
            }
        }
        // Each shard's flag is taken with its handler set, so that no task
        // handles what was queued after the events taken here first.
        for &i in &shards {
            let mut q = shared.events[i].lock();
            q.handler = Some(handler.clone());
            q.waker = None;
            q.handling = true;
        }
        let handled = shared.handling(None, || {
            for &i in &shards {
                let batch = std::mem::take(&mut first[i]);
                shared.handle_held(&shared.events[i], &handler, batch);
            }
        });
        if handled.is_none() {
            // Called from this server's own handler: the handling that is
            // running takes these shards once the handler returns, the
            // events taken first.
            for i in shards {
                let mut q = shared.events[i].lock();
                let mut events = std::mem::take(&mut first[i]);
                events.append(&mut q.events);
                q.events = events;
                q.handling = false;
            }
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use kitestring_core::reliable::MessageId;
    use kitestring_core::wire::SessionId;

    use super::*;
    use crate::drive::tests::Frozen;
    use crate::server::ServerOptions;

    /// An event of a session whose id puts it on shard `shard` of two.
    fn acked(shard: u8, id: u64) -> ServerEvent {
        let mut session = [0; 16];
        session[0] = shard;
        ServerEvent::Acked {
            session: SessionId(session),
            first: MessageId(id),
            last: MessageId(id),
        }
    }

    /// Queues `event` on `shard` and wakes, as a server call that caused it
    /// would once it released the state.
    fn cause(shared: &ServerShared, shard: usize, event: ServerEvent) {
        let mut wakes = Wakes::default();
        shared.queue_event(shard, event, &mut wakes);
        wakes.wake(shared);
    }

    #[test]
    fn an_inline_handler_is_never_called_from_inside_itself() {
        let options = ServerOptions {
            event_shards: 2,
            ..ServerOptions::default()
        };
        let (handle, events) =
            crate::server::start(Arc::new(Frozen(Mutex::new(Instant::now()))), options).unwrap();
        let shared = handle.shared.clone();
        assert_eq!(shard_of(&acked(1, 0), &shared.lock().server, 2), 1);
        let depth = Arc::new(AtomicUsize::new(0));
        // (what, how many calls of the handler were running when it began)
        let seen = Arc::new(Mutex::new(Vec::<(u64, usize)>::new()));
        {
            let (shared, depth, seen) = (shared.clone(), depth.clone(), seen.clone());
            events.handle_inline(move |event| {
                let d = depth.fetch_add(1, Ordering::SeqCst);
                if let ServerEvent::Acked { last, .. } = event {
                    seen.lock().unwrap().push((last.0, d));
                    if last.0 == 1 {
                        // A server call from the handler that causes an
                        // event on the other shard.
                        cause(&shared, 1, acked(1, 2));
                        seen.lock().unwrap().push((100, d));
                    }
                }
                depth.fetch_sub(1, Ordering::SeqCst);
            });
        }
        cause(&shared, 0, acked(0, 1));
        // The second event waits for the first call to return.
        assert_eq!(*seen.lock().unwrap(), [(1, 0), (100, 0), (2, 0)]);
        assert_eq!(shared.event_backlog.load(Ordering::SeqCst), 0);
    }
}
