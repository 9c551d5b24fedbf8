//! Synced maps across server nodes sharing one real `redis-server`:
//! members on three nodes and the applications of all three write the same
//! and different keys, and every node and every member ends with the same
//! map; a node started later reads what the cluster has; a node whose
//! Redis connection is cut catches up when it is back, and what was
//! written on it meanwhile reaches the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kitestring::kitestring_core::config::ResumeSecret;
use kitestring::{
    ClientEvents, ClientHandle, ClientOptions, Event, MapOptions, ServerConfig, ServerHandle,
    ServerOptions,
};
use kitestring_chaos::Proxy;
use kitestring_redis::testing::RedisServer;
use kitestring_redis::RedisBackplane;

const SECRET: [u8; 16] = *b"cluster-secret!!";
const ROOM: &str = "settings";
const MAP: &str = "app";

type Entries = BTreeMap<String, u64>;

/// A node with the map open, as every node's start-up does.
async fn node(redis_url: &str, name: &str) -> (ServerHandle, SocketAddr) {
    let backplane = RedisBackplane::connect(redis_url, name).await.unwrap();
    let options = ServerOptions {
        config: ServerConfig {
            resume_secret: ResumeSecret(SECRET),
            ..ServerConfig::default()
        },
        backplane: Some(Arc::new(backplane)),
        node_timeout: Duration::from_secs(3),
        ..ServerOptions::default()
    };
    let (server, events) = kitestring::bind(
        kitestring_tokio::runtime(),
        "127.0.0.1:0".parse().unwrap(),
        options,
    )
    .unwrap();
    tokio::spawn(events.for_each(|_| async {}));
    server
        .open_map(ROOM, MAP, MapOptions::default())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    (server, addr)
}

async fn member(addr: SocketAddr) -> (ClientHandle, ClientEvents) {
    let url = format!("ws://{addr}/");
    let (client, mut events) =
        kitestring::connect(kitestring_tokio::runtime(), &url, ClientOptions::default()).unwrap();
    client.join(ROOM).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Event::MapSynced { .. } = events.next().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("a snapshot");
    (client, events)
}

fn entries(all: Vec<(Arc<str>, kitestring::Payload)>) -> Entries {
    all.into_iter()
        .map(|(k, v)| (k.to_string(), kitestring::decode(&v).unwrap()))
        .collect()
}

async fn on_node(server: &ServerHandle) -> Entries {
    entries(server.map_entries(ROOM, MAP).await.unwrap().unwrap())
}

async fn on_client(client: &ClientHandle) -> Entries {
    entries(client.map_entries(ROOM, MAP).await.unwrap())
}

/// Waits until every node and client holds `want`.
async fn all_hold(nodes: &[&ServerHandle], clients: &[&ClientHandle], want: &Entries) {
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let mut ok = true;
            for n in nodes {
                ok &= &on_node(n).await == want;
            }
            for c in clients {
                ok &= &on_client(c).await == want;
            }
            if ok {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if done.is_err() {
        for (i, n) in nodes.iter().enumerate() {
            eprintln!("node {i}: {:?}", on_node(n).await);
        }
        for (i, c) in clients.iter().enumerate() {
            eprintln!("client {i}: {:?}", on_client(c).await);
        }
        panic!("not every copy holds {want:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_converge_across_nodes_and_a_late_node_reads_them() {
    let redis = RedisServer::start().expect("redis-server");
    let (a, a_addr) = node(&redis.url(), "a").await;
    let (b, b_addr) = node(&redis.url(), "b").await;
    let (c, c_addr) = node(&redis.url(), "c").await;
    let (x, _xe) = member(a_addr).await;
    let (y, _ye) = member(b_addr).await;
    let (z, _ze) = member(c_addr).await;

    // Each writer's own key, and one key everyone writes, in turns.
    for i in 0..60u64 {
        match i % 6 {
            0 => x.map_set(ROOM, MAP, "x", &i).await.map(|_| ()).unwrap(),
            1 => y.map_set(ROOM, MAP, "y", &i).await.map(|_| ()).unwrap(),
            2 => z.map_set(ROOM, MAP, "z", &i).await.map(|_| ()).unwrap(),
            3 => a
                .map_set(ROOM, MAP, "shared", &i)
                .await
                .map(|_| ())
                .unwrap(),
            4 => y
                .map_set(ROOM, MAP, "shared", &i)
                .await
                .map(|_| ())
                .unwrap(),
            _ => c
                .map_set(ROOM, MAP, "shared", &i)
                .await
                .map(|_| ())
                .unwrap(),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The last write of "shared" happens after every other has settled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.map_set(ROOM, MAP, "shared", &1000u64).await.unwrap();
    z.map_delete(ROOM, MAP, "z").await.unwrap();
    let want: Entries = [("x", 54u64), ("y", 55), ("shared", 1000)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    all_hold(&[&a, &b, &c], &[&x, &y, &z], &want).await;

    // A node started now reads the cluster's map, and its member gets it
    // in its snapshot.
    let (d, d_addr) = node(&redis.url(), "d").await;
    let (w, _we) = member(d_addr).await;
    all_hold(&[&d], &[&w], &want).await;
    w.map_set(ROOM, MAP, "w", &7u64).await.unwrap();
    let mut want = want;
    want.insert("w".into(), 7);
    all_hold(&[&a, &b, &c, &d], &[&x, &y, &z, &w], &want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_redis_catches_up_both_ways() {
    let redis = RedisServer::start().expect("redis-server");
    let redis_addr: SocketAddr = format!("127.0.0.1:{}", redis.port()).parse().unwrap();
    // Node b reaches Redis through a proxy the test can cut.
    let link = Proxy::start(redis_addr).unwrap();
    let (a, a_addr) = node(&redis.url(), "a").await;
    let (b, b_addr) = node(&format!("redis://{}", link.local_addr()), "b").await;
    let (x, _xe) = member(a_addr).await;
    let (y, _ye) = member(b_addr).await;
    a.map_set(ROOM, MAP, "before", &1u64).await.unwrap();
    let mut want: Entries = [("before".to_owned(), 1u64)].into();
    all_hold(&[&a, &b], &[&x, &y], &want).await;

    // Cut off: b hears nothing of a's writes, and cannot store its own.
    link.set_refuse(true);
    link.cut_all();
    for i in 0..20u64 {
        x.map_set(ROOM, MAP, "from_a", &i).await.unwrap();
        b.map_set(ROOM, MAP, "from_b", &i).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    y.map_set(ROOM, MAP, "from_y", &5u64).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        on_node(&a).await.get("from_b"),
        None,
        "a cannot have heard of b's writes"
    );

    // Back: b reads what it missed, and stores what it wrote meanwhile.
    link.set_refuse(false);
    want.insert("from_a".into(), 19);
    want.insert("from_b".into(), 19);
    want.insert("from_y".into(), 5);
    all_hold(&[&a, &b], &[&x, &y], &want).await;
}
