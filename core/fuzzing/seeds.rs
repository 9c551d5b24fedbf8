//! Seeds of the decode targets' corpora: real frames, as the core's own
//! tests and golden transcripts use them.
//!
//! It never writes a file: the test `seeds_pass_the_decode_targets` writes
//! the corpora, when asked to.

use bytes::Bytes;

use crate::wire::{
    self, ClientId, Codec, Frame, Hello, Msg, MsgKind, Payload, Reject, Resume, ResumeKey,
    SessionId, Transmit, Welcome, PROTOCOL_VERSION,
};

/// Real frames, as the core's own tests and golden transcripts use them, to
/// seed the corpora: `(name, message)`.
pub fn seed_messages() -> Vec<(String, Transmit)> {
    let sid = SessionId([7; 16]);
    let mut frames = vec![
        Frame::Hello(Hello {
            versions: vec![1],
            client: ClientId([0xc1; 16]),
            resume: None,
            caps: Vec::new(),
            codecs: vec![Codec::MsgPack, Codec::Json],
            join: Vec::new(),
        }),
        Frame::Hello(Hello {
            versions: vec![1],
            client: ClientId([1; 16]),
            resume: Some(Resume {
                session: sid,
                delivered: 41,
                key: Some(ResumeKey([0x4b; 16])),
                acked: Some(7),
            }),
            caps: vec!["batch".into()],
            codecs: vec![Codec::Json],
            join: Vec::new(),
        }),
        Frame::Welcome(Welcome {
            version: 1,
            codec: Codec::Json,
            session: sid,
            resumed: false,
            lost: None,
            delivered: 0,
            features: Vec::new().into(),
            ping_interval_ms: 30_000,
            pong_timeout_ms: 10_000,
            max_message: 1 << 20,
            key: Some(ResumeKey([0x4b; 16])),
            recovered: false,
        }),
        Frame::Welcome(Welcome {
            version: 1,
            codec: Codec::MsgPack,
            session: sid,
            resumed: true,
            lost: Some("unknown_session".into()),
            delivered: 3,
            features: vec!["batch".into()].into(),
            ping_interval_ms: 30_000,
            pong_timeout_ms: 10_000,
            max_message: 1 << 20,
            key: None,
            recovered: false,
        }),
        Frame::Reject(Reject {
            code: 4001,
            reason: "unsupported_version".into(),
            message: "server speaks 1".into(),
            versions: vec![1],
            retry_after_ms: None,
        }),
        Frame::Reject(Reject {
            code: 1013,
            reason: "overloaded".into(),
            message: "session limit reached".into(),
            versions: vec![1],
            retry_after_ms: Some(5000),
        }),
        Frame::Ping { nonce: 9 },
        Frame::Pong { nonce: 9 },
        Frame::Ack { ack: 12 },
        Frame::Replay { from: 3 },
        Frame::GoAway {
            code: 4011,
            retry_after_ms: Some(500),
        },
        Frame::Raw(Bytes::from_static(b"\x00\x01pos")),
    ];
    let payloads = [
        Payload::json(&br#"{"n":1}"#[..]),
        Payload::json(&br#"{"x":[1,2,"\u00e9"]}"#[..]),
        Payload::msgpack(vec![0x92, 0x01, 0xa3, b't', b'w', b'o']),
        Ok(Payload::binary(&b"\xff\x00bin"[..])),
    ];
    for (i, p) in payloads.into_iter().enumerate() {
        if let Ok(payload) = p {
            let seq = i as u64 + 1;
            frames.push(Frame::Msg(Msg {
                kind: MsgKind::Plain,
                room: None,
                seq,
                id: 76 + seq,
                ack: Some(4),
                ts: if i == 0 {
                    Some(1_700_000_000_000)
                } else {
                    None
                },
                payload,
            }));
        }
    }
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        for codec in [Codec::Json, Codec::MsgPack] {
            if let Ok(t) = wire::encode(f, codec, PROTOCOL_VERSION) {
                let name = format!("{:02}-{}-{}", i, f.type_name(), codec.name());
                if !out.iter().any(|(_, o)| *o == t) {
                    out.push((name, t));
                }
            }
        }
    }
    out
}
