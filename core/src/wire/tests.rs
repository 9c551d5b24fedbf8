//! Unit tests of the wire format: both codecs against each other and
//! against serde, detached payloads, batches, and every decode error.
//!
//! The encoder's memory is tested beside it, in `buffers`.

use std::borrow::Cow;

use super::encode::{json_payload_into, pack_payload_into, write_pack_envelope};
use super::envelope::{bounded_batch, JsonEnvelope, PackEnvelope};
use super::error::INVALID;
use super::payload::msgpack_value_end;
use super::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

pub(super) const LIMITS: Limits = Limits {
    max_message: 1 << 20,
    version: 1,
};

/// The envelope fields of a message, payload aside.
macro_rules! fill_msg {
    ($env:ident, $m:expr) => {{
        $env.t = "msg".into();
        $env.seq = Some($m.seq);
        $env.id = Some($m.id);
        $env.ack = $m.ack;
        $env.ts = $m.ts;
        $env.rq = ($m.kind == MsgKind::Request).then_some(true);
        $env.rs = $m.kind.rs();
        $env.op = $m.kind.op().map(Cow::Borrowed);
        $env.r = $m.room.as_deref().map(Cow::Borrowed);
    }};
}

/// The serde form of a `msg` envelope: the oracle the hand-written encoder
/// is checked against.
fn json_msg(m: &Msg) -> Result<JsonEnvelope<'_>, EncodeError> {
    let mut env = JsonEnvelope::default();
    fill_msg!(env, m);
    json_payload_into(&mut env, &m.payload)?;
    Ok(env)
}

/// The serde form of a `msg` envelope in MessagePack: the oracle the
/// hand-written encoder is checked against.
fn pack_msg(m: &Msg) -> Result<PackEnvelope<'_>, EncodeError> {
    let mut env = PackEnvelope::default();
    fill_msg!(env, m);
    pack_payload_into(&mut env, &m.payload)?;
    Ok(env)
}

#[test]
fn handshake_headers_are_printable_and_decode_to_the_frame() {
    let non_ascii = Frame::Reject(Reject {
        code: 4403,
        reason: "forbidden".into(),
        message: "caf\u{e9} \u{2615} \u{1d11e}\ttab".into(),
        versions: vec![1],
        retry_after_ms: Some(250),
    });
    let frames = samples()
        .into_iter()
        .filter(|f| matches!(f, Frame::Hello(_) | Frame::Welcome(_) | Frame::Reject(_)))
        .chain([non_ascii.clone()]);
    for frame in frames {
        let header = handshake_header(&frame).unwrap();
        assert!(
            header.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "{header}"
        );
        let Transmit::Text(json) = encode(&frame, Codec::Json, 1).unwrap() else {
            panic!("a handshake frame is text");
        };
        assert_eq!(header, header_value(std::str::from_utf8(&json).unwrap()));
        assert_eq!(decode(Incoming::Text(&header), &LIMITS).unwrap(), frame);
    }
    let escaped = handshake_header(&non_ascii).unwrap();
    assert!(
        escaped.contains("caf\\u00e9 \\u2615 \\ud834\\udd1e\\ttab"),
        "{escaped}"
    );
    assert!(matches!(
        handshake_header(&Frame::Ping { nonce: 1 }),
        Err(EncodeError::Unrepresentable)
    ));
}

fn samples() -> Vec<Frame> {
    let sid = SessionId([7; 16]);
    vec![
        Frame::Hello(Hello {
            versions: vec![1],
            client: ClientId([1; 16]),
            resume: Some(Resume {
                session: sid,
                delivered: 41,
                key: Some(ResumeKey([9; 16])),
                acked: Some(3),
            }),
            caps: vec!["batch".into()],
            codecs: vec![Codec::MsgPack, Codec::Json],
            join: vec!["lobby".into(), "a \"quoted\" room".into()],
        }),
        Frame::Welcome(Welcome {
            version: 1,
            codec: Codec::MsgPack,
            session: sid,
            resumed: false,
            lost: Some("unknown_session".into()),
            delivered: 0,
            features: Vec::new().into(),
            ping_interval_ms: 30_000,
            pong_timeout_ms: 10_000,
            max_message: 1 << 20,
            key: Some(ResumeKey([5; 16])),
            recovered: false,
        }),
        Frame::Welcome(Welcome {
            version: 1,
            codec: Codec::Json,
            session: sid,
            resumed: true,
            lost: None,
            delivered: 3,
            features: vec!["batch".into()].into(),
            ping_interval_ms: 20_000,
            pong_timeout_ms: 10_000,
            max_message: 1 << 20,
            key: Some(ResumeKey([5; 16])),
            recovered: true,
        }),
        Frame::Reject(Reject {
            code: 4001,
            reason: "unsupported_version".into(),
            message: "server speaks 1".into(),
            versions: vec![1],
            retry_after_ms: None,
        }),
        Frame::Ping { nonce: 9 },
        Frame::Pong { nonce: u64::MAX },
        Frame::Ack { ack: 12 },
        Frame::Replay { from: 3 },
        Frame::GoAway {
            code: 1001,
            retry_after_ms: Some(500),
        },
        Frame::Raw(Bytes::from_static(b"\x00\x01pos")),
        Frame::Reauth { within_ms: 30_000 },
        Frame::Auth {
            token: "eyJhbGciOi.\"quoted\".sig".into(),
        },
        Frame::Msg(Msg {
            seq: 1,
            id: 77,
            ack: Some(4),
            ts: Some(1_700_000_000_000),
            kind: MsgKind::Plain,
            room: Some("lobby".into()),
            payload: Payload::json(&br#"{"x":[1,2,"\u00e9"]}"#[..]).unwrap(),
        }),
        Frame::Msg(Msg {
            seq: 2,
            id: 78,
            ack: None,
            ts: None,
            kind: MsgKind::Request,
            room: None,
            payload: Payload::binary(&b"\xff\x00bin"[..]),
        }),
        Frame::Msg(Msg {
            seq: 3,
            id: 79,
            ack: None,
            ts: None,
            kind: MsgKind::Response(78),
            room: None,
            payload: Payload::msgpack(rmp_serde::to_vec(&(1, "two")).unwrap()).unwrap(),
        }),
        Frame::Msg(Msg {
            seq: 4,
            id: 80,
            ack: None,
            ts: None,
            kind: MsgKind::MapWrite,
            room: Some("doc".into()),
            payload: Payload::json(&br#"{"n":"meta","k":"title"}"#[..]).unwrap(),
        }),
        Frame::Latest(LatestValue {
            room: "dash".into(),
            key: "cpu".into(),
            epoch: 7301,
            version: 12,
            payload: Payload::binary(&b"\x01"[..]),
        }),
        map_value(Some(Payload::json(&br#"{"t":"Q3"}"#[..]).unwrap()), Some(9)),
        map_value(None, None),
        map_value(Some(Payload::binary(&b"\xff\x00"[..])), None),
        map_value(
            Some(Payload::msgpack(vec![0x92, 0x01, 0xa1, b'x']).unwrap()),
            Some(1),
        ),
        Frame::MapSnapshot(MapSnapshot {
            room: "doc".into(),
            map: "meta".into(),
            entries: 2,
        }),
    ]
}

/// An entry of the map `meta` in the room `doc`, of key `title`.
fn map_value(value: Option<Payload>, settles: Option<u64>) -> Frame {
    Frame::MapValue(MapValue {
        room: "doc".into(),
        map: "meta".into(),
        key: "title".into(),
        stamp: crate::hlc::HlcTimestamp {
            physical_ms: 1_700_000_000_000,
            logical: 2,
            node: 7,
        },
        value,
        settles,
    })
}

pub(super) fn msg_with(payload: Payload) -> Frame {
    Frame::Msg(Msg {
        seq: 1,
        id: 1,
        ack: None,
        ts: None,
        kind: MsgKind::Plain,
        room: None,
        payload,
    })
}

pub(super) fn payload_of(frame: &Frame) -> &Bytes {
    match frame {
        Frame::Msg(m) => &m.payload.data,
        Frame::Raw(b) => b,
        other => panic!("not a msg: {other:?}"),
    }
}

fn detached_msg(payload: Payload) -> Msg {
    Msg {
        seq: 300,
        id: 70_000,
        ack: Some(5),
        ts: Some(1_700_000_000_000),
        kind: MsgKind::Response(12),
        room: Some("lobby".into()),
        payload,
    }
}

/// Every payload kind, in both codecs, goes detached and comes back
/// whole; received in a shared buffer, the payload is that buffer.
#[test]
fn detached_payloads_round_trip_and_are_shared_with_their_message() {
    let json = format!("[{}1]", "1,".repeat(3000));
    for payload in [
        Payload::json(json.into_bytes()).unwrap(),
        Payload::msgpack(msgpack_string(5000)).unwrap(),
        Payload::binary(vec![7u8; 16 * 1024]),
        Payload::binary(Vec::new()),
    ] {
        for codec in [Codec::Json, Codec::MsgPack] {
            let m = detached_msg(payload.clone());
            let [head, body] = encode_detached(&m, codec, 1).unwrap();
            assert_eq!(
                matches!(head, Transmit::Text(_)),
                codec == Codec::Json,
                "the envelope travels in the codec's kind of message"
            );
            assert!(head.len() < 100, "{head:?}");
            let Transmit::Binary(body) = body else {
                panic!("the payload is a binary message")
            };
            assert_eq!(body.as_ptr(), payload.data().as_ptr(), "not copied");
            // Alone, the envelope cannot be decoded.
            assert!(matches!(
                decode(head.as_incoming(), &LIMITS),
                Err(DecodeError::InvalidField { field: "dj", .. })
            ));
            let mut decoder = Decoder::new();
            assert_eq!(decoder.decode(head.as_incoming(), &LIMITS), Ok(None));
            assert_eq!(decoder.awaiting(), Some(payload.len()));
            let got = decoder
                .decode(Incoming::SharedBinary(&body), &LIMITS)
                .unwrap();
            assert_eq!(got, Some(Frame::Msg(m.clone())));
            assert_eq!(payload_of(got.as_ref().unwrap()).as_ptr(), body.as_ptr());
            assert_eq!(decoder.awaiting(), None);
            // Copied from a plain slice, the same message.
            assert_eq!(decoder.decode(head.as_incoming(), &LIMITS), Ok(None));
            let got = decoder.decode(Incoming::Binary(&body), &LIMITS).unwrap();
            assert_eq!(got, Some(Frame::Msg(m)));
            // Anything else goes through as with `decode`.
            let ping = encode(&Frame::Ping { nonce: 4 }, codec, 1).unwrap();
            assert_eq!(
                decoder.decode(ping.as_incoming(), &LIMITS),
                Ok(Some(Frame::Ping { nonce: 4 }))
            );
        }
    }
}

/// The encoder sends a payload detached only to a peer that can take
/// it and only from [`DETACH_FROM`] bytes up; a detached payload is the
/// message's own bytes.
#[test]
fn the_encoder_detaches_large_payloads_for_peers_that_take_them() {
    let mut encoder = Encoder::for_server();
    let mut count = |len: usize, detach: bool| {
        let m = detached_msg(Payload::binary(vec![1u8; len]));
        let mut out = Vec::new();
        encoder
            .encode_each(
                &Frame::Msg(m.clone()),
                Codec::MsgPack,
                1,
                detach,
                None,
                |t| out.push(t),
            )
            .unwrap();
        if out.len() == 2 {
            assert_eq!(out[1].data().as_ptr(), m.payload.data().as_ptr());
            let mut decoder = Decoder::new();
            assert_eq!(decoder.decode(out[0].as_incoming(), &LIMITS), Ok(None));
            assert_eq!(
                decoder.decode(out[1].as_incoming(), &LIMITS),
                Ok(Some(Frame::Msg(m)))
            );
        } else {
            assert_eq!(decode(out[0].as_incoming(), &LIMITS), Ok(Frame::Msg(m)));
        }
        out.len()
    };
    assert_eq!(count(DETACH_FROM - 1, true), 1);
    assert_eq!(count(DETACH_FROM, true), 2);
    assert_eq!(count(64 * 1024, true), 2);
    assert_eq!(count(64 * 1024, false), 1);
    assert_eq!(count(32, true), 1);
}

#[test]
fn detached_payloads_are_checked() {
    let m = detached_msg(Payload::binary(vec![1u8; 5000]));
    let [head, body] = encode_detached(&m, Codec::MsgPack, 1).unwrap();
    let mut decoder = Decoder::new();
    // The next message is not the payload: it is dropped, the numbered
    // envelope comes out invalid (to be refused by id, not stall the
    // stream), and the decoder starts afresh.
    for wrong in [
        Incoming::Binary(&body.data()[1..]),
        Incoming::Text("{\"t\":\"ping\",\"nonce\":1}"),
    ] {
        assert_eq!(decoder.decode(head.as_incoming(), &LIMITS), Ok(None));
        match decoder.decode(wrong, &LIMITS) {
            Ok(Some(Frame::Msg(Msg {
                seq,
                id,
                kind: MsgKind::Invalid(what),
                ..
            }))) => {
                assert_eq!((seq, id), (m.seq, m.id));
                assert_eq!(what.field(), "payload");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decoder.awaiting(), None);
    }
    // A payload over the limit is refused at its envelope.
    let small = Limits {
        max_message: 4999,
        version: 1,
    };
    assert_eq!(
        decoder.decode(head.as_incoming(), &small),
        Err(DecodeError::TooLarge {
            size: 5000,
            max: 4999
        })
    );
    assert_eq!(decoder.awaiting(), None);
    // A detached JSON payload must be JSON.
    let mut bad = detached_msg(Payload::json(&b"[1]"[..]).unwrap());
    bad.payload.data = Bytes::from_static(b"[1,");
    let [head, body] = encode_detached(&bad, Codec::MsgPack, 1).unwrap();
    assert_eq!(decoder.decode(head.as_incoming(), &LIMITS), Ok(None));
    // Numbered, so consumed as an invalid message rather than dropped.
    assert!(matches!(
        decoder.decode(body.as_incoming(), &LIMITS),
        Ok(Some(Frame::Msg(Msg {
            kind: MsgKind::Invalid(what),
            ..
        }))) if what.field() == "dj"
    ));
    // One payload per message, and none detached inside a batch: the
    // message is numbered, so it is consumed as an invalid message (its
    // announced payload first, when one is announced).
    let invalid = |frame: Option<Frame>| match frame {
        Some(Frame::Msg(m)) => matches!(m.kind, MsgKind::Invalid(_)),
        Some(Frame::Batch(b)) => b.iter().all(|m| matches!(m.kind, MsgKind::Invalid(_))),
        _ => false,
    };
    let mut decoder = Decoder::new();
    let text = r#"{"t":"msg","seq":1,"id":1,"j":1,"dj":1}"#;
    assert_eq!(decoder.decode(Incoming::Text(text), &LIMITS), Ok(None));
    assert!(invalid(
        decoder.decode(Incoming::Binary(b"1"), &LIMITS).unwrap()
    ));
    for text in [
        r#"{"t":"msg","seq":1,"id":1,"db":1,"dm":1}"#,
        r#"{"t":"batch","f":[{"t":"msg","seq":1,"id":1,"db":1}]}"#,
    ] {
        let frame = Decoder::new()
            .decode(Incoming::Text(text), &LIMITS)
            .unwrap();
        assert!(invalid(frame.clone()), "{text}: {frame:?}");
    }
    // Other frame types ignore the fields, as any field they do not use.
    assert_eq!(
        Decoder::new().decode(Incoming::Text(r#"{"t":"ping","nonce":2,"db":9}"#), &LIMITS),
        Ok(Some(Frame::Ping { nonce: 2 }))
    );
}

#[test]
fn every_frame_round_trips_in_both_codecs() {
    for codec in [Codec::Json, Codec::MsgPack] {
        for frame in samples() {
            let wire = encode(&frame, codec, 1).unwrap();
            let back = decode(wire.as_incoming(), &LIMITS)
                .unwrap_or_else(|e| panic!("{codec:?} {frame:?}: {e}"));
            assert_eq!(back, frame, "{codec:?}");
        }
    }
}

#[test]
fn the_quick_envelope_reader_takes_what_kitestring_writes_and_agrees_with_serde() {
    let mut frames = samples();
    frames.push(Frame::Batch(
        samples()
            .into_iter()
            .filter_map(|f| match f {
                Frame::Msg(m) => Some(m),
                _ => None,
            })
            .collect(),
    ));
    for frame in frames {
        let Transmit::Binary(wire) = encode(&frame, Codec::MsgPack, 1).unwrap() else {
            continue;
        };
        let took = assert_quick_envelope_agrees(&wire);
        // Raw frames have no envelope.
        let quick = !matches!(frame, Frame::Raw(_));
        assert_eq!(took, quick, "{frame:?}");
    }
}

#[test]
#[cfg(feature = "msgpack-serde")]
fn the_quick_envelope_reader_leaves_unusual_forms_to_serde() {
    use super::fields::pack_frame;
    use super::quick::serde_pack_envelope;
    use rmp::encode::{
        write_array_len, write_map_len, write_nil, write_sint, write_str, write_uint,
    };
    let framed = |body: Vec<u8>| {
        let mut msg = vec![KIND_MSGPACK, 1];
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(&body);
        msg
    };
    type Entry<'a> = (&'a str, &'a dyn Fn(&mut Vec<u8>));
    let map = |fields: &[Entry<'_>], extra: &[u8]| {
        let mut b = Vec::new();
        write_map_len(&mut b, fields.len() as u32).unwrap();
        for (k, v) in fields {
            write_str(&mut b, k).unwrap();
            v(&mut b);
        }
        b.extend_from_slice(extra);
        framed(b)
    };
    let ack = |b: &mut Vec<u8>| write_str(b, "ack").unwrap();
    let n = |v: u64| {
        move |b: &mut Vec<u8>| {
            write_uint(b, v).unwrap();
        }
    };
    let plain = map(&[("t", &ack), ("ack", &n(5))], &[]);
    assert!(assert_quick_envelope_agrees(&plain));
    // A batch, even an empty one (which the fields' checks then refuse).
    let empty = |b: &mut Vec<u8>| write_array_len(b, 0).map(drop).unwrap();
    assert!(assert_quick_envelope_agrees(&map(
        &[("t", &ack), ("f", &empty)],
        &[]
    )));
    let nil = |b: &mut Vec<u8>| write_nil(b).unwrap();
    let signed = |b: &mut Vec<u8>| {
        write_sint(b, -1).unwrap();
    };
    let truncated = |b: &mut Vec<u8>| b.push(0xd0); // an int8 marker, no data
    let unusual = [
        // A nil, a negative number, a truncated integer.
        map(&[("t", &ack), ("ack", &nil)], &[]),
        map(&[("t", &ack), ("ack", &signed)], &[]),
        map(&[("t", &ack), ("ack", &truncated)], &[]),
        // A key twice, an unknown key, bytes after the map.
        map(&[("t", &ack), ("ack", &n(5)), ("ack", &n(6))], &[]),
        map(&[("t", &ack), ("t", &ack)], &[]),
        map(&[("t", &ack), ("ack", &n(5)), ("extra", &n(1))], &[]),
        map(&[("t", &ack), ("ack", &n(5))], &[0xc0]),
        // No type, a code out of range.
        map(&[("ack", &n(5))], &[]),
        map(&[("t", &ack), ("code", &n(70_000))], &[]),
        // A batch in a batch, a batch longer than the limit, a batch twice.
        map(
            &[
                ("t", &ack),
                ("f", &|b: &mut Vec<u8>| {
                    write_array_len(b, 1).unwrap();
                    write_map_len(b, 2).unwrap();
                    write_str(b, "t").unwrap();
                    write_str(b, "batch").unwrap();
                    write_str(b, "f").unwrap();
                    write_array_len(b, 0).unwrap();
                }),
            ],
            &[],
        ),
        map(
            &[
                ("t", &ack),
                ("f", &|b: &mut Vec<u8>| {
                    write_array_len(b, MAX_BATCH as u32 + 1).unwrap();
                    for _ in 0..=MAX_BATCH {
                        write_map_len(b, 1).unwrap();
                        write_str(b, "t").unwrap();
                        write_str(b, "msg").unwrap();
                    }
                }),
            ],
            &[],
        ),
        map(&[("t", &ack), ("f", &empty), ("f", &empty)], &[]),
        // Not a map: the struct as an array, keys as field indexes.
        framed({
            let mut b = Vec::new();
            write_array_len(&mut b, 1).unwrap();
            write_str(&mut b, "ack").unwrap();
            b
        }),
        framed({
            let mut b = Vec::new();
            write_map_len(&mut b, 1).unwrap();
            write_uint(&mut b, 0).unwrap();
            write_str(&mut b, "ack").unwrap();
            b
        }),
    ];
    for msg in unusual {
        assert!(!assert_quick_envelope_agrees(&msg), "{msg:x?}");
        // What serde makes of it is what decoding gives.
        let body = &msg[BINARY_HEADER_LEN..];
        let expected = serde_pack_envelope(body)
            .and_then(|env| pack_frame(&env, false, None, super::compress::Inflation::OFF));
        assert_eq!(
            decode(Incoming::Binary(&msg), &LIMITS),
            expected,
            "{msg:x?}"
        );
    }
}

#[test]
fn batches_round_trip_and_are_checked() {
    let msgs: Vec<Msg> = samples()
        .into_iter()
        .filter_map(|f| match f {
            Frame::Msg(m) => Some(m),
            _ => None,
        })
        .collect();
    let batch = Frame::Batch(msgs);
    for codec in [Codec::Json, Codec::MsgPack] {
        let wire = encode(&batch, codec, 1).unwrap();
        assert_eq!(
            decode(wire.as_incoming(), &LIMITS).unwrap(),
            batch,
            "{codec:?}"
        );
    }
    let bad: &[(&str, &str)] = &[
        (
            r#"{"t":"batch","f":[]}"#,
            "a batch holds 1 to 1024 messages",
        ),
        (
            r#"{"t":"batch","f":[{"t":"ping","nonce":1}]}"#,
            "a batch holds only msg frames",
        ),
    ];
    for (text, reason) in bad {
        assert_eq!(
            decode(Incoming::Text(text), &LIMITS).unwrap_err(),
            DecodeError::InvalidField { field: "f", reason },
            "{text}"
        );
    }
    match decode(
        Incoming::Text(r#"{"t":"batch","f":[{"t":"batch","f":[]}]}"#),
        &LIMITS,
    ) {
        // Refused by serde, or, without it, by the hand-written reader.
        Err(DecodeError::Json { message, .. }) => {
            assert!(message.contains("do not nest") || !cfg!(feature = "json-serde"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        decode(Incoming::Text(r#"{"t":"batch"}"#), &LIMITS).unwrap_err(),
        DecodeError::MissingField {
            frame: "batch",
            field: "f"
        }
    );
}

#[test]
fn json_payloads_are_stored_without_surrounding_whitespace() {
    let p = Payload::json(&b" \n 1 \t"[..]).unwrap();
    assert_eq!(&p.data()[..], b"1");
    let f = msg_with(p);
    for codec in [Codec::Json, Codec::MsgPack] {
        let wire = encode(&f, codec, 1).unwrap();
        assert_eq!(decode(wire.as_incoming(), &LIMITS).unwrap(), f, "{codec:?}");
    }
}

#[test]
fn hand_written_json_matches_serde() {
    let payloads = [
        Payload::json(&br#"{"a":[1,"\u00e9\n"]}"#[..]).unwrap(),
        Payload::null(),
        Payload::binary(&b"\x00\xff binary"[..]),
        Payload::msgpack(vec![0x92, 0x01, 0xa1, b'x']).unwrap(),
    ];
    let kinds = [
        MsgKind::Plain,
        MsgKind::Request,
        MsgKind::Response(9),
        MsgKind::Join,
        MsgKind::Presence,
        MsgKind::MapWrite,
    ];
    for payload in &payloads {
        for kind in kinds {
            for room in [None, Some("lobby"), Some("quo\"te\\ \u{1}")] {
                let m = Msg {
                    seq: 7,
                    id: u64::MAX,
                    ack: Some(3),
                    ts: (kind == MsgKind::Plain).then_some(1_700_000_000_000),
                    kind,
                    room: room.map(std::sync::Arc::from),
                    payload: payload.clone(),
                };
                let mut ours = Vec::new();
                write_json_msg(&m, &mut ours, Form::Embedded).unwrap();
                let theirs = serde_json::to_vec(&json_msg(&m).unwrap()).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&ours),
                    String::from_utf8_lossy(&theirs)
                );
            }
        }
    }
}

#[test]
fn hand_written_msgpack_matches_serde() {
    // Lengths on each side of MessagePack's size classes: fixstr/str8
    // at 31/32, str8/str16 and bin8/bin16 at 255/256, 16/32 bits at
    // 65 535/65 536.
    let sizes = [0usize, 1, 31, 32, 255, 256, 65_535, 65_536];
    let mut payloads = vec![Payload::null()];
    for n in sizes {
        payloads.push(Payload::binary(vec![0xa5; n]));
        payloads.push(Payload::msgpack(msgpack_string(n)).unwrap());
        payloads.push(Payload::json(format!("\"{}\"", "x".repeat(n.saturating_sub(2)))).unwrap());
    }
    let ints = [
        0u64,
        1,
        127,
        128,
        255,
        256,
        65_535,
        65_536,
        u64::from(u32::MAX),
        u64::from(u32::MAX) + 1,
        u64::MAX,
    ];
    let kinds = [
        MsgKind::Plain,
        MsgKind::Request,
        MsgKind::Response(9),
        MsgKind::Response(u64::MAX),
        MsgKind::Join,
        MsgKind::Leave,
        MsgKind::Presence,
        MsgKind::MapWrite,
    ];
    let long_room = "r".repeat(MAX_TOKEN_LEN);
    let rooms = [
        None,
        Some("lobby"),
        Some(&"é".repeat(16)[..]),
        Some(&long_room[..]),
    ];
    let check = |m: &Msg| {
        let mut ours = Vec::new();
        write_pack_msg(m, &mut ours, Form::Embedded).unwrap();
        let theirs = rmp_serde::to_vec_named(&pack_msg(m).unwrap()).unwrap();
        assert!(ours == theirs, "{m:?}");
    };
    for payload in &payloads {
        for kind in kinds {
            for room in rooms {
                check(&Msg {
                    seq: 7,
                    id: 300,
                    ack: Some(3),
                    ts: (kind == MsgKind::Plain).then_some(1_700_000_000_000),
                    kind,
                    room: room.map(std::sync::Arc::from),
                    payload: payload.clone(),
                });
            }
        }
    }
    for (i, &n) in ints.iter().enumerate() {
        let other = ints[(i + 3) % ints.len()];
        for (ack, ts) in [
            (None, None),
            (Some(n), None),
            (None, Some(other)),
            (Some(other), Some(n)),
        ] {
            check(&Msg {
                seq: n,
                id: other,
                ack,
                ts,
                kind: MsgKind::Plain,
                room: None,
                payload: Payload::binary(&b"x"[..]),
            });
        }
    }
    // A batch of them, too.
    let batch = Frame::Batch(
        (1..4)
            .map(|i| Msg {
                seq: i,
                id: i + 10,
                ack: None,
                ts: None,
                kind: MsgKind::Plain,
                room: Some(std::sync::Arc::from("lobby")),
                payload: Payload::binary(vec![1u8; 40]),
            })
            .collect(),
    );
    let ours = encode(&batch, Codec::MsgPack, 1).unwrap();
    let Frame::Batch(msgs) = &batch else {
        unreachable!()
    };
    let env = PackEnvelope {
        t: "batch".into(),
        f: Some(msgs.iter().map(|m| pack_msg(m).unwrap()).collect()),
        ..PackEnvelope::default()
    };
    let theirs = rmp_serde::to_vec_named(&env).unwrap();
    assert_eq!(&ours.data()[BINARY_HEADER_LEN..], &theirs[..]);
    assert_eq!(decode(ours.as_incoming(), &LIMITS).unwrap(), batch);
}

/// A MessagePack string of `n` bytes, as a payload's encoded value.
fn msgpack_string(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_str(&mut out, &"s".repeat(n)).unwrap();
    out
}

/// Found by the `decode_msgpack` and `decode_binary_header` fuzz targets:
/// a 14-byte envelope declaring a batch of 65 535 entries made the
/// decoder reserve about 1 MiB before reading any of them.
#[test]
fn declared_batch_lengths_are_not_trusted() {
    struct Lying;
    impl Iterator for Lying {
        type Item = u8;
        fn next(&mut self) -> Option<u8> {
            None
        }
        fn size_hint(&self) -> (usize, Option<usize>) {
            (1_000_000, Some(1_000_000))
        }
    }
    let de = serde::de::value::SeqDeserializer::<_, serde::de::value::Error>::new(Lying);
    let v: Option<Vec<u8>> = bounded_batch(de).unwrap();
    assert!(v.unwrap().capacity() <= 4);

    let crash: &[u8] = &[0x85, 0xa1, 0x66, 0xdc, 0x92, 0x8c, 0x67, 0xdc];
    let mut frame = vec![KIND_MSGPACK, 1];
    frame.extend_from_slice(&(crash.len() as u32).to_le_bytes());
    frame.extend_from_slice(crash);
    assert!(matches!(
        decode(Incoming::Binary(&frame), &LIMITS),
        Err(DecodeError::MsgPack { .. })
    ));

    // Found next: batches nested inside batches, each declaring 65 535
    // entries, reserved room at every level before the nesting was refused.
    let nested: &[u8] = &[
        0x83, 0xa1, 0x67, 0xd1, 0x1b, 0x13, 0x12, 0xdc, 0xff, 0xff, 0x83, 0xa1, 0x67, 0xd1, 0x1b,
        0x13, 0x12, 0xdc, 0xff, 0xff, 0x1b, 0x1b, 0xff,
    ];
    let mut frame = vec![KIND_MSGPACK, 1];
    frame.extend_from_slice(&(nested.len() as u32).to_le_bytes());
    frame.extend_from_slice(nested);
    match decode(Incoming::Binary(&frame), &LIMITS) {
        // Refused by serde, or, without it, by the hand-written reader.
        Err(DecodeError::MsgPack { message }) => assert!(
            message.contains("do not nest") || !cfg!(feature = "msgpack-serde"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    // The flag is cleared after an error: the next batch decodes.
    let ok = encode(&Frame::Batch(vec![]), Codec::MsgPack, 1);
    assert!(ok.is_ok());
}

#[test]
fn a_null_payload_is_a_payload() {
    for codec in [Codec::Json, Codec::MsgPack] {
        let f = msg_with(Payload::null());
        let wire = encode(&f, codec, 1).unwrap();
        assert_eq!(decode(wire.as_incoming(), &LIMITS).unwrap(), f, "{codec:?}");
    }
}

#[test]
fn handshake_is_always_json_text() {
    for frame in &samples()[..3] {
        assert!(matches!(
            encode(frame, Codec::MsgPack, 1).unwrap(),
            Transmit::Text(_)
        ));
    }
}

#[test]
fn json_envelope_is_readable() {
    let msg = samples()
        .into_iter()
        .find(|f| matches!(f, Frame::Msg(m) if m.seq == 1))
        .unwrap();
    let t = encode(&msg, Codec::Json, 1).unwrap();
    let Transmit::Text(b) = t else { panic!() };
    assert_eq!(
        std::str::from_utf8(&b).unwrap(),
        r#"{"t":"msg","seq":1,"id":77,"ack":4,"ts":1700000000000,"j":{"x":[1,2,"\u00e9"]},"r":"lobby"}"#
    );
}

#[test]
fn size_is_checked_before_parsing() {
    let big = "x".repeat(100);
    let e = decode(
        Incoming::Text(&big),
        &Limits {
            max_message: 10,
            version: 1,
        },
    )
    .unwrap_err();
    assert_eq!(e, DecodeError::TooLarge { size: 100, max: 10 });
}

#[test]
fn errors_name_the_problem() {
    let cases: &[(&str, DecodeError)] = &[
        (
            r#"{"t":"msg","id":1,"j":1}"#,
            DecodeError::MissingField {
                frame: "msg",
                field: "seq",
            },
        ),
        (
            r#"{"t":"msg","seq":0,"id":1,"j":1}"#,
            DecodeError::InvalidField {
                field: "seq",
                reason: "sequence numbers start at 1",
            },
        ),
        (
            r#"{"t":"ping"}"#,
            DecodeError::MissingField {
                frame: "ping",
                field: "nonce",
            },
        ),
        (
            r#"{"t":"hello","versions":[1],"client":"zz"}"#,
            DecodeError::InvalidField {
                field: "client",
                reason: "not 32 hex digits",
            },
        ),
        (
            r#"{"t":"hello","versions":[1],"client":"0102030405060708090a0b0c0d0e0f10","join":["a",""]}"#,
            DecodeError::InvalidField {
                field: "join",
                reason: "room names are 1 to 256 bytes",
            },
        ),
    ];
    for (text, want) in cases {
        assert_eq!(
            &decode(Incoming::Text(text), &LIMITS).unwrap_err(),
            want,
            "{text}"
        );
    }
    assert!(matches!(
        decode(Incoming::Text("{not json"), &LIMITS),
        Err(DecodeError::Json { line: 1, .. })
    ));
}

/// A `msg` whose `seq` and `id` can be read decodes, whatever else is
/// wrong with it, as an invalid message carrying those numbers and the
/// reason, in both codecs; one whose numbers cannot be read stays a
/// decode error.
#[test]
// Fields of the wrong type are serde's to read, in both codecs.
#[cfg(all(feature = "json-serde", feature = "msgpack-serde"))]
fn numbered_messages_with_bad_fields_decode_as_invalid_messages() {
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    let cases = [
        (
            r#"{"t":"msg","seq":3,"id":9,"j":1,"op":"x","r":"a"}"#.to_owned(),
            "op",
        ),
        (
            r#"{"t":"msg","seq":3,"id":9,"j":1,"op":"join"}"#.to_owned(),
            "r",
        ),
        (r#"{"t":"msg","seq":3,"id":9,"j":1,"r":""}"#.to_owned(), "r"),
        (
            r#"{"t":"msg","seq":3,"id":9,"j":1,"r":[1]}"#.to_owned(),
            "msg",
        ),
        (
            r#"{"t":"msg","seq":3,"id":9,"j":1,"rq":true,"rs":1}"#.to_owned(),
            "rs",
        ),
        (r#"{"t":"msg","seq":3,"id":9}"#.to_owned(), "j"),
        (
            r#"{"t":"msg","seq":3,"id":9,"ack":"x","j":1}"#.to_owned(),
            "msg",
        ),
        (
            r#"{"t":"msg","seq":3,"id":9,"ack":-1,"j":1}"#.to_owned(),
            "msg",
        ),
        (format!(r#"{{"t":"msg","seq":3,"id":9,"j":{deep}}}"#), "j"),
    ];
    for (text, field) in &cases {
        let mut value: serde_json::Value = serde_json::from_str(text).unwrap();
        if let Some(j) = value.get_mut("j") {
            // MessagePack carries JSON payloads as text.
            if j.is_array() {
                *j = serde_json::Value::String(j.to_string());
            }
        }
        let body = rmp_serde::to_vec_named(&value).unwrap();
        let mut bin = vec![KIND_MSGPACK, 1];
        bin.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bin.extend_from_slice(&body);
        for (json, msg) in [
            (true, Incoming::Text(text)),
            (false, Incoming::Binary(&bin)),
        ] {
            match decode(msg, &LIMITS) {
                Ok(Frame::Msg(Msg {
                    seq: 3,
                    id: 9,
                    kind: MsgKind::Invalid(what),
                    ..
                })) => {
                    // In MessagePack `j` must be a string: these
                    // envelopes fail as a whole there.
                    if json {
                        assert_eq!(what.field(), *field, "{text}: {what:?}");
                    }
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }
    let base64 = r#"{"t":"msg","seq":3,"id":9,"b":"!!"}"#;
    assert!(matches!(
        decode(Incoming::Text(base64), &LIMITS),
        Ok(Frame::Msg(Msg {
            kind: MsgKind::Invalid(what),
            ..
        })) if what.field() == "b"
    ));
    for text in [
        r#"{"t":"msg","id":9,"j":1,"r":""}"#,
        r#"{"t":"msg","seq":"3","id":9,"j":1}"#,
        r#"{"t":"msg","seq":0,"id":9,"j":1}"#,
    ] {
        assert!(decode(Incoming::Text(text), &LIMITS).is_err(), "{text}");
    }
    // Invalid messages are never encoded.
    let invalid = Msg::invalid(
        1,
        1,
        None,
        InvalidMsg::named("r", "room names are 1 to 256 bytes"),
    );
    assert_eq!(
        encode(&Frame::Msg(invalid), Codec::Json, 1),
        Err(EncodeError::Unrepresentable)
    );
    // A refusal by id round-trips in both codecs.
    let refusal = Frame::Msg(Msg {
        seq: 1,
        id: 2,
        ack: Some(0),
        ts: None,
        kind: MsgKind::RefusedMessage(77),
        room: None,
        payload: Payload::null(),
    });
    for codec in [Codec::Json, Codec::MsgPack] {
        let t = encode(&refusal, codec, 1).unwrap();
        assert_eq!(decode(t.as_incoming(), &LIMITS).unwrap(), refusal);
    }
}

/// Every reason an invalid message can carry is kept exactly, in one
/// byte: a message is no larger for the rare bad one.
#[test]
fn invalid_messages_keep_their_reason_in_a_byte() {
    for &(field, reason) in INVALID {
        let what = InvalidMsg::named(field, reason);
        assert_eq!((what.field(), what.reason()), (field, reason));
        let e = DecodeError::InvalidField { field, reason };
        assert_eq!(InvalidMsg::of(&e).error(), e);
    }
    assert!(INVALID.len() <= usize::from(u8::MAX));
    assert!(core::mem::size_of::<MsgKind>() <= 16);
}

#[test]
fn json_payloads_nest_at_most_64_deep() {
    let at = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
    assert!(Payload::json(at(64).into_bytes()).is_ok());
    assert_eq!(
        Payload::json(at(65).into_bytes()),
        Err(PayloadError::TooDeep)
    );
    // Brackets inside strings do not count.
    let quoted = format!(r#"["{}"]"#, "[".repeat(500));
    assert!(Payload::json(quoted.into_bytes()).is_ok());
    let escaped = format!(r#"["\"{}"]"#, "[".repeat(500));
    assert!(Payload::json(escaped.into_bytes()).is_ok());
    assert_eq!(
        Payload::json(at(200_000).into_bytes()),
        Err(PayloadError::TooDeep)
    );
}

#[test]
fn binary_header_is_validated() {
    assert_eq!(
        decode(Incoming::Binary(&[1, 1, 0]), &LIMITS).unwrap_err(),
        DecodeError::ShortHeader { len: 3 }
    );
    assert_eq!(
        decode(Incoming::Binary(&[9, 1, 0, 0, 0, 0]), &LIMITS).unwrap_err(),
        DecodeError::UnknownBinaryKind { kind: 9 }
    );
    assert_eq!(
        decode(Incoming::Binary(&[2, 2, 0, 0, 0, 0]), &LIMITS).unwrap_err(),
        DecodeError::VersionMismatch {
            got: 2,
            expected: 1
        }
    );
    assert_eq!(
        decode(Incoming::Binary(&[2, 1, 5, 0, 0, 0, 1]), &LIMITS).unwrap_err(),
        DecodeError::LengthMismatch {
            declared: 5,
            actual: 1
        }
    );
}

#[test]
fn unknown_types_and_fields_are_tolerated() {
    let f = decode(Incoming::Text(r#"{"t":"future","zz":[1]}"#), &LIMITS).unwrap();
    assert_eq!(f, Frame::Unknown("future".into()));
    let f = decode(
        Incoming::Text(r#"{"t":"ping","nonce":3,"extra":{"a":1}}"#),
        &LIMITS,
    )
    .unwrap();
    assert_eq!(f, Frame::Ping { nonce: 3 });
    let hello = r#"{"t":"hello","versions":[1],"client":"0102030405060708090a0b0c0d0e0f10","codecs":["cbor","json"],"caps":["teleport"]}"#;
    let Frame::Hello(h) = decode(Incoming::Text(hello), &LIMITS).unwrap() else {
        panic!()
    };
    assert_eq!(h.codecs, vec![Codec::Json]);
    assert_eq!(h.caps, vec![super::CapName::from("teleport")]);
}

#[test]
fn payload_constructors_validate() {
    assert!(Payload::json(&b"{\"a\":1}"[..]).is_ok());
    assert!(Payload::json(&b"{\"a\":"[..]).is_err());
    assert!(Payload::json(&b"1 2"[..]).is_err());
    assert!(Payload::msgpack(vec![0x92, 0x01, 0x02]).is_ok());
    assert!(Payload::msgpack(vec![0x92, 0x01]).is_err());
    assert!(Payload::msgpack(vec![0x01, 0x02]).is_err());
}

#[test]
fn the_hand_written_envelope_writer_matches_serde() {
    let bytes = serde_bytes::Bytes::new(&[1, 2, 3]);
    let long = "\u{e9}".repeat(200);
    let ints = [0u64, 127, 128, 255, 256, 65_535, 65_536, u64::MAX];
    let full = |n: u64| PackEnvelope {
        t: "pub".into(),
        seq: Some(n),
        id: Some(n / 2),
        ack: Some(n / 3),
        ts: Some(n),
        j: Some("{}".into()),
        m: Some(bytes),
        b: Some(bytes),
        nonce: Some(n),
        from: Some(n),
        code: Some(u16::try_from(n % 65_536).unwrap()),
        retry: Some(n),
        r: Some("lobby".into()),
        op: Some(long.as_str().into()),
        rq: Some(n % 2 == 0),
        rs: Some(n),
        within: Some(n),
        token: Some("t".into()),
        f: None,
        dj: Some(n),
        dm: Some(n),
        db: Some(n),
        e: Some(n),
        k: Some("key".into()),
        n: Some(long.as_str().into()),
        hl: Some(n / 5),
        hn: Some(n),
        #[cfg(feature = "compression")]
        z: Some(n),
        #[cfg(feature = "compression")]
        zj: Some(bytes),
        #[cfg(feature = "compression")]
        zm: Some(bytes),
        #[cfg(feature = "compression")]
        zb: Some(bytes),
    };
    let mut envelopes: Vec<PackEnvelope<'_>> = ints.iter().map(|&n| full(n)).collect();
    envelopes.push(PackEnvelope {
        t: "ack".into(),
        ack: Some(5),
        ..PackEnvelope::default()
    });
    envelopes.push(PackEnvelope {
        t: "subs".into(),
        f: Some(ints.iter().map(|&n| full(n)).collect()),
        ..PackEnvelope::default()
    });
    for env in &envelopes {
        let mut ours = Vec::new();
        write_pack_envelope(env, &mut ours).unwrap();
        assert!(ours == rmp_serde::to_vec_named(env).unwrap(), "{}", env.t);
    }
}

#[test]
fn the_hand_written_msgpack_check_agrees_with_rmp_serde() {
    use serde::Deserialize as _;
    let serde_end = |data: &[u8]| {
        let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(data));
        de.set_max_depth(MAX_MSGPACK_DEPTH);
        serde::de::IgnoredAny::deserialize(&mut de)
            .ok()
            .map(|_| de.position() as usize)
    };
    let nested = |depth: usize, open: u8| {
        let mut v = vec![open; depth];
        v.push(0xc0);
        if open == 0x81 {
            // A map's values: one key (nil) before each nested map.
            v = (0..depth).flat_map(|_| [0x81, 0xc0]).collect();
            v.push(0xc0);
        }
        v
    };
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xc1],
        vec![0xc0, 0xc0],
        vec![0xa3, b'a', 0xff, 0xfe], // not UTF-8
        vec![0xd9, 2, b'h'],          // truncated str8
        vec![0xc7, 1, 5, 9],          // ext8
        vec![0xc7, 1, 5],             // truncated ext8
        vec![0xd4, 1, 2],             // fixext1
        vec![0xd8, 1],                // truncated fixext16
        vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0],
        vec![0xdf, 0, 0, 0, 1, 0xc0, 0xc0],
        vec![0xde, 0, 1, 0xc0],
        vec![0x92, 0x90, 0x80],
        vec![0x93, 0x91, 0x91, 0xc0, 0xc3, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![0xcf, 1, 2, 3, 4, 5, 6, 7, 8],
        vec![0xcf, 1, 2, 3],
        vec![0xc6, 0, 0, 0, 2, 1, 2],
        vec![0xc6, 0xff, 0xff, 0xff, 0xff, 1],
    ];
    for depth in MAX_MSGPACK_DEPTH - 2..MAX_MSGPACK_DEPTH + 3 {
        cases.push(nested(depth, 0x91));
        cases.push(nested(depth, 0x81));
        cases.push(vec![0x91; depth].into_iter().chain([0x90]).collect());
    }
    for byte in 0..=255u8 {
        cases.push(vec![
            byte, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
    }
    for case in &cases {
        assert_eq!(msgpack_value_end(case).ok(), serde_end(case), "{case:x?}");
    }
}

#[test]
fn the_quick_json_reader_takes_what_kitestring_writes_and_agrees_with_serde() {
    let mut frames = samples();
    frames.push(Frame::Batch(
        samples()
            .into_iter()
            .filter_map(|f| match f {
                Frame::Msg(m) => Some(m),
                _ => None,
            })
            .collect(),
    ));
    for frame in frames {
        let Transmit::Text(wire) = encode(&frame, Codec::Json, 1).unwrap() else {
            continue;
        };
        let text = std::str::from_utf8(&wire).unwrap();
        assert!(assert_quick_json_agrees(text), "{text}");
        // The hand-written writers write what serde writes: serde writes
        // back exactly the text it read.
        let again = if matches!(
            frame,
            Frame::Hello(_) | Frame::Welcome(_) | Frame::Reject(_)
        ) {
            let env: super::envelope::HandshakeEnvelope<'_> = serde_json::from_str(text).unwrap();
            serde_json::to_string(&env).unwrap()
        } else {
            let env: super::envelope::JsonEnvelope<'_> = serde_json::from_str(text).unwrap();
            serde_json::to_string(&env).unwrap()
        };
        assert_eq!(again, text);
    }
}

#[test]
fn the_quick_json_reader_takes_any_ordinary_writers_forms() {
    for text in [
        " {\"nonce\" : 5 ,\"t\":\"ping\", \"x\":[{\"y\":null},-1.5e3,true]}\n",
        r#"{"t":"msg","seq":1,"id":2,"j":{"a":[1,"\u00e9\ud83d\ude00"]},"r":null,"ts":null}"#,
        r#"{"t":"msg","seq":1,"id":2,"j":null,"r":"a\"b\\c\/\n","op":"join"}"#,
        r#"{"t":"batch","f":[{"t":"msg","seq":1,"id":2,"b":"AAE="}]}"#,
        r#"{"t":"welcome","version":1,"codec":"json","session":"00000000000000000000000000000001","ping_ms":1,"pong_ms":2,"max":3,"features":[],"lost":null,"extra":{}}"#,
        r#"{"t":"reject","code":4002,"reason":"bad_hello","versions":[1,2]}"#,
        r#"{"t":"hello","versions":[1],"client":"0102030405060708090a0b0c0d0e0f10","join":["lobby","a\u0000b"]}"#,
    ] {
        assert!(assert_quick_json_agrees(text), "{text}");
    }
}

#[test]
fn the_quick_json_reader_leaves_unusual_forms_to_serde() {
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    for text in [
        // An envelope as an array, which serde reads by position.
        r#"["ping",null,null,null,null,null,null,null,7]"#.to_owned(),
        r#"{"\u0074":"ping","nonce":1}"#.to_owned(),
        r#"{"t":"ping","nonce":-0}"#.to_owned(),
        r#"{"t":"ping","nonce":1.0}"#.to_owned(),
        r#"{"t":"ping","nonce":007}"#.to_owned(),
        r#"{"t":"ping","nonce":null,"nonce":1}"#.to_owned(),
        r#"{"t":"ping","nonce":18446744073709551616}"#.to_owned(),
        r#"{"t":"ping","r":"\ud800"}"#.to_owned(),
        r#"{"t":"batch","f":null}"#.to_owned(),
        r#"{"t":"batch","f":[{"t":"batch","f":[]}]}"#.to_owned(),
        format!(r#"{{"t":"ping","nonce":1,"x":{deep}}}"#),
        r#"{"t":"ping","nonce":1} x"#.to_owned(),
        r#"{"t":"hello","versions":[256]}"#.to_owned(),
    ] {
        assert!(!assert_quick_json_agrees(&text), "{text}");
    }
    // What serde then makes of them is unchanged: an escaped key read as
    // the key, and the errors it always gave.
    #[cfg(feature = "json-serde")]
    {
        let ping = decode(Incoming::Text(r#"{"t":"ping","nonce":1}"#), &LIMITS);
        assert_eq!(ping, Ok(Frame::Ping { nonce: 1 }));
        let bad = decode(Incoming::Text(r#"{"t":"ping","nonce":1.0}"#), &LIMITS);
        assert!(
            matches!(&bad, Err(DecodeError::Json { message, .. }) if message.contains("invalid type")),
            "{bad:?}"
        );
    }
}

#[test]
fn the_json_value_check_is_serdes() {
    let texts = [
        "0",
        "-0",
        "01",
        "-",
        "1.",
        "1.5",
        "1e",
        "1e+5",
        "1E-0",
        ".5",
        "-a",
        "tru",
        "nul",
        "null",
        " true ",
        "1 2",
        "[1,]",
        "[,1]",
        "{\"a\":1,}",
        "{\"a\" 1}",
        "{1:2}",
        "[]",
        "{}",
        "[[],{}]",
        "\"\\ud800\"",
        "\"\\u12g4\"",
        "\"\\x\"",
        "\"\u{1}\"",
        "\"\u{7f}\"",
        "\"\\/\"",
        "",
        " ",
        "\"",
        "[",
        "{\"a\":[1,{\"b\":null}]}",
        "1\n",
        "\t[1]\r",
    ];
    for text in texts {
        assert_quick_json_agrees(text);
    }
    for bytes in [&b"\"\xff\""[..], b"\xff", b"[\"\xc3\xa9\"]", b"1 \xff"] {
        let ours = super::json::json_value(bytes).ok();
        let theirs = serde_json::from_slice::<&serde_json::value::RawValue>(bytes).is_ok();
        assert_eq!(ours.is_some(), theirs, "{bytes:?}");
    }
}

#[test]
fn json_strings_are_escaped_as_serde_escapes_them() {
    let all: String = (0u8..0x80)
        .map(char::from)
        .chain(['é', '\u{2028}', '😀'])
        .collect();
    let mut ours = Vec::new();
    push_json_str(&mut ours, &all);
    assert_eq!(ours, serde_json::to_vec(&all).unwrap());
}

#[test]
fn json_numbers_are_read_near_enough_for_settings() {
    let read = |text: &str| JsonReader::new(text).number();
    for (text, want) in [
        ("0", 0.0),
        ("-2.5", -2.5),
        ("1500.25", 1500.25),
        ("0.000001", 0.000_001),
        ("1e3", 1000.0),
        ("1E-2", 0.01),
        ("25e-1", 2.5),
        ("9007199254740993", 9_007_199_254_740_992.0),
        ("123456789012345678901234", 1.234_567_890_123_456_8e23),
        ("0.1", 0.1),
    ] {
        let got = read(text).unwrap();
        assert!((got - want).abs() <= want.abs() * 1e-15, "{text}: {got}");
    }
    assert_eq!(read("1e309"), None);
    assert_eq!(read("-"), None);
    assert_eq!(read("01"), None);
    assert_eq!(read("1e-400"), Some(0.0));
}

/// `lv` frames round-trip in both codecs, and their fields are checked.
#[test]
fn latest_values_round_trip_and_are_checked() {
    let v = Frame::Latest(LatestValue {
        room: "dash".into(),
        key: "cpu".into(),
        epoch: 7301,
        version: 12,
        payload: Payload::json(b"{\"v\":0.9}".to_vec()).unwrap(),
    });
    let limits = Limits {
        max_message: 1 << 20,
        version: 1,
    };
    for codec in [Codec::Json, Codec::MsgPack] {
        let t = encode(&v, codec, 1).unwrap();
        assert_eq!(decode(t.as_incoming(), &limits).unwrap(), v, "{codec:?}");
    }
    let t = encode(&v, Codec::Json, 1).unwrap();
    assert_eq!(
        std::str::from_utf8(t.data()).unwrap(),
        r#"{"t":"lv","seq":12,"j":{"v":0.9},"r":"dash","e":7301,"k":"cpu"}"#
    );
    for (bad, field) in [
        (
            r#"{"t":"lv","seq":0,"j":1,"r":"dash","e":1,"k":"cpu"}"#,
            "seq",
        ),
        (r#"{"t":"lv","seq":1,"j":1,"r":"dash","e":1,"k":""}"#, "k"),
        (
            r#"{"t":"lv","seq":1,"j":1,"r":"dash","e":9007199254740992,"k":"a"}"#,
            "e",
        ),
    ] {
        match decode(Incoming::Text(bad), &limits) {
            Err(DecodeError::InvalidField { field: f, .. }) => assert_eq!(f, field, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    for (bad, field) in [
        (r#"{"t":"lv","seq":1,"j":1,"e":1,"k":"a"}"#, "r"),
        (r#"{"t":"lv","seq":1,"j":1,"r":"dash","k":"a"}"#, "e"),
        (r#"{"t":"lv","seq":1,"j":1,"r":"dash","e":1}"#, "k"),
    ] {
        match decode(Incoming::Text(bad), &limits) {
            Err(DecodeError::MissingField { field: f, .. }) => assert_eq!(f, field, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

/// A frame through the stream decoder: the messages of one frame in order.
fn receive(sent: &[Transmit]) -> Result<Option<Frame>, DecodeError> {
    let mut decoder = Decoder::new();
    let mut frame = None;
    for t in sent {
        frame = decoder.decode(t.as_incoming(), &LIMITS)?;
    }
    Ok(frame)
}

/// `mv` frames round-trip in both codecs with each kind of value, a
/// delete, with and without `settles`, through the hand-written readers
/// (which serde agrees with) and the stream decoder; `ms` frames too.
#[test]
fn map_values_and_snapshots_round_trip_in_both_codecs() {
    let values = [
        Some(Payload::json(&br#"{"title":"Q3","tags":["a","\u00e9"]}"#[..]).unwrap()),
        Some(Payload::null()),
        Some(Payload::msgpack(rmp_serde::to_vec(&(1, "two")).unwrap()).unwrap()),
        Some(Payload::binary(&b"\x00\xffbin"[..])),
        Some(Payload::binary(Vec::new())),
        None,
    ];
    let mut frames = Vec::new();
    for value in &values {
        for settles in [None, Some(0), Some(u64::MAX)] {
            frames.push(map_value(value.clone(), settles));
        }
    }
    // The stamp at its bounds, names and keys at theirs.
    let long = "\u{e9}".repeat(MAX_TOKEN_LEN / 2);
    frames.push(Frame::MapValue(MapValue {
        room: "r".into(),
        map: long.as_str().into(),
        key: "k".into(),
        stamp: crate::hlc::HlcTimestamp {
            physical_ms: MAX_EPOCH - 1,
            logical: u32::MAX,
            node: MAX_EPOCH - 1,
        },
        value: None,
        settles: None,
    }));
    frames.push(Frame::MapValue(MapValue {
        room: long.as_str().into(),
        map: "m".into(),
        key: long.as_str().into(),
        stamp: crate::hlc::HlcTimestamp::MIN,
        value: Some(Payload::json(&b"0"[..]).unwrap()),
        settles: Some(3),
    }));
    for entries in [0, 1, MAX_MAP_ENTRIES] {
        frames.push(Frame::MapSnapshot(MapSnapshot {
            room: "doc".into(),
            map: long.as_str().into(),
            entries,
        }));
    }
    for frame in &frames {
        for codec in [Codec::Json, Codec::MsgPack] {
            let t = encode(frame, codec, 1).unwrap();
            assert_eq!(
                decode(t.as_incoming(), &LIMITS).as_ref(),
                Ok(frame),
                "{codec:?}"
            );
            assert_eq!(
                receive(std::slice::from_ref(&t)),
                Ok(Some(frame.clone())),
                "{codec:?}"
            );
            match &t {
                Transmit::Text(b) => {
                    let text = std::str::from_utf8(b).unwrap();
                    assert!(assert_quick_json_agrees(text), "{text}");
                    // The hand-written writer writes what serde writes.
                    let env: JsonEnvelope<'_> = serde_json::from_str(text).unwrap();
                    assert_eq!(serde_json::to_string(&env).unwrap(), text);
                }
                Transmit::Binary(b) => {
                    assert!(assert_quick_envelope_agrees(b), "{frame:?}");
                    let env = super::quick::serde_pack_envelope(&b[BINARY_HEADER_LEN..]).unwrap();
                    let theirs = rmp_serde::to_vec_named(&env).unwrap();
                    assert_eq!(&b[BINARY_HEADER_LEN..], &theirs[..], "{frame:?}");
                }
            }
        }
    }
    // A delete carries no payload field at all; `"j":null` is a value.
    let delete = encode(&map_value(None, None), Codec::Json, 1).unwrap();
    let text = std::str::from_utf8(delete.data()).unwrap();
    assert!(!text.contains(r#""j""#), "{text}");
    let null = r#"{"t":"mv","ts":1,"j":null,"r":"doc","k":"a","n":"m","hl":0,"hn":0}"#;
    assert!(matches!(
        decode(Incoming::Text(null), &LIMITS),
        Ok(Frame::MapValue(MapValue { value: Some(p), .. })) if p == Payload::null()
    ));
}

/// The exact JSON text of an `mv` and an `ms` (PROTOCOL.md, section 3.6).
#[test]
fn map_frames_are_readable_json() {
    let text = |frame: &Frame| {
        let t = encode(frame, Codec::Json, 1).unwrap();
        String::from_utf8(t.data().to_vec()).unwrap()
    };
    let mv = map_value(Some(Payload::json(&br#"{"t":"Q3"}"#[..]).unwrap()), Some(9));
    assert_eq!(
        text(&mv),
        r#"{"t":"mv","id":9,"ts":1700000000000,"j":{"t":"Q3"},"r":"doc","k":"title","n":"meta","hl":2,"hn":7}"#
    );
    assert_eq!(
        text(&map_value(None, None)),
        r#"{"t":"mv","ts":1700000000000,"r":"doc","k":"title","n":"meta","hl":2,"hn":7}"#
    );
    let ms = Frame::MapSnapshot(MapSnapshot {
        room: "doc".into(),
        map: "meta".into(),
        entries: 2,
    });
    assert_eq!(text(&ms), r#"{"t":"ms","seq":2,"r":"doc","n":"meta"}"#);
    let write = MapWriteBody {
        map: "meta".into(),
        key: "title".into(),
        value: Some(Payload::json(&br#""Q3""#[..]).unwrap()),
        stamp: Some(crate::hlc::HlcTimestamp {
            physical_ms: 1_700_000_000_000,
            logical: 4,
            node: 77,
        }),
    };
    let mset = Frame::Msg(Msg {
        seq: 5,
        id: 31,
        ack: None,
        ts: None,
        kind: MsgKind::MapWrite,
        room: Some("doc".into()),
        payload: write.to_payload(Codec::Json).unwrap(),
    });
    assert_eq!(
        text(&mset),
        r#"{"t":"msg","seq":5,"id":31,"j":{"n":"meta","k":"title","vj":"Q3","h":[1700000000000,4,77]},"r":"doc","op":"mset"}"#
    );
}

/// An envelope in JSON as the MessagePack envelope with the same fields
/// (a JSON payload `j` as the string of its text).
fn pack_of(text: &str) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_str(text).unwrap();
    if let Some(j) = value.get_mut("j") {
        *j = serde_json::Value::String(j.to_string());
    }
    let body = rmp_serde::to_vec_named(&value).unwrap();
    let mut bin = vec![KIND_MSGPACK, 1];
    bin.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bin.extend_from_slice(&body);
    bin
}

/// Malformed `mv` and `ms` frames are refused, in both codecs, with the
/// error that names the frame and the field.
#[test]
fn malformed_map_frames_are_refused_naming_the_field() {
    let mv = |fields: &str| format!(r#"{{"t":"mv",{fields}}}"#);
    let all = r#""ts":1,"r":"doc","n":"meta","k":"a","hl":0,"hn":0"#;
    let without = |field: &str| {
        let kept: Vec<&str> = all
            .split(',')
            .filter(|f| !f.starts_with(&format!("\"{field}\":")))
            .collect();
        mv(&kept.join(","))
    };
    let with = |field: &str, value: &str| {
        let kept: Vec<String> = all
            .split(',')
            .map(|f| {
                if f.starts_with(&format!("\"{field}\":")) {
                    format!("\"{field}\":{value}")
                } else {
                    f.to_owned()
                }
            })
            .collect();
        mv(&kept.join(","))
    };
    let long = format!("\"{}\"", "x".repeat(MAX_TOKEN_LEN + 1));
    let missing = |frame, field| DecodeError::MissingField { frame, field };
    let invalid = |field: &'static str| move |e: &DecodeError| matches!(e, DecodeError::InvalidField { field: f, .. } if *f == field);
    let mut cases: Vec<(String, DecodeError)> = Vec::new();
    for field in ["r", "n", "k", "ts", "hl", "hn"] {
        cases.push((without(field), missing("mv", field)));
    }
    for (text, field) in [
        (r#"{"t":"ms","n":"meta","seq":1}"#.to_owned(), "r"),
        (r#"{"t":"ms","r":"doc","seq":1}"#.to_owned(), "n"),
        (r#"{"t":"ms","r":"doc","n":"meta"}"#.to_owned(), "seq"),
    ] {
        cases.push((text, missing("ms", field)));
    }
    for (text, want) in &cases {
        for (codec, msg) in [
            ("json", decode(Incoming::Text(text), &LIMITS)),
            ("msgpack", decode(Incoming::Binary(&pack_of(text)), &LIMITS)),
        ] {
            assert_eq!(msg.as_ref(), Err(want), "{codec} {text}");
        }
    }
    let bad: Vec<(String, &'static str)> = vec![
        (with("r", r#""""#), "r"),
        (with("r", &long), "r"),
        (with("n", r#""""#), "n"),
        (with("n", &long), "n"),
        (with("k", r#""""#), "k"),
        (with("k", &long), "k"),
        (with("ts", "9007199254740992"), "ts"),
        (with("ts", "18446744073709551615"), "ts"),
        (with("hl", "4294967296"), "hl"),
        (with("hn", "9007199254740992"), "hn"),
        (mv(&format!(r#"{all},"j":1,"b":"AA==""#)), "j"),
        (mv(&format!(r#"{all},"m":"AA==","b":"AA==""#)), "m"),
        (mv(&format!(r#"{all},"b":"!!""#)), "b"),
        (r#"{"t":"ms","r":"","n":"meta","seq":1}"#.to_owned(), "r"),
        (r#"{"t":"ms","r":"doc","n":"","seq":1}"#.to_owned(), "n"),
        (format!(r#"{{"t":"ms","r":"doc","n":{long},"seq":1}}"#), "n"),
        (
            r#"{"t":"ms","r":"doc","n":"meta","seq":65537}"#.to_owned(),
            "seq",
        ),
        (
            r#"{"t":"ms","r":"doc","n":"meta","seq":18446744073709551615}"#.to_owned(),
            "seq",
        ),
    ];
    for &(ref text, field) in &bad {
        let json = decode(Incoming::Text(text), &LIMITS);
        assert!(json.as_ref().is_err_and(invalid(field)), "{text}: {json:?}");
        // In MessagePack, base64 is no longer base64 but a string where
        // `bin` belongs: a decode failure of another kind.
        if !text.contains(r#""b":"#) {
            let pack = decode(Incoming::Binary(&pack_of(text)), &LIMITS);
            assert!(pack.as_ref().is_err_and(invalid(field)), "{text}: {pack:?}");
        }
    }
    // Just within every bound.
    for text in [
        with("ts", "9007199254740991"),
        with("hl", "4294967295"),
        with("hn", "9007199254740991"),
        with("n", &format!("\"{}\"", "x".repeat(MAX_TOKEN_LEN))),
        r#"{"t":"ms","r":"doc","n":"meta","seq":65536}"#.to_owned(),
        r#"{"t":"ms","r":"doc","n":"meta","seq":0}"#.to_owned(),
    ] {
        assert!(decode(Incoming::Text(&text), &LIMITS).is_ok(), "{text}");
        assert!(
            decode(Incoming::Binary(&pack_of(&text)), &LIMITS).is_ok(),
            "{text}"
        );
    }
    // Fields of the wrong type are serde's to refuse.
    #[cfg(feature = "json-serde")]
    for text in [with("hl", "-1"), with("hn", "1.5"), with("n", "7")] {
        assert!(
            matches!(
                decode(Incoming::Text(&text), &LIMITS),
                Err(DecodeError::Json { .. })
            ),
            "{text}"
        );
    }
}

/// An `mv`'s value goes detached to a peer that takes detached payloads
/// from [`DETACH_FROM`] bytes, comes back whole through the stream
/// decoder, and is checked when it arrives.
#[test]
fn large_map_values_go_detached_and_are_checked() {
    let json = format!("[{}1]", "1,".repeat(3000));
    let mut encoder = Encoder::for_server();
    for value in [
        Payload::json(json.into_bytes()).unwrap(),
        Payload::msgpack(msgpack_string(5000)).unwrap(),
        Payload::binary(vec![7u8; DETACH_FROM]),
    ] {
        for codec in [Codec::Json, Codec::MsgPack] {
            let frame = map_value(Some(value.clone()), Some(4));
            let mut sent = Vec::new();
            encoder
                .encode_each(&frame, codec, 1, true, None, |t| sent.push(t))
                .unwrap();
            assert_eq!(sent.len(), 2, "{codec:?}");
            assert!(sent[0].len() < 200, "{:?}", sent[0]);
            assert_eq!(sent[1].data().as_ptr(), value.data().as_ptr(), "not copied");
            assert_eq!(receive(&sent), Ok(Some(frame.clone())), "{codec:?}");
            // Alone, the envelope cannot be decoded.
            assert!(matches!(
                decode(sent[0].as_incoming(), &LIMITS),
                Err(DecodeError::InvalidField { field: "dj", .. })
            ));
            // Not numbered, a value that does not follow its envelope is
            // a decode failure (the message that came instead is dropped).
            let mut decoder = Decoder::new();
            assert_eq!(decoder.decode(sent[0].as_incoming(), &LIMITS), Ok(None));
            assert_eq!(
                decoder.decode(Incoming::Text(r#"{"t":"ping","nonce":1}"#), &LIMITS),
                Err(DecodeError::DetachedMismatch {
                    expected: value.len(),
                    actual: 22,
                    text: true
                })
            );
            assert_eq!(decoder.awaiting(), None);
            // A peer that takes none, or a small value: one message.
            let mut one = Vec::new();
            encoder
                .encode_each(&frame, codec, 1, false, None, |t| one.push(t))
                .unwrap();
            assert_eq!(one, vec![encode(&frame, codec, 1).unwrap()]);
        }
    }
    let small = map_value(Some(Payload::binary(vec![1u8; DETACH_FROM - 1])), None);
    let delete = map_value(None, None);
    for frame in [small, delete] {
        let mut sent = Vec::new();
        encoder
            .encode_each(&frame, Codec::MsgPack, 1, true, None, |t| sent.push(t))
            .unwrap();
        assert_eq!(sent, vec![encode(&frame, Codec::MsgPack, 1).unwrap()]);
    }
    // A detached JSON value must be JSON.
    let head = r#"{"t":"mv","ts":1,"r":"doc","k":"a","n":"m","hl":0,"hn":0,"dj":3}"#;
    let mut decoder = Decoder::new();
    assert_eq!(decoder.decode(Incoming::Text(head), &LIMITS), Ok(None));
    assert_eq!(
        decoder.decode(Incoming::Binary(b"[1,"), &LIMITS),
        Err(DecodeError::InvalidField {
            field: "dj",
            reason: "not a JSON value"
        })
    );
    assert_eq!(decoder.decode(Incoming::Text(head), &LIMITS), Ok(None));
    assert!(matches!(
        decoder.decode(Incoming::Binary(b"[1]"), &LIMITS),
        Ok(Some(Frame::MapValue(MapValue { value: Some(p), .. }))) if &p.data()[..] == b"[1]"
    ));
    // One value a frame, detached or not.
    let two = r#"{"t":"mv","ts":1,"r":"doc","k":"a","n":"m","hl":0,"hn":0,"dj":3,"j":1}"#;
    assert!(matches!(
        Decoder::new().decode(Incoming::Text(two), &LIMITS),
        Err(DecodeError::InvalidField { field: "dj", .. })
    ));
}

/// `"op":"mset"` is a room operation: it round-trips with its room, and
/// without one it is a numbered message refused by id.
#[test]
fn map_writes_are_room_messages() {
    let body = MapWriteBody {
        map: "meta".into(),
        key: "title".into(),
        value: Some(Payload::json(&br#""Q3""#[..]).unwrap()),
        stamp: None,
    };
    for codec in [Codec::Json, Codec::MsgPack] {
        let m = Msg {
            seq: 3,
            id: 12,
            ack: Some(1),
            ts: None,
            kind: MsgKind::MapWrite,
            room: Some("doc".into()),
            payload: body.to_payload(codec).unwrap(),
        };
        let t = encode(&Frame::Msg(m.clone()), codec, 1).unwrap();
        let Ok(Frame::Msg(back)) = decode(t.as_incoming(), &LIMITS) else {
            panic!("{codec:?}");
        };
        assert_eq!(back, m);
        assert_eq!(MapWriteBody::from_payload(&back.payload), Ok(body.clone()));
    }
    let roomless = r#"{"t":"msg","seq":3,"id":9,"j":{"n":"m","k":"a"},"op":"mset"}"#;
    assert!(matches!(
        decode(Incoming::Text(roomless), &LIMITS),
        Ok(Frame::Msg(Msg { kind: MsgKind::Invalid(what), .. })) if what.field() == "r"
    ));
}

#[test]
fn small_copies_hold_their_bytes_and_share_them_when_cloned() {
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
    for len in [
        0, 1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 1024,
        1025, 2048,
    ] {
        let part = &data[100.min(2048 - len)..][..len];
        let copy = super::fields::small_copy(part);
        assert_eq!(&copy[..], part, "length {len}");
        let clone = copy.clone();
        assert_eq!(
            clone.as_ptr(),
            copy.as_ptr(),
            "a clone shares, length {len}"
        );
        if len > 2 {
            assert_eq!(&copy.slice(1..len - 1)[..], &part[1..len - 1]);
        }
        drop(copy);
        assert_eq!(
            &clone[..],
            part,
            "the clone outlives the first, length {len}"
        );
    }
}

/// A `hello`'s `join` takes at most 32 rooms, as its other lists, and
/// round-trips through the header form.
#[test]
fn a_hello_joins_at_most_32_rooms() {
    let hello = |n: usize| {
        let rooms: Vec<String> = (0..n).map(|i| format!("\"room {i}\"")).collect();
        format!(
            r#"{{"t":"hello","versions":[1],"client":"0102030405060708090a0b0c0d0e0f10","join":[{}]}}"#,
            rooms.join(",")
        )
    };
    match decode(Incoming::Text(&hello(32)), &LIMITS) {
        Ok(Frame::Hello(h)) => {
            assert_eq!(h.join.len(), 32);
            assert_eq!(&*h.join[31], "room 31");
            let header = handshake_header(&Frame::Hello(h.clone())).unwrap();
            assert!(matches!(
                decode(Incoming::Text(&header), &LIMITS),
                Ok(Frame::Hello(again)) if again == h
            ));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        decode(Incoming::Text(&hello(33)), &LIMITS).unwrap_err(),
        DecodeError::InvalidField {
            field: "join",
            reason: "more than 32 entries",
        }
    );
}
