//! Rooms, broadcast, presence, slow consumers, rotation, shutdown and
//! request/response, end to end. Several clients run at once here, so each
//! event stream is drained by a [`Recorder`] task of its own and the
//! scenario polls the recordings: no client is ever paused because the
//! test was busy reading another one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kitestring::kitestring_core::client::Cause;
use kitestring::kitestring_core::rooms::PolicyFn;
use kitestring::{
    ClientError, ClientEvents, ClientHandle, CloseCode, Codec, DecodeExt, Event, Member, Presence,
    RequestError, Runtime, ServerEvent, ServerEvents, ServerHandle, ServerOptions, SessionEnd,
    SessionId, State,
};
use kitestring_chaos::Proxy;

use crate::{fast_client, fast_server, note, within, Note};

/// Every event of one stream, in order, collected by a task of its own.
pub struct Recorder<E> {
    events: Arc<Mutex<Vec<E>>>,
}

impl<E: Clone + Send + 'static> Recorder<E> {
    fn spawn<S>(rt: &Arc<dyn Runtime>, mut stream: S) -> Recorder<E>
    where
        S: futures_util::Stream<Item = E> + Unpin + Send + 'static,
    {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        rt.spawn(Box::pin(async move {
            while let Some(e) = stream.next().await {
                sink.lock().unwrap().push(e);
            }
        }));
        Recorder { events }
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Vec<E> {
        self.events.lock().unwrap().clone()
    }

    /// How many events were recorded so far (a mark for [`since`](Self::since)).
    pub fn mark(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// The events recorded after `mark`.
    pub fn since(&self, mark: usize) -> Vec<E> {
        self.events.lock().unwrap()[mark..].to_vec()
    }

    /// Polls the recording every 5 ms until `check` returns `Some`; panics
    /// naming `what` after `ms` milliseconds.
    pub async fn until<T>(
        &self,
        rt: &Arc<dyn Runtime>,
        ms: u64,
        what: &str,
        mut check: impl FnMut(&[E]) -> Option<T>,
    ) -> T {
        within(rt, ms, what, async {
            loop {
                if let Some(t) = check(&self.events.lock().unwrap()) {
                    return t;
                }
                kitestring::util::sleep(&**rt, Duration::from_millis(5)).await;
            }
        })
        .await
    }
}

fn record_client(rt: &Arc<dyn Runtime>, events: ClientEvents) -> Recorder<Event> {
    Recorder::spawn(rt, events)
}

fn record_server(rt: &Arc<dyn Runtime>, events: ServerEvents) -> Recorder<ServerEvent> {
    Recorder::spawn(rt, events)
}

/// A client of the scenarios: its handle, its recording, its own chaos
/// proxy (so one member's link can be faulted alone) and its session.
pub struct Peer {
    /// The handle.
    pub handle: ClientHandle,
    /// Its events.
    pub events: Recorder<Event>,
    /// The proxy its connections go through.
    pub proxy: Proxy,
    /// Its first session.
    pub session: SessionId,
}

fn serve(rt: &Arc<dyn Runtime>, options: ServerOptions) -> (ServerHandle, Recorder<ServerEvent>) {
    let (server, events) = kitestring::bind(
        rt.clone(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        options,
    )
    .unwrap();
    let events = record_server(rt, events);
    (server, events)
}

async fn peer(rt: &Arc<dyn Runtime>, server: &ServerHandle) -> Peer {
    peer_with(rt, server, vec![Codec::MsgPack, Codec::Json]).await
}

async fn peer_with(rt: &Arc<dyn Runtime>, server: &ServerHandle, codecs: Vec<Codec>) -> Peer {
    peer_from(rt, server, fast_client(codecs)).await
}

/// A peer whose client does not take room streams: each room message is
/// sequenced and acknowledged in its own session.
async fn legacy_peer(rt: &Arc<dyn Runtime>, server: &ServerHandle) -> Peer {
    let mut options = fast_client(vec![Codec::MsgPack, Codec::Json]);
    options.config.room_streams = false;
    peer_from(rt, server, options).await
}

async fn peer_from(
    rt: &Arc<dyn Runtime>,
    server: &ServerHandle,
    options: kitestring::ClientOptions,
) -> Peer {
    let proxy = Proxy::start(server.local_addr().unwrap()).unwrap();
    let url = format!("ws://{}/", proxy.local_addr());
    let (handle, events) = kitestring::connect(rt.clone(), &url, options).unwrap();
    let events = record_client(rt, events);
    let session = events
        .until(rt, 3000, "client Connected", |evs| {
            evs.iter().find_map(|e| match e {
                Event::Connected { session, .. } => Some(*session),
                _ => None,
            })
        })
        .await;
    Peer {
        handle,
        events,
        proxy,
        session,
    }
}

/// The notes a client received as room messages of `room`, in order.
fn room_notes(events: &[Event], room: &str) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.room.as_deref() == Some(room) => {
                Some(m.decode::<Note>().unwrap().n)
            }
            _ => None,
        })
        .collect()
}

/// Presence updates a client received for `room`, in order.
fn presences(events: &[Event], room: &str) -> Vec<Presence> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Presence { room: r, presence } if &**r == room => Some(presence.clone()),
            _ => None,
        })
        .collect()
}

fn resumes(events: &[Event]) -> Vec<(SessionId, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Connected {
                session, resumed, ..
            } => Some((*session, *resumed)),
            _ => None,
        })
        .collect()
}

/// Waits until `p` has opened `n` connections (the first and its resumes).
async fn reopened(rt: &Arc<dyn Runtime>, p: &Peer, n: usize) {
    p.events
        .until(rt, 3000, "resumed", |evs| {
            (resumes(evs).len() >= n).then_some(())
        })
        .await;
}

async fn room_size_is(rt: &Arc<dyn Runtime>, server: &ServerHandle, room: &str, n: usize) {
    within(rt, 3000, "room size", async {
        while server.room_size(room).await.unwrap() != n {
            kitestring::util::sleep(&**rt, Duration::from_millis(5)).await;
        }
    })
    .await;
}

async fn finish(rt: &Arc<dyn Runtime>, server: ServerHandle, peers: Vec<Peer>) {
    for p in peers {
        let _ = within(rt, 3000, "client close", p.handle.close()).await;
    }
    within(rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Broadcasts to a room while members' links are cut: every member gets
/// every broadcast exactly once, in order, and resumes its session.
pub async fn broadcast_through_cuts(rt: Arc<dyn Runtime>) {
    let (server, _sev) = serve(&rt, fast_server());
    let mut peers = Vec::new();
    for _ in 0..3 {
        let p = peer(&rt, &server).await;
        within(&rt, 2000, "join", p.handle.join("lobby"))
            .await
            .unwrap();
        peers.push(p);
    }
    room_size_is(&rt, &server, "lobby", 3).await;
    let members = server.members("lobby").await.unwrap();
    assert_eq!(members.len(), 3);
    let mut sessions = server.member_sessions("lobby").await.unwrap();
    sessions.sort();
    let mut want_sessions: Vec<SessionId> = peers.iter().map(|p| p.session).collect();
    want_sessions.sort();
    assert_eq!(sessions, want_sessions);
    assert_eq!(
        server.rooms_of(peers[0].session).await.unwrap(),
        vec![Arc::<str>::from("lobby")]
    );

    const N: u32 = 300;
    for n in 0..N {
        let queued = within(&rt, 2000, "broadcast", server.broadcast("lobby", &note(n)))
            .await
            .unwrap();
        assert_eq!(queued, 3, "broadcast {n} reaches every member");
        // Each cut waits for the previous one's resume, so every cut hits
        // a live connection and broadcasts are queued while links are down.
        match n {
            60 => peers[0].proxy.cut_all(),
            120 => {
                reopened(&rt, &peers[0], 2).await;
                peers[1].proxy.cut_all();
            }
            180 => {
                reopened(&rt, &peers[1], 2).await;
                peers[0].proxy.cut_all();
                peers[2].proxy.cut_all();
            }
            _ => {}
        }
        if n % 20 == 0 {
            kitestring::util::sleep(&*rt, Duration::from_millis(2)).await;
        }
    }
    let want: Vec<u32> = (0..N).collect();
    for (i, p) in peers.iter().enumerate() {
        let got = p
            .events
            .until(&rt, 6000, "every broadcast", |evs| {
                let got = room_notes(evs, "lobby");
                (got.len() >= N as usize).then_some(got)
            })
            .await;
        assert_eq!(got, want, "member {i}: every broadcast once, in order");
        let opens = resumes(&p.events.snapshot());
        assert!(
            opens.len() >= 2,
            "member {i} reconnected at least once: {opens:?}"
        );
        assert!(
            opens.iter().skip(1).all(|(s, r)| *r && *s == p.session),
            "member {i} resumed its session every time: {opens:?}"
        );
    }
    // Nothing extra trickles in.
    kitestring::util::sleep(&*rt, Duration::from_millis(150)).await;
    for p in &peers {
        assert_eq!(room_notes(&p.events.snapshot(), "lobby").len(), N as usize);
    }
    let metrics = server.metrics().await.unwrap();
    assert_eq!(metrics.rooms, 1);
    assert_eq!(metrics.memberships, 3);
    assert_eq!(metrics.counters.broadcasts, u64::from(N));
    assert!(metrics.counters.sessions_resumed >= 4);
    finish(&rt, server, peers).await;
}

/// A member whose client does not take room streams, and whose link is
/// black-holed, stops acknowledging; once its own buffers are full it is
/// closed with 4009, and the other members receive every broadcast
/// meanwhile. It later comes back (a new session if its old one ended) and
/// is in the room again.
pub async fn slow_member_evicted(rt: Arc<dyn Runtime>) {
    let mut options = fast_server();
    // Room for ~200 unacknowledged broadcasts per member, then eviction.
    options.config.reliability.window_messages = 128;
    options.config.queue.max_messages = 64;
    let (server, sev) = serve(&rt, options);
    let mut peers = Vec::new();
    for _ in 0..3 {
        let p = legacy_peer(&rt, &server).await;
        p.handle.join("feed").await.unwrap();
        peers.push(p);
    }
    room_size_is(&rt, &server, "feed", 3).await;
    let slow = peers[2].session;
    let mark = sev.mark();
    peers[2].proxy.black_hole_all();

    const N: u32 = 600;
    let body = "x".repeat(512);
    let start = Instant::now();
    for n in 0..N {
        let value = (n, body.as_str());
        within(&rt, 2000, "broadcast", server.broadcast("feed", &value))
            .await
            .unwrap();
        if n % 4 == 0 {
            kitestring::util::sleep(&*rt, Duration::from_millis(1)).await;
        }
    }
    let closed = sev
        .until(&rt, 4000, "slow member closed", |evs| {
            evs[mark..].iter().find_map(|e| match e {
                ServerEvent::SessionDetached { session, code } if *session == slow => {
                    Some(format!("detached {code}"))
                }
                ServerEvent::SessionEnded {
                    session,
                    reason: SessionEnd::SlowConsumer,
                    ..
                } if *session == slow => Some("ended as slow consumer".to_owned()),
                _ => None,
            })
        })
        .await;
    eprintln!("slow member: {closed} after {:?}", start.elapsed());
    let metrics = server.metrics().await.unwrap();
    assert_eq!(
        metrics
            .counters
            .close_codes
            .get(&CloseCode::SLOW_CONSUMER.0),
        Some(&1),
        "one connection closed with 4009: {:?}",
        metrics.counters.close_codes
    );
    // No other member was touched.
    for e in sev.since(mark) {
        match e {
            ServerEvent::SessionDetached { session, .. }
            | ServerEvent::SessionEnded { session, .. } => {
                assert_eq!(session, slow, "only the slow member is closed")
            }
            _ => {}
        }
    }
    let want: Vec<u32> = (0..N).collect();
    for p in &peers[..2] {
        let got = p
            .events
            .until(&rt, 4000, "fast members get everything", |evs| {
                let got: Vec<u32> = evs
                    .iter()
                    .filter_map(|e| match e {
                        Event::Message(m) if m.room.as_deref() == Some("feed") => {
                            Some(m.decode::<(u32, String)>().unwrap().0)
                        }
                        _ => None,
                    })
                    .collect();
                (got.len() >= N as usize).then_some(got)
            })
            .await;
        assert_eq!(got, want);
        assert_eq!(resumes(&p.events.snapshot()).len(), 1, "never reconnected");
    }
    // The slow member notices (heartbeat), comes back and is in the room.
    peers[2]
        .events
        .until(&rt, 5000, "slow member back", |evs| {
            (resumes(evs).len() >= 2).then_some(())
        })
        .await;
    room_size_is(&rt, &server, "feed", 3).await;
    finish(&rt, server, peers).await;
}

/// A room-stream member whose link is black-holed costs the server nothing
/// per broadcast: the room's feed holds what it has not written, bounded by
/// the room's history. Its client notices the dead link, resumes its
/// session on a new connection, and gets every broadcast the history still
/// holds, once each and in order, and one `Missed` naming exactly the
/// offsets the history no longer held; the other members get everything.
pub async fn stream_member_falls_behind(rt: Arc<dyn Runtime>) {
    const HISTORY: usize = 100;
    const N: u32 = 600;
    let mut options = fast_server();
    options.config.history.max_entries = HISTORY;
    let (server, _sev) = serve(&rt, options);
    let mut peers = Vec::new();
    for _ in 0..3 {
        let p = peer(&rt, &server).await;
        p.handle.join("feed").await.unwrap();
        peers.push(p);
    }
    room_size_is(&rt, &server, "feed", 3).await;
    let slow = peers[2].session;
    peers[2].proxy.black_hole_all();
    let body = "x".repeat(512);
    for n in 0..N {
        let value = (n, body.as_str());
        within(&rt, 2000, "broadcast", server.broadcast("feed", &value))
            .await
            .unwrap();
        if n % 4 == 0 {
            kitestring::util::sleep(&*rt, Duration::from_millis(1)).await;
        }
    }
    let notes = |evs: &[Event]| -> Vec<u32> {
        evs.iter()
            .filter_map(|e| match e {
                Event::Message(m) if m.room.as_deref() == Some("feed") => {
                    Some(m.decode::<(u32, String)>().unwrap().0)
                }
                _ => None,
            })
            .collect()
    };
    let want: Vec<u32> = (0..N).collect();
    for p in &peers[..2] {
        let got = p
            .events
            .until(&rt, 4000, "fast members get everything", |evs| {
                let got = notes(evs);
                (got.len() >= N as usize).then_some(got)
            })
            .await;
        assert_eq!(got, want);
        assert_eq!(resumes(&p.events.snapshot()).len(), 1, "never reconnected");
    }
    // The slow member resumes its session and ends with the last broadcast.
    let evs = peers[2]
        .events
        .until(&rt, 6000, "the slow member catches up", |evs| {
            (notes(evs).last() == Some(&(N - 1))).then(|| evs.to_vec())
        })
        .await;
    let opens = resumes(&evs);
    assert!(
        opens.len() >= 2 && opens.iter().skip(1).all(|(s, r)| *r && *s == slow),
        "the slow member resumed its session: {opens:?}"
    );
    let got = notes(&evs);
    let gaps = gaps_named_missed(&evs, &got, "feed");
    assert_eq!(gaps, 1, "one gap");
    assert!(
        got.len() >= HISTORY - 5,
        "the history's broadcasts were recovered: {} of them",
        got.len()
    );
    finish(&rt, server, peers).await;
}

/// Checks that `got`, a member's broadcasts (numbered from 0), came once
/// each and in order, and that each run of broadcasts it lacks is named,
/// in order, by one `Missed` event of `room` covering as many offsets (and
/// at most the three joins' presence entries more).
/// Returns the number of gaps.
fn gaps_named_missed(evs: &[Event], got: &[u32], room: &str) -> usize {
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
    let missed: Vec<(u64, Option<u64>)> = evs
        .iter()
        .filter_map(|e| match e {
            Event::Missed { room: r, from, to } if &**r == room => Some((*from, *to)),
            _ => None,
        })
        .collect();
    let gaps: Vec<(u32, u32)> = std::iter::once(-1)
        .chain(got.iter().map(|&n| i64::from(n)))
        .collect::<Vec<i64>>()
        .windows(2)
        .filter(|w| w[1] > w[0] + 1)
        .map(|w| ((w[0] + 1) as u32, (w[1] - 1) as u32))
        .collect();
    assert_eq!(
        gaps.len(),
        missed.len(),
        "every gap named: gaps {gaps:?}, Missed {missed:?}"
    );
    for (gap, (from, to)) in gaps.iter().zip(&missed) {
        let to = to.expect("the count of missed entries is known");
        // The offsets missed are the gap's broadcasts, and perhaps the
        // presence entries of the members' joins just before them (a
        // member black-holed before its own join's `skip` reached it).
        let (offsets, broadcasts) = (to - from + 1, u64::from(gap.1 - gap.0) + 1);
        assert!(
            (broadcasts..=broadcasts + 3).contains(&offsets),
            "Missed {from}..={to} names the broadcasts {gap:?}"
        );
    }
    gaps.len()
}

/// A member's frames keep the order the server made them in, whichever
/// way they reach it: broadcasts to its rooms (written from the rooms'
/// shared feeds) and messages to it alone (from its own queue) arrive
/// interleaved exactly as sent. A member that leaves one of its rooms gets
/// that room's broadcasts up to its leave and none after, with nothing
/// skipped; a member speaking the other codec gets the same broadcasts.
pub async fn feeds_keep_order(rt: Arc<dyn Runtime>) {
    let (server, _sev) = serve(&rt, fast_server());
    let a = peer_with(&rt, &server, vec![Codec::MsgPack, Codec::Json]).await;
    let b = peer_with(&rt, &server, vec![Codec::Json]).await;
    for (p, room) in [(&a, "lobby"), (&a, "side"), (&b, "lobby")] {
        within(&rt, 2000, "join", p.handle.join(room))
            .await
            .unwrap();
    }
    room_size_is(&rt, &server, "lobby", 2).await;
    room_size_is(&rt, &server, "side", 1).await;

    const N: u32 = 200;
    let mut sent = Vec::new();
    for n in 0..N {
        within(&rt, 2000, "broadcast", server.broadcast("lobby", &note(n)))
            .await
            .unwrap();
        within(
            &rt,
            2000,
            "send",
            server.send_when_ready(a.session, &note(1000 + n)),
        )
        .await
        .unwrap();
        within(
            &rt,
            2000,
            "broadcast",
            server.broadcast("side", &note(2000 + n)),
        )
        .await
        .unwrap();
        sent.extend([n, 1000 + n, 2000 + n]);
        if n == N / 2 {
            // The leave's acknowledgment comes after every broadcast to
            // `side` before it; none after it reaches the member.
            within(&rt, 2000, "leave", a.handle.leave("side"))
                .await
                .unwrap();
        }
        if n % 25 == 0 {
            kitestring::util::sleep(&*rt, Duration::from_millis(1)).await;
        }
    }
    let notes = |evs: &[Event]| -> Vec<u32> {
        evs.iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.decode::<Note>().unwrap().n),
                _ => None,
            })
            .collect()
    };
    let got = a
        .events
        .until(&rt, 6000, "every message to a", |evs| {
            let got = notes(evs);
            got.iter()
                .filter(|&&n| n < 2000)
                .count()
                .ge(&(2 * N as usize))
                .then_some(got)
        })
        .await;
    // What `a` got of `side`: every broadcast up to some point at or after
    // its leave was sent, none after. (`leave` returns once the leave is
    // queued, and the broadcasts after it do not wait: on a loaded machine
    // the server may take the leave after the last of them.)
    let side: Vec<u32> = got.iter().copied().filter(|&n| n >= 2000).collect();
    let k = side.len() as u32;
    assert!(
        k > N / 2 && k <= N,
        "side broadcasts up to the leave: {k} of {N}"
    );
    assert_eq!(side, (2000..2000 + k).collect::<Vec<_>>());
    let want: Vec<u32> = sent.iter().copied().filter(|&n| n < 2000 + k).collect();
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "a's messages out of the order they were sent, from #{i}: got {:?}, want {:?}",
            &got[i.saturating_sub(3)..got.len().min(i + 6)],
            &want[i.saturating_sub(3)..want.len().min(i + 6)]
        );
    }
    let got_b = b
        .events
        .until(&rt, 6000, "every broadcast to b", |evs| {
            let got = room_notes(evs, "lobby");
            (got.len() >= N as usize).then_some(got)
        })
        .await;
    assert_eq!(got_b, (0..N).collect::<Vec<_>>());
    for p in [&a, &b] {
        assert_eq!(resumes(&p.events.snapshot()).len(), 1, "never reconnected");
    }
    finish(&rt, server, vec![a, b]).await;
}

/// A server whose policy lets clients join only rooms named `public...`
/// and publish anywhere but in rooms named `...-ro`.
fn public_rooms_only() -> ServerOptions {
    let mut options = fast_server();
    options.policy = Some(Arc::new(PolicyFn {
        join: |_: &Member, room: &str| {
            if room.starts_with("public") {
                Ok(())
            } else {
                Err("members only".to_owned())
            }
        },
        publish: |_: &Member, room: &str| {
            if room.ends_with("-ro") {
                Err("read only".to_owned())
            } else {
                Ok(())
            }
        },
    }));
    options
}

/// A policy refuses a join (the client gets `Refused`, the server a
/// `Refused` event) and a publish; publishing to a room one is not in is
/// refused too; the application's own `join` bypasses the policy.
pub async fn unauthorized_join_refused(rt: Arc<dyn Runtime>) {
    let (server, sev) = serve(&rt, public_rooms_only());
    let a = peer(&rt, &server).await;
    let b = peer(&rt, &server).await;

    a.handle.join("secret").await.unwrap();
    let refusal = a
        .events
        .until(&rt, 3000, "join refused", |evs| {
            evs.iter().find_map(|e| match e {
                Event::Refused {
                    room: Some(room),
                    refusal,
                    ..
                } if &**room == "secret" => Some(refusal.clone()),
                _ => None,
            })
        })
        .await;
    assert_eq!(refusal.op, "join");
    assert!(refusal.reason.contains("members only"), "{refusal:?}");
    sev.until(&rt, 3000, "server Refused", |evs| {
        evs.iter().find_map(|e| match e {
            ServerEvent::Refused {
                session, room, op, ..
            } if *session == a.session && &**room == "secret" => Some(*op),
            _ => None,
        })
    })
    .await
    .eq(&kitestring::RoomOp::Join)
    .then_some(())
    .expect("the server reports a refused join");
    assert_eq!(server.room_size("secret").await.unwrap(), 0);

    // Publishing to a room it is not in.
    a.handle.publish("public-chat", &note(1)).await.unwrap();
    let refusal = a
        .events
        .until(&rt, 3000, "publish refused", |evs| {
            evs.iter().find_map(|e| match e {
                Event::Refused {
                    room: Some(room),
                    refusal,
                    ..
                } if &**room == "public-chat" => Some(refusal.clone()),
                _ => None,
            })
        })
        .await;
    assert_eq!(refusal.op, "publish");

    // Publishing where the policy says read-only; b is there to not hear it.
    for p in [&a, &b] {
        p.handle.join("public-ro").await.unwrap();
        p.handle.join("public-chat").await.unwrap();
    }
    room_size_is(&rt, &server, "public-ro", 2).await;
    room_size_is(&rt, &server, "public-chat", 2).await;
    a.handle.publish("public-ro", &note(2)).await.unwrap();
    let refusal = a
        .events
        .until(&rt, 3000, "read-only publish refused", |evs| {
            evs.iter().find_map(|e| match e {
                Event::Refused {
                    room: Some(room),
                    refusal,
                    ..
                } if &**room == "public-ro" => Some(refusal.clone()),
                _ => None,
            })
        })
        .await;
    assert_eq!(
        (refusal.op.as_str(), refusal.reason.as_str()),
        ("publish", "read only")
    );
    // An allowed publish reaches b (and not a: no echo), after the refused one.
    a.handle.publish("public-chat", &note(3)).await.unwrap();
    let got = b
        .events
        .until(&rt, 3000, "allowed publish", |evs| {
            let got = room_notes(evs, "public-chat");
            (!got.is_empty()).then_some(got)
        })
        .await;
    assert_eq!(got, vec![3]);
    assert!(room_notes(&b.events.snapshot(), "public-ro").is_empty());
    let published = sev
        .until(&rt, 3000, "server sees the publish", |evs| {
            evs.iter().find_map(|e| match e {
                ServerEvent::Message { session, message }
                    if *session == a.session && message.room.as_deref() == Some("public-chat") =>
                {
                    Some(message.decode::<Note>().unwrap().n)
                }
                _ => None,
            })
        })
        .await;
    assert_eq!(published, 3);
    assert!(room_notes(&a.events.snapshot(), "public-chat").is_empty());

    // The application may put anyone anywhere.
    server.join(a.session, "secret").await.unwrap();
    let snapshot = a
        .events
        .until(&rt, 3000, "snapshot of secret", |evs| {
            presences(evs, "secret").into_iter().next()
        })
        .await;
    assert!(snapshot.snapshot);
    assert_eq!(snapshot.joined.len(), 1);
    assert_eq!(snapshot.joined[0].client, a.handle.client_id().to_hex());
    let unknown = server.join(SessionId([9; 16]), "secret").await;
    assert!(matches!(
        &unknown,
        Err(kitestring::ServerError::Room {
            error: kitestring::RoomError::UnknownSession,
            ..
        })
    ));
    // The message names what it is about.
    let message = unknown.unwrap_err().to_string();
    assert!(
        message.contains(&SessionId([9; 16]).to_hex()) && message.contains("\"secret\""),
        "{message}"
    );
    finish(&rt, server, vec![a, b]).await;
}

/// Rooms a client asks for with its options ride in its first `hello`:
/// the session opens a member of those the policy allows, the one it
/// refuses is reported on both sides by room (the client's with the id of
/// its join), and no `join` message went out.
pub async fn joins_ride_in_the_hello(rt: Arc<dyn Runtime>) {
    let (server, sev) = serve(&rt, public_rooms_only());
    let mut client = fast_client(vec![Codec::MsgPack, Codec::Json]);
    client.rooms = vec!["public-a".into(), "secret".into(), "public-b".into()];
    let a = peer_from(&rt, &server, client).await;
    let refused = a
        .events
        .until(&rt, 3000, "the hello's join refused", |evs| {
            evs.iter().find_map(|e| match e {
                Event::Refused {
                    id,
                    room: Some(room),
                    refusal,
                } if &**room == "secret" => Some((*id, refusal.clone())),
                _ => None,
            })
        })
        .await;
    assert!(
        refused.0.is_some(),
        "the refusal names the join: {refused:?}"
    );
    assert_eq!(refused.1.op, "join");
    assert_eq!(refused.1.code.as_deref(), Some("forbidden"));
    let joined = sev
        .until(&rt, 3000, "server Joined", |evs| {
            let rooms: Vec<String> = evs
                .iter()
                .filter_map(|e| match e {
                    ServerEvent::Joined { session, room } if *session == a.session => {
                        Some(room.to_string())
                    }
                    _ => None,
                })
                .collect();
            (rooms.len() == 2).then_some(rooms)
        })
        .await;
    assert_eq!(joined, ["public-a", "public-b"]);
    room_size_is(&rt, &server, "public-a", 1).await;
    room_size_is(&rt, &server, "public-b", 1).await;
    assert_eq!(server.room_size("secret").await.unwrap(), 0);
    let snapshot = a.handle.stats().await.unwrap();
    assert_eq!(
        snapshot.stats.delivery.messages_sent, 0,
        "the joins rode in the hello"
    );
    let mut rooms = snapshot.rooms.clone();
    rooms.sort();
    assert_eq!(rooms, ["public-a", "public-b"]);

    // The rooms work as any joined room's.
    let b = peer(&rt, &server).await;
    b.handle.join("public-a").await.unwrap();
    room_size_is(&rt, &server, "public-a", 2).await;
    b.handle.publish("public-a", &note(7)).await.unwrap();
    a.events
        .until(&rt, 3000, "a publish in a hello's room", |evs| {
            (room_notes(evs, "public-a") == [7]).then_some(())
        })
        .await;
}

/// A member offline while another leaves and rejoins and a third leaves
/// gets exactly those diffs, in order, when it resumes.
pub async fn presence_after_resume(rt: Arc<dyn Runtime>) {
    let (server, sev) = serve(&rt, fast_server());
    let a = peer(&rt, &server).await;
    let b = peer(&rt, &server).await;
    let c = peer(&rt, &server).await;
    for p in [&a, &b, &c] {
        p.handle.join("room").await.unwrap();
    }
    room_size_is(&rt, &server, "room", 3).await;
    let member = |p: &Peer| p.handle.client_id().to_hex();
    // a sees the others arrive (a snapshot, then diffs) and knows all three.
    a.events
        .until(&rt, 3000, "a knows everyone", |evs| {
            let mut known = std::collections::BTreeSet::new();
            for p in presences(evs, "room") {
                if p.snapshot {
                    known.clear();
                }
                known.extend(p.joined.iter().map(|m| m.client.clone()));
                for m in &p.left {
                    known.remove(&m.client);
                }
            }
            (known.len() == 3).then_some(())
        })
        .await;
    let before = presences(&a.events.snapshot(), "room").len();

    // a goes offline and cannot come back for now.
    a.proxy.set_refuse(true);
    a.proxy.cut_all();
    sev.until(&rt, 3000, "a detached", |evs| {
        evs.iter().find_map(|e| match e {
            ServerEvent::SessionDetached { session, .. } if *session == a.session => Some(()),
            _ => None,
        })
    })
    .await;
    b.handle.leave("room").await.unwrap();
    room_size_is(&rt, &server, "room", 2).await;
    b.handle.join("room").await.unwrap();
    room_size_is(&rt, &server, "room", 3).await;
    c.handle.leave("room").await.unwrap();
    room_size_is(&rt, &server, "room", 2).await;
    a.proxy.set_refuse(false);

    let missed = a
        .events
        .until(&rt, 4000, "a gets the diffs", |evs| {
            let p = presences(evs, "room");
            (p.len() >= before + 3).then(|| p[before..].to_vec())
        })
        .await;
    let diff = |joined: Vec<String>, left: Vec<String>| Presence {
        snapshot: false,
        joined: joined
            .into_iter()
            .map(|client| Member {
                client,
                identity: None,
            })
            .collect(),
        left: left
            .into_iter()
            .map(|client| Member {
                client,
                identity: None,
            })
            .collect(),
    };
    assert_eq!(
        missed,
        vec![
            diff(vec![], vec![member(&b)]),
            diff(vec![member(&b)], vec![]),
            diff(vec![], vec![member(&c)]),
        ],
        "the missed diffs, in order, nothing else"
    );
    let opens = resumes(&a.events.snapshot());
    assert_eq!(
        opens.last(),
        Some(&(a.session, true)),
        "a resumed its session"
    );
    kitestring::util::sleep(&*rt, Duration::from_millis(150)).await;
    assert_eq!(presences(&a.events.snapshot(), "room").len(), before + 3);
    finish(&rt, server, vec![a, b, c]).await;
}

/// Connections older than ~300 ms are rotated while messages flow both
/// ways (directly and through a room): nothing is lost or duplicated and
/// the session never changes.
pub async fn rotation_without_loss(rt: Arc<dyn Runtime>) {
    let mut options = fast_server();
    options.config.max_connection_age = Some(Duration::from_millis(300));
    let (server, sev) = serve(&rt, options);
    let a = peer(&rt, &server).await;
    let b = peer(&rt, &server).await;
    a.handle.join("r").await.unwrap();
    b.handle.join("r").await.unwrap();
    room_size_is(&rt, &server, "r", 2).await;

    const N: u32 = 300;
    let start = Instant::now();
    for n in 0..N {
        let mut full = 0;
        loop {
            match within(&rt, 2000, "client send", a.handle.send(&note(n))).await {
                Ok(_) => break,
                Err(ClientError::Send(kitestring::SendError::QueueFull { .. })) if full < 200 => {
                    full += 1;
                    kitestring::util::sleep(&*rt, Duration::from_millis(5)).await;
                }
                Err(e) => panic!("send {n}: {e}"),
            }
        }
        server.send(a.session, &note(n)).await.unwrap();
        if n % 2 == 0 {
            // Through the room, from b, so publishes cross rotations too.
            b.handle.publish("r", &note(n)).await.unwrap();
        }
        kitestring::util::sleep(&*rt, Duration::from_millis(3)).await;
    }
    let elapsed = start.elapsed();
    let to_server = sev
        .until(&rt, 5000, "server gets everything", |evs| {
            let got: Vec<u32> = evs
                .iter()
                .filter_map(|e| match e {
                    ServerEvent::Message { session, message }
                        if *session == a.session && message.room.is_none() =>
                    {
                        Some(message.decode::<Note>().unwrap().n)
                    }
                    _ => None,
                })
                .collect();
            (got.len() >= N as usize).then_some(got)
        })
        .await;
    assert_eq!(to_server, (0..N).collect::<Vec<_>>());
    let (direct, room) = a
        .events
        .until(&rt, 5000, "client gets everything", |evs| {
            let direct: Vec<u32> = evs
                .iter()
                .filter_map(|e| match e {
                    Event::Message(m) if m.room.is_none() => Some(m.decode::<Note>().unwrap().n),
                    _ => None,
                })
                .collect();
            let room = room_notes(evs, "r");
            (direct.len() >= N as usize && room.len() >= (N / 2) as usize).then_some((direct, room))
        })
        .await;
    assert_eq!(direct, (0..N).collect::<Vec<_>>());
    assert_eq!(room, (0..N).step_by(2).collect::<Vec<_>>());
    kitestring::util::sleep(&*rt, Duration::from_millis(100)).await;
    let metrics = server.metrics().await.unwrap();
    // A connection lives 300 ms, then its client reconnects: at least one
    // rotation a second for each client, however slow the reconnects of a
    // loaded machine.
    let floor = (elapsed.as_millis() / 1000) as u64;
    assert!(
        metrics.counters.rotations >= 2 * floor.max(1),
        "{} rotations in {elapsed:?} for two clients",
        metrics.counters.rotations
    );
    assert_eq!(metrics.sessions, 2, "no session created or lost");
    assert_eq!(metrics.counters.sessions_created, 2);
    for p in [&a, &b] {
        let opens = resumes(&p.events.snapshot());
        assert!(opens.len() >= 3, "rotated: {opens:?}");
        assert!(
            opens.iter().all(|(s, _)| *s == p.session) && opens.iter().skip(1).all(|(_, r)| *r),
            "same session throughout: {opens:?}"
        );
        assert!(
            !p.events
                .snapshot()
                .iter()
                .any(|e| matches!(e, Event::SessionLost { .. })),
            "no session lost"
        );
    }
    finish(&rt, server, vec![a, b]).await;
}

/// A shutdown closes every member with 1001 (after a goaway) and tells no
/// one that anyone left: sessions are detached, not ended.
pub async fn shutdown_keeps_rooms(rt: Arc<dyn Runtime>) {
    let (server, sev) = serve(&rt, fast_server());
    let a = peer(&rt, &server).await;
    let b = peer(&rt, &server).await;
    a.handle.join("room").await.unwrap();
    b.handle.join("room").await.unwrap();
    room_size_is(&rt, &server, "room", 2).await;
    server.broadcast("room", &note(1)).await.unwrap();
    for p in [&a, &b] {
        p.events
            .until(&rt, 3000, "broadcast before shutdown", |evs| {
                (room_notes(evs, "room") == vec![1]).then_some(())
            })
            .await;
    }
    let marks: Vec<usize> = [&a, &b].iter().map(|p| p.events.mark()).collect();
    let smark = sev.mark();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
    for p in [&a, &b] {
        let cause = p
            .events
            .until(&rt, 3000, "reconnecting after goaway", |evs| {
                evs.iter().find_map(|e| match e {
                    Event::StateChanged {
                        new: State::Reconnecting { cause, .. },
                        ..
                    } => Some(cause.clone()),
                    _ => None,
                })
            })
            .await;
        let code = match cause {
            Cause::GoAway { code } | Cause::PeerClosed { code, .. } => code,
            other => panic!("unexpected cause {other:?}"),
        };
        assert_eq!(code, CloseCode::GOING_AWAY);
    }
    // Let the server task finish and the clients try to come back.
    kitestring::util::sleep(&*rt, Duration::from_millis(300)).await;
    for (p, mark) in [&a, &b].into_iter().zip(marks) {
        for e in p.events.since(mark) {
            assert!(
                !matches!(
                    e,
                    Event::Presence { .. }
                        | Event::Refused { .. }
                        | Event::Message(_)
                        | Event::SessionLost { .. }
                ),
                "nothing bogus after shutdown: {e:?}"
            );
        }
    }
    let server_events = sev.since(smark);
    let detached: Vec<(SessionId, CloseCode)> = server_events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::SessionDetached { session, code } => Some((*session, *code)),
            _ => None,
        })
        .collect();
    assert_eq!(detached.len(), 2, "{server_events:?}");
    assert!(detached.iter().all(|(_, c)| *c == CloseCode::GOING_AWAY));
    assert!(
        !server_events.iter().any(|e| matches!(
            e,
            ServerEvent::Left { .. } | ServerEvent::SessionEnded { .. }
        )),
        "no one left, no session ended: {server_events:?}"
    );
    assert!(server.room_size("room").await.is_err(), "server stopped");
    for p in [a, b] {
        let _ = within(&rt, 3000, "client close", p.handle.close()).await;
    }
}

/// A request whose link is cut after the server received it gets its
/// response after the resume; a request nobody answers times out, and its
/// late answer is reported as `LateResponse`.
pub async fn request_across_cut(rt: Arc<dyn Runtime>) {
    let (server, sev) = serve(&rt, fast_server());
    let a = peer(&rt, &server).await;

    let pending = a
        .handle
        .start_request(
            kitestring::encode(&note(7), Codec::Json).unwrap(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let request_id = pending.id();
    let got = sev
        .until(&rt, 3000, "server gets the request", |evs| {
            evs.iter().find_map(|e| match e {
                ServerEvent::Message { session, message } if message.request => {
                    Some((*session, message.id, message.decode::<Note>().unwrap()))
                }
                _ => None,
            })
        })
        .await;
    assert_eq!((got.0, got.2.n), (a.session, 7));
    let mark = sev.mark();
    a.proxy.cut_all();
    // Answer while the link is down or coming back.
    server
        .respond(
            got.0,
            got.1,
            &Note {
                n: 8,
                text: "answer".into(),
            },
        )
        .await
        .unwrap();
    let response = within(&rt, 4000, "response after the cut", pending)
        .await
        .unwrap();
    assert_eq!(response.response_to, Some(request_id));
    assert_eq!(response.decode::<Note>().unwrap().n, 8);
    sev.until(&rt, 3000, "resumed", |evs| {
        evs[mark..].iter().find_map(|e| match e {
            ServerEvent::SessionOpened { resumed: true, .. } => Some(()),
            _ => None,
        })
    })
    .await;
    // The response event reaches the stream too.
    a.events
        .until(&rt, 2000, "Response event", |evs| {
            evs.iter().find_map(|e| match e {
                Event::Response { request, .. } if *request == request_id => Some(()),
                _ => None,
            })
        })
        .await;

    // A request that times out, then a late answer.
    let mark = sev.mark();
    let r = within(
        &rt,
        3000,
        "request times out",
        a.handle.request(&note(9), Duration::from_millis(200)),
    )
    .await;
    let late_id = match r {
        Err(ClientError::Request {
            id,
            error: RequestError::TimedOut,
        }) => id,
        other => panic!("expected a timeout, got {other:?}"),
    };
    let (session, id) = sev
        .until(&rt, 3000, "second request", |evs| {
            evs[mark..].iter().find_map(|e| match e {
                ServerEvent::Message { session, message } if message.request => {
                    Some((*session, message.id))
                }
                _ => None,
            })
        })
        .await;
    server.respond(session, id, &note(10)).await.unwrap();
    a.events
        .until(&rt, 3000, "late response reported", |evs| {
            evs.iter().find_map(|e| match e {
                Event::LateResponse { request } if *request == late_id => Some(()),
                _ => None,
            })
        })
        .await;
    let stats = a.handle.stats().await.unwrap();
    assert_eq!(stats.pending_requests, 0);
    assert_eq!(stats.session, Some(a.session));
    assert!(stats.stats.resumes >= 1);
    finish(&rt, server, vec![a]).await;
}

/// Typed sends and responses are encoded with each session's negotiated
/// codec: a JSON-only client gets JSON from a server that prefers
/// MessagePack, a MessagePack client gets MessagePack.
pub async fn typed_sends_use_session_codec(rt: Arc<dyn Runtime>) {
    let (server, sev) = serve(&rt, fast_server());
    let json = peer_with(&rt, &server, vec![Codec::Json]).await;
    let pack = peer_with(&rt, &server, vec![Codec::MsgPack, Codec::Json]).await;
    assert_eq!(server.codec_for(json.session), Codec::Json);
    assert_eq!(server.codec_for(pack.session), Codec::MsgPack);
    for p in [&json, &pack] {
        server.send(p.session, &note(1)).await.unwrap();
    }
    for (p, want) in [
        (&json, kitestring::PayloadKind::Json),
        (&pack, kitestring::PayloadKind::MsgPack),
    ] {
        let got = p
            .events
            .until(&rt, 3000, "typed send", |evs| {
                evs.iter().find_map(|e| match e {
                    Event::Message(m) => Some((m.payload.kind(), m.decode::<Note>().unwrap().n)),
                    _ => None,
                })
            })
            .await;
        assert_eq!(got, (want, 1));
    }
    // Responses too.
    let pending = json
        .handle
        .start_request(
            kitestring::encode(&note(2), Codec::Json).unwrap(),
            Duration::from_secs(3),
        )
        .await
        .unwrap();
    let (session, id) = sev
        .until(&rt, 3000, "request", |evs| {
            evs.iter().find_map(|e| match e {
                ServerEvent::Message { session, message } if message.request => {
                    Some((*session, message.id))
                }
                _ => None,
            })
        })
        .await;
    server.respond(session, id, &note(3)).await.unwrap();
    let response = within(&rt, 3000, "response", pending).await.unwrap();
    assert_eq!(response.payload.kind(), kitestring::PayloadKind::Json);
    finish(&rt, server, vec![json, pack]).await;
}

/// `send_latest` coalesces a burst per key: fewer messages than values,
/// in order, the last value always delivered; `stats` counts what went out.
pub async fn send_latest_coalesces(rt: Arc<dyn Runtime>) {
    let (server, sev) = serve(&rt, fast_server());
    let a = peer(&rt, &server).await;
    for n in 0..200u32 {
        a.handle.send_latest("cursor", &n).await.unwrap();
        if n % 50 == 0 {
            kitestring::util::sleep(&*rt, Duration::from_millis(20)).await;
        }
    }
    let got = sev
        .until(&rt, 3000, "last value", |evs| {
            let got: Vec<u32> = evs
                .iter()
                .filter_map(|e| match e {
                    ServerEvent::Message { message, .. } => Some(message.decode::<u32>().unwrap()),
                    _ => None,
                })
                .collect();
            (got.last() == Some(&199)).then_some(got)
        })
        .await;
    assert!(
        got.len() < 50,
        "coalesced: {} messages for 200 values",
        got.len()
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    let stats = a.handle.stats().await.unwrap();
    assert_eq!(stats.stats.delivery.messages_sent, got.len() as u64);
    assert_eq!(stats.session, Some(a.session));
    assert_eq!(stats.state, State::Open);
    finish(&rt, server, vec![a]).await;
}
