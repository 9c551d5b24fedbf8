//! The HTTP fallback's server side (PROTOCOL.md, section 1.1): a
//! connection carried by plain HTTP requests for clients whose WebSocket
//! upgrades are blocked on the way. `open` (POST) is admitted exactly as an
//! upgrade is (`upgrade::admit`: origin, authenticator, a `hello` in the
//! request), and the connection then runs in the ordinary connection task
//! (`conn.rs`) over a [`Link`] instead of a WebSocket: polls (GET) take
//! the frames it wrote, sends (POST) hand it the frames the client wrote.
//!
//! It owns the link between the HTTP requests and the connection task and
//! the requests' checks: one poll and one send at a time, each numbered,
//! bodies bounded, every malformed body a typed error with the close code
//! a WebSocket would give. A poll or send abandoned by the client (its HTTP
//! connection closed before the answer), or no poll for
//! [`HttpFallback::gap`](super::HttpFallback::gap), is a dropped
//! connection, and the session resumes as after any drop. It must never
//! run the core, check credentials or hold a lock across an `.await`:
//! everything about sessions happens in the connection task, as for a
//! WebSocket.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use async_tungstenite::tungstenite::http::{self as h, Response, StatusCode};
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::{Error as WsError, Message};
use bytes::Bytes;
use futures_util::{Sink, Stream};
use http_body_util::{BodyExt, Full, Limited};
use kitestring_core::close::CloseCode;
use kitestring_core::wire::records::{self, Record, RecordError, Records, RECORD_HEADER};
use tracing::debug;

use crate::runtime::{AsyncTimer, BoxFuture};
use crate::util;

use super::conn::{connection, report_closed, Carrier};
use super::http::{self, FallbackAsk, HttpRefusal};
use super::hyper::admit_request;
use super::shared::ServerShared;
use super::upgrade::refused;
use super::HttpFallback;

/// A fallback response's body.
pub(super) type Body = Full<Bytes>;

/// Frames a send may leave unread by the connection task: one body's worth.
/// A send is answered once its frames are read, so a client writes its next
/// one only then.
fn body_limit(shared: &ServerShared, fallback: &HttpFallback) -> usize {
    let one_message = shared.options.config.max_message_size + RECORD_HEADER + 1024;
    fallback.max_body.max(one_message)
}

/// One fallback connection: what its connection task wrote and the polls
/// have not taken, what the sends brought and the task has not read, and
/// who waits for which.
pub(super) struct Link {
    state: Mutex<LinkState>,
}

struct LinkState {
    /// Records written by the connection task, for the next poll.
    out: Vec<u8>,
    /// Past this many bytes in `out`, the task's writes wait for a poll.
    out_limit: usize,
    /// A close record is in `out` (or went out): nothing more is written.
    closing: bool,
    /// The close record went out in a poll's answer.
    close_sent: bool,
    /// Messages from sends, for the connection task.
    inbound: VecDeque<Result<Message, WsError>>,
    /// The client is gone: a request abandoned, the gap passed, or the
    /// task ended. Reads end, writes fail, requests get 404.
    gone: bool,
    /// The task read a close (the client's, or its own after an error):
    /// reads end.
    read_closed: bool,
    next_poll: u64,
    next_send: u64,
    polling: bool,
    sending: bool,
    /// When the last poll was answered; `None` while one waits.
    idle_since: Option<Instant>,
    /// The connection task's read side (through its ready flag) and write
    /// side, separately: each is polled with its own waker.
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// The waiting poll, and the send waiting for its frames to be read.
    poll_waker: Option<Waker>,
    send_waker: Option<Waker>,
}

impl Link {
    fn new(out_limit: usize, now: Instant) -> Self {
        Link {
            state: Mutex::new(LinkState {
                out: Vec::new(),
                out_limit,
                closing: false,
                close_sent: false,
                inbound: VecDeque::new(),
                gone: false,
                read_closed: false,
                next_poll: 0,
                next_send: 0,
                polling: false,
                sending: false,
                idle_since: Some(now),
                read_waker: None,
                write_waker: None,
                poll_waker: None,
                send_waker: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client is gone: everyone waiting looks again.
    fn drop_client(&self) {
        let mut st = self.lock();
        if !st.gone {
            st.gone = true;
            st.wake_all();
        }
    }
}

impl LinkState {
    fn wake_all(&mut self) {
        for w in [
            self.read_waker.take(),
            self.write_waker.take(),
            self.poll_waker.take(),
            self.send_waker.take(),
        ]
        .into_iter()
        .flatten()
        {
            w.wake();
        }
    }
}

/// The connection task's side of a [`Link`]: a [`Carrier`] like a
/// WebSocket. Removes the link from the server's table when dropped (the
/// task ended), so later requests for it get 404.
pub(super) struct LinkCarrier {
    id: String,
    link: Arc<Link>,
    shared: Arc<ServerShared>,
    gap: Duration,
    /// Fires when the gap after the last poll's answer has passed.
    gap_timer: Option<Pin<Box<dyn AsyncTimer>>>,
    armed_for: Option<Instant>,
}

impl Drop for LinkCarrier {
    fn drop(&mut self) {
        self.link.drop_client();
        let mut links = self.shared.links.lock().unwrap_or_else(|e| e.into_inner());
        links.remove(&self.id);
    }
}

impl Stream for LinkCarrier {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let deadline = {
            let mut st = this.link.lock();
            if let Some(m) = st.inbound.pop_front() {
                if st.inbound.is_empty() {
                    if let Some(w) = st.send_waker.take() {
                        w.wake();
                    }
                }
                if matches!(m, Ok(Message::Close(_)) | Err(_)) {
                    st.read_closed = true;
                }
                return Poll::Ready(Some(m));
            }
            if st.gone || st.read_closed {
                return Poll::Ready(None);
            }
            match &st.read_waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.read_waker = Some(cx.waker().clone()),
            }
            st.idle_since.map(|since| since + this.gap)
        };
        // No poll waiting since `since`: past the gap, the client is gone.
        let Some(at) = deadline else {
            return Poll::Pending;
        };
        if this.armed_for != Some(at) {
            this.armed_for = Some(at);
            match &mut this.gap_timer {
                Some(t) => t.as_mut().reset(at),
                None => this.gap_timer = Some(this.shared.runtime.new_timer(at)),
            }
        }
        if let Some(t) = &mut this.gap_timer {
            if t.as_mut().poll(cx).is_ready() {
                debug!(link = %this.id, "no poll within the gap: the client is gone");
                this.link.drop_client();
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    }
}

impl Sink<Message> for LinkCarrier {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let mut st = self.link.lock();
        if st.gone || st.closing {
            return Poll::Ready(Err(WsError::AlreadyClosed));
        }
        if st.out.len() < st.out_limit {
            return Poll::Ready(Ok(()));
        }
        // A poll takes them: the client reads slowly, as a full socket.
        if let Some(w) = st.poll_waker.take() {
            w.wake();
        }
        st.write_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn start_send(self: Pin<&mut Self>, m: Message) -> Result<(), WsError> {
        let mut st = self.link.lock();
        if st.gone || st.closing {
            return Err(WsError::AlreadyClosed);
        }
        match &m {
            Message::Text(t) => {
                records::push_record(&mut st.out, records::RECORD_TEXT, t.as_bytes())
            }
            Message::Binary(b) => records::push_record(&mut st.out, records::RECORD_BINARY, b),
            Message::Close(frame) => {
                let (code, reason) = crate::ws::close_code(frame);
                records::push_close(&mut st.out, code.unwrap_or(CloseCode(1005)), &reason);
                st.closing = true;
            }
            // Pings, pongs and raw frames are WebSocket matters.
            _ => {}
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let mut st = self.link.lock();
        if st.gone {
            return Poll::Ready(Err(WsError::AlreadyClosed));
        }
        if !st.out.is_empty() {
            if let Some(w) = st.poll_waker.take() {
                w.wake();
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.poll_flush(cx)
    }
}

impl Carrier for LinkCarrier {
    /// Queues the close record, then waits until a poll took it (or the
    /// client is gone); the caller bounds the wait.
    fn close_with(&mut self, frame: CloseFrame) -> BoxFuture<'_, ()> {
        {
            let mut st = self.link.lock();
            if !st.closing && !st.gone {
                records::push_close(&mut st.out, CloseCode(u16::from(frame.code)), &frame.reason);
                st.closing = true;
                if let Some(w) = st.poll_waker.take() {
                    w.wake();
                }
            }
        }
        let link = self.link.clone();
        Box::pin(std::future::poll_fn(move |cx| {
            let mut st = link.lock();
            if st.close_sent || st.gone {
                return Poll::Ready(());
            }
            st.write_waker = Some(cx.waker().clone());
            Poll::Pending
        }))
    }

    /// Nothing to discard: a send's body was read whole.
    fn linger(&mut self, _limit: usize) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Headers every fallback answer carries: no caching, and for a page on an
/// allowed origin the CORS headers that let it read the answer.
fn answer(status: StatusCode, cors: Option<&str>, body: Bytes) -> h::response::Builder {
    let mut r = Response::builder()
        .status(status)
        .header("cache-control", "no-store");
    if !body.is_empty() {
        r = r.header("content-type", "application/octet-stream");
    }
    if let Some(origin) = cors {
        r = r
            .header("access-control-allow-origin", origin)
            .header("access-control-allow-credentials", "true")
            .header("vary", "origin");
    }
    r
}

fn build(r: h::response::Builder, body: Bytes) -> Response<Body> {
    r.body(Full::new(body)).unwrap_or_else(|_| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

/// A refusal as a fallback answer: the upgrade's status, headers and
/// reason, with the CORS headers a page needs to read it.
fn refusal(r: &HttpRefusal, cors: Option<&str>) -> Response<Body> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut b = answer(status, cors, Bytes::new())
        .header("content-type", "text/plain; charset=utf-8")
        .header(records::REFUSAL_HEADER, r.status.to_string());
    for (name, value) in r.extra_headers() {
        b = b.header(name, value);
    }
    build(b, Bytes::from(r.body()))
}

const NO_SUCH_CONNECTION: HttpRefusal =
    HttpRefusal::new(404, "no such fallback connection; open a new one");
const OUT_OF_ORDER: HttpRefusal =
    HttpRefusal::new(409, "request out of order; the connection is closed");
const BODY_TOO_LARGE: HttpRefusal = HttpRefusal::new(413, "request body over the limit");

/// Serves one fallback request, whichever HTTP server read it.
pub(super) async fn serve<B>(
    shared: Arc<ServerShared>,
    ask: FallbackAsk,
    mut parts: h::request::Parts,
    body: B,
    peer: Option<SocketAddr>,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(fallback) = shared.options.http_fallback.clone() else {
        return refusal(&HttpRefusal::NOT_AN_UPGRADE, None);
    };
    let origin = parts
        .headers
        .get("origin")
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let host = parts
        .headers
        .get("host")
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    // A page on an allowed origin may read the answers; the origin is
    // checked again, with the rest of the admission, at `open`.
    let cors = origin
        .as_deref()
        .filter(|o| shared.options.origins.allows(Some(o), host.as_deref()));
    let kind = match &ask {
        FallbackAsk::Preflight => "preflight",
        FallbackAsk::Open => "open",
        FallbackAsk::Poll { .. } => "poll",
        FallbackAsk::Send { .. } => "send",
    };
    let response = match ask {
        FallbackAsk::Preflight => build(
            answer(StatusCode::NO_CONTENT, cors, Bytes::new())
                .header("access-control-allow-methods", "GET, POST")
                .header(
                    "access-control-allow-headers",
                    "authorization, content-type, kitestring-hello",
                )
                .header("access-control-max-age", "600"),
            Bytes::new(),
        ),
        FallbackAsk::Open => open(&shared, &fallback, &mut parts, peer, cors).await,
        FallbackAsk::Poll { id, n } => poll(&shared, &fallback, &id, n, cors).await,
        FallbackAsk::Send { id, n } => send(&shared, &fallback, &id, n, body, cors).await,
    };
    metrics::counter!("kitestring_http_fallback_requests_total",
        "kind" => kind, "status" => response.status().as_str().to_owned())
    .increment(1);
    response
}

/// `open`: admitted as an upgrade, then a connection task over a new link.
/// The answer names the connection; when the request carried a `hello`, it
/// waits (at most the handshake timeout) for the connection's first frame,
/// the answer, so the session opens in one round trip.
async fn open(
    shared: &Arc<ServerShared>,
    fallback: &HttpFallback,
    parts: &mut h::request::Parts,
    peer: Option<SocketAddr>,
    cors: Option<&str>,
) -> Response<Body> {
    let early = OnceLock::new();
    let admitted = async {
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let req = http::check_open(
            target,
            parts
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
        )?;
        let has_hello = req.hello.is_some()
            || req.query.is_some_and(|q| {
                http::query_value(q, kitestring_core::wire::HELLO_PARAM).is_some()
            });
        let admitted = admit_request(
            shared,
            &req,
            &parts.headers,
            &mut parts.extensions,
            peer,
            &early,
        )
        .await?;
        Ok::<_, HttpRefusal>((admitted, has_hello))
    }
    .await;
    let early = early.into_inner();
    let (admitted, has_hello) = match admitted {
        Ok(a) => a,
        Err(r) => {
            if let Some((id, _)) = early {
                report_closed(shared, id, None);
            }
            refused(peer, &r);
            return refusal(&r, cors);
        }
    };
    let Ok(raw) = util::random16() else {
        if let Some((id, _)) = early {
            report_closed(shared, id, None);
        }
        return refusal(
            &HttpRefusal::new(503, "no randomness for a connection id"),
            cors,
        );
    };
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let now = shared.runtime.now();
    let limit = body_limit(shared, fallback);
    let link = Arc::new(Link::new(limit, now));
    shared
        .links
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), link.clone());
    let carrier = LinkCarrier {
        id: id.clone(),
        link: link.clone(),
        shared: shared.clone(),
        gap: fallback.gap,
        gap_timer: None,
        armed_for: None,
    };
    shared.runtime.spawn(connection(
        shared.clone(),
        carrier,
        admitted.identity,
        early,
    ));
    debug!(?peer, link = %id, "fallback connection opened");
    let mut body = Vec::new();
    let open = format!(
        r#"{{"id":"{id}","wait":{},"gap":{},"max":{limit}}}"#,
        fallback.wait.as_millis(),
        fallback.gap.as_millis()
    );
    records::push_record(&mut body, records::RECORD_OPEN, open.as_bytes());
    // The `hello`'s answer goes in the header when the `hello` did.
    let in_url = has_hello && admitted.welcome.is_none();
    if in_url {
        let limit = shared.options.handshake_timeout;
        let _ = util::timeout(&*shared.runtime, limit, wait_for_frames(&link)).await;
    }
    {
        let mut st = link.lock();
        take_out(&mut st, &mut body);
        // Counts as a poll's answer: the gap runs from now.
        st.idle_since = Some(shared.runtime.now());
        if let Some(w) = st.read_waker.take() {
            w.wake();
        }
    }
    let mut r = answer(StatusCode::OK, cors, Bytes::new())
        .header("content-type", "application/octet-stream");
    if cors.is_some() {
        r = r.header(
            "access-control-expose-headers",
            kitestring_core::wire::WELCOME_HEADER,
        );
    }
    if let Some(welcome) = admitted
        .welcome
        .as_deref()
        .filter(|w| crate::head::is_visible_ascii(w.as_bytes()))
    {
        r = r.header(kitestring_core::wire::WELCOME_HEADER, welcome);
    }
    build(r, Bytes::from(body))
}

/// Moves what the task wrote into an answer's body; notes a close record
/// going out, and wakes the task's writes.
fn take_out(st: &mut LinkState, body: &mut Vec<u8>) {
    if st.out.is_empty() {
        return;
    }
    body.append(&mut st.out);
    if st.out.capacity() > st.out_limit {
        st.out = Vec::new();
    }
    if st.closing {
        st.close_sent = true;
    }
    if let Some(w) = st.write_waker.take() {
        w.wake();
    }
}

/// Ready once the link has records for a poll, or is gone.
fn wait_for_frames(link: &Link) -> impl std::future::Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| {
        let mut st = link.lock();
        if !st.out.is_empty() || st.gone {
            return Poll::Ready(());
        }
        st.poll_waker = Some(cx.waker().clone());
        Poll::Pending
    })
}

fn find(shared: &ServerShared, id: &str) -> Option<Arc<Link>> {
    shared
        .links
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(id)
        .cloned()
}

/// Marks a request under way; if it is dropped before it is done (the
/// client's HTTP connection closed), the client is gone.
struct InFlight<'a> {
    link: &'a Link,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.link.drop_client();
        }
    }
}

/// A request out of order (its number is not the next, or another of its
/// kind is under way) ends the connection: the client broke the rules, and
/// resumes on a new one.
fn out_of_order(link: &Link, st: &mut LinkState) {
    st.inbound
        .push_back(Err(WsError::Protocol(ProtocolError::InvalidCloseSequence)));
    if let Some(w) = st.read_waker.take() {
        w.wake();
    }
    let _ = link;
}

/// A poll: answered with every record the task wrote as soon as there is
/// one, or empty after [`HttpFallback::wait`].
async fn poll(
    shared: &ServerShared,
    fallback: &HttpFallback,
    id: &str,
    n: u64,
    cors: Option<&str>,
) -> Response<Body> {
    let Some(link) = find(shared, id) else {
        return refusal(&NO_SUCH_CONNECTION, cors);
    };
    {
        let mut st = link.lock();
        if st.gone || (st.close_sent && st.out.is_empty()) {
            return refusal(&NO_SUCH_CONNECTION, cors);
        }
        if n != st.next_poll || st.polling {
            out_of_order(&link, &mut st);
            return refusal(&OUT_OF_ORDER, cors);
        }
        st.next_poll += 1;
        st.polling = true;
        st.idle_since = None;
    }
    let mut guard = InFlight {
        link: &link,
        done: false,
    };
    let _ = util::timeout(&*shared.runtime, fallback.wait, wait_for_frames(&link)).await;
    guard.done = true;
    let mut body = Vec::new();
    let gone = {
        let mut st = link.lock();
        take_out(&mut st, &mut body);
        st.polling = false;
        st.idle_since = Some(shared.runtime.now());
        if let Some(w) = st.read_waker.take() {
            w.wake(); // the gap runs from now
        }
        st.gone && body.is_empty()
    };
    if gone {
        return refusal(&NO_SUCH_CONNECTION, cors);
    }
    build(
        answer(StatusCode::OK, cors, Bytes::new()),
        Bytes::from(body),
    )
}

/// A send: its records become the task's reads, in order, and it is
/// answered 204 once the task has read them all (so the client's next
/// send waits while the server's reads push back). A malformed body is
/// answered 400 (413 over the limit), and the connection closes with the
/// code a WebSocket would give, after the well-formed frames before it.
async fn send<B>(
    shared: &ServerShared,
    fallback: &HttpFallback,
    id: &str,
    n: u64,
    body: B,
    cors: Option<&str>,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(link) = find(shared, id) else {
        return refusal(&NO_SUCH_CONNECTION, cors);
    };
    {
        let mut st = link.lock();
        if st.gone || st.read_closed {
            return refusal(&NO_SUCH_CONNECTION, cors);
        }
        if n != st.next_send || st.sending {
            out_of_order(&link, &mut st);
            return refusal(&OUT_OF_ORDER, cors);
        }
        st.next_send += 1;
        st.sending = true;
    }
    let mut guard = InFlight {
        link: &link,
        done: false,
    };
    let limit = body_limit(shared, fallback);
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            guard.done = true;
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                let mut st = link.lock();
                st.inbound
                    .push_back(Err(WsError::Capacity(CapacityError::MessageTooLong {
                        size: limit + 1,
                        max_size: limit,
                    })));
                if let Some(w) = st.read_waker.take() {
                    w.wake();
                }
                return refusal(&BODY_TOO_LARGE, cors);
            }
            // The body did not arrive whole: the client is gone.
            link.drop_client();
            return refusal(&NO_SUCH_CONNECTION, cors);
        }
    };
    let max = shared.options.config.max_message_size;
    let mut bad = None;
    {
        let mut st = link.lock();
        for r in Records::new(bytes, max + 1024) {
            let m = match r {
                Ok(Record::Text(t)) => match t.try_into() {
                    Ok(t) => Message::Text(t),
                    Err(_) => {
                        bad = Some(RecordError::NotUtf8);
                        break;
                    }
                },
                Ok(Record::Binary(b)) => Message::Binary(b),
                Ok(Record::Close { code, reason }) => {
                    Message::Close(Some(crate::ws::close_frame(code, reason)))
                }
                Ok(Record::Open(_)) => {
                    bad = Some(RecordError::UnknownKind(records::RECORD_OPEN));
                    break;
                }
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            };
            st.inbound.push_back(Ok(m));
        }
        if let Some(e) = &bad {
            st.inbound.push_back(Err(record_error(e, max)));
        }
        if let Some(w) = st.read_waker.take() {
            w.wake();
        }
    }
    if let Some(e) = bad {
        guard.done = true;
        let r = if matches!(e, RecordError::TooLarge { .. }) {
            BODY_TOO_LARGE
        } else {
            HttpRefusal::bad("malformed fallback body; the connection is closed")
        };
        return refusal(&r, cors);
    }
    // Answered once the task read them all (or ended).
    std::future::poll_fn(|cx| {
        let mut st = link.lock();
        if st.inbound.is_empty() || st.gone {
            return Poll::Ready(());
        }
        st.send_waker = Some(cx.waker().clone());
        Poll::Pending
    })
    .await;
    guard.done = true;
    let gone = {
        let mut st = link.lock();
        st.sending = false;
        st.gone && !st.inbound.is_empty()
    };
    if gone {
        return refusal(&NO_SUCH_CONNECTION, cors);
    }
    build(
        answer(StatusCode::NO_CONTENT, cors, Bytes::new()),
        Bytes::new(),
    )
}

/// A malformed record as the WebSocket error that closes the connection
/// with the same code (`ws::read_error_close`).
fn record_error(e: &RecordError, max: usize) -> WsError {
    match e {
        RecordError::TooLarge { len, .. } => WsError::Capacity(CapacityError::MessageTooLong {
            size: *len,
            max_size: max,
        }),
        RecordError::NotUtf8 => WsError::Utf8("a text record is not UTF-8".into()),
        RecordError::UnknownKind(k) => WsError::Protocol(ProtocolError::InvalidOpcode(*k)),
        RecordError::BadClose => WsError::Protocol(ProtocolError::InvalidCloseSequence),
        RecordError::Truncated => WsError::Protocol(ProtocolError::ExpectedFragment(
            async_tungstenite::tungstenite::protocol::frame::coding::Data::Continue,
        )),
    }
}
