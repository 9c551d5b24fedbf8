//! A node of a cluster killed with SIGKILL, as a crash would: real node
//! processes (`kitestring-node`) on a real `redis-server`, behind a proxy
//! playing the load balancer. The client resumes on the surviving node
//! with its session intact (taken up from its record), and what the crash
//! may cost is exactly what PROTOCOL.md says: no message the client saw
//! acknowledged is lost, a message may be handled twice only with the
//! same id, and the client is told the session was recovered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use kitestring::{ClientOptions, Event};
use kitestring_chaos::Proxy;
use kitestring_redis::testing::RedisServer;

/// A `kitestring-node` process and every line it printed.
struct Node {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn start(redis: &RedisServer, name: &str) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kitestring-node"))
            .args(["--redis", &redis.url(), "--name", name])
            .args(["--node-timeout-ms", "2000"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("kitestring-node starts");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
                keep.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the node says where it listens");
        Node { child, addr, lines }
    }

    /// (client message id, payload) of every message it handled.
    fn handled(&self) -> Vec<(u64, u64)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let mut f = l.strip_prefix("handled ")?.split(' ');
                let _session = f.next()?;
                Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(b"shutdown\n");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the client heard.
#[derive(Default)]
struct Seen {
    echoes: Vec<u64>,
    /// Client message ids acknowledged.
    acked: BTreeSet<u64>,
    recovered: bool,
    lost: bool,
}

impl Seen {
    fn take(&mut self, e: Event) {
        match e {
            Event::Message(m) => self
                .echoes
                .push(kitestring::decode::<u64>(&m.payload).unwrap()),
            Event::Acked { first, last } => self.acked.extend(first.0..=last.0),
            Event::Connected { recovered, .. } => self.recovered |= recovered,
            Event::SessionLost { .. } => self.lost = true,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_costs_only_what_the_crash_promise_allows() {
    let redis = RedisServer::start().expect("redis-server");
    let mut a = Node::start(&redis, "a");
    let b = Node::start(&redis, "b");
    let proxy = Proxy::start(a.addr).unwrap();
    let url = format!("ws://{}/", proxy.local_addr());
    let (client, mut events) =
        kitestring::connect(kitestring_tokio::runtime(), &url, ClientOptions::default()).unwrap();

    let mut ids: BTreeMap<u64, u64> = BTreeMap::new(); // payload -> client id
    let mut seen = Seen::default();

    // 40 messages on node a, most of them echoed and acknowledged.
    for k in 0..40u64 {
        ids.insert(k, client.send(&k).await.unwrap().0);
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.echoes.len() < 30 {
        let Ok(Some(e)) = tokio::time::timeout_at(until, events.next()).await else {
            panic!("node a echoed only {} messages", seen.echoes.len());
        };
        seen.take(e);
    }

    // Node a dies with SIGKILL, messages in flight; the balancer sends the
    // client to b, which takes the session up once a is known to be gone.
    proxy.set_targets(&[b.addr]);
    a.child.kill().unwrap();
    let _ = a.child.wait();
    proxy.cut_all();
    for k in 40..60u64 {
        ids.insert(k, client.send(&k).await.unwrap().0);
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let done = (40..60).all(|k| seen.echoes.contains(&k));
        if done && seen.recovered {
            break;
        }
        let Ok(Some(e)) = tokio::time::timeout_at(until, events.next()).await else {
            panic!(
                "after the crash: recovered {}, echoes {:?}",
                seen.recovered,
                seen.echoes.iter().filter(|&&k| k >= 40).collect::<Vec<_>>()
            );
        };
        seen.take(e);
    }
    // Let acknowledgments settle.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(e) = events.next().await {
            seen.take(e);
        }
    })
    .await;

    assert!(!seen.lost, "the session was lost");
    assert!(
        seen.recovered,
        "the client was not told the session was recovered"
    );
    let mut handled = a.handled();
    handled.extend(b.handled());
    let by_payload: BTreeMap<u64, BTreeSet<u64>> =
        handled.iter().fold(BTreeMap::new(), |mut m, &(id, k)| {
            m.entry(k).or_default().insert(id);
            m
        });
    for (k, id) in &ids {
        // Nothing the client saw acknowledged is lost; and every message,
        // acknowledged or sent again, was handled somewhere.
        let seen = by_payload.get(k);
        assert!(seen.is_some(), "message {k} (id {id}) was never handled");
        // Handled twice only with its own id.
        assert_eq!(
            seen.unwrap(),
            &BTreeSet::from([*id]),
            "message {k} handled under another id"
        );
    }
    for id in &seen.acked {
        assert!(
            handled.iter().any(|(h, _)| h == id),
            "id {id} acknowledged but never handled"
        );
    }
    // Every message sent after the crash was echoed by b exactly once.
    for k in 40..60u64 {
        assert_eq!(
            seen.echoes.iter().filter(|&&e| e == k).count(),
            1,
            "echo of {k}"
        );
    }
    client.close().await.unwrap();
}

/// Three node processes under every fault at once (client cuts, a node
/// killed and restarted under its name, a graceful restart, a node's Redis
/// connection cut): nothing lost, nothing duplicated beyond what the crash
/// promise allows, and every message accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_lose_nothing_under_kills_restarts_and_redis_cuts() {
    let settings = kitestring_demo::cluster::ClusterSettings {
        node_bin: env!("CARGO_BIN_EXE_kitestring-node").into(),
        nodes: 3,
        clients: 6,
        rate: 20.0,
        duration: Duration::from_secs(16),
        seed: 3,
        node_timeout: Duration::from_secs(2),
    };
    let report = kitestring_demo::cluster::run(settings, |line| println!("{line}"))
        .await
        .unwrap();
    println!("{}", report.lines());
    assert!(
        report.kills >= 1 && report.restarts >= 1 && report.redis_cuts >= 1,
        "{report:?}"
    );
    assert!(report.sent > 300, "{report:?}");
    assert!(
        report.room_acked > 100 && report.room_delivered > 400,
        "{report:?}"
    );
    assert_eq!(
        (report.lost, report.duplicated),
        (0, 0),
        "{}",
        report.lines()
    );
    assert_eq!(report.handled + report.reported, report.sent);
}
