//! The lag bound over real sockets (`ServerConfig::max_lag`, PROTOCOL.md
//! section 7): a member whose application takes events slowly, while its
//! client keeps reading a little and sending its pings, falls behind in
//! time without filling anything the server counts; its session ends as a
//! slow consumer (4009) soon after it is `max_lag` behind. A fast member of
//! the same room is untouched and gets every broadcast exactly once, in
//! order.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kitestring::{ClientOptions, Event, Payload, ServerEvent, ServerOptions, SessionEnd};

/// Broadcasts, one a millisecond.
const TOTAL: u64 = 3_000;

fn number(p: &Payload) -> u64 {
    std::str::from_utf8(p.data()).unwrap().parse().unwrap()
}

/// The client's session, once it has one.
async fn session_of(client: &kitestring::ClientHandle) -> kitestring::SessionId {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(s) = client.stats().await.unwrap().session {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a session")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_ended_within_the_lag_bound_and_a_fast_one_is_untouched() {
    let max_lag = Duration::from_secs(1);
    let mut options = ServerOptions::default();
    options.config.max_lag = Some(max_lag);
    // Clients ping every 200 ms: a member that sends nothing else is
    // heard from often enough to be judged at the bound.
    options.config.ping_interval = Duration::from_millis(200);
    options.config.rate_limit = None;
    let (server, mut events) = kitestring::bind(
        kitestring_tokio::runtime(),
        "127.0.0.1:0".parse().unwrap(),
        options,
    )
    .unwrap();
    let ended = Arc::new(Mutex::new(Vec::new()));
    let seen = ended.clone();
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            if let ServerEvent::SessionEnded {
                session, reason, ..
            } = e
            {
                seen.lock().unwrap().push((session, reason, Instant::now()));
            }
        }
    });
    let url = format!("ws://{}/", server.local_addr().unwrap());

    // The slow member: its application takes an event every 100 ms, and
    // its client holds 8 before it stops reading the socket.
    let slow_options = ClientOptions {
        event_buffer: 8,
        ..ClientOptions::default()
    };
    let (slow, mut slow_events) =
        kitestring::connect(kitestring_tokio::runtime(), &url, slow_options).unwrap();
    slow.join("feed").await.unwrap();
    let slow_session = session_of(&slow).await;
    let slow_task = tokio::spawn(async move {
        while slow_events.next().await.is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // The fast member takes every broadcast at once.
    let (fast, mut fast_events) =
        kitestring::connect(kitestring_tokio::runtime(), &url, ClientOptions::default()).unwrap();
    fast.join("feed").await.unwrap();
    let fast_session = session_of(&fast).await;
    let fast_task = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut lost = 0;
        while let Some(e) = fast_events.next().await {
            match e {
                Event::Message(m) if m.room.as_deref() == Some("feed") => {
                    let n = number(&m.payload);
                    got.push(n);
                    if n == TOTAL {
                        break;
                    }
                }
                Event::SessionLost { .. } => lost += 1,
                _ => {}
            }
        }
        (got, lost)
    });

    tokio::time::timeout(Duration::from_secs(10), async {
        while server.room_size("feed").await.unwrap() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both members in the room");

    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for n in 1..=TOTAL {
        tick.tick().await;
        let p = Payload::json(format!("{n}")).unwrap();
        server.broadcast_payload("feed", p, None).await.unwrap();
    }
    let (got, lost) = tokio::time::timeout(Duration::from_secs(30), fast_task)
        .await
        .expect("the fast member got the last broadcast")
        .unwrap();
    assert_eq!(lost, 0);
    assert_eq!(got.len() as u64, TOTAL, "every broadcast once");
    assert!(got.iter().copied().eq(1..=TOTAL), "in order, without gaps");

    // The slow member was ended as a slow consumer, soon after it fell
    // `max_lag` behind (about a second into the broadcasts).
    let deadline = start + Duration::from_secs(15);
    let at = loop {
        let found = ended
            .lock()
            .unwrap()
            .iter()
            .find(|(s, _, _)| *s == slow_session)
            .cloned();
        if let Some((_, reason, at)) = found {
            assert_eq!(reason, SessionEnd::SlowConsumer);
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "the slow member was not ended within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = at.duration_since(start);
    assert!(
        after <= Duration::from_secs(6),
        "ended {after:?} into the run"
    );

    // The fast member's session is untouched.
    assert!(ended
        .lock()
        .unwrap()
        .iter()
        .all(|(s, _, _)| *s != fast_session));
    let info = server.session(fast_session).await.unwrap().unwrap();
    assert!(info.connection.is_some(), "{info:?}");
    assert!(info.lag.is_some_and(|l| l < max_lag), "{info:?}");
    let m = server.metrics().await.unwrap();
    assert!(m.counters.lag_evictions >= 1);
    assert!(m.counters.lag_probes >= 2);
    slow_task.abort();
    fast.close().await.unwrap();
}
