//! The client's driver task, the only owner of the sockets. On each wake-up
//! it gathers what is ready (frames, a finished connection attempt or close,
//! a fresh token) without the lock, feeds it to the core and drains the
//! core's outputs under one lock, then writes frames without it.
//!
//! It never holds the lock across an `.await` or a socket call. Sockets are
//! keyed by the core's `TransportId`: a socket whose transport the core has
//! left is closed and dropped, and the core ignores any late report about
//! it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_tungstenite::tungstenite::{Error as WsError, Message};
use futures_util::{FutureExt, Sink, SinkExt, StreamExt};
use kitestring_core::client::{
    Client, Event, LostReason, Output, RequestError, State, TransportError, TransportId,
};
use kitestring_core::close::CloseCode;
use kitestring_core::reliable::MessageId;
use kitestring_core::wire::Incoming;
use tracing::{debug, trace, warn};

use crate::drive::{Budget, DriveTimer, ReadyFlag};
use crate::error::ClientError;
use crate::runtime::{BoxFuture, Runtime};
use crate::util;
use crate::ws;

use super::connector::{transport_error, Connector, Link, Opened, Opening, Probe, RequestHello};
use super::shared::{codec_tag, fail_requests, fail_waiters, ClientShared, Inner};
use kitestring_core::client::transport::{TransportChoice, TransportKind};

/// The open socket of the core's current transport.
struct Live {
    tid: TransportId,
    ws: Link,
    /// Polls the socket's read side only when it has signalled.
    readable: ReadyFlag,
    /// Frames the core emitted that the socket has not taken yet. Bounded by
    /// the core's send window plus a few control frames.
    out: VecDeque<Message>,
    needs_flush: bool,
}

type Closing = BoxFuture<'static, (TransportId, Option<CloseCode>, Cow<'static, str>)>;

/// Frames read from the socket per step, at most: the lock is taken once
/// for all of them, and the application's events wait behind at most one
/// batch while it leaves the event stream full.
const READ_BATCH: usize = 32;

/// Something that happened to the driver's IO, fed to the core under the lock.
// Inputs live in one step's batch only.
#[allow(clippy::large_enum_variant)]
enum Input {
    /// Every handle is gone: close the session.
    HandlesGone,
    /// The upgrade's outcome: the socket and the response's
    /// [`wire::WELCOME_HEADER`], if any.
    ///
    /// [`wire::WELCOME_HEADER`]: kitestring_core::wire::WELCOME_HEADER
    Opened(TransportId, Result<Opened, TransportError>),
    /// A probe of WebSocket came back.
    Probed(Probe),
    Frame(TransportId, Option<Result<Message, WsError>>),
    WriteFailed(TransportId, WsError),
    Closed(TransportId, Option<CloseCode>, Cow<'static, str>),
    Token(Option<String>),
}

/// What one step of the driver came to.
enum StepOutcome {
    /// Something was ready without a waker being registered for it (or more
    /// may be): step again.
    Again,
    /// The session is over and the task should stop.
    Finished,
}

/// The driver task: the shared state, and the IO only the task touches.
pub(super) struct Driver {
    shared: Arc<ClientShared>,
    io: TaskIo,
}

/// The driver task's own state: sockets, timers and queues no handle sees.
struct TaskIo {
    runtime: Arc<dyn Runtime>,
    timer: DriveTimer,
    connector: Arc<Connector>,
    close_timeout: Duration,
    handles_gone: bool,
    /// What became ready since the last step, in order.
    inputs: Vec<Input>,
    /// This step did not read the socket because the application's event
    /// queue was full.
    reads_skipped: bool,
    /// The application's stream to wake after the lock is released.
    wake_events: Option<Waker>,
    /// Draining started a future (a connection attempt, a close, a token
    /// fetch) that has not been polled yet.
    started: bool,
    connecting: Option<(TransportId, Opening)>,
    live: Option<Live>,
    /// Sockets finishing their close: usually none or one (a reconnect
    /// while the old socket closes), each bounded by the close timeout.
    closing: Vec<Closing>,
    /// A fresh token being fetched to answer `TokenExpiring`.
    token_fetch: Option<BoxFuture<'static, Option<String>>>,
    /// Which transport the next connection takes.
    choice: TransportChoice,
    /// A probe of WebSocket under way, while the fallback carries the
    /// connection.
    probe: Option<BoxFuture<'static, Probe>>,
}

impl Driver {
    /// The task of the client `shared` holds, opening its connections with
    /// `connector`.
    pub(super) fn new(
        shared: Arc<ClientShared>,
        runtime: Arc<dyn Runtime>,
        connector: Connector,
        close_timeout: Duration,
        choice: TransportChoice,
    ) -> Self {
        Driver {
            shared,
            io: TaskIo {
                timer: DriveTimer::new(&*runtime),
                connector: Arc::new(connector),
                runtime,
                close_timeout,
                handles_gone: false,
                inputs: Vec::new(),
                reads_skipped: false,
                wake_events: None,
                started: false,
                connecting: None,
                live: None,
                closing: Vec::new(),
                token_fetch: None,
                choice,
                probe: None,
            },
        }
    }

    pub(super) async fn run(mut self) {
        let mut budget = Budget::default();
        while let StepOutcome::Again = budget.run(|cx| self.poll_step(cx)).await {}
        // Let sockets still closing finish their handshake, bounded by their timeouts.
        futures_util::future::join_all(std::mem::take(&mut self.io.closing)).await;
        let (replies, mut waiters, mut requests) = {
            let mut inner = self.shared.lock();
            (
                std::mem::take(&mut inner.close_replies),
                std::mem::take(&mut inner.waiters),
                std::mem::take(&mut inner.requests),
            )
        };
        for reply in replies {
            let _ = reply.send(Ok(()));
        }
        fail_waiters(&mut waiters, ClientError::NotAcknowledged);
        fail_requests(&mut requests, RequestError::Closed);
        debug!("client driver stopped");
    }

    /// One turn: feed in what is ready and drain the core under one lock,
    /// then deliver events and write frames without it.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<StepOutcome> {
        let Driver { shared, io } = self;
        // First, so a handle call from now on wakes this task again.
        shared.driver.register(cx.waker());
        let mut again = io.gather(shared, cx);
        let (finished, deadline) = {
            let mut inner = shared.lock();
            let now = shared.now();
            // Feeding never adds inputs; the vector is kept for its capacity.
            let mut inputs = std::mem::take(&mut io.inputs);
            for input in inputs.drain(..) {
                io.feed(&mut inner, now, input);
            }
            io.inputs = inputs;
            if inner.client.poll_timeout().is_some_and(|d| d.at <= now) {
                inner.client.handle_timeout(now);
            }
            io.drain(shared, &mut inner);
            // Before the events that follow it are woken.
            let kind = match io.live.as_ref().map(|l| l.ws.kind()) {
                None => 0,
                Some(TransportKind::WebSocket) => 1,
                Some(TransportKind::Http) => 2,
            };
            shared.transport.store(kind, Ordering::Relaxed);
            let finished = inner.finished(io.handles_gone);
            if finished {
                inner.stopped = true;
            }
            if io.reads_skipped {
                // Still full: the stream wakes the task when it takes one.
                // Emptied since the look before reading: read now.
                if inner.events_dropped || inner.events.len() < shared.event_room {
                    again = true;
                } else {
                    inner.reader_paused = true;
                }
            }
            let mut deadline = inner.client.poll_timeout().map(|d| d.at);
            if let Some(at) = io.probe_due(now) {
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
            }
            (finished, deadline)
        };
        if let Some(waker) = io.wake_events.take() {
            waker.wake();
        }
        again |= io.write(cx);
        shared.unsent.store(
            io.live.as_ref().map_or(0, |l| l.out.len()),
            Ordering::Relaxed,
        );

        if finished {
            return Poll::Ready(StepOutcome::Finished);
        }
        again |= std::mem::take(&mut io.started);
        let deadline = deadline.map(|at| shared.clock.std(at));
        again |= io.timer.poll(&*shared.runtime, deadline, cx).is_ready();
        if again {
            Poll::Ready(StepOutcome::Again)
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Driver {
    /// Whether the task ended or was dropped by its runtime, calls fail with
    /// [`ClientError::Stopped`] from now on, and whoever still waits is
    /// released (their senders dropped: `NotAcknowledged`, `Stopped`).
    fn drop(&mut self) {
        let left = {
            let mut inner = self.shared.lock();
            inner.stopped = true;
            inner.events_ended = true;
            (
                std::mem::take(&mut inner.waiters),
                std::mem::take(&mut inner.requests),
                std::mem::take(&mut inner.close_replies),
                inner.events_waker.take(),
            )
        };
        let (waiters, requests, replies, events) = left;
        drop((waiters, requests, replies));
        if let Some(waker) = events {
            waker.wake();
        }
    }
}

impl TaskIo {
    /// Collects what is ready into `inputs`, without the lock; `true` if
    /// anything was (its source registered no waker, so step again).
    fn gather(&mut self, shared: &ClientShared, cx: &mut Context<'_>) -> bool {
        let before = self.inputs.len();
        if !self.handles_gone && shared.handles.load(Ordering::Acquire) == 0 {
            self.handles_gone = true;
            self.inputs.push(Input::HandlesGone);
        }
        // Frames first, several per step, unless events wait for room: the
        // task stops reading while the application leaves its stream full.
        self.reads_skipped = shared.queued.load(Ordering::Relaxed) >= shared.event_room;
        if let (false, Some(live)) = (self.reads_skipped, &mut self.live) {
            for _ in 0..READ_BATCH {
                let ws = &mut live.ws;
                let Poll::Ready(item) = live.readable.poll(cx, |cx| ws.poll_next_unpin(cx)) else {
                    break;
                };
                let more = matches!(&item, Some(Ok(m)) if !matches!(m, Message::Close(_)));
                self.inputs.push(Input::Frame(live.tid, item));
                if !more {
                    break;
                }
            }
        }
        if let Some((tid, fut)) = &mut self.connecting {
            if let Poll::Ready(r) = fut.poll_unpin(cx) {
                self.inputs.push(Input::Opened(*tid, r));
                self.connecting = None;
            }
        }
        let mut i = 0;
        while i < self.closing.len() {
            if let Poll::Ready((tid, code, reason)) = self.closing[i].poll_unpin(cx) {
                drop(self.closing.swap_remove(i));
                self.inputs.push(Input::Closed(tid, code, reason));
            } else {
                i += 1;
            }
        }
        if let Some(fetch) = &mut self.token_fetch {
            if let Poll::Ready(token) = fetch.poll_unpin(cx) {
                self.token_fetch = None;
                self.inputs.push(Input::Token(token));
            }
        }
        if let Some(probe) = &mut self.probe {
            if let Poll::Ready(outcome) = probe.poll_unpin(cx) {
                self.probe = None;
                self.inputs.push(Input::Probed(outcome));
            }
        }
        self.inputs.len() > before
    }

    /// Feeds one input to the core.
    fn feed(&mut self, inner: &mut Inner, now: kitestring_core::Instant, input: Input) {
        let client = &mut inner.client;
        match input {
            Input::HandlesGone => {
                let _ = client.close(now);
            }
            Input::Opened(tid, Ok(opened)) => {
                let Opened {
                    link: ws,
                    welcome,
                    fell_back,
                } = opened;
                if let Some(old) = self.live.take() {
                    self.start_close(old, CloseCode::RETRY, "superseded");
                }
                match ws.kind() {
                    TransportKind::Http if fell_back => {
                        warn!("WebSocket upgrades are blocked on the way: the HTTP fallback carries the session");
                        self.choice.blocked(now);
                    }
                    TransportKind::Http => {}
                    TransportKind::WebSocket => self.choice.unblocked(),
                }
                trace!(transport = tid.0, kind = ?ws.kind(), "transport opened");
                self.live = Some(Live {
                    tid,
                    ws,
                    readable: ReadyFlag::new(),
                    out: VecDeque::new(),
                    needs_flush: false,
                });
                client.handle_upgraded(now, tid, welcome.as_deref());
            }
            Input::Probed(outcome) => {
                debug!(?outcome, "WebSocket probed");
                match outcome {
                    Probe::Passed => {
                        self.choice.unblocked();
                        // Move: the session resumes on a WebSocket.
                        if self
                            .live
                            .as_ref()
                            .is_some_and(|l| l.ws.kind() == TransportKind::Http)
                        {
                            debug!("WebSocket works again: moving the session to it");
                            let _ = client.reconnect(now);
                        }
                    }
                    Probe::Blocked => self.choice.blocked(now),
                    // Tried again after another period.
                    Probe::Failed => self.choice.blocked(now),
                }
            }
            Input::Opened(tid, Err(e)) => {
                debug!(transport = tid.0, error = ?e, "connection attempt failed");
                client.handle_transport_error(now, tid, e);
            }
            Input::Frame(tid, item) => self.frame(client, now, tid, item),
            Input::WriteFailed(tid, e) => {
                // The socket was dropped when the write failed.
                client.handle_transport_error(now, tid, transport_error(e));
            }
            Input::Closed(tid, code, reason) => {
                client.handle_transport_closed(now, tid, code, &reason);
            }
            Input::Token(Some(token)) => {
                if let Err(e) = client.send_token(now, token) {
                    // Not open any more: the next connection carries a fresh
                    // token in its upgrade anyway.
                    debug!(error = %e, "fresh token not sent");
                }
            }
            Input::Token(None) => {
                debug!("token provider had no token; the server will close with 4401")
            }
        }
    }

    fn frame(
        &mut self,
        client: &mut Client,
        now: kitestring_core::Instant,
        tid: TransportId,
        item: Option<Result<Message, WsError>>,
    ) {
        let current = matches!(&self.live, Some(l) if l.tid == tid);
        match item {
            Some(Ok(Message::Text(text))) => {
                client.handle_message(now, tid, Incoming::Text(text.as_str()));
            }
            Some(Ok(Message::Binary(data))) => {
                client.handle_message(now, tid, Incoming::SharedBinary(&data));
            }
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = ws::close_code(&frame);
                debug!(transport = tid.0, ?code, %reason, "peer closed");
                // tungstenite has queued the close reply; finish it aside.
                if let Some(live) = self.live.take_if(|_| current) {
                    self.finish_close(live);
                }
                client.handle_transport_closed(now, tid, code, &reason);
            }
            Some(Ok(_)) => {} // pings are answered by tungstenite; pongs ignored
            None => {
                if current {
                    self.live = None;
                }
                client.handle_transport_closed(now, tid, None, "");
            }
            Some(Err(e)) => {
                debug!(transport = tid.0, error = %e, "transport error");
                if let Some(mut live) = self.live.take_if(|_| current) {
                    // A peer that broke the WebSocket protocol (a message
                    // over the limit, bad UTF-8, bad framing) gets the
                    // close code RFC 6455 asks for, not a dropped socket.
                    if let Some((code, reason)) = ws::read_error_close(&e) {
                        live.out.clear();
                        self.start_close(live, code, reason);
                    }
                }
                client.handle_transport_error(now, tid, transport_error(e));
            }
        }
    }

    /// Carries out every output of the core, in order: frames go to the
    /// socket's queue, events to the application's queue (after settling the
    /// waiters they resolve), connects and closes start their futures.
    fn drain(&mut self, shared: &ClientShared, inner: &mut Inner) {
        while let Some(output) = inner.client.poll_output() {
            match output {
                Output::Connect(tid) => {
                    debug!(transport = tid.0, "connecting");
                    if let Some(old) = self.live.take() {
                        self.start_close(old, CloseCode::RETRY, "superseded");
                    }
                    let hello = if self.connector.hello_in_url {
                        inner.client.url_hello(tid).map(RequestHello::Url)
                    } else {
                        inner.client.upgrade_hello(tid).map(RequestHello::Header)
                    };
                    let first = self.choice.first(shared.now());
                    let fut = self.connector.clone().open(
                        hello.unwrap_or(RequestHello::None),
                        first,
                        self.choice.may_fall_back(true),
                    );
                    self.connecting = Some((tid, Box::pin(fut)));
                    self.started = true;
                }
                Output::Transmit(tid, t) => match &mut self.live {
                    Some(live) if live.tid == tid => live.out.push_back(ws::to_message(t)),
                    _ => trace!(
                        transport = tid.0,
                        "dropped a frame for a transport that is gone"
                    ),
                },
                Output::Disconnect(tid, code, reason) => {
                    debug!(transport = tid.0, %code, reason, "closing transport");
                    if matches!(&self.live, Some(l) if l.tid == tid) {
                        if let Some(live) = self.live.take() {
                            self.start_close(live, code, reason);
                        }
                    } else {
                        if matches!(&self.connecting, Some((t, _)) if *t == tid) {
                            self.connecting = None;
                        }
                        let done: Closing =
                            Box::pin(async move { (tid, Some(code), Cow::Borrowed("")) });
                        self.closing.push(done);
                        self.started = true;
                    }
                }
                Output::Event(event) => {
                    self.event(shared, inner, &event);
                    if let Some(waker) = inner.push_event(shared, event) {
                        self.wake_events = Some(waker);
                    }
                }
            }
        }
    }

    /// What the driver itself does about an event: logs, the codec, the
    /// waiters it resolves, a token fetch.
    fn event(&mut self, shared: &ClientShared, inner: &mut Inner, event: &Event) {
        if matches!(
            event,
            Event::Acked { .. } | Event::StateChanged { .. } | Event::SessionLost { .. }
        ) {
            for waker in inner.room_waiters.drain(..) {
                waker.wake();
            }
        }
        match event {
            Event::Connected {
                codec,
                session,
                resumed,
                ..
            } => {
                shared.codec.store(codec_tag(*codec), Ordering::Relaxed);
                // Once per connection, never per message.
                let resumed_label = if *resumed { "true" } else { "false" };
                metrics::counter!("kitestring_client_connects_total", "resumed" => resumed_label)
                    .increment(1);
                // Later log lines of this client carry the session id.
                shared
                    .span
                    .record("session", tracing::field::display(session));
                if *resumed {
                    debug!(?codec, "session resumed");
                } else {
                    debug!(?codec, "session opened");
                }
            }
            Event::Acked { first, last } => {
                let done: Vec<MessageId> = inner
                    .waiters
                    .range(*first..=*last)
                    .map(|(id, _)| *id)
                    .collect();
                for id in done {
                    if let Some(w) = inner.waiters.remove(&id) {
                        let _ = w.send(Ok(()));
                    }
                }
            }
            Event::Rtt(rtt) => {
                // Once per heartbeat.
                metrics::histogram!("kitestring_client_rtt_seconds").record(*rtt);
            }
            Event::SessionLost {
                reason,
                unconfirmed,
                unsent,
            } => {
                metrics::counter!("kitestring_client_sessions_lost_total").increment(1);
                warn!(
                    ?reason,
                    unconfirmed = unconfirmed.len(),
                    unsent = unsent.len(),
                    "session lost"
                );
                for id in unconfirmed.iter().chain(unsent) {
                    if let Some(w) = inner.waiters.remove(id) {
                        let _ = w.send(Err(ClientError::Lost {
                            id: *id,
                            reason: reason.clone(),
                        }));
                    }
                }
            }
            Event::SendFailed { id, error } => {
                if let Some(w) = inner.waiters.remove(id) {
                    let _ = w.send(Err(ClientError::SendFailed {
                        id: *id,
                        error: error.clone(),
                    }));
                }
            }
            Event::Response { request, response } => {
                if let Some(w) = inner.requests.remove(request) {
                    let _ = w.send(Ok(response.clone()));
                }
            }
            Event::RequestFailed { request, error } => {
                debug!(request = request.0, %error, "request failed");
                if let Some(w) = inner.requests.remove(request) {
                    let _ = w.send(Err(ClientError::Request {
                        id: *request,
                        error: *error,
                    }));
                }
            }
            Event::LateResponse { request } => {
                debug!(request = request.0, "late response dropped");
            }
            Event::Refused { id, room, refusal } => {
                warn!(
                    id = id.map(|i| i.0),
                    room = room.as_deref(),
                    op = %refusal.op,
                    reason = %refusal.reason,
                    "refused by the server"
                );
                if let Some(w) = id.and_then(|id| inner.waiters.remove(&id).map(|w| (id, w))) {
                    let _ = w.1.send(Err(ClientError::Refused {
                        id: w.0,
                        refusal: refusal.clone(),
                    }));
                }
            }
            Event::LatestFailed { key, error } => {
                debug!(%key, %error, "latest value not sent");
            }
            Event::TokenExpiring { within } => {
                debug!(?within, "server asks for a fresh token");
                if let Some(provider) = &self.connector.token {
                    self.token_fetch = Some(provider());
                    self.started = true;
                }
            }
            Event::StateChanged { new, .. } => {
                match new {
                    State::Failed { .. } => warn!(state = ?new, "client failed"),
                    State::Closed { .. } => debug!(state = ?new, "session ended"),
                    _ => debug!(state = new.name(), "state changed"),
                }
                if matches!(new, State::Closed { .. } | State::Failed { .. }) {
                    fail_waiters(&mut inner.waiters, |id| ClientError::Lost {
                        id,
                        reason: LostReason::Closed,
                    });
                    for reply in inner.close_replies.drain(..) {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            _ => {}
        }
    }

    /// While the fallback carries the connection: starts a probe of
    /// WebSocket once one is due, and says when the next is (for the
    /// task's timer).
    fn probe_due(&mut self, now: kitestring_core::Instant) -> Option<kitestring_core::Instant> {
        if self.probe.is_some() {
            return None;
        }
        let on = self.live.as_ref()?.ws.kind();
        let at = self.choice.probe_at(on)?;
        if at > now {
            return Some(at);
        }
        debug!("probing whether WebSocket upgrades go through again");
        self.probe = Some(Box::pin(self.connector.clone().probe()));
        // Not probed again before this one is done, nor for a while after.
        self.choice.blocked(now);
        self.started = true;
        None
    }

    /// Writes queued frames as far as the socket takes them; `true` if the
    /// write failed (the socket is dropped and the failure fed next step).
    fn write(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(live) = &mut self.live else {
            return false;
        };
        match pump_writes(live, cx) {
            Ok(()) => false,
            Err(e) => {
                let tid = live.tid;
                self.live = None;
                self.inputs.push(Input::WriteFailed(tid, e));
                true
            }
        }
    }

    /// Writes what is queued, then a close frame, then waits (bounded) for
    /// the peer's close; reports the transport closed either way.
    fn start_close(&mut self, mut live: Live, code: CloseCode, reason: &'static str) {
        live.out.push_back(ws::close_message(code, reason));
        let runtime = self.runtime.clone();
        let limit = self.close_timeout;
        let tid = live.tid;
        self.closing.push(Box::pin(async move {
            let _ = util::timeout(&*runtime, limit, close_live(live)).await;
            (tid, Some(code), Cow::Borrowed(reason))
        }));
        self.started = true;
    }

    /// The peer sent a close: flush tungstenite's reply and wait for EOF.
    fn finish_close(&mut self, live: Live) {
        let runtime = self.runtime.clone();
        let limit = self.close_timeout;
        let tid = live.tid;
        self.closing.push(Box::pin(async move {
            let _ = util::timeout(&*runtime, limit, close_live(live)).await;
            // Already reported; the core ignores a second report.
            (tid, None, Cow::Borrowed(""))
        }));
        self.started = true;
    }
}

async fn close_live(mut live: Live) {
    while let Some(m) = live.out.pop_front() {
        if live.ws.feed(m).await.is_err() {
            return;
        }
    }
    let _ = live.ws.flush().await;
    // Read until the peer's close (or EOF) so the close handshake completes.
    while let Some(Ok(_)) = live.ws.next().await {}
}

/// Moves queued frames into the socket as far as it accepts them.
fn pump_writes(live: &mut Live, cx: &mut Context<'_>) -> Result<(), WsError> {
    let mut ws = Pin::new(&mut live.ws);
    while !live.out.is_empty() {
        match ws.as_mut().poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                if let Some(m) = live.out.pop_front() {
                    ws.as_mut().start_send(m)?;
                    live.needs_flush = true;
                }
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    if live.needs_flush {
        match ws.as_mut().poll_flush(cx) {
            Poll::Ready(Ok(())) => live.needs_flush = false,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => {}
        }
    }
    Ok(())
}
