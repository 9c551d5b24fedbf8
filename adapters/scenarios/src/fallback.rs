//! The HTTP fallback (PROTOCOL.md, section 1.1) end to end: through a
//! proxy that blocks WebSocket upgrades, a client falls back to HTTP and
//! exchanges messages exactly once both ways through cuts; moves its
//! session to a WebSocket once upgrades go through again, and back when
//! they are blocked again; and the server answers malformed fallback
//! requests with typed errors and the WebSocket close codes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{AsyncReadExt, AsyncWriteExt, StreamExt};
use kitestring::kitestring_core::wire::records::{self, Record, Records};
use kitestring::{
    ClientEvents, ClientHandle, ClientOptions, CloseCode, Codec, DecodeExt, Event, Runtime,
    ServerEvent, ServerEvents, ServerHandle, ServerOptions, SessionId, TransportKind,
};
use kitestring_chaos::{Proxy, RandomFaults, Upgrades};

use crate::{collect_server, fast_client, fast_server, note, opened, serve, within, Note};

/// A server behind a chaos proxy, and a client of it through the proxy
/// with its session open.
struct Pair {
    server: ServerHandle,
    sev: ServerEvents,
    proxy: Proxy,
    client: ClientHandle,
    cev: ClientEvents,
    session: SessionId,
}

impl Pair {
    /// The proxy treats upgrades as `upgrades` (and faults every
    /// connection at random with `faults`, from the first); the client
    /// connects with `options`.
    async fn open(
        rt: &Arc<dyn Runtime>,
        upgrades: Upgrades,
        faults: Option<RandomFaults>,
        options: ClientOptions,
    ) -> Pair {
        let (server, sev, addr) = serve(rt, fast_server());
        let proxy = Proxy::start(addr).unwrap();
        proxy.set_upgrades(upgrades);
        proxy.set_random_faults(faults);
        let url = format!("ws://{}/live?room=a", proxy.local_addr());
        let (client, mut cev) = kitestring::connect(rt.clone(), &url, options).unwrap();
        let session = crate::client_wait(rt, &mut cev, 10_000, "Connected", |e| match e {
            Event::Connected { session, .. } => Some(*session),
            _ => None,
        })
        .await;
        Pair {
            server,
            sev,
            proxy,
            client,
            cev,
            session,
        }
    }

    /// Reads both sides for `pause`, collecting what arrives.
    async fn read_for(&mut self, rt: &Arc<dyn Runtime>, pause: Duration, got: &mut Got) {
        let until = Instant::now() + pause;
        while Instant::now() < until {
            let r = kitestring::util::timeout(&**rt, Duration::from_millis(20), async {
                futures_util::future::select(self.sev.next(), self.cev.next()).await
            })
            .await;
            got.take(self.session, r);
        }
    }

    /// Cuts every connection the proxy carries until the client has
    /// resumed `resumes` times, reading both sides meanwhile. A cut that finds both of the fallback's HTTP connections
    /// between requests ends nothing (the client opens a new one for its
    /// next request, and nothing was on the way), so it is repeated, at
    /// most ten times.
    async fn cut_until_resumed(&mut self, rt: &Arc<dyn Runtime>, resumes: u64, got: &mut Got) {
        for _ in 0..10 {
            self.proxy.cut_all();
            let until = Instant::now() + Duration::from_millis(2000);
            while Instant::now() < until {
                self.read_for(rt, Duration::from_millis(50), got).await;
                let stats = within(rt, 3000, "client stats", self.client.stats())
                    .await
                    .unwrap()
                    .stats;
                if stats.resumes >= resumes && self.client.transport().is_some() {
                    return;
                }
            }
        }
        panic!("ten cuts of every connection and no resume {resumes}");
    }

    /// Sends `n` messages each way, one pair at a time, calling `step`
    /// (with the message's number, the client and the proxy) before each
    /// pair, and doing what it asks; then waits until every message
    /// arrived, and checks each side got every message once, in order.
    async fn once_each_way<F>(&mut self, rt: &Arc<dyn Runtime>, n: u32, mut step: F)
    where
        F: FnMut(u32, &ClientHandle, &Proxy) -> Step,
    {
        let mut got = Got::default();
        for i in 0..n {
            match step(i, &self.client, &self.proxy) {
                Step::Go => {}
                Step::Read(pause) => self.read_for(rt, pause, &mut got).await,
                Step::CutUntilResumed(resumes) => {
                    self.cut_until_resumed(rt, resumes, &mut got).await;
                }
            }
            let mut full = 0;
            loop {
                match within(rt, 3000, "client send", self.client.send(&note(i))).await {
                    Ok(_) => break,
                    Err(kitestring::ClientError::Send(kitestring::SendError::QueueFull {
                        ..
                    })) if full < 300 => {
                        full += 1;
                        kitestring::util::sleep(&**rt, Duration::from_millis(10)).await;
                    }
                    Err(e) => panic!("send {i}: {e}"),
                }
            }
            within(
                rt,
                3000,
                "server send",
                self.server.send(self.session, &note(i)),
            )
            .await
            .unwrap();
            while let Some(Some(e)) = futures_util::FutureExt::now_or_never(self.sev.next()) {
                got.server(self.session, &e);
            }
            while let Some(Some(e)) = futures_util::FutureExt::now_or_never(self.cev.next()) {
                got.client(e);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while (got.to_server.len() < n as usize || got.to_client.len() < n as usize)
            && Instant::now() < deadline
        {
            self.read_for(rt, Duration::from_millis(50), &mut got).await;
        }
        let want: Vec<u32> = (0..n).collect();
        assert_eq!(
            got.to_server, want,
            "client to server: every message once, in order"
        );
        assert_eq!(
            got.to_client, want,
            "server to client: every message once, in order"
        );
    }

    /// Closes the client and shuts the server down.
    async fn end(self, rt: &Arc<dyn Runtime>) {
        within(rt, 3000, "close", self.client.close())
            .await
            .unwrap();
        within(rt, 3000, "shutdown", self.server.shutdown())
            .await
            .unwrap();
    }
}

/// What [`Pair::once_each_way`] does before sending a pair.
enum Step {
    /// Sends at once.
    Go,
    /// Reads both sides for this long first.
    Read(Duration),
    /// Cuts every connection until the client's resumes reach this count.
    CutUntilResumed(u64),
}

/// Which side's stream was ready first, and with what.
type Either<S, C, A, B> = futures_util::future::Either<(Option<S>, A), (Option<C>, B)>;

/// What each side received, in order.
#[derive(Default)]
struct Got {
    to_server: Vec<u32>,
    to_client: Vec<u32>,
    resumes: u32,
    last: Option<kitestring::ConnectionId>,
}

impl Got {
    fn server(&mut self, session: SessionId, e: &ServerEvent) {
        let mut last = self.last.unwrap_or(kitestring::ConnectionId(0));
        collect_server(
            e,
            session,
            &mut self.to_server,
            &mut self.resumes,
            &mut last,
        );
        self.last = Some(last);
    }

    fn client(&mut self, e: Event) {
        if let Event::Message(m) = e {
            self.to_client.push(m.decode::<Note>().unwrap().n);
        }
    }

    fn take<A, B>(&mut self, session: SessionId, r: Option<Either<ServerEvent, Event, A, B>>) {
        match r {
            Some(futures_util::future::Either::Left((Some(e), _))) => self.server(session, &e),
            Some(futures_util::future::Either::Right((Some(e), _))) => self.client(e),
            _ => {}
        }
    }
}

/// Scenario: a proxy answers every upgrade `400`; the client falls back
/// to HTTP and 300 messages each way arrive exactly once, in order,
/// through two cuts of every connection (the polls and sends under way
/// among them). A cut that finds the client between requests ends nothing
/// and is repeated: each of the two must end the connection, and the
/// session resume on new requests.
pub async fn fallback_through_cuts(rt: Arc<dyn Runtime>) {
    let options = fast_client(vec![Codec::MsgPack, Codec::Json]);
    let mut pair = Pair::open(&rt, Upgrades::Refuse, None, options).await;
    assert_eq!(pair.client.codec(), Codec::MsgPack);
    assert_eq!(pair.client.transport(), Some(TransportKind::Http));
    pair.once_each_way(&rt, 300, |i, _, _| match i {
        100 => Step::CutUntilResumed(1),
        200 => Step::CutUntilResumed(2),
        _ => Step::Go,
    })
    .await;
    assert_eq!(pair.client.transport(), Some(TransportKind::Http));
    let stats = pair.client.stats().await.unwrap().stats;
    assert_eq!(stats.resumes, 2, "resumed after each cut: {stats:?}");
    pair.end(&rt).await;
}

/// Scenario: with the upgrade's `Upgrade` header stripped on the way (the
/// server answers 426) and the `hello` in the URL, as a page sends it, the
/// session opens over the fallback in one round trip and carries JSON,
/// large messages (detached payloads) included.
pub async fn fallback_stripped_upgrade(rt: Arc<dyn Runtime>) {
    let mut options = fast_client(vec![Codec::Json]);
    options.hello_in_url = true;
    let mut pair = Pair::open(&rt, Upgrades::Strip, None, options).await;
    assert_eq!(pair.client.transport(), Some(TransportKind::Http));
    pair.once_each_way(&rt, 50, |_, _, _| Step::Go).await;
    let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    pair.client.send_bytes(big.clone()).await.unwrap();
    pair.server
        .send_bytes(pair.session, big.clone())
        .await
        .unwrap();
    let got = crate::server_wait(&rt, &mut pair.sev, 5000, "large bytes", |e| match e {
        ServerEvent::Message { message, .. } => Some(message.payload.data().to_vec()),
        _ => None,
    })
    .await;
    assert!(got == big, "300 KB to the server, intact");
    let got = crate::client_wait(&rt, &mut pair.cev, 5000, "large bytes", |e| match e {
        Event::Message(m) => Some(m.payload.data().to_vec()),
        _ => None,
    })
    .await;
    assert!(got == big, "300 KB to the client, intact");
    pair.end(&rt).await;
}

/// Scenario: a session that starts on the fallback moves to a WebSocket
/// once upgrades go through again (the client's probe after its memory of
/// the block runs out), then back to the fallback when they are blocked
/// again, with messages flowing both ways all along: nothing lost or
/// duplicated, one session throughout.
pub async fn fallback_moves_to_websocket_and_back(rt: Arc<dyn Runtime>) {
    let mut options = fast_client(vec![Codec::Json]);
    options.fallback_memory = Duration::from_millis(300);
    let mut pair = Pair::open(&rt, Upgrades::Refuse, None, options).await;
    assert_eq!(pair.client.transport(), Some(TransportKind::Http));
    let mut seen = vec![TransportKind::Http];
    pair.once_each_way(&rt, 300, |i, client, proxy| {
        if let Some(t) = client.transport() {
            if seen.last() != Some(&t) {
                seen.push(t);
            }
        }
        match i {
            // Reads long enough for the move on a loaded machine (the
            // transport is sampled at each of the next 100 messages).
            100 => {
                proxy.set_upgrades(Upgrades::Pass);
                Step::Read(Duration::from_millis(3000))
            }
            200 => {
                proxy.set_upgrades(Upgrades::Refuse);
                proxy.cut_all();
                Step::Read(Duration::from_millis(2000))
            }
            _ => Step::Go,
        }
    })
    .await;
    assert_eq!(
        seen,
        vec![
            TransportKind::Http,
            TransportKind::WebSocket,
            TransportKind::Http
        ],
        "fallback, WebSocket, fallback"
    );
    let session = pair.client.stats().await.unwrap().session;
    assert_eq!(session, Some(pair.session), "one session");
    pair.end(&rt).await;
}

/// One raw HTTP/1.1 request on a connection of its own: status, headers
/// (lower-case names) and body.
async fn raw(
    rt: &Arc<dyn Runtime>,
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut io = rt
        .connect_tcp(addr.ip().to_string(), addr.port())
        .await
        .unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    io.write_all(req.as_bytes()).await.unwrap();
    io.write_all(body).await.unwrap();
    io.flush().await.unwrap();
    let mut all = Vec::new();
    let _ = io.read_to_end(&mut all).await;
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&all[..end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = all[end..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = unchunk(&body);
    }
    (status, headers, body)
}

fn unchunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let len = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if len == 0 {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + len]);
        b = &b[nl + 2 + len + 2..];
    }
    out
}

/// Opens a fallback connection by hand (no `hello`): its id.
async fn raw_open(rt: &Arc<dyn Runtime>, addr: std::net::SocketAddr) -> String {
    let (status, headers, body) = raw(
        rt,
        addr,
        "POST",
        &format!("/?{}=open", records::HTTP_PARAM),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{headers:?}");
    match Records::new(body.into(), 1 << 20).next() {
        Some(Ok(Record::Open(json))) => {
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            v["id"].as_str().unwrap().to_owned()
        }
        other => panic!("no open record: {other:?}"),
    }
}

/// Polls a hand-opened connection until its close record: the close code.
async fn raw_close_code(rt: &Arc<dyn Runtime>, addr: std::net::SocketAddr, id: &str) -> CloseCode {
    for n in 0..20 {
        let (status, _, body) = raw(
            rt,
            addr,
            "GET",
            &format!(
                "/?{}={id}&{}={n}",
                records::HTTP_PARAM,
                records::HTTP_SEQ_PARAM
            ),
            &[],
            b"",
        )
        .await;
        assert_eq!(status, 200, "poll {n}");
        for r in Records::new(body.into(), 1 << 20) {
            if let Ok(Record::Close { code, .. }) = r {
                return code;
            }
        }
    }
    panic!("no close record");
}

/// Scenario: every malformed fallback request gets a typed answer, and a
/// malformed body closes its connection with the close code a WebSocket
/// would get; the server's refusals are marked as its own.
pub async fn fallback_bad_input(rt: Arc<dyn Runtime>) {
    let mut options: ServerOptions = fast_server();
    options.config.max_message_size = 64 * 1024;
    options.handshake_timeout = Duration::from_millis(500);
    let (server, _sev, addr) = serve(&rt, options);

    // A kept-alive HTTP connection left idle is closed after the
    // handshake timeout, as a socket that never finishes its upgrade is.
    let mut io = rt
        .connect_tcp(addr.ip().to_string(), addr.port())
        .await
        .unwrap();
    let req = format!(
        "GET /?{}=00ff&{}=0 HTTP/1.1\r\nhost: {addr}\r\n\r\n",
        records::HTTP_PARAM,
        records::HTTP_SEQ_PARAM
    );
    io.write_all(req.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut all = Vec::new();
    within(
        &rt,
        3000,
        "an idle HTTP connection closed",
        io.read_to_end(&mut all),
    )
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 404"));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "kept alive first"
    );
    let p = records::HTTP_PARAM;
    let s = records::HTTP_SEQ_PARAM;

    // Unknown connection; a poll without its number; open with GET.
    let (status, headers, _) = raw(&rt, addr, "GET", &format!("/?{p}=00ff&{s}=0"), &[], b"").await;
    assert_eq!(status, 404);
    assert!(headers
        .iter()
        .any(|(n, v)| n == records::REFUSAL_HEADER && v == "404"));
    let (status, _, _) = raw(&rt, addr, "GET", &format!("/?{p}=00ff"), &[], b"").await;
    assert_eq!(status, 400);
    let (status, headers, _) = raw(&rt, addr, "GET", &format!("/?{p}=open"), &[], b"").await;
    assert_eq!(status, 405);
    assert!(headers
        .iter()
        .any(|(n, v)| n == "allow" && v.contains("POST")));
    // A plain GET is still not an upgrade.
    let (status, headers, _) = raw(&rt, addr, "GET", "/", &[], b"").await;
    assert_eq!(status, 426);
    assert!(headers.iter().any(|(n, _)| n == records::REFUSAL_HEADER));

    // A body that is not records: 400, and the connection closes with 1002.
    let id = raw_open(&rt, addr).await;
    let (status, _, _) = raw(
        &rt,
        addr,
        "POST",
        &format!("/?{p}={id}&{s}=0"),
        &[],
        &[9, 0, 0, 0, 0],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        raw_close_code(&rt, addr, &id).await,
        CloseCode::PROTOCOL_ERROR
    );
    // Gone after its close: 404.
    let (status, _, _) = raw(&rt, addr, "GET", &format!("/?{p}={id}&{s}=99"), &[], b"").await;
    assert_eq!(status, 404);

    // Text that is not UTF-8: 1007.
    let id = raw_open(&rt, addr).await;
    let mut body = Vec::new();
    records::push_record(&mut body, records::RECORD_TEXT, &[0xff, 0xfe]);
    let (status, _, _) = raw(&rt, addr, "POST", &format!("/?{p}={id}&{s}=0"), &[], &body).await;
    assert_eq!(status, 400);
    assert_eq!(
        raw_close_code(&rt, addr, &id).await,
        CloseCode::INVALID_PAYLOAD
    );

    // A record over the message limit: 413 and 1009.
    let id = raw_open(&rt, addr).await;
    let mut body = Vec::new();
    records::push_record(&mut body, records::RECORD_BINARY, &vec![1u8; 200 * 1024]);
    let (status, _, _) = raw(&rt, addr, "POST", &format!("/?{p}={id}&{s}=0"), &[], &body).await;
    assert_eq!(status, 413);
    assert_eq!(
        raw_close_code(&rt, addr, &id).await,
        CloseCode::MESSAGE_TOO_BIG
    );

    // A body over the body limit: 413 and 1009.
    let id = raw_open(&rt, addr).await;
    let body = vec![0u8; 2 * 1024 * 1024];
    let (status, _, _) = raw(&rt, addr, "POST", &format!("/?{p}={id}&{s}=0"), &[], &body).await;
    assert_eq!(status, 413);
    assert_eq!(
        raw_close_code(&rt, addr, &id).await,
        CloseCode::MESSAGE_TOO_BIG
    );

    // A send out of order: 409, and the connection closes with 1002.
    let id = raw_open(&rt, addr).await;
    let (status, _, _) = raw(&rt, addr, "POST", &format!("/?{p}={id}&{s}=5"), &[], b"").await;
    assert_eq!(status, 409);
    assert_eq!(
        raw_close_code(&rt, addr, &id).await,
        CloseCode::PROTOCOL_ERROR
    );

    // A frame that is not a Kitestring frame: the core's own close code,
    // as over a WebSocket.
    let id = raw_open(&rt, addr).await;
    let mut body = Vec::new();
    records::push_record(&mut body, records::RECORD_TEXT, b"not json");
    let (status, _, _) = raw(&rt, addr, "POST", &format!("/?{p}={id}&{s}=0"), &[], &body).await;
    assert_eq!(status, 204);
    let code = raw_close_code(&rt, addr, &id).await;
    assert!(
        code.0 == 1002 || code.0 == 4002,
        "closed as a bad first frame: {code:?}"
    );
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Scenario: admission over the fallback is the upgrade's: behind a proxy
/// that blocks upgrades, a bad token fails the client as `Unauthorized`
/// (after its one retry with a fresh token), refused in-band when its
/// `hello` is in the URL; a forbidden one as `Forbidden`; a good one opens
/// the session with its identity. A foreign origin is refused `403` before
/// any credential is looked at, and an allowed one may read the answers.
pub async fn fallback_admission(rt: Arc<dyn Runtime>) {
    let (server, mut sev, addr) = crate::auth_server(&rt);
    let proxy = Proxy::start(addr).unwrap();
    proxy.set_upgrades(Upgrades::Refuse);
    let url = format!("ws://{}/", proxy.local_addr());
    for (token, in_url, want) in [
        ("bad", false, kitestring::FailReason::Unauthorized),
        ("bad", true, kitestring::FailReason::Unauthorized),
        ("forbidden", false, kitestring::FailReason::Forbidden),
    ] {
        let (provider, calls) = crate::counting_token(token);
        let mut options = fast_client(vec![Codec::Json]);
        options.token = Some(provider);
        options.hello_in_url = in_url;
        let (_client, mut cev) = kitestring::connect(rt.clone(), &url, options).unwrap();
        let reason = crate::client_wait(&rt, &mut cev, 5000, "Failed", |e| match e {
            Event::StateChanged {
                new: kitestring::State::Failed { reason },
                ..
            } => Some(reason.clone()),
            Event::Connected { .. } => panic!("connected with token {token}"),
            _ => None,
        })
        .await;
        assert_eq!(reason, want, "token {token}, hello in the URL: {in_url}");
        let calls = calls.load(std::sync::atomic::Ordering::SeqCst);
        let retries = usize::from(want == kitestring::FailReason::Unauthorized);
        assert_eq!(
            calls,
            1 + retries,
            "one token per attempt, fallback included"
        );
    }
    let (provider, _) = crate::counting_token("good");
    let mut options = fast_client(vec![Codec::Json]);
    options.token = Some(provider);
    let (client, mut cev) = kitestring::connect(rt.clone(), &url, options).unwrap();
    opened(&rt, &mut cev).await;
    assert_eq!(client.transport(), Some(TransportKind::Http));
    let (_, _, identity, _) = crate::session_opened(&rt, &mut sev).await;
    assert_eq!(identity.as_deref(), Some("alice"));
    within(&rt, 3000, "close", client.close()).await.unwrap();

    let open = format!("/?{}=open", records::HTTP_PARAM);
    let (status, headers, _) = raw(
        &rt,
        addr,
        "POST",
        &open,
        &[
            ("origin", "http://elsewhere.example"),
            ("authorization", "Bearer good"),
        ],
        b"",
    )
    .await;
    assert_eq!(status, 403, "a foreign origin");
    assert!(!headers
        .iter()
        .any(|(n, _)| n == "access-control-allow-origin"));
    let same = format!("http://{addr}");
    let (status, headers, _) = raw(
        &rt,
        addr,
        "POST",
        &open,
        &[("origin", &same), ("authorization", "Bearer good")],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(n, v)| n == "access-control-allow-origin" && *v == same));
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Scenario: the rate limit applies over the fallback as over a WebSocket:
/// a client pinned to HTTP that sends 3 000 messages as fast as its window
/// lets it, against the default limit (1 000 a second, bursts of 2 000,
/// throttled), is slowed, not refused: every message arrives once, in
/// order, no sooner than the limit allows, and the application is told
/// messages were delayed.
pub async fn fallback_flood_is_throttled(rt: Arc<dyn Runtime>) {
    const N: u32 = 3000;
    let (server, mut sev, addr) = serve(&rt, ServerOptions::default());
    let mut options = fast_client(vec![Codec::Json]);
    options.transports = kitestring::Transports::Http;
    let (client, mut cev) =
        kitestring::connect(rt.clone(), &format!("ws://{addr}/"), options).unwrap();
    let (session, _, _) = opened(&rt, &mut cev).await;
    assert_eq!(client.transport(), Some(TransportKind::Http));
    let start = Instant::now();
    let sender = {
        let client = client.clone();
        async move {
            for i in 0..N {
                client.send_when_ready(&i).await.unwrap();
            }
        }
    };
    let reader = async {
        let mut got = Vec::new();
        let mut delayed = 0;
        while got.len() < N as usize {
            match sev.next().await.expect("server events") {
                ServerEvent::Message {
                    session: s,
                    message,
                } if s == session => {
                    got.push(message.decode::<u32>().unwrap());
                }
                ServerEvent::RateLimited { delayed: d, .. } => delayed += d,
                _ => {}
            }
        }
        (got, delayed)
    };
    let ((), (got, mut delayed)) = within(
        &rt,
        15_000,
        "the flood",
        futures_util::future::join(sender, reader),
    )
    .await;
    let elapsed = start.elapsed();
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert!(
        elapsed >= Duration::from_millis(900),
        "1 000 over the burst take a second at 1 000 a second: {elapsed:?}"
    );
    // The last report comes within a second (5 s for a loaded machine).
    let deadline = Instant::now() + Duration::from_secs(5);
    while delayed == 0 && Instant::now() < deadline {
        if let Some(Some(ServerEvent::RateLimited { delayed: d, .. })) =
            kitestring::util::timeout(&*rt, Duration::from_millis(100), sev.next()).await
        {
            delayed += d;
        }
    }
    assert!(
        delayed > 0,
        "the application was told messages were delayed"
    );
    within(&rt, 3000, "close", client.close()).await.unwrap();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Scenario: a refusal by the server itself is not a block: a client whose
/// upgrade the server refuses `401` (no proxy on the way) does not try the
/// fallback (the authenticator sees one request per attempt: the upgrade
/// and the one retry with a fresh token), and fails `Unauthorized`.
pub async fn fallback_not_for_refusals(rt: Arc<dyn Runtime>) {
    let checks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut options = fast_server();
    let seen = checks.clone();
    options.auth = Some(kitestring::Authenticator::sync(
        move |_req: &kitestring::AuthRequest| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(kitestring::AuthReject::Unauthorized)
        },
    ));
    let (server, _sev, addr) = serve(&rt, options);
    let (provider, _) = crate::counting_token("bad");
    let mut options = fast_client(vec![Codec::Json]);
    options.token = Some(provider);
    let (_client, mut cev) =
        kitestring::connect(rt.clone(), &format!("ws://{addr}/"), options).unwrap();
    let reason = crate::client_wait(&rt, &mut cev, 5000, "Failed", |e| match e {
        Event::StateChanged {
            new: kitestring::State::Failed { reason },
            ..
        } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert_eq!(reason, kitestring::FailReason::Unauthorized);
    assert_eq!(
        checks.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "two upgrades, no fallback request"
    );
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Scenario: random faults on every proxied connection of the fallback
/// (cuts and black holes, two a second on average, seeded), while 300
/// messages cross each way, paced: a black-holed poll or send is found by
/// the heartbeat, the session resumes on new requests, and every message
/// arrives exactly once, in order.
pub async fn fallback_random_faults(rt: Arc<dyn Runtime>) {
    let faults = RandomFaults {
        seed: 27,
        rate: 2.0,
        black_hole_share: 0.5,
    };
    let options = fast_client(vec![Codec::MsgPack, Codec::Json]);
    let mut pair = Pair::open(&rt, Upgrades::Refuse, Some(faults), options).await;
    pair.once_each_way(&rt, 300, |i, _, _| {
        if i % 5 == 0 {
            Step::Read(Duration::from_millis(40))
        } else {
            Step::Go
        }
    })
    .await;
    pair.proxy.set_random_faults(None);
    let resumes = pair.client.stats().await.unwrap().stats.resumes;
    assert!(resumes >= 1, "faults ended connections: {resumes} resumes");
    pair.end(&rt).await;
}
