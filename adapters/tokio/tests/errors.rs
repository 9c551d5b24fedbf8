//! Error messages name what they are about: the address that could not be
//! bound, the session, the room.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kitestring::{ClientOptions, ServerOptions, SessionId};

#[tokio::test]
async fn errors_name_the_address_session_and_room() {
    let rt = kitestring_tokio::runtime();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = kitestring::bind(rt.clone(), addr, ServerOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("cannot listen on {addr}: ")),
        "{message}"
    );

    let (server, _events) = kitestring::bind(
        rt.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerOptions::default(),
    )
    .unwrap();
    let ghost = SessionId([0xab; 16]);
    let err = server.send(ghost, &1).await.unwrap_err();
    assert!(err.is_unknown_session());
    assert_eq!(
        err.to_string(),
        format!("session {}: no such session", ghost.to_hex())
    );
    let err = server.join(ghost, "lobby").await.unwrap_err();
    assert!(err.is_unknown_session());
    assert_eq!(
        err.to_string(),
        format!(
            "session {}, room \"lobby\": no such session",
            ghost.to_hex()
        )
    );
    let huge = kitestring::Payload::binary(vec![0u8; 2 << 20]);
    let err = server
        .broadcast_payload("lobby", huge, None)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with("room \"lobby\": payload of "),
        "{message}"
    );

    let url = format!("ws://{}/", server.local_addr().unwrap());
    let (client, _events) = kitestring::connect(rt, &url, ClientOptions::default()).unwrap();
    let long = "r".repeat(300);
    let err = client.join(&long).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "room \"{}...\": room names are 1 to 256 bytes",
            "r".repeat(64)
        )
    );
    client.close().await.unwrap();
}
