//! Compressed envelopes and datagrams (PROTOCOL.md, section 2.2), end to
//! end through the encoder and the decoder: every form in both codecs, what
//! is left uncompressed, and what a hostile or broken peer can send.

#![allow(clippy::unwrap_used)]

use super::tests::LIMITS;
use super::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const CONFIG: CompressionConfig = CompressionConfig {
    threshold: 1024,
    level: 1,
};

/// JSON of about `n` bytes, the kind an application sends: records with
/// the same keys.
fn json_of(n: usize) -> String {
    let mut s = String::from(r#"{"items":["#);
    let mut i = 0u64;
    while s.len() + 2 < n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"id":{},"user":"user{}","text":"message number {} in the lobby","seen":{}}}"#,
            1000 + i,
            i % 9,
            i,
            i % 2 == 0
        ));
        i += 1;
    }
    s.push_str("]}");
    s
}

fn msg(payload: Payload) -> Msg {
    Msg {
        seq: 7,
        id: 42,
        ack: Some(3),
        ts: Some(1_700_000_000_000),
        kind: MsgKind::Request,
        room: Some("lobby".into()),
        payload,
    }
}

fn payloads(n: usize) -> Vec<Payload> {
    let json = json_of(n);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    vec![
        Payload::json(json.clone()).unwrap(),
        Payload::msgpack(rmp_serde::to_vec_named(&value).unwrap()).unwrap(),
        Payload::binary(json.into_bytes()),
    ]
}

/// A decoder on a connection that agreed on compression.
fn agreed() -> Decoder {
    let mut d = Decoder::new();
    d.set_compression(true);
    d
}

/// Decodes the messages of one frame in order: the frame they make.
fn receive(d: &mut Decoder, sent: &[Transmit]) -> Result<Frame, DecodeError> {
    let mut frame = None;
    for t in sent {
        let shared = t.data().clone();
        let incoming = match t {
            Transmit::Text(_) => t.as_incoming(),
            Transmit::Binary(_) => Incoming::SharedBinary(&shared),
        };
        frame = d.decode(incoming, &LIMITS)?;
    }
    Ok(frame.expect("a whole frame"))
}

fn wire_len(sent: &[Transmit]) -> usize {
    sent.iter().map(Transmit::len).sum()
}

#[test]
fn every_payload_form_comes_back_as_it_was_sent_and_smaller() {
    for codec in [Codec::Json, Codec::MsgPack] {
        for n in [1500, 16 * 1024, 64 * 1024] {
            for payload in payloads(n) {
                for detach in [false, true] {
                    let frame = Frame::Msg(msg(payload.clone()));
                    let sent = encode_compressed(&frame, codec, 1, &CONFIG, detach).unwrap();
                    let what = format!("{codec:?} {n} {:?} detach {detach}", payload.kind());
                    assert_eq!(receive(&mut agreed(), &sent).unwrap(), frame, "{what}");
                    let plain = encode(&frame, codec, 1).unwrap();
                    assert!(
                        wire_len(&sent) * 2 < plain.len(),
                        "{what}: {} of {}",
                        wire_len(&sent),
                        plain.len()
                    );
                    // Large deflated payloads go detached, by their
                    // deflated size.
                    // (In a JSON envelope from 1 KiB, where it would be
                    // base64.)
                    let from = match codec {
                        Codec::Json => 1024,
                        _ => DETACH_FROM,
                    };
                    if sent.len() == 2 {
                        assert!(detach && sent[1].len() >= from, "{what}");
                    } else if detach {
                        assert!(sent[0].len() < from * 4 / 3 + 200, "{what}");
                    }
                    // The envelope says so in its own words.
                    if let Transmit::Text(t) = &sent[0] {
                        let text = std::str::from_utf8(t).unwrap();
                        assert!(text.contains(r#""z":"#), "{text}");
                        assert!(assert_quick_json_agrees(text));
                    } else {
                        assert!(assert_quick_envelope_agrees(sent[0].data()));
                    }
                }
            }
        }
    }
}

#[test]
fn small_or_incompressible_payloads_go_as_they_are() {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let noise: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let small = Payload::json(json_of(900)).unwrap();
    assert!(small.len() < CONFIG.threshold);
    for codec in [Codec::Json, Codec::MsgPack] {
        for payload in [small.clone(), Payload::binary(noise.clone())] {
            let frame = Frame::Msg(msg(payload));
            let sent = encode_compressed(&frame, codec, 1, &CONFIG, false).unwrap();
            assert_eq!(sent, vec![encode(&frame, codec, 1).unwrap()], "{codec:?}");
        }
        // A JSON payload in a JSON envelope is compressed only when its
        // base64 is still smaller than the text.
        let threshold_only = CompressionConfig {
            threshold: 0,
            ..CONFIG
        };
        let tiny = Frame::Msg(msg(Payload::json(r#"{"a":1}"#).unwrap()));
        let sent = encode_compressed(&tiny, codec, 1, &threshold_only, false).unwrap();
        assert_eq!(sent, vec![encode(&tiny, codec, 1).unwrap()]);
    }
    // Other frames have no payload to compress.
    let ack = Frame::Ack { ack: 9 };
    let sent = encode_compressed(&ack, Codec::Json, 1, &CONFIG, true).unwrap();
    assert_eq!(sent, vec![encode(&ack, Codec::Json, 1).unwrap()]);
}

#[test]
fn batches_entries_and_datagrams_are_compressed_too() {
    let big = Payload::json(json_of(4000)).unwrap();
    let small = Payload::json(r#"{"x":1}"#).unwrap();
    let batch = Frame::Batch(vec![
        msg(big.clone()),
        Msg {
            seq: 8,
            ..msg(small.clone())
        },
        Msg {
            seq: 9,
            ..msg(Payload::binary(json_of(3000)))
        },
    ]);
    let entry = Frame::Pub(StreamEntry {
        room: "lobby".into(),
        offset: 12,
        kind: MsgKind::Presence,
        ts: Some(5),
        payload: big.clone(),
    });
    let datagram = Frame::Raw(bytes::Bytes::from(json_of(2000)));
    for codec in [Codec::Json, Codec::MsgPack] {
        for frame in [&batch, &entry, &datagram] {
            let sent = encode_compressed(frame, codec, 1, &CONFIG, true).unwrap();
            assert_eq!(sent.len(), 1);
            assert!(wire_len(&sent) * 2 < encode(frame, codec, 1).unwrap().len());
            assert_eq!(receive(&mut agreed(), &sent).unwrap(), *frame, "{codec:?}");
        }
    }
    let sent = encode_compressed(&datagram, Codec::Json, 1, &CONFIG, true).unwrap();
    assert_eq!(sent[0].data()[0], KIND_DEFLATE_RAW);
}

#[test]
fn nothing_compressed_is_taken_where_compression_was_not_agreed() {
    let frames = [
        Frame::Msg(msg(Payload::json(json_of(20_000)).unwrap())),
        Frame::Raw(bytes::Bytes::from(json_of(2000))),
    ];
    for codec in [Codec::Json, Codec::MsgPack] {
        for frame in &frames {
            for detach in [false, true] {
                let sent = encode_compressed(frame, codec, 1, &CONFIG, detach).unwrap();
                let refused = receive(&mut Decoder::new(), &sent);
                assert_eq!(
                    refused,
                    Err(DecodeError::Compression {
                        reason: "compression was not agreed on this connection"
                    }),
                    "{codec:?} {frame:?}"
                );
                assert!(decode(sent[0].as_incoming(), &LIMITS).is_err());
            }
        }
    }
}

/// A `msg` envelope in JSON with the given payload fields.
fn text_msg(fields: &str) -> String {
    format!(r#"{{"t":"msg","seq":5,"id":9,{fields}}}"#)
}

fn deflated(data: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec(data, 6)
}

fn decode_text(d: &mut Decoder, text: &str) -> Result<Option<Frame>, DecodeError> {
    d.decode(Incoming::Text(text), &LIMITS)
}

#[test]
fn a_decompression_bomb_costs_at_most_the_announced_length_within_the_limit() {
    let zeros = vec![b' '; 4 << 20];
    let bomb = deflated(&zeros);
    let b64 = crate::base64::encode(&bomb);
    let compression = |reason| Err(DecodeError::Compression { reason });
    // Announced honestly: over the limit (1009) before anything is read.
    let honest = text_msg(&format!(r#""zb":"{b64}","z":{}"#, zeros.len()));
    assert!(matches!(
        decode_text(&mut agreed(), &honest),
        Err(DecodeError::TooLarge { size, .. }) if size == 4 << 20
    ));
    // Announced small: inflating stops there (1002).
    let lying = text_msg(&format!(r#""zb":"{b64}","z":100"#));
    assert_eq!(
        decode_text(&mut agreed(), &lying),
        compression("inflates to more bytes than `z` announced")
    );
    // Detached, the announcement is checked at the envelope.
    let detached = text_msg(&format!(r#""db":{},"z":{}"#, bomb.len(), 1 << 30));
    assert!(matches!(
        decode_text(&mut agreed(), &detached),
        Err(DecodeError::TooLarge { .. })
    ));
    let mut d = agreed();
    let detached = text_msg(&format!(r#""db":{},"z":10"#, bomb.len()));
    assert_eq!(decode_text(&mut d, &detached), Ok(None));
    assert_eq!(
        d.decode(Incoming::Binary(&bomb), &LIMITS),
        compression("inflates to more bytes than `z` announced")
    );
    // A datagram likewise.
    let mut raw = vec![KIND_DEFLATE_RAW, 1, 0, 0, 0, 0];
    raw.extend_from_slice(&100u32.to_le_bytes());
    raw.extend_from_slice(&bomb);
    let body = u32::try_from(raw.len() - BINARY_HEADER_LEN).unwrap();
    raw[2..6].copy_from_slice(&body.to_le_bytes());
    assert_eq!(
        agreed().decode(Incoming::Binary(&raw), &LIMITS),
        compression("inflates to more bytes than `z` announced")
    );
    raw[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        agreed().decode(Incoming::Binary(&raw), &LIMITS),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn broken_compression_fields_close_and_broken_payloads_are_refused_by_id() {
    let json = json_of(3000);
    let z = json.len();
    let good = crate::base64::encode(&deflated(json.as_bytes()));
    let garbage = crate::base64::encode(&[0xFF; 40]);
    let not_json = crate::base64::encode(&deflated(b"{\"a\":"));
    let compression = |reason| Err(DecodeError::Compression { reason });
    let invalid = |field, reason| {
        Ok(Some(Frame::Msg(Msg::invalid(
            5,
            9,
            None,
            InvalidMsg::named(field, reason),
        ))))
    };
    let cases: Vec<(String, Result<Option<Frame>, DecodeError>)> = vec![
        (
            format!(r#""zj":"{good}","z":{z}"#),
            Ok(Some(Frame::Msg(Msg {
                seq: 5,
                id: 9,
                ack: None,
                ts: None,
                kind: MsgKind::Plain,
                room: None,
                payload: Payload::json(json.clone()).unwrap(),
            }))),
        ),
        (
            format!(r#""zj":"{garbage}","z":{z}"#),
            compression("not a complete raw deflate stream"),
        ),
        (
            format!(r#""zj":"{good}""#),
            compression("a compressed payload without `z`, its inflated length"),
        ),
        (
            format!(r#""j":1,"z":{z}"#),
            compression("`z` on a message without a compressed payload"),
        ),
        (
            format!(r#""zj":"{good}","z":{}"#, z + 1),
            compression("inflates to fewer bytes than `z` announced"),
        ),
        (
            format!(r#""zj":"{good}","j":1,"z":{z}"#),
            invalid("zj", "a message carries exactly one payload"),
        ),
        (
            format!(r#""zj":"{good}","zb":"{good}","z":{z}"#),
            invalid("zj", "a message carries exactly one payload"),
        ),
        // Announcing a detached payload, it waits for it, as with `j`
        // and `dj`, and is refused with it.
        (format!(r#""zj":"{good}","dj":5,"z":{z}"#), Ok(None)),
        (
            format!(r#""zj":"***","z":{z}"#),
            invalid("zj", "not valid base64"),
        ),
        (
            r#""zj":"","z":0"#.to_owned(),
            compression("not a complete raw deflate stream"),
        ),
        (
            format!(r#""zj":"{not_json}","z":5"#),
            invalid("zj", "not a JSON value"),
        ),
    ];
    for (fields, expected) in cases {
        let text = text_msg(&fields);
        assert_eq!(decode_text(&mut agreed(), &text), expected, "{fields}");
        assert_quick_json_agrees(&text);
    }
    // Corruption anywhere in a deflated payload: a typed error or other
    // bytes, never a panic.
    let frame = Frame::Msg(msg(Payload::binary(json.into_bytes())));
    for codec in [Codec::Json, Codec::MsgPack] {
        let sent = encode_compressed(&frame, codec, 1, &CONFIG, false).unwrap();
        let wire = sent[0].data();
        for i in (0..wire.len()).step_by(3) {
            let mut bad = wire.to_vec();
            bad[i] ^= 0x21;
            let incoming = match codec {
                Codec::Json => match std::str::from_utf8(&bad) {
                    Ok(t) => Incoming::Text(t),
                    Err(_) => continue,
                },
                Codec::MsgPack => Incoming::Binary(&bad),
            };
            let _ = agreed().decode(incoming, &LIMITS);
        }
    }
}

/// An `mv` of the map `meta` in the room `doc`.
fn map_value(value: Option<Payload>) -> Frame {
    Frame::MapValue(MapValue {
        room: "doc".into(),
        map: "meta".into(),
        key: "report".into(),
        stamp: crate::hlc::HlcTimestamp {
            physical_ms: 1_700_000_000_000,
            logical: 3,
            node: 12,
        },
        value,
        settles: Some(8),
    })
}

/// A large map value is compressed when compression was agreed, as a
/// message's payload is: embedded, or detached when large and the peer
/// takes it; it comes back as it was, and is refused where compression
/// was not agreed.
#[test]
fn large_map_values_are_compressed() {
    for codec in [Codec::Json, Codec::MsgPack] {
        // Deflated values go detached from 1 KiB in a JSON envelope, as
        // a message's do, and from `DETACH_FROM` in MessagePack.
        let from = match codec {
            Codec::Json => 1024,
            _ => DETACH_FROM,
        };
        let mut detached = 0;
        for n in [1500, 16 * 1024, 128 * 1024] {
            for payload in payloads(n) {
                for detach in [false, true] {
                    let frame = map_value(Some(payload.clone()));
                    let sent = encode_compressed(&frame, codec, 1, &CONFIG, detach).unwrap();
                    let what = format!("{codec:?} {n} {:?} detach {detach}", payload.kind());
                    assert_eq!(receive(&mut agreed(), &sent).unwrap(), frame, "{what}");
                    let plain = encode(&frame, codec, 1).unwrap();
                    assert!(
                        wire_len(&sent) * 2 < plain.len(),
                        "{what}: {} of {}",
                        wire_len(&sent),
                        plain.len()
                    );
                    if sent.len() == 2 {
                        assert!(detach && sent[1].len() >= from, "{what}");
                        detached += 1;
                    } else {
                        assert!(!detach || sent[0].len() < from * 4 / 3 + 200, "{what}");
                    }
                    match &sent[0] {
                        Transmit::Text(t) => {
                            let text = std::str::from_utf8(t).unwrap();
                            assert!(text.contains(r#""z":"#), "{text}");
                            assert!(text.starts_with(r#"{"t":"mv","id":8,"ts":"#), "{text}");
                            assert!(assert_quick_json_agrees(text));
                        }
                        Transmit::Binary(b) => assert!(assert_quick_envelope_agrees(b)),
                    }
                    assert_eq!(
                        receive(&mut Decoder::new(), &sent),
                        Err(DecodeError::Compression {
                            reason: "compression was not agreed on this connection"
                        }),
                        "{what}"
                    );
                }
            }
        }
        assert!(detached > 0, "{codec:?}");
        // A delete and a small value go as they are.
        for frame in [
            map_value(None),
            map_value(Some(Payload::json(json_of(900)).unwrap())),
        ] {
            let sent = encode_compressed(&frame, codec, 1, &CONFIG, true).unwrap();
            assert_eq!(sent, vec![encode(&frame, codec, 1).unwrap()], "{codec:?}");
        }
    }
    // `z` without a compressed value is a protocol error, not a delete.
    let text = r#"{"t":"mv","ts":1,"r":"doc","k":"a","n":"m","hl":0,"hn":0,"z":5}"#;
    assert_eq!(
        agreed().decode(Incoming::Text(text), &LIMITS),
        Err(DecodeError::Compression {
            reason: "`z` on a message without a compressed payload"
        })
    );
}
