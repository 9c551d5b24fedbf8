//! The HTTP fallback's client side (PROTOCOL.md, section 1.1): a
//! connection carried by an `open`, then polls (GET) and sends (POST), one
//! of each at a time, each numbered, on two kept-alive HTTP/1.1
//! connections made with hyper.
//!
//! [`HttpLink`] is what the driver task reads and writes, as it would a
//! WebSocket (a `Stream` and a `Sink` of messages); a task of its own makes
//! the requests. It owns only the carrying: any failed request, any answer
//! other than the expected one, ends the link, and the core resumes the
//! session on a new connection as after any drop. It never retries a
//! request (its answer may have been lost with frames in it) and never
//! interprets a frame.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_tungstenite::tungstenite::error::ProtocolError;
use async_tungstenite::tungstenite::http::{self as h, HeaderValue, Request, StatusCode, Uri};
use async_tungstenite::tungstenite::{Error as WsError, Message};
use bytes::Bytes;
use futures_util::{Sink, Stream};
use http_body_util::{BodyExt, Full, Limited};
use kitestring_core::client::TransportError;
use kitestring_core::close::CloseCode;
use kitestring_core::wire::records::{self, Record, Records};
use tracing::{debug, trace};

use crate::runtime::{BoxIo, Runtime};
use crate::util;

/// What the server's `open` record says.
#[derive(Debug, serde::Deserialize)]
struct OpenRecord {
    id: String,
    /// How long the server holds a poll, ms.
    wait: u64,
    /// Largest body the server takes.
    max: usize,
}

/// One kept-alive HTTP/1.1 connection to the server, opened again (for the
/// next request) when the server or a proxy closed it between requests.
pub(super) struct HttpClient {
    runtime: Arc<dyn Runtime>,
    open_io: Arc<
        dyn Fn() -> crate::runtime::BoxFuture<'static, Result<BoxIo, TransportError>> + Send + Sync,
    >,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

/// An answer: status, headers and the whole body.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: h::HeaderMap,
    pub(super) body: Bytes,
}

impl HttpClient {
    pub(super) fn new(
        runtime: Arc<dyn Runtime>,
        open_io: Arc<
            dyn Fn() -> crate::runtime::BoxFuture<'static, Result<BoxIo, TransportError>>
                + Send
                + Sync,
        >,
    ) -> Self {
        HttpClient {
            runtime,
            open_io,
            sender: None,
        }
    }

    /// Sends one request and reads its whole answer (at most `max` bytes of
    /// body). A connection found closed before the request is replaced; a
    /// request that fails once sent is an error, never repeated.
    pub(super) async fn request(
        &mut self,
        req: Request<Full<Bytes>>,
        max: usize,
    ) -> Result<Answer, TransportError> {
        if let Some(s) = &mut self.sender {
            if s.is_closed()
                || futures_util::future::poll_fn(|cx| s.poll_ready(cx))
                    .await
                    .is_err()
            {
                self.sender = None;
            }
        }
        if self.sender.is_none() {
            let io = (self.open_io)().await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(
                crate::hyper_io::FuturesIo::new(io, Vec::new()),
            )
            .await
            .map_err(|e| TransportError::Io(format!("HTTP handshake: {e}")))?;
            // Ends when the sender is dropped (or the server closes).
            self.runtime.spawn(Box::pin(async move {
                if let Err(e) = conn.await {
                    trace!(error = %e, "fallback HTTP connection ended");
                }
            }));
            self.sender = Some(sender);
        }
        let Some(sender) = &mut self.sender else {
            return Err(TransportError::Io("no HTTP connection".into()));
        };
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| TransportError::Io(format!("HTTP request: {e}")))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, max)
            .collect()
            .await
            .map_err(|e| TransportError::Io(format!("HTTP answer: {e}")))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// Where a link's requests go, and what each carries.
pub(super) struct Endpoint {
    /// The endpoint's URL (its path and the application's query).
    pub(super) uri: Uri,
    /// Headers every request carries: `host`, and the credential.
    pub(super) headers: h::HeaderMap,
}

impl Endpoint {
    /// The URL with `extra` appended to its query.
    fn target(&self, extra: &str) -> String {
        let path = self.uri.path();
        match self.uri.query() {
            Some(q) => format!("{path}?{q}&{extra}"),
            None => format!("{path}?{extra}"),
        }
    }

    fn request(
        &self,
        method: h::Method,
        extra: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, TransportError> {
        let mut req = Request::builder().method(method).uri(self.target(extra));
        for (name, value) in &self.headers {
            req = req.header(name, value);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/octet-stream");
        }
        req.body(Full::new(body))
            .map_err(|e| TransportError::Io(format!("fallback request: {e}")))
    }
}

/// The `open`: a new fallback connection, admitted as an upgrade would be.
/// `hello_query` is the percent-encoded `hello` for the URL, `hello_header`
/// one for the `Kitestring-Hello` header. Returns the link and the header's
/// answer, if any.
pub(super) async fn open(
    runtime: Arc<dyn Runtime>,
    http: HttpClient,
    poll_http: HttpClient,
    endpoint: Endpoint,
    hello_query: Option<String>,
    hello_header: Option<String>,
) -> Result<(HttpLink, Option<String>), TransportError> {
    let mut http = http;
    let mut extra = format!("{}=open", records::HTTP_PARAM);
    if let Some(q) = hello_query {
        extra.push_str(&format!("&{}={q}", kitestring_core::wire::HELLO_PARAM));
    }
    let mut req = endpoint.request(h::Method::POST, &extra, Bytes::new())?;
    if let Some(hello) = hello_header {
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(hello)) {
            req.headers_mut()
                .insert(kitestring_core::wire::HELLO_HEADER, v);
        }
    }
    let answer = http.request(req, 16 * 1024 * 1024).await?;
    if answer.status != StatusCode::OK {
        return Err(TransportError::Http {
            status: answer.status.as_u16(),
            retry_after: answer
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        });
    }
    let welcome = answer
        .headers
        .get(kitestring_core::wire::WELCOME_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut records = Records::new(answer.body, usize::MAX >> 1);
    let open: OpenRecord = match records.next() {
        Some(Ok(Record::Open(json))) => serde_json::from_slice(&json)
            .map_err(|e| TransportError::Io(format!("the fallback's open record: {e}")))?,
        _ => {
            return Err(TransportError::Io(
                "the fallback's answer has no open record".into(),
            ))
        }
    };
    debug!(link = %open.id, "fallback connection opened");
    let link = Arc::new(LinkShared {
        state: Mutex::new(LinkState {
            inbound: VecDeque::new(),
            outbound: Vec::new(),
            out_limit: open.max,
            ended: false,
            dropped: false,
            read_waker: None,
            write_waker: None,
            worker_waker: None,
        }),
    });
    {
        let mut st = link.lock();
        st.take_records(records);
    }
    let worker = Worker {
        link: link.clone(),
        endpoint: Arc::new(endpoint),
        id: open.id,
        wait: Duration::from_millis(open.wait),
        max: open.max,
        runtime: runtime.clone(),
    };
    runtime.spawn(Box::pin(worker.run(http, poll_http)));
    Ok((HttpLink { link }, welcome))
}

struct LinkShared {
    state: Mutex<LinkState>,
}

impl LinkShared {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct LinkState {
    /// Messages from polls, for the driver task.
    inbound: VecDeque<Result<Message, WsError>>,
    /// Records the driver task wrote, for the next send.
    outbound: Vec<u8>,
    /// Past this many bytes waiting, writes wait for a send.
    out_limit: usize,
    /// The link failed or closed: once `inbound` is read, reads end.
    ended: bool,
    /// The driver task dropped the link: the worker stops.
    dropped: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    worker_waker: Option<Waker>,
}

impl LinkState {
    /// Queues a poll's records for the driver task. A close record ends the
    /// link; a malformed body ends it with the error a WebSocket reader
    /// would give.
    fn take_records(&mut self, records: Records) {
        for r in records {
            let m = match r {
                Ok(Record::Text(t)) => match t.try_into() {
                    Ok(t) => Message::Text(t),
                    Err(_) => {
                        self.fail(WsError::Utf8("a text record is not UTF-8".into()));
                        return;
                    }
                },
                Ok(Record::Binary(b)) => Message::Binary(b),
                Ok(Record::Close { code, reason }) => {
                    self.inbound
                        .push_back(Ok(Message::Close(Some(crate::ws::close_frame(
                            code, reason,
                        )))));
                    self.ended = true;
                    return;
                }
                Ok(Record::Open(_)) | Err(_) => {
                    self.fail(WsError::Protocol(ProtocolError::InvalidOpcode(0)));
                    return;
                }
            };
            self.inbound.push_back(Ok(m));
        }
    }

    fn fail(&mut self, e: WsError) {
        if !self.ended {
            self.inbound.push_back(Err(e));
            self.ended = true;
        }
    }

    fn wake_driver(&mut self) {
        for w in [self.read_waker.take(), self.write_waker.take()]
            .into_iter()
            .flatten()
        {
            w.wake();
        }
    }
}

/// The driver task's side of a fallback connection.
pub(crate) struct HttpLink {
    link: Arc<LinkShared>,
}

impl Drop for HttpLink {
    fn drop(&mut self) {
        let mut st = self.link.lock();
        st.dropped = true;
        if let Some(w) = st.worker_waker.take() {
            w.wake();
        }
    }
}

impl Stream for HttpLink {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut st = self.link.lock();
        if let Some(m) = st.inbound.pop_front() {
            return Poll::Ready(Some(m));
        }
        if st.ended {
            return Poll::Ready(None);
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Sink<Message> for HttpLink {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let mut st = self.link.lock();
        if st.ended {
            return Poll::Ready(Err(WsError::AlreadyClosed));
        }
        if st.outbound.len() < st.out_limit {
            return Poll::Ready(Ok(()));
        }
        st.write_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn start_send(self: Pin<&mut Self>, m: Message) -> Result<(), WsError> {
        let mut st = self.link.lock();
        if st.ended {
            return Err(WsError::AlreadyClosed);
        }
        match &m {
            Message::Text(t) => {
                records::push_record(&mut st.outbound, records::RECORD_TEXT, t.as_bytes())
            }
            Message::Binary(b) => records::push_record(&mut st.outbound, records::RECORD_BINARY, b),
            Message::Close(frame) => {
                let (code, reason) = crate::ws::close_code(frame);
                records::push_close(&mut st.outbound, code.unwrap_or(CloseCode(1005)), &reason);
            }
            _ => {}
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let mut st = self.link.lock();
        if !st.outbound.is_empty() {
            if let Some(w) = st.worker_waker.take() {
                w.wake();
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.poll_flush(cx)
    }
}

/// The requests of one link: polls on one HTTP connection, sends on the
/// other, until the link ends or the driver drops it.
struct Worker {
    link: Arc<LinkShared>,
    endpoint: Arc<Endpoint>,
    id: String,
    wait: Duration,
    max: usize,
    runtime: Arc<dyn Runtime>,
}

impl Worker {
    async fn run(self, send_http: HttpClient, poll_http: HttpClient) {
        let dropped = {
            let link = self.link.clone();
            std::future::poll_fn(move |cx| {
                let mut st = link.lock();
                if st.dropped {
                    return Poll::Ready(());
                }
                st.worker_waker = Some(cx.waker().clone());
                Poll::Pending
            })
        };
        let work = futures_util::future::join(self.polls(poll_http), self.sends(send_http));
        futures_util::pin_mut!(work);
        futures_util::pin_mut!(dropped);
        // Whichever ends first: the link failed (both loops stop) or the
        // driver dropped it (the requests under way are abandoned, and the
        // server counts the connection dropped).
        let _ = futures_util::future::select(work, dropped).await;
        let mut st = self.link.lock();
        st.fail(WsError::AlreadyClosed);
        st.wake_driver();
        trace!(link = %self.id, "fallback link ended");
    }

    fn ended(&self) -> bool {
        let st = self.link.lock();
        st.ended || st.dropped
    }

    fn fail(&self, why: String) {
        debug!(link = %self.id, %why, "fallback link failed");
        let mut st = self.link.lock();
        st.fail(WsError::Io(std::io::Error::other(why)));
        st.wake_driver();
        if let Some(w) = st.worker_waker.take() {
            w.wake();
        }
    }

    async fn polls(&self, mut http: HttpClient) {
        let param = format!("{}={}", records::HTTP_PARAM, self.id);
        for n in 0u64.. {
            if self.ended() {
                return;
            }
            let extra = format!("{param}&{}={n}", records::HTTP_SEQ_PARAM);
            let req = match self.endpoint.request(h::Method::GET, &extra, Bytes::new()) {
                Ok(r) => r,
                Err(e) => return self.fail(format!("{e:?}")),
            };
            // Held by the server for `wait` at most: past it with a margin,
            // the link is dead.
            let limit = self.wait + Duration::from_secs(10);
            let answer = util::timeout(
                &*self.runtime,
                limit,
                http.request(req, self.max.saturating_mul(4)),
            )
            .await;
            match answer {
                Some(Ok(a)) if a.status == StatusCode::OK => {
                    let mut st = self.link.lock();
                    st.take_records(Records::new(a.body, usize::MAX >> 1));
                    st.wake_driver();
                }
                Some(Ok(a)) if a.status == StatusCode::NOT_FOUND => {
                    // The server ended the connection.
                    let mut st = self.link.lock();
                    st.ended = true;
                    st.wake_driver();
                    return;
                }
                Some(Ok(a)) => return self.fail(format!("a poll was answered {}", a.status)),
                Some(Err(e)) => return self.fail(format!("a poll failed: {e:?}")),
                None => return self.fail("a poll outlived its limit".into()),
            }
        }
    }

    async fn sends(&self, mut http: HttpClient) {
        let param = format!("{}={}", records::HTTP_PARAM, self.id);
        for n in 0u64.. {
            // The next batch: everything written since the last send, cut
            // at a record boundary under the server's limit.
            let body = std::future::poll_fn(|cx| {
                let mut st = self.link.lock();
                if st.dropped || (st.ended && st.outbound.is_empty()) {
                    return Poll::Ready(None);
                }
                if st.outbound.is_empty() {
                    st.worker_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                let cut = cut_at(&st.outbound, self.max);
                let rest = st.outbound.split_off(cut);
                let body = std::mem::replace(&mut st.outbound, rest);
                if let Some(w) = st.write_waker.take() {
                    w.wake();
                }
                Poll::Ready(Some(body))
            })
            .await;
            let Some(body) = body else {
                return;
            };
            let extra = format!("{param}&{}={n}", records::HTTP_SEQ_PARAM);
            let req = match self
                .endpoint
                .request(h::Method::POST, &extra, Bytes::from(body))
            {
                Ok(r) => r,
                Err(e) => return self.fail(format!("{e:?}")),
            };
            match http.request(req, 64 * 1024).await {
                Ok(a) if a.status == StatusCode::NO_CONTENT || a.status == StatusCode::OK => {}
                Ok(a) if a.status == StatusCode::NOT_FOUND => {
                    let mut st = self.link.lock();
                    st.ended = true;
                    st.wake_driver();
                    return;
                }
                Ok(a) => return self.fail(format!("a send was answered {}", a.status)),
                Err(e) => return self.fail(format!("a send failed: {e:?}")),
            }
        }
    }
}

/// Where to cut `records` so the first part is at most `max` bytes (but at
/// least one record): at a record boundary.
fn cut_at(records: &[u8], max: usize) -> usize {
    let mut at = 0;
    while at + records::RECORD_HEADER <= records.len() {
        let len = u32::from_be_bytes([
            records[at + 1],
            records[at + 2],
            records[at + 3],
            records[at + 4],
        ]) as usize;
        let next = at + records::RECORD_HEADER + len;
        if at > 0 && next > max {
            break;
        }
        at = next;
    }
    at.min(records.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_cut_at_record_boundaries() {
        let mut body = Vec::new();
        records::push_record(&mut body, records::RECORD_TEXT, &[b'a'; 10]);
        records::push_record(&mut body, records::RECORD_TEXT, &[b'b'; 10]);
        records::push_record(&mut body, records::RECORD_TEXT, &[b'c'; 100]);
        assert_eq!(cut_at(&body, 1000), body.len());
        assert_eq!(cut_at(&body, 30), 30);
        assert_eq!(cut_at(&body, 29), 15);
        // One record over the limit still goes alone.
        assert_eq!(cut_at(&body[30..], 10), 105);
    }
}
