//! Compression (PROTOCOL.md, section 2.2): agreed in the handshake, used in
//! both directions only when both sides want it, invisible to the
//! application, surviving cuts and resumes; old peers that never mention
//! it are served as before; what a broken or hostile peer compresses
//! closes its connection with the right code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::time::Duration;

use kitestring_conformance::sim::{LinkConfig, Sim};
use kitestring_core::client::{Client, Event, Output};
use kitestring_core::close::CloseCode;
use kitestring_core::config::{ClientConfig, CompressionConfig, ServerConfig};
use kitestring_core::reliable::BatchConfig;
use kitestring_core::server::{Server, ServerEvent, ServerOutput};
use kitestring_core::wire::{
    self, ClientId, Codec, DecodeError, Frame, Incoming, Limits, Payload, SessionId, Transmit,
    CAP_DEFLATE,
};
use kitestring_core::Instant;

const LIMITS: Limits = Limits {
    max_message: 1 << 20,
    version: 1,
};

/// About `n` bytes of the JSON an application sends, numbered `tag`.
fn json(tag: u64, n: usize) -> Payload {
    let mut s = format!(r#"{{"tag":{tag},"rows":["#);
    let mut i = 0;
    while s.len() < n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"id":{},"name":"row {i}","price":{}.5,"in_stock":{}}}"#,
            tag * 1000 + i,
            i % 97,
            i % 3 == 0
        ));
        i += 1;
    }
    s.push_str("]}");
    Payload::json(s).unwrap()
}

fn tag_of(p: &Payload) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(p.data()).unwrap();
    v["tag"].as_u64().unwrap()
}

/// A server and one client, each compressing or not, connected.
fn pair(server_on: bool, client_on: bool, codec: Codec, seed: u64) -> (Sim, usize, SessionId) {
    let compression = |on: bool| on.then(CompressionConfig::default);
    let batch = (seed % 2 == 0).then(BatchConfig::default);
    let mut sim = Sim::new(
        ServerConfig {
            codecs: vec![codec, Codec::Json],
            compression: compression(server_on),
            batch,
            ..ServerConfig::default()
        },
        LinkConfig::default(),
        seed,
    );
    let c = sim.add_client(
        ClientConfig {
            codecs: vec![codec, Codec::Json],
            compression: compression(client_on),
            batch,
            ..ClientConfig::default()
        },
        seed,
    );
    sim.connect(c);
    sim.run_for(Duration::from_secs(1));
    let s = sim.session(c).unwrap();
    (sim, c, s)
}

fn up(sim: &Sim) -> Vec<u64> {
    sim.server_events
        .iter()
        .filter_map(|(_, e)| match e {
            ServerEvent::Message { message, .. } => Some(tag_of(&message.payload)),
            _ => None,
        })
        .collect()
}

fn down(sim: &Sim, c: usize) -> Vec<u64> {
    sim.peers[c]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Message(m) => Some(tag_of(&m.payload)),
            _ => None,
        })
        .collect()
}

/// Bytes each side wrote: (client, server).
fn bytes_out(sim: &Sim, c: usize) -> (u64, u64) {
    (
        sim.peers[c].client.stats().traffic.bytes_out,
        sim.server.stats().traffic.bytes_out,
    )
}

/// Sends 40 messages each way of 200 B to 20 KiB; returns the bytes each
/// side wrote for them.
fn exchange(sim: &mut Sim, c: usize, session: SessionId) -> (u64, u64) {
    let before = bytes_out(sim, c);
    for n in 1..=40u64 {
        let size = [200, 1500, 6000, 20_000][n as usize % 4];
        sim.client_send(c, json(n, size)).unwrap();
        sim.server_send(session, json(n, size)).unwrap();
        sim.run_for(Duration::from_millis(3));
    }
    sim.run_for(Duration::from_secs(5));
    assert_eq!(up(sim), (1..=40).collect::<Vec<_>>());
    assert_eq!(down(sim, c), (1..=40).collect::<Vec<_>>());
    let after = bytes_out(sim, c);
    (after.0 - before.0, after.1 - before.1)
}

#[test]
fn both_directions_compress_only_when_both_sides_want_it() {
    for codec in [Codec::Json, Codec::MsgPack] {
        for seed in [1, 2] {
            let (mut sim, c, s) = pair(true, true, codec, seed);
            let compressed = exchange(&mut sim, c, s);
            for (server_on, client_on) in [(false, false), (true, false), (false, true)] {
                let (mut sim, c, s) = pair(server_on, client_on, codec, seed);
                let plain = exchange(&mut sim, c, s);
                let what =
                    format!("{codec:?}, seed {seed}, server {server_on}, client {client_on}");
                // The JSON above shrinks about fivefold; the small
                // messages and the acknowledgments go as they are.
                assert!(
                    compressed.0 * 3 < plain.0,
                    "{what}: {compressed:?} {plain:?}"
                );
                assert!(
                    compressed.1 * 3 < plain.1,
                    "{what}: {compressed:?} {plain:?}"
                );
            }
        }
    }
}

#[test]
fn cuts_and_resumes_lose_and_duplicate_nothing() {
    for codec in [Codec::Json, Codec::MsgPack] {
        for cut_after in [0, 500, 3000, 20_000] {
            let (mut sim, c, session) = pair(true, true, codec, cut_after);
            sim.cut_after(c, cut_after);
            for n in 1..=30u64 {
                sim.client_send(c, json(n, 3000 + 500 * n as usize))
                    .unwrap();
                sim.server_send(session, json(n, 2500)).unwrap();
                sim.run_for(Duration::from_millis(2));
            }
            sim.run_for(Duration::from_secs(20));
            let what = format!("{codec:?}, cut after {cut_after}");
            assert_eq!(up(&sim), (1..=30).collect::<Vec<_>>(), "{what}");
            assert_eq!(down(&sim, c), (1..=30).collect::<Vec<_>>(), "{what}");
        }
    }
}

#[test]
fn datagrams_are_compressed_both_ways() {
    let (mut sim, c, session) = pair(true, true, Codec::MsgPack, 3);
    let data = bytes::Bytes::from(json(1, 4000).data().to_vec());
    let before = bytes_out(&sim, c);
    sim.with_client(c, |client, now| {
        client.send_datagram(now, data.clone()).unwrap()
    });
    sim.with_server(|server, now| server.send_datagram(now, session, data.clone()).unwrap());
    sim.run_for(Duration::from_secs(1));
    let after = bytes_out(&sim, c);
    assert!(after.0 - before.0 < 2000 && after.1 - before.1 < 2000);
    let got_up = sim
        .server_events
        .iter()
        .any(|(_, e)| matches!(e, ServerEvent::Datagram { data: d, .. } if *d == data));
    let got_down = sim.peers[c]
        .events
        .iter()
        .any(|(_, e)| matches!(e, Event::Datagram(d) if *d == data));
    assert!(got_up && got_down);
}

/// A server with compression on, and a connection whose `hello` is `hello`.
fn server_with(hello: &str) -> (Server, kitestring_core::server::ConnectionId) {
    let mut server = Server::new(ServerConfig {
        compression: Some(CompressionConfig::default()),
        ..ServerConfig::default()
    })
    .unwrap();
    let conn = server.handle_connection(Instant::ZERO, None, SessionId([9; 16]));
    server.handle_message(Instant::ZERO, conn, Incoming::Text(hello));
    (server, conn)
}

fn hello(caps: &str, codecs: &str) -> String {
    format!(
        r#"{{"t":"hello","versions":[1],"client":"{}","caps":[{caps}],"codecs":[{codecs}]}}"#,
        ClientId([1; 16]).to_hex()
    )
}

fn drain(server: &mut Server) -> (Vec<Transmit>, Option<CloseCode>) {
    let mut sent = Vec::new();
    let mut closed = None;
    while let Some(o) = server.poll_output() {
        match o {
            ServerOutput::Transmit(_, t) => sent.push(t),
            ServerOutput::Disconnect(_, code, _) => closed = Some(code),
            _ => {}
        }
    }
    (sent, closed)
}

#[test]
fn a_client_that_never_mentions_compression_is_served_as_before() {
    // An old client: no `deflate` among its capabilities.
    let (mut server, conn) = server_with(&hello(r#""batch","detach""#, r#""msgpack","json""#));
    let session = server.session_of(conn).unwrap();
    for n in 0..10 {
        server
            .send(Instant::ZERO, session, json(n, 30_000))
            .unwrap();
    }
    server.handle_timeout(Instant::from_secs(1));
    let (sent, closed) = drain(&mut server);
    assert_eq!(closed, None);
    // Its welcome does not offer compression, and everything it is sent
    // decodes without it.
    let Frame::Welcome(w) = wire::decode(sent[0].as_incoming(), &LIMITS).unwrap() else {
        panic!("no welcome first");
    };
    assert!(!w.features.iter().any(|f| f == CAP_DEFLATE));
    let mut decoder = wire::Decoder::new();
    let mut msgs = 0;
    for t in &sent[1..] {
        if let Some(Frame::Msg(_)) = decoder.decode(t.as_incoming(), &LIMITS).unwrap() {
            msgs += 1;
        }
    }
    assert_eq!(msgs, 10);
}

/// An open connection that agreed on compression, with its codec.
fn agreed(codec: Codec) -> (Server, kitestring_core::server::ConnectionId) {
    let codecs = format!(r#""{}""#, codec.name());
    let (mut server, conn) = server_with(&hello(r#""batch","detach","deflate""#, &codecs));
    let (sent, _) = drain(&mut server);
    let Frame::Welcome(w) = wire::decode(sent[0].as_incoming(), &LIMITS).unwrap() else {
        panic!("no welcome");
    };
    assert!(w.features.iter().any(|f| f == CAP_DEFLATE));
    (server, conn)
}

fn closed_with(codec: Codec, text: &str) -> (Option<CloseCode>, Vec<DecodeError>) {
    let (mut server, conn) = agreed(codec);
    server.handle_message(Instant::ZERO, conn, Incoming::Text(text));
    let mut errors = Vec::new();
    let mut closed = None;
    while let Some(o) = server.poll_output() {
        match o {
            ServerOutput::Disconnect(_, code, _) => closed = Some(code),
            ServerOutput::Event(ServerEvent::DecodeFailed { error, .. }) => errors.push(error),
            _ => {}
        }
    }
    (closed, errors)
}

#[test]
fn what_a_hostile_client_compresses_closes_its_connection() {
    let bomb = miniz_oxide::deflate::compress_to_vec(&vec![b'['; 8 << 20], 9);
    let b64 = base64_of(&bomb);
    // A bomb announced honestly: over the limit, 1009.
    let (closed, errors) = closed_with(
        Codec::Json,
        &format!(
            r#"{{"t":"msg","seq":1,"id":1,"zj":"{b64}","z":{}}}"#,
            8 << 20
        ),
    );
    assert_eq!(closed, Some(CloseCode::MESSAGE_TOO_BIG));
    assert!(matches!(errors[..], [DecodeError::TooLarge { .. }]));
    // A bomb announced small, garbage, and compression where it was not
    // agreed: protocol errors, 1002, each with its typed error.
    for text in [
        format!(r#"{{"t":"msg","seq":1,"id":1,"zj":"{b64}","z":64}}"#),
        r#"{"t":"msg","seq":1,"id":1,"zb":"AAAA","z":3}"#.to_owned(),
    ] {
        let (closed, errors) = closed_with(Codec::Json, &text);
        assert_eq!(closed, Some(CloseCode::PROTOCOL_ERROR), "{text}");
        assert!(
            matches!(errors[..], [DecodeError::Compression { .. }]),
            "{errors:?}"
        );
    }
    let (mut server, conn) = server_with(&hello(r#""batch""#, r#""json""#));
    drain(&mut server);
    let good = base64_of(&miniz_oxide::deflate::compress_to_vec(b"[1,2,3]", 6));
    let text = format!(r#"{{"t":"msg","seq":1,"id":1,"zj":"{good}","z":7}}"#);
    server.handle_message(Instant::ZERO, conn, Incoming::Text(&text));
    assert_eq!(drain(&mut server).1, Some(CloseCode::PROTOCOL_ERROR));
}

#[test]
fn what_a_broken_server_compresses_closes_the_connection_and_the_session_goes_on() {
    let mut client = Client::new(
        ClientConfig {
            compression: Some(CompressionConfig::default()),
            hello_in_upgrade: false,
            ..ClientConfig::default()
        },
        ClientId([2; 16]),
        7,
    )
    .unwrap();
    client.connect(Instant::ZERO).unwrap();
    let mut transport = None;
    let mut hello_text = None;
    let pump = |client: &mut Client, transport: &mut Option<_>| {
        let mut out = Vec::new();
        while let Some(o) = client.poll_output() {
            out.push(o);
        }
        for o in &out {
            if let Output::Connect(t) = o {
                *transport = Some(*t);
            }
        }
        out
    };
    pump(&mut client, &mut transport);
    let t = transport.unwrap();
    client.handle_transport_opened(Instant::ZERO, t);
    for o in pump(&mut client, &mut transport) {
        if let Output::Transmit(_, Transmit::Text(b)) = o {
            hello_text = Some(String::from_utf8(b.to_vec()).unwrap());
        }
    }
    // The client offers compression.
    let hello_text = hello_text.unwrap();
    assert!(hello_text.contains(r#""deflate""#), "{hello_text}");
    let welcome = format!(
        r#"{{"t":"welcome","version":1,"codec":"json","session":"{}","resumed":false,"delivered":0,"features":["batch","detach","deflate"],"ping_ms":20000,"pong_ms":10000,"max":1048576}}"#,
        SessionId([5; 16]).to_hex()
    );
    client.handle_message(Instant::ZERO, t, Incoming::Text(&welcome));
    pump(&mut client, &mut transport);
    // A well-formed compressed message is delivered as it was.
    let text_of = |z: &[u8], len: usize| {
        format!(
            r#"{{"t":"msg","seq":1,"id":1,"zj":"{}","z":{len}}}"#,
            base64_of(z)
        )
    };
    let payload = json(4, 5000);
    let z = miniz_oxide::deflate::compress_to_vec(payload.data(), 6);
    client.handle_message(
        Instant::ZERO,
        t,
        Incoming::Text(&text_of(&z, payload.len())),
    );
    let delivered = pump(&mut client, &mut transport)
        .into_iter()
        .any(|o| matches!(o, Output::Event(Event::Message(m)) if m.payload == payload));
    assert!(delivered);
    // A corrupt one closes the connection with 1002; the client comes back.
    let corrupt = text_of(&z[..z.len() / 2], payload.len());
    client.handle_message(Instant::ZERO, t, Incoming::Text(&corrupt));
    let out = pump(&mut client, &mut transport);
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Event(Event::DecodeFailed(DecodeError::Compression { .. }))
        )),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Disconnect(_, CloseCode::PROTOCOL_ERROR, _))),
        "{out:?}"
    );
    assert_eq!(client.session(), Some(SessionId([5; 16])));
}

fn base64_of(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[test]
fn a_client_never_offers_what_it_was_not_configured_for() {
    // `deflate` among the application's own capabilities, compression
    // off: not offered, and a server that claims it anyway is not taken at
    // its word.
    let mut client = Client::new(
        ClientConfig {
            capabilities: vec![CAP_DEFLATE.to_owned()],
            hello_in_upgrade: false,
            ..ClientConfig::default()
        },
        ClientId([3; 16]),
        7,
    )
    .unwrap();
    client.connect(Instant::ZERO).unwrap();
    let mut transport = None;
    while let Some(o) = client.poll_output() {
        if let Output::Connect(t) = o {
            transport = Some(t);
        }
    }
    let t = transport.unwrap();
    client.handle_transport_opened(Instant::ZERO, t);
    let mut hello_text = String::new();
    while let Some(o) = client.poll_output() {
        if let Output::Transmit(_, Transmit::Text(b)) = o {
            hello_text = String::from_utf8(b.to_vec()).unwrap();
        }
    }
    assert!(hello_text.starts_with(r#"{"t":"hello""#), "{hello_text}");
    assert!(!hello_text.contains("deflate"), "{hello_text}");
    let welcome = format!(
        r#"{{"t":"welcome","version":1,"codec":"json","session":"{}","resumed":false,"delivered":0,"features":["deflate"],"ping_ms":20000,"pong_ms":10000,"max":1048576}}"#,
        SessionId([6; 16]).to_hex()
    );
    client.handle_message(Instant::ZERO, t, Incoming::Text(&welcome));
    while client.poll_output().is_some() {}
    let z = base64_of(&miniz_oxide::deflate::compress_to_vec(b"[1,2,3]", 6));
    let text = format!(r#"{{"t":"msg","seq":1,"id":1,"zj":"{z}","z":7}}"#);
    client.handle_message(Instant::ZERO, t, Incoming::Text(&text));
    let mut closed = None;
    while let Some(o) = client.poll_output() {
        if let Output::Disconnect(_, code, _) = o {
            closed = Some(code);
        }
    }
    assert_eq!(closed, Some(CloseCode::PROTOCOL_ERROR));
}

#[test]
fn a_level_deflate_does_not_have_is_refused_at_construction() {
    for level in [0, 10, 255] {
        let compression = Some(CompressionConfig {
            level,
            ..CompressionConfig::default()
        });
        let client = ClientConfig {
            compression,
            ..ClientConfig::default()
        };
        let server = ServerConfig {
            compression,
            ..ServerConfig::default()
        };
        assert!(client.validate().is_err(), "level {level}");
        assert!(server.validate().is_err(), "level {level}");
    }
    for level in 1..=9 {
        let compression = Some(CompressionConfig {
            level,
            ..CompressionConfig::default()
        });
        assert!(ClientConfig {
            compression,
            ..ClientConfig::default()
        }
        .validate()
        .is_ok());
    }
}
