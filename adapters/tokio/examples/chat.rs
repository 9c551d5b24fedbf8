//! A chat room in forty lines: a server that lets every client into
//! "lobby", and two clients that join it and talk. Run with
//! `cargo run -p kitestring-tokio --example chat`.

use std::time::Duration;

use futures_util::StreamExt;
use kitestring::{ClientOptions, DecodeExt, Event, ServerEvent, ServerOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = kitestring_tokio::runtime();

    // The server: accept everyone (add `ServerOptions::auth` to check tokens
    // at the HTTP upgrade, and `policy` to control who joins which room).
    let (server, mut server_events) =
        kitestring::bind(rt.clone(), "127.0.0.1:0".parse()?, ServerOptions::default())?;
    let url = format!("ws://{}/ws", server.local_addr().ok_or("no address")?);
    tokio::spawn(async move {
        while let Some(event) = server_events.next().await {
            if let ServerEvent::SessionOpened {
                session, resumed, ..
            } = event
            {
                println!("server: session {session:?} opened (resumed: {resumed})");
            }
        }
    });

    // Two clients: they reconnect and resume by themselves, and every
    // message reaches every other member exactly once, in order.
    let (alice, mut alice_events) =
        kitestring::connect(rt.clone(), &url, ClientOptions::default())?;
    let (bob, mut bob_events) = kitestring::connect(rt, &url, ClientOptions::default())?;
    alice.join("lobby").await?;
    bob.join("lobby").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice.publish("lobby", &("alice", "hello, lobby")).await?;

    let deadline = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            Some(event) = bob_events.next() => match event {
                Event::Presence { room, presence } => println!("bob: {room}: {presence:?}"),
                Event::Message(m) => {
                    let (from, text): (String, String) = m.decode()?;
                    println!("bob: {from} says {text:?}");
                    break;
                }
                _ => {}
            },
            Some(_) = alice_events.next() => {}
            () = &mut deadline => return Err("no message within 5 s".into()),
        }
    }
    alice.close().await?;
    bob.close().await?;
    Ok(())
}
