//! Rooms across server nodes sharing one real `redis-server`: members on
//! three nodes, publishes from clients on every node and broadcasts from
//! the applications, presence lists and join/leave events cluster-wide; a
//! node whose Redis connection drops catches up from the room's log; the
//! members of a node cut off from Redis (as good as crashed, for the
//! others) leave within the documented time, and come back when it does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kitestring::kitestring_core::config::ResumeSecret;
use kitestring::{
    AuthRequest, Authenticator, ClientEvents, ClientHandle, ClientOptions, Event, ServerConfig,
    ServerHandle, ServerOptions,
};
use kitestring_chaos::Proxy;
use kitestring_redis::testing::RedisServer;
use kitestring_redis::RedisBackplane;

const SECRET: [u8; 16] = *b"cluster-secret!!";
const NODE_TIMEOUT: Duration = Duration::from_secs(3);

async fn node(redis_url: &str, name: &str) -> (ServerHandle, SocketAddr) {
    let backplane = RedisBackplane::connect(redis_url, name).await.unwrap();
    let options = ServerOptions {
        auth: Some(Authenticator::sync(|req: &AuthRequest| {
            Ok(req.query_param("user").map(str::to_owned))
        })),
        config: ServerConfig {
            resume_secret: ResumeSecret(SECRET),
            ..ServerConfig::default()
        },
        backplane: Some(Arc::new(backplane)),
        node_timeout: NODE_TIMEOUT,
        ..ServerOptions::default()
    };
    let (server, events) = kitestring::bind(
        kitestring_tokio::runtime(),
        "127.0.0.1:0".parse().unwrap(),
        options,
    )
    .unwrap();
    // The applications here only broadcast: their events are drained.
    tokio::spawn(events.for_each(|_| async {}));
    let addr = server.local_addr().unwrap();
    (server, addr)
}

/// What one client saw of the room.
#[derive(Default, Debug)]
struct View {
    /// Messages by publisher, in arrival order.
    from: BTreeMap<u64, Vec<u64>>,
    /// Members by identity, as presence says.
    members: BTreeSet<String>,
    /// Identities announced as joining and leaving, in order.
    joined: Vec<String>,
    left: Vec<String>,
}

impl View {
    fn messages(&self) -> usize {
        self.from.values().map(Vec::len).sum()
    }
}

struct Member {
    client: ClientHandle,
    events: ClientEvents,
    view: View,
}

impl Member {
    async fn connect(addr: SocketAddr, user: &str) -> Member {
        let url = format!("ws://{addr}/?user={user}");
        let (client, events) =
            kitestring::connect(kitestring_tokio::runtime(), &url, ClientOptions::default())
                .unwrap();
        Member {
            client,
            events,
            view: View::default(),
        }
    }

    /// Reads events until `until` holds or `limit` passes.
    async fn watch(&mut self, limit: Duration, until: impl Fn(&View) -> bool) {
        let end = tokio::time::Instant::now() + limit;
        while !until(&self.view) {
            let Ok(Some(e)) = tokio::time::timeout_at(end, self.events.next()).await else {
                return;
            };
            match e {
                Event::Message(m) if m.room.as_deref() == Some("lobby") => {
                    let (from, k): (u64, u64) = kitestring::decode(&m.payload).unwrap();
                    self.view.from.entry(from).or_default().push(k);
                }
                Event::Presence { presence, .. } => {
                    let name = |m: &kitestring::Member| m.identity.clone().unwrap_or_default();
                    if presence.snapshot {
                        self.view.members = presence.joined.iter().map(name).collect();
                    } else {
                        for m in &presence.joined {
                            self.view.members.insert(name(m));
                            self.view.joined.push(name(m));
                        }
                        for m in &presence.left {
                            self.view.members.remove(&name(m));
                            self.view.left.push(name(m));
                        }
                    }
                }
                Event::SessionLost { .. } => panic!("a member lost its session"),
                _ => {}
            }
        }
    }
}

fn users(n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("u{i}")).collect()
}

/// Two members, `(user, address)` each, both in "lobby" and seeing each
/// other there.
async fn pair_in_lobby(first: (&str, SocketAddr), second: (&str, SocketAddr)) -> (Member, Member) {
    let mut x = Member::connect(first.1, first.0).await;
    let mut y = Member::connect(second.1, second.0).await;
    x.client.join("lobby").await.unwrap();
    y.client.join("lobby").await.unwrap();
    let both: BTreeSet<String> = [first.0.to_string(), second.0.to_string()].into();
    x.watch(Duration::from_secs(15), |v| v.members == both)
        .await;
    y.watch(Duration::from_secs(15), |v| v.members == both)
        .await;
    (x, y)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spans_three_nodes_exactly_once_and_in_order() {
    let redis = RedisServer::start().expect("redis-server");
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(node(&redis.url(), name).await);
    }
    let mut members = Vec::new();
    for i in 0..6 {
        let m = Member::connect(nodes[i % 3].1, &format!("u{i}")).await;
        m.client.join("lobby").await.unwrap();
        members.push(m);
    }
    // Presence: every member sees all six, whichever node it is on.
    let everyone = users(6);
    for m in &mut members {
        m.watch(Duration::from_secs(15), |v| v.members == everyone)
            .await;
        assert_eq!(m.view.members, everyone, "a member's presence list");
    }
    for (server, _) in &nodes {
        assert_eq!(server.room_size("lobby").await.unwrap(), 6);
        let listed: BTreeSet<String> = server
            .members("lobby")
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| m.identity)
            .collect();
        assert_eq!(listed, everyone, "the application's member list");
    }

    // Every client publishes, and node b's application broadcasts, at once.
    const N: u64 = 40;
    for k in 0..N {
        for (i, m) in members.iter().enumerate() {
            m.client.publish("lobby", &(i as u64, k)).await.unwrap();
        }
        let reached = nodes[1].0.broadcast("lobby", &(100u64, k)).await.unwrap();
        assert_eq!(
            reached, 6,
            "a broadcast reaches the room's members cluster-wide"
        );
    }
    // Each member gets every other publisher's messages (not its own: the
    // server does not echo publishes) and the application's, each once,
    // in the order they were sent.
    let want = (members.len() as u64) * N;
    for (i, m) in members.iter_mut().enumerate() {
        m.watch(Duration::from_secs(30), |v| v.messages() as u64 >= want)
            .await;
        let mut publishers: BTreeSet<u64> = (0..6).filter(|&j| j != i as u64).collect();
        publishers.insert(100);
        assert_eq!(
            m.view.from.keys().copied().collect::<BTreeSet<_>>(),
            publishers,
            "member {i}: who it heard from"
        );
        for (from, got) in &m.view.from {
            assert_eq!(
                got,
                &(0..N).collect::<Vec<_>>(),
                "member {i}: messages from {from} lost, duplicated or reordered"
            );
        }
    }

    // A leave is seen on every node; the application's list follows.
    members[5].client.leave("lobby").await.unwrap();
    for m in members.iter_mut().take(5) {
        m.watch(Duration::from_secs(10), |v| !v.members.contains("u5"))
            .await;
        assert_eq!(m.view.left, vec!["u5".to_string()]);
    }
    assert_eq!(nodes[0].0.room_size("lobby").await.unwrap(), 5);
    for m in &members {
        m.client.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_redis_catches_up_and_its_members_leave_when_it_is_gone() {
    let redis = RedisServer::start().expect("redis-server");
    let redis_addr: SocketAddr = format!("127.0.0.1:{}", redis.port()).parse().unwrap();
    // Node c reaches Redis through a proxy the test can cut.
    let link = Proxy::start(redis_addr).unwrap();
    let (a, a_addr) = node(&redis.url(), "a").await;
    let (_c, c_addr) = node(&format!("redis://{}", link.local_addr()), "c").await;
    let (mut on_a, mut on_c) = pair_in_lobby(("u0", a_addr), ("u1", c_addr)).await;

    // Node a's application broadcasts while c's connection to Redis is
    // cut twice: c misses what was published meanwhile and reads it from
    // the room's log.
    const N: u64 = 200;
    for k in 0..N {
        a.broadcast("lobby", &(100u64, k)).await.unwrap();
        if k == 50 || k == 120 {
            link.cut_all();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for m in [&mut on_a, &mut on_c] {
        m.watch(Duration::from_secs(20), |v| v.messages() as u64 >= N)
            .await;
        assert_eq!(
            m.view.from.get(&100),
            Some(&(0..N).collect::<Vec<_>>()),
            "lost, duplicated or reordered"
        );
    }

    // Node c loses Redis for good: for the others it is gone, and its
    // member leaves within the node timeout and a third of it.
    link.set_refuse(true);
    link.cut_all();
    let cut = tokio::time::Instant::now();
    on_a.watch(Duration::from_secs(15), |v| {
        v.left.contains(&"u1".to_string())
    })
    .await;
    let took = cut.elapsed();
    assert!(
        on_a.view.left.contains(&"u1".to_string()),
        "the gone node's member never left"
    );
    assert!(
        took <= NODE_TIMEOUT * 4 / 3 + Duration::from_secs(2),
        "it left after {took:?}"
    );
    assert_eq!(a.room_size("lobby").await.unwrap(), 1);

    // Redis comes back for node c: its member is recorded again and
    // announced as joining, and c follows the room again.
    link.set_refuse(false);
    let both = users(2);
    on_a.watch(Duration::from_secs(20), |v| v.members == both)
        .await;
    assert_eq!(on_a.view.members, both, "the member is back");
    assert_eq!(a.room_size("lobby").await.unwrap(), 2);
    a.broadcast("lobby", &(100u64, N)).await.unwrap();
    on_c.watch(Duration::from_secs(20), |v| v.messages() as u64 > N)
        .await;
    let got = on_c.view.from.get(&100).unwrap();
    assert_eq!(got.last(), Some(&N), "the member on c hears the room again");
}

/// A member's connection moves to another node, then that node shuts down
/// for a deploy and hands both members over, while the other member
/// publishes and an application broadcasts all along: every message
/// arrives once, in order, and nobody is announced as leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_move_between_nodes_and_through_a_deploy_with_their_rooms() {
    let redis = RedisServer::start().expect("redis-server");
    let (a, a_addr) = node(&redis.url(), "a").await;
    let (b, b_addr) = node(&redis.url(), "b").await;
    // Each client reaches the nodes through a balancer the test steers.
    let to_x = Proxy::start(a_addr).unwrap();
    let to_y = Proxy::start(b_addr).unwrap();
    let (mut x, mut y) = pair_in_lobby(("x", to_x.local_addr()), ("y", to_y.local_addr())).await;

    const N: u64 = 300;
    for k in 0..N {
        // While y is away its client queues (100 messages): wait for room.
        while let Err(e) = y.client.publish("lobby", &(1u64, k)).await {
            assert!(e.to_string().contains("queue full"), "{e}");
            y.watch(Duration::from_millis(20), |_| false).await;
        }
        a.broadcast("lobby", &(100u64, k)).await.unwrap();
        if k == 60 {
            // x's balancer sends it to b now; its connection to a is cut.
            to_x.set_targets(&[b_addr]);
            to_x.cut_all();
        }
        if k == 150 {
            // A deploy: b stops, handing over both members; both
            // balancers send them to a.
            to_x.set_targets(&[a_addr]);
            to_y.set_targets(&[a_addr]);
            let b = b.clone();
            tokio::spawn(async move { b.shutdown().await });
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
        // Drain events as we go, so nothing waits on a full queue.
        x.watch(Duration::from_millis(1), |_| false).await;
        y.watch(Duration::from_millis(1), |_| false).await;
    }
    x.watch(Duration::from_secs(30), |v| v.messages() as u64 >= 2 * N)
        .await;
    y.watch(Duration::from_secs(30), |v| v.messages() as u64 >= N)
        .await;
    let all: Vec<u64> = (0..N).collect();
    assert_eq!(x.view.from.get(&1), Some(&all), "x: y's publishes");
    assert_eq!(x.view.from.get(&100), Some(&all), "x: the broadcasts");
    assert_eq!(y.view.from.get(&100), Some(&all), "y: the broadcasts");
    assert!(
        x.view.left.is_empty() && y.view.left.is_empty(),
        "a member announced as leaving: {:?} {:?}",
        x.view.left,
        y.view.left
    );
    assert_eq!(a.room_size("lobby").await.unwrap(), 2);
}

/// Redis restarts empty under a room with members on two nodes: room
/// operations are refused (`unavailable`) while it is down, never lost;
/// when it is back, each node records its members again, the room's
/// stream starts a new epoch (members are told the rest of the old one
/// is gone), and broadcasts reach everyone again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_survives_a_redis_restart() {
    let mut redis = RedisServer::start().expect("redis-server");
    let (a, a_addr) = node(&redis.url(), "a").await;
    let (_b, b_addr) = node(&redis.url(), "b").await;
    let (mut x, mut y) = pair_in_lobby(("x", a_addr), ("y", b_addr)).await;
    for k in 0..10u64 {
        a.broadcast("lobby", &(100u64, k)).await.unwrap();
    }
    y.watch(Duration::from_secs(10), |v| v.messages() >= 10)
        .await;

    redis.kill();
    // While Redis is down a broadcast fails, saying so: the first because
    // it is not confirmed in time (it stays queued and is delivered once
    // when Redis is back), the next at once.
    let first = a.broadcast("lobby", &(300u64, 0u64)).await;
    assert!(
        first.is_err(),
        "a broadcast with Redis down must fail, not vanish"
    );
    let second = tokio::time::timeout(
        Duration::from_secs(1),
        a.broadcast("lobby", &(300u64, 1u64)),
    )
    .await
    .expect("refused at once while Redis is known to be down");
    assert!(second.is_err());
    redis.restart().unwrap();

    // Both nodes record their members again; the application's list and
    // the room's traffic come back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while a.room_size("lobby").await.unwrap_or(0) < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        a.room_size("lobby").await.unwrap(),
        2,
        "members recorded again"
    );
    let mut k = 10u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if a.broadcast("lobby", &(200u64, k)).await.is_ok() {
            k += 1;
        }
        y.watch(Duration::from_millis(100), |_| false).await;
        x.watch(Duration::from_millis(1), |_| false).await;
        if k >= 20 && y.view.from.get(&200).is_some_and(|g| g.len() >= 5) {
            break;
        }
    }
    let got = y.view.from.get(&200).cloned().unwrap_or_default();
    assert!(
        got.len() >= 5,
        "broadcasts reach the other node again: {got:?}"
    );
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {got:?}"
    );
    let before: Vec<u64> = (0..10).collect();
    assert_eq!(
        y.view.from.get(&100),
        Some(&before),
        "nothing before the restart lost or repeated"
    );
    // The unconfirmed one arrived once; the refused one never.
    assert_eq!(
        y.view.from.get(&300),
        Some(&vec![0]),
        "the unconfirmed broadcast, once"
    );
}

/// A node restarted under its name after a graceful stop (a deploy) takes
/// up its previous process's members again, and tidies what that process
/// left in Redis without taking out the members it now holds: they go on
/// receiving, and their publishes are not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_under_its_name_keeps_its_members() {
    let redis = RedisServer::start().expect("redis-server");
    let (a, a_addr) = node(&redis.url(), "a").await;
    let (b, b_addr) = node(&redis.url(), "b").await;
    let to_x = Proxy::start(a_addr).unwrap();
    let (mut x, mut y) = pair_in_lobby(("x", to_x.local_addr()), ("y", b_addr)).await;

    // The deploy: a stops, a new process named "a" starts elsewhere and
    // the balancer sends x there.
    a.shutdown().await.unwrap();
    let (_a2, a2_addr) = node(&redis.url(), "a").await;
    to_x.set_targets(&[a2_addr]);
    to_x.cut_all();
    // Past the new process's first reconciliation and a beat or two.
    for k in 0..40u64 {
        b.broadcast("lobby", &(100u64, k)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        x.watch(Duration::from_millis(1), |_| false).await;
    }
    for k in 0..5u64 {
        while x.client.publish("lobby", &(1u64, k)).await.is_err() {
            x.watch(Duration::from_millis(20), |_| false).await;
        }
    }
    x.watch(Duration::from_secs(20), |v| v.messages() >= 40)
        .await;
    y.watch(Duration::from_secs(20), |v| {
        v.from.get(&1).is_some_and(|g| g.len() >= 5)
    })
    .await;
    let all: Vec<u64> = (0..40).collect();
    assert_eq!(x.view.from.get(&100), Some(&all), "x: the broadcasts");
    assert_eq!(
        y.view.from.get(&1),
        Some(&(0..5).collect::<Vec<_>>()),
        "y: x's publishes, not refused"
    );
    assert_eq!(b.room_size("lobby").await.unwrap(), 2);
}
