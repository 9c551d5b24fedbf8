//! One connection's task: reads frames, decodes them (once the connection's
//! `hello` was answered, with the decoder it took from the core, before the
//! state's lock is taken) and runs them through the core under the state's
//! lock, writes the frames the core left in its slot, pauses
//! reading while the application's event queue is full or the rate limit
//! pushes back, and closes when told or when the peer goes.
//!
//! It takes its frames under its slot's lock alone, so it writes while
//! another task holds the state's; it never holds a lock across a socket
//! call or an `.await`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use kitestring_core::close::CloseCode;
use kitestring_core::server::{ConnDecoder, ConnectionId, Decoded};
use kitestring_core::wire::{Incoming, SessionId};
use smallvec::SmallVec;
use tracing::{debug, trace, warn, Instrument};

use crate::drive::ReadyFlag;
use crate::runtime::BoxFuture;
use crate::util;
use crate::ws;

use super::feed::{FeedError, Followed};
use super::shared::{lock_slot, CloseOrder, ConnSlot, ServerShared, SlotRef, Wakes};
use super::upgrade::{claim_for, in_band_form, Early};

/// How a connection task's main loop ended.
enum ConnEnd {
    /// The peer closed (a close frame), the stream ended (`None`) or a read
    /// failed.
    Ended(Option<Result<Message, WsError>>),
    /// The core (or shutdown) ordered a close.
    Close(CloseOrder),
    WriteFailed,
}

/// What carries a connection's frames: a WebSocket, or the HTTP fallback's
/// link (`fallback.rs`). The connection task reads and writes messages
/// through it the same way whichever it is.
pub(super) trait Carrier:
    Sink<Message, Error = WsError> + Stream<Item = Result<Message, WsError>> + Send + Unpin + 'static
{
    /// Writes what is buffered, then a close with `frame`.
    fn close_with(&mut self, frame: CloseFrame) -> BoxFuture<'_, ()>;
    /// After a close that answered a broken read: ends the write side and
    /// discards what the peer still sends, at most `limit` bytes.
    fn linger(&mut self, limit: usize) -> BoxFuture<'_, ()>;
}

impl<S> Carrier for WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fn close_with(&mut self, frame: CloseFrame) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.close(Some(frame)).await;
        })
    }

    fn linger(&mut self, limit: usize) -> BoxFuture<'_, ()> {
        Box::pin(ws::linger(self.get_mut(), limit))
    }
}

/// Frames read in one go, run through the core under one lock: on the
/// stack of one poll, so neither a burst's buffer nor its allocation is
/// carried from one read to the next.
type Batch = SmallVec<[Message; ConnIo::BATCH]>;

/// A batch decoded outside the state's lock, on the stack of one poll.
type DecodedBatch = SmallVec<[Decoded; ConnIo::BATCH]>;

/// A connection task's own buffers.
struct ConnIo {
    id: ConnectionId,
    /// Shared with the state, which fills it.
    slot: SlotRef,
    /// Frames taken from the slot, not yet accepted by the socket, with
    /// their stamps. Taken only when empty, so at most
    /// [`ServerShared::outbound`].
    out: VecDeque<(u64, Message)>,
    /// The room feeds this connection writes from.
    followed: Followed,
    /// Entries stamped up to this may be written once the frames before
    /// them are: it was every entry published when the slot's queue was
    /// last emptied.
    horizon: u64,
    /// The connection's decoder once its `hello` was answered
    /// ([`Server::take_decoder`]): messages are decoded before the state's
    /// lock is taken, so the lock is held for what they do, not for
    /// parsing them.
    ///
    /// [`Server::take_decoder`]: kitestring_core::server::Server::take_decoder
    decoder: Option<ConnDecoder>,
    /// The first frame, read before this task ran (with a cluster, to claim
    /// the session its `hello` resumes): the first batch begins with it.
    first: Vec<Message>,
    needs_flush: bool,
    /// The last batch read held several messages, and the application's
    /// answers to them may still be coming: the flush of the first frames
    /// that arrive without a read is put off for one turn of the scheduler,
    /// so that the rest go out in the same write. Cleared by that turn.
    answers_due: bool,
    /// Read only when the socket signalled: this task also wakes for every
    /// outgoing frame, and a read attempt is not free.
    readable: ReadyFlag,
    /// While the rate limit pushes back ([`Server::read_paused_until`]):
    /// nothing is read before this timer fires, so a flooding client is
    /// slowed by its own TCP window instead of having messages dropped.
    ///
    /// [`Server::read_paused_until`]: kitestring_core::server::Server::read_paused_until
    throttle: Option<Pin<Box<dyn crate::runtime::AsyncTimer>>>,
}

impl ConnIo {
    /// Frames read per batch, and per wake-up before yielding so one busy
    /// connection cannot hold a worker thread.
    const BATCH: usize = 32;
    const READ_BUDGET: usize = 128;

    /// Under the state's lock: `true` if the application has room for
    /// events after all, else marks this connection paused (the
    /// application's next take wakes it) and returns `false`.
    fn pause_unless_room(&self, shared: &ServerShared) -> bool {
        let mut st = shared.lock();
        if shared.events_have_room() {
            return true;
        }
        {
            let mut slot = lock_slot(&self.slot);
            if !slot.paused {
                slot.paused = true;
                st.paused.push(self.id);
            }
        }
        // Said before looking again: a stream that hands an event out
        // after this sees it and lets the readers go; one that did before
        // left room that the second look sees.
        shared.readers_paused.store(true, Ordering::SeqCst);
        if shared.events_have_room() {
            let mut wakes = Wakes::default();
            st.resume_readers(shared, &mut wakes);
            drop(st);
            wakes.wake(shared);
            return true;
        }
        false
    }

    /// A feed this connection follows cannot go on: it fell behind what
    /// the feed holds (a slow consumer), or an entry did not encode. The
    /// core closes the connection, and its session resumes from the rooms'
    /// histories.
    fn feed_failed(&mut self, shared: &ServerShared, e: FeedError) {
        let id = self.id;
        let (code, why) = match e {
            FeedError::Behind => (CloseCode::SLOW_CONSUMER, "fell behind a room feed"),
            FeedError::Encode => (CloseCode::INTERNAL_ERROR, "a room entry did not encode"),
        };
        warn!(connection = id.0, %code, "closing a connection that {why}");
        self.followed = Followed::default();
        shared.run(Some(id), |st, now| {
            st.server.disconnect_connection(now, id, code);
        });
    }

    /// Nothing to read and nothing left to write: the task waits. The
    /// frame queue a burst left behind is let go, so an idle connection
    /// holds none (the next burst allocates once): the one it took from the
    /// slot (the slot keeps the other, empty once swapped). Reads need no
    /// buffer of their own: a batch lives on the stack of one poll.
    fn settle(&mut self) {
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = VecDeque::new();
        }
    }

    /// Adds what was taken from feeds to the server's counters.
    fn count_feed_writes(&mut self, shared: &ServerShared) {
        if self.followed.frames > 0 {
            let f = &mut self.followed;
            shared.feed_frames.fetch_add(f.frames, Ordering::Relaxed);
            shared.feed_bytes.fetch_add(f.bytes, Ordering::Relaxed);
            (f.frames, f.bytes) = (0, 0);
        }
    }

    fn poll<C: Carrier>(
        &mut self,
        shared: &ServerShared,
        ws: &mut C,
        cx: &mut Context<'_>,
    ) -> Poll<ConnEnd> {
        let mut read = 0;
        loop {
            // What the state holds for this connection: only the slot is
            // locked, so writing never waits for the state's lock.
            let may_read = {
                let mut slot = lock_slot(&self.slot);
                if let Some(order) = slot.close.take() {
                    if order.flush {
                        self.out.extend(slot.out.drain(..));
                        self.followed
                            .apply(std::mem::take(&mut slot.follows).into_iter());
                    }
                    return Poll::Ready(ConnEnd::Close(*order));
                }
                match &slot.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
                take_frames(
                    &mut self.out,
                    &mut self.followed,
                    &mut self.horizon,
                    shared,
                    &mut slot,
                );
                !slot.paused
            };
            // Whether the application has room for the events reading
            // causes; if not, the task pauses, checked and recorded under
            // the state's lock so that the application's next take cannot
            // miss it.
            let may_read = may_read
                && (shared.event_backlog.load(Ordering::Relaxed) < shared.event_room
                    || self.pause_unless_room(shared));
            let may_read = may_read
                && match self.throttle.as_mut().map(|t| t.as_mut().poll(cx)) {
                    Some(Poll::Pending) => false,
                    Some(Poll::Ready(())) => {
                        self.throttle = None;
                        true
                    }
                    None => true,
                };
            // Writes: hand frames over only while the socket accepts them,
            // so a stalled peer leaves them queued (and bounded); feed
            // entries go before the frames queued after they were published.
            loop {
                match Pin::new(&mut *ws).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(ConnEnd::WriteFailed),
                    Poll::Pending => break,
                }
                let before = self.out.front().map_or(self.horizon, |(stamp, _)| *stamp);
                let m = match self.followed.next_before(before.min(self.horizon), cx) {
                    Ok(Some(entry)) => entry.message,
                    Ok(None) => match self.out.pop_front() {
                        Some((_, m)) => m,
                        None if self.followed.holds_any() => {
                            // Entries published after the frames were
                            // taken: take again, then write them in order.
                            let mut slot = lock_slot(&self.slot);
                            let horizon = self.horizon;
                            take_frames(
                                &mut self.out,
                                &mut self.followed,
                                &mut self.horizon,
                                shared,
                                &mut slot,
                            );
                            drop(slot);
                            if self.horizon == horizon && self.out.is_empty() {
                                break; // nothing new (cannot happen)
                            }
                            continue;
                        }
                        // Latest values last, one at a time from the slot:
                        // one replaced while the socket was busy goes out
                        // as the newest.
                        None => match lock_slot(&self.slot).pop_latest() {
                            Some(v) => {
                                self.followed.frames += 1;
                                self.followed.bytes += v.transmit.data().len() as u64;
                                ws::to_message(v.transmit)
                            }
                            None => break,
                        },
                    },
                    Err(e) => {
                        self.feed_failed(shared, e);
                        // The close order is in the slot: look again.
                        cx.waker().wake_by_ref();
                        continue;
                    }
                };
                if Pin::new(&mut *ws).start_send(m).is_err() {
                    return Poll::Ready(ConnEnd::WriteFailed);
                }
                self.needs_flush = true;
            }
            self.count_feed_writes(shared);
            // Woken for frames alone after reading a burst: once, let the
            // application queue the rest of its answers before the write
            // goes out. An answer to a lone message goes out at once.
            if self.needs_flush && read == 0 && self.answers_due {
                self.answers_due = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.needs_flush {
                match Pin::new(&mut *ws).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.needs_flush = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(ConnEnd::WriteFailed),
                    Poll::Pending => {}
                }
            }
            if !may_read {
                return Poll::Pending; // woken when the application makes room
            }
            if read >= Self::READ_BUDGET {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            // Reads: everything already there, up to a batch.
            let mut end = None;
            let mut batch = Batch::new();
            if !self.first.is_empty() {
                batch.extend(std::mem::take(&mut self.first));
            }
            while batch.len() < Self::BATCH {
                match self.readable.poll(cx, |cx| ws.poll_next_unpin(cx)) {
                    Poll::Ready(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => {
                        batch.push(m);
                    }
                    // Pings and pongs: tungstenite answers pings itself.
                    Poll::Ready(Some(Ok(
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_),
                    ))) => {}
                    Poll::Ready(other) => {
                        end = Some(other);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if batch.is_empty() && end.is_none() {
                self.settle();
                return Poll::Pending;
            }
            read += batch.len();
            if !batch.is_empty() {
                self.answers_due = batch.len() > 1;
                let id = self.id;
                let paused = match self.decoder.as_mut() {
                    // Decoded before the state's lock is taken.
                    Some(decoder) => {
                        let decoded: DecodedBatch = batch
                            .iter()
                            .filter_map(incoming)
                            .map(|m| decoder.decode(m))
                            .collect();
                        drop(batch);
                        shared.run(Some(id), |st, now| {
                            for m in decoded {
                                st.server.handle_decoded(now, id, m);
                            }
                            st.server.read_paused_until(id)
                        })
                    }
                    None => {
                        let decoder = &mut self.decoder;
                        shared.run(Some(id), |st, now| {
                            for m in &batch {
                                if let Some(m) = incoming(m) {
                                    st.server.handle_message(now, id, m);
                                }
                            }
                            // Once the `hello` was answered, the rest is
                            // decoded here.
                            *decoder = st.server.take_decoder(id);
                            st.server.read_paused_until(id)
                        })
                    }
                };
                if let Some(at) = paused {
                    let at = shared.clock.std(at);
                    match &mut self.throttle {
                        Some(timer) => timer.as_mut().reset(at),
                        None => self.throttle = Some(shared.runtime.new_timer(at)),
                    }
                }
            }
            if let Some(end) = end {
                return Poll::Ready(ConnEnd::Ended(end));
            }
        }
    }
}

/// Under the slot's lock: takes the frames queued for a connection (once
/// the last ones were handed to the socket) and the feeds it is to follow
/// or leave. Once the slot's queue is empty, every entry published so far
/// ([`ServerShared::published`]) may go out: a frame queued later is
/// stamped at least that, and goes after them.
fn take_frames(
    out: &mut VecDeque<(u64, Message)>,
    followed: &mut Followed,
    horizon: &mut u64,
    shared: &ServerShared,
    slot: &mut ConnSlot,
) {
    if out.is_empty() {
        if out.capacity() > 256 {
            *out = VecDeque::new(); // after a burst
        }
        std::mem::swap(out, &mut slot.out);
    }
    if !slot.follows.is_empty() {
        // Taken, not drained: an idle connection keeps no spare capacity.
        followed.apply(std::mem::take(&mut slot.follows).into_iter());
    }
    if slot.out.is_empty() {
        *horizon = shared.published.load(Ordering::Acquire);
    }
}

/// A data message as the core takes it; `None` for control frames.
fn incoming(m: &Message) -> Option<Incoming<'_>> {
    match m {
        Message::Text(t) => Some(Incoming::Text(t.as_str())),
        Message::Binary(b) => Some(Incoming::SharedBinary(b)),
        _ => None,
    }
}

/// Tells the core a connection is gone (once), and forgets its slot.
pub(super) fn report_closed(shared: &ServerShared, id: ConnectionId, code: Option<CloseCode>) {
    shared.run(Some(id), |st, now| {
        if st.conns.remove(&id).is_some() {
            st.server.handle_connection_closed(now, id, code);
        }
    });
}

/// Ends a connection: finishes the close handshake (bounded by the close
/// timeout) and reports the connection gone to the core.
async fn finish<C: Carrier>(
    shared: Arc<ServerShared>,
    id: ConnectionId,
    mut ws: C,
    mut io: ConnIo,
    end: ConnEnd,
) {
    let runtime = shared.runtime.clone();
    let close_timeout = shared.options.close_timeout;
    match end {
        ConnEnd::Ended(Some(Ok(Message::Close(frame)))) => {
            let (code, _) = ws::close_code(&frame);
            report_closed(&shared, id, code);
            let _ = util::timeout(&*runtime, close_timeout, async {
                let _ = ws.flush().await;
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
        ConnEnd::Close(order) if order.abort => {
            drop(ws);
            report_closed(&shared, id, None);
        }
        ConnEnd::Close(order) => {
            let limit = if order.flush {
                close_timeout
            } else {
                close_timeout / 4
            };
            let (out, followed) = (&mut io.out, &mut io.followed);
            let _ = util::timeout(&*runtime, limit, async {
                if order.flush {
                    // The queued frames, and the feed entries published
                    // before them.
                    while let Some(&(before, _)) = out.front() {
                        let next = {
                            let mut cx = Context::from_waker(std::task::Waker::noop());
                            followed.next_before(before, &mut cx)
                        };
                        let m = match next {
                            Ok(Some(entry)) => entry.message,
                            Ok(None) | Err(_) => match out.pop_front() {
                                Some((_, m)) => m,
                                None => break,
                            },
                        };
                        if ws.feed(m).await.is_err() {
                            break;
                        }
                    }
                }
                ws.close_with(ws::close_frame(order.code, order.reason))
                    .await;
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
            report_closed(&shared, id, Some(order.code));
        }
        ConnEnd::Ended(Some(Err(e))) => match ws::read_error_close(&e) {
            // The peer broke the protocol (a message over the limit, text
            // that is not UTF-8, bad framing): it gets the RFC's close code
            // and the core hears the same code. tungstenite's reader is not
            // used again; the rest of what the peer sends is discarded.
            Some((code, reason)) => {
                debug!(%code, reason, error = %e, "closing a connection that broke the protocol");
                report_closed(&shared, id, Some(code));
                let limit = shared.options.config.max_message_size.max(64 * 1024);
                let _ = util::timeout(&*runtime, close_timeout, async {
                    ws.close_with(ws::close_frame(code, reason)).await;
                    ws.linger(limit).await;
                })
                .await;
            }
            None => {
                trace!(error = %e, "connection failed");
                report_closed(&shared, id, None);
            }
        },
        ConnEnd::Ended(_) | ConnEnd::WriteFailed => report_closed(&shared, id, None),
    }
}

/// With a cluster: reads the connection's first frame (its `hello`) and
/// claims the session it resumes before it runs (`upgrade::claim_for`); a
/// claim that fails is refused in-band, as the upgrade's would be (a
/// `reject` `try_later` with its `retry`, then 4429). Returns the frame,
/// for the first batch.
async fn claim_first<C: Carrier>(
    shared: &ServerShared,
    id: ConnectionId,
    ws: &mut C,
) -> Vec<Message> {
    let limit = shared.options.handshake_timeout;
    let Some(Some(Ok(first))) = util::timeout(&*shared.runtime, limit, ws.next()).await else {
        return Vec::new();
    };
    if let Message::Text(t) = &first {
        if let Err(refusal) = claim_for(shared, t.as_bytes()).await {
            if let Some(form) = in_band_form(&refusal, shared.options.retry_after) {
                shared.run(Some(id), |st, now| st.server.refuse_hello(now, id, form));
            }
        }
    }
    vec![first]
}

/// One connection's task: reads frames and runs them through the core,
/// writes the frames the core queued for it, closes when told or when the
/// peer goes.
///
/// `early`: the core already opened this connection while it admitted the
/// upgrade request, and made its slot: the task starts with them without
/// taking the state's lock (the slot stays registered until the task
/// reports the connection closed, so there is nothing to look up).
pub(super) fn connection<C: Carrier>(
    shared: Arc<ServerShared>,
    mut ws: C,
    identity: Option<String>,
    early: Option<Early>,
) -> BoxFuture<'static, ()> {
    // Opened here, before the task's future is made: the future then
    // carries the socket once, not a second time as an argument kept for
    // its whole life (an async fn's arguments live as long as it does).
    let cluster_claim = shared.cluster.is_some() && early.is_none();
    let opened = early.map(Ok).unwrap_or_else(|| open(&shared, identity));
    match opened {
        Ok((id, slot)) => {
            let span = tracing::debug_span!("kitestring_connection", id = id.0);
            Box::pin(serve(shared, ws, id, slot, cluster_claim).instrument(span))
        }
        Err((code, reason)) => Box::pin(async move {
            let close_timeout = shared.options.close_timeout;
            let _ = util::timeout(&*shared.runtime, close_timeout, async {
                ws.close_with(ws::close_frame(code, reason)).await;
            })
            .await;
        }),
    }
}

/// Opens a connection in the core for a socket upgraded without a `hello`
/// in its request, and registers its slot; the close to send instead while
/// shutting down or without randomness for a session id.
fn open(
    shared: &ServerShared,
    identity: Option<String>,
) -> Result<Early, (CloseCode, &'static str)> {
    shared.run(None, |st, now| {
        if st.shutdown.is_some() || st.stopped {
            return Err((CloseCode::GOING_AWAY, "going away"));
        }
        let fresh = match util::random16() {
            Ok(b) => SessionId(b),
            Err(e) => {
                warn!(error = %e, "no randomness for a session id; refusing the connection");
                return Err((CloseCode::INTERNAL_ERROR, "no randomness"));
            }
        };
        let id = st.server.handle_connection(now, identity, fresh);
        let slot = SlotRef::default();
        st.conns.insert(id, slot.clone());
        Ok((id, slot))
    })
}

/// The connection task proper, once the core opened the connection.
///
/// A block rather than an `async fn`: an `async fn` moves its arguments
/// into locals of its own, so its future would hold the socket twice.
#[allow(clippy::manual_async_fn)]
fn serve<C: Carrier>(
    shared: Arc<ServerShared>,
    mut ws: C,
    id: ConnectionId,
    slot: SlotRef,
    cluster_claim: bool,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    async move {
        // With a cluster, a `hello` sent as the first frame may resume a
        // session another node holds: it is claimed before the hello runs.
        // Boxed, as the closing stage is: its futures (the claim's above
        // all) would otherwise be carried by every open connection's task.
        let mut first = Vec::new();
        if cluster_claim {
            first = Box::pin(claim_first(&shared, id, &mut ws)).await;
        }
        let mut io = ConnIo {
            id,
            slot,
            out: VecDeque::new(),
            followed: Followed::default(),
            horizon: 0,
            decoder: None,
            first,
            needs_flush: false,
            answers_due: false,
            readable: ReadyFlag::new(),
            throttle: None,
        };
        let end = std::future::poll_fn(|cx| io.poll(&shared, &mut ws, cx)).await;
        // Boxed: the closing stage's futures are only allocated when a
        // connection closes, not carried by every open one.
        Box::pin(finish(shared, id, ws, io, end)).await;
        trace!("connection task ended");
    }
}
