//! Synced maps over real sockets (PROTOCOL.md, section 3.6): settings
//! shared between a server and three clients, written by all of them,
//! through connections aborted mid-write and a session that is closed and
//! started again, end the same everywhere; the room policy decides who
//! writes which key; a client sees its own write at once and the server's
//! verdict after.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kitestring::{
    ClientEvents, ClientHandle, ClientOptions, Event, MapOptions, Member, ServerEvent,
    ServerHandle, ServerOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ROOM: &str = "settings";
const MAP: &str = "app";

async fn server() -> (
    ServerHandle,
    String,
    tokio::task::JoinHandle<Vec<ServerEvent>>,
) {
    let rt = kitestring_tokio::runtime();
    let (server, mut events) =
        kitestring::bind(rt, "127.0.0.1:0".parse().unwrap(), ServerOptions::default()).unwrap();
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(e) = events.next().await {
            if matches!(e, ServerEvent::MapChanged { .. }) {
                seen.push(e);
            }
        }
        seen
    });
    let url = format!("ws://{}/", server.local_addr().unwrap());
    (server, url, seen)
}

async fn member(url: &str) -> (ClientHandle, ClientEvents) {
    let (client, events) =
        kitestring::connect(kitestring_tokio::runtime(), url, ClientOptions::default()).unwrap();
    client.join(ROOM).await.unwrap();
    (client, events)
}

/// Waits until `events` says the map is in step, handing back what it
/// reads then.
async fn synced(client: &ClientHandle, events: &mut ClientEvents) -> BTreeMap<String, f64> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::MapSynced { room, map } = events.next().await.unwrap() {
                if &*room == ROOM && &*map == MAP {
                    break;
                }
            }
        }
    })
    .await
    .expect("a snapshot");
    read(client).await
}

async fn read(client: &ClientHandle) -> BTreeMap<String, f64> {
    client
        .map_entries(ROOM, MAP)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.to_string(), kitestring::decode(&v).unwrap()))
        .collect()
}

async fn server_map(server: &ServerHandle) -> BTreeMap<String, f64> {
    server
        .map_entries(ROOM, MAP)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.to_string(), kitestring::decode(&v).unwrap()))
        .collect()
}

/// A relay to the server at `url` for one connection at a time: bytes from
/// the client pass at once, bytes from the server wait while the returned
/// gate is held. Returns the relay's URL and the gate.
async fn held_relay(url: &str) -> (String, Arc<tokio::sync::Mutex<()>>) {
    let target = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = format!("ws://{}/", listener.local_addr().unwrap());
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let held = gate.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&target).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let gate = held.clone();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                let _ = server_write.shutdown().await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let _open = gate.lock().await;
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = client_write.shutdown().await;
            });
        }
    });
    (relay, gate)
}

/// Waits until every client reads what the server has.
async fn converged(server: &ServerHandle, clients: &[&ClientHandle]) -> BTreeMap<String, f64> {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let want = server_map(server).await;
            let mut all = true;
            for c in clients {
                all &= read(c).await == want;
            }
            if all {
                return want;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every client ends with the server's map")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_converge_through_aborted_connections() {
    let (server, url, seen) = server().await;
    server
        .open_map(ROOM, MAP, MapOptions::default())
        .await
        .unwrap();
    server.map_set(ROOM, MAP, "volume", &0.5).await.unwrap();
    let (a, mut a_events) = member(&url).await;
    let (b, mut b_events) = member(&url).await;
    let (c, mut c_events) = member(&url).await;
    for (client, events) in [
        (&a, &mut a_events),
        (&b, &mut b_events),
        (&c, &mut c_events),
    ] {
        let m = synced(client, events).await;
        assert_eq!(m.get("volume"), Some(&0.5), "the snapshot on join");
    }
    // Every party writes; a's own write reads back at once.
    a.map_set(ROOM, MAP, "volume", &0.8).await.unwrap();
    assert_eq!(
        a.map_get::<f64>(ROOM, MAP, "volume").await.unwrap(),
        Some(0.8)
    );
    let sessions = server.member_sessions(ROOM).await.unwrap();
    for i in 0..200u32 {
        let f = f64::from(i);
        match i % 4 {
            0 => a.map_set(ROOM, MAP, "speed", &f).await.map(|_| ()),
            1 => b.map_set(ROOM, MAP, "speed", &f).await.map(|_| ()),
            2 => c.map_set(ROOM, MAP, "depth", &f).await.map(|_| ()),
            _ => server
                .map_set(ROOM, MAP, "depth", &f)
                .await
                .map(|_| ())
                .map_err(|e| panic!("{e}")),
        }
        .unwrap();
        if i % 50 == 25 {
            // A connection dies mid-stream; its client resumes.
            let victim = sessions[(i as usize / 50) % sessions.len()];
            if let Some(info) = server.session(victim).await.unwrap() {
                if let Some(conn) = info.connection {
                    server.abort(conn).await.unwrap();
                }
            }
        }
    }
    // Writes queued by a client whose connection was aborted are taken
    // when it is back (the server stamps: the one it takes last wins), so
    // the delete comes once every copy is in step.
    converged(&server, &[&a, &b, &c]).await;
    b.map_delete(ROOM, MAP, "volume").await.unwrap();
    let end = converged(&server, &[&a, &b, &c]).await;
    assert_eq!(end.get("volume"), None, "b's delete, the last write of it");
    assert!(end.contains_key("speed") && end.contains_key("depth"));
    // The application saw every change it made or took, the last one of
    // each key being what the map holds.
    a.close().await.unwrap();
    b.close().await.unwrap();
    c.close().await.unwrap();
    server.shutdown().await.unwrap();
    let seen = seen.await.unwrap();
    let mut folded = BTreeMap::new();
    for e in seen {
        if let ServerEvent::MapChanged { key, value, .. } = e {
            match value {
                Some(v) => folded.insert(key.to_string(), kitestring::decode::<f64>(&v).unwrap()),
                None => folded.remove(&*key),
            };
        }
    }
    assert_eq!(folded, end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_decides_who_writes_and_refusals_restore_the_value() {
    let (server, url, _seen) = server().await;
    // Only keys under "public." are the members' to write.
    struct Keys;
    impl kitestring::RoomPolicy for Keys {
        fn authorize_map_write(
            &self,
            _: &Member,
            _: &str,
            _: &str,
            key: &str,
        ) -> Result<(), String> {
            if key.starts_with("public.") {
                Ok(())
            } else {
                Err(format!("{key} is not yours to write"))
            }
        }
    }
    server.set_policy(Box::new(Keys)).await.unwrap();
    server
        .open_map(ROOM, MAP, MapOptions::default())
        .await
        .unwrap();
    server
        .map_set(ROOM, MAP, "admin.limit", &10.0)
        .await
        .unwrap();
    // The member reaches the server through a relay whose way back can be
    // held, so the server's verdict cannot arrive before the client's own
    // view of its write is read.
    let (relay, gate) = held_relay(&url).await;
    let (a, mut events) = member(&relay).await;
    synced(&a, &mut events).await;
    a.map_set(ROOM, MAP, "public.color", &1.0).await.unwrap();
    let held = gate.lock().await;
    let refused_id = a.map_set(ROOM, MAP, "admin.limit", &99.0).await.unwrap();
    assert_eq!(
        a.map_get::<f64>(ROOM, MAP, "admin.limit").await.unwrap(),
        Some(99.0),
        "the client's own write, before the server's verdict"
    );
    drop(held);
    let refusal = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Refused {
                id: Some(id),
                refusal,
                ..
            } = events.next().await.unwrap()
            {
                if id == refused_id {
                    return refusal;
                }
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(refusal.code.as_deref(), Some("forbidden"));
    assert_eq!(refusal.op, "mset");
    assert_eq!(
        a.map_get::<f64>(ROOM, MAP, "admin.limit").await.unwrap(),
        Some(10.0)
    );
    let end = converged(&server, &[&a]).await;
    assert_eq!(end.get("public.color"), Some(&1.0));
    assert_eq!(end.get("admin.limit"), Some(&10.0));
    // Not a member: refused at once, nothing sent.
    assert!(a.map_set("elsewhere", MAP, "x", &1.0).await.is_err());
}
