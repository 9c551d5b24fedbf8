//! Body of the `inflate` target: compressed payloads and datagrams
//! (PROTOCOL.md, section 2.2), honest and hostile.
//!
//! This file owns [`inflate`] and its input, [`ArbCompressed`]. It never
//! changes what the encoder or the decoder does: it encodes with the public
//! [`wire::encode_compressed`], hands the decoder messages as a connection
//! that agreed on compression would, and asserts on the answers against
//! miniz_oxide's own inflation as the oracle.

use arbitrary::Arbitrary;
use bytes::Bytes;

use crate::wire::{
    self, Codec, CompressionConfig, DecodeError, Frame, Incoming, Limits, Msg, MsgKind, Payload,
    PayloadKind, Transmit, BINARY_HEADER_LEN, KIND_DEFLATE_RAW, KIND_MSGPACK, PROTOCOL_VERSION,
};

use super::{AllocProbe, ALLOC_PER_BYTE, ALLOC_SLACK};

/// The size limit of the `inflate` target's decoder: what a compressed
/// payload may inflate to at most.
pub const INFLATE_MAX: usize = 64 * 1024;

/// Heap the inflater needs whatever the input: its state (about 11 KB)
/// and the payload's envelope.
const INFLATE_SLACK: usize = 16 * 1024;

/// One input of the `inflate` target.
#[derive(Arbitrary, Debug)]
pub struct ArbCompressed {
    /// A payload to send compressed and get back, and the stream (or what
    /// deflates to it) to inflate as a hostile peer's.
    pub data: Vec<u8>,
    /// Deflate `data` into the hostile stream first (a valid stream, which
    /// `flip` may then corrupt), rather than take it as it is.
    pub deflate_first: bool,
    /// The deflate level, 1 to 9 (wrapped).
    pub level: u8,
    /// Where the hostile stream is corrupted, and how (`xor`).
    pub flip: Option<(u16, u8)>,
    /// The length the hostile envelope announces in `z`; `None`: the
    /// length the stream really inflates to, if it does.
    pub announce: Option<u32>,
    /// Which form carries the hostile stream: a `msg` in a JSON or a
    /// MessagePack envelope (embedded or detached, of each payload kind),
    /// or a datagram.
    pub form: u8,
}

/// Target `inflate`: (1) `data` as a payload of every kind and as a
/// datagram, compressed with [`wire::encode_compressed`] in both codecs,
/// comes back equal from a decoder that agreed on compression (and a
/// decoder that did not refuses whatever was compressed); (2) `data` (or
/// its deflated form, corrupted or not) announced as a compressed payload
/// or datagram of some length: the decoder takes it exactly when it is one
/// raw deflate stream inflating to exactly that length (miniz_oxide's own
/// inflation says what it inflates to), refuses a length over the limit
/// as `TooLarge` before inflating, anything else as a typed error, never
/// panics, and never allocates much more than the announced length.
pub fn inflate(input: &ArbCompressed, probe: &dyn AllocProbe) {
    round_trip(input);
    hostile(input, probe);
}

fn limits() -> Limits {
    Limits {
        max_message: INFLATE_MAX,
        version: PROTOCOL_VERSION,
    }
}

fn agreed() -> wire::Decoder {
    let mut d = wire::Decoder::new();
    d.set_compression(true);
    d
}

/// Decodes one frame's messages; the frame they make, or the first error.
fn receive(d: &mut wire::Decoder, sent: &[Transmit]) -> Result<Option<Frame>, DecodeError> {
    let mut frame = None;
    for t in sent {
        frame = d.decode(t.as_incoming(), &limits())?;
    }
    Ok(frame)
}

fn round_trip(input: &ArbCompressed) {
    let config = CompressionConfig {
        threshold: 0,
        level: 1 + input.level % 9,
    };
    let data = &input.data[..input.data.len().min(INFLATE_MAX / 2)];
    let mut payloads = vec![Payload::binary(data.to_vec())];
    payloads.extend(Payload::json(data.to_vec()).ok());
    payloads.extend(Payload::msgpack(data.to_vec()).ok());
    let mut frames: Vec<Frame> = payloads
        .into_iter()
        .map(|payload| {
            Frame::Msg(Msg {
                seq: 1,
                id: 1,
                ack: None,
                ts: None,
                kind: MsgKind::Plain,
                room: None,
                payload,
            })
        })
        .collect();
    frames.push(Frame::Raw(Bytes::copy_from_slice(data)));
    for frame in &frames {
        for codec in [Codec::Json, Codec::MsgPack] {
            for detach in [false, true] {
                let sent = wire::encode_compressed(frame, codec, PROTOCOL_VERSION, &config, detach)
                    .expect("a valid frame encodes");
                let back = receive(&mut agreed(), &sent);
                assert_eq!(back, Ok(Some(frame.clone())), "{codec:?}, detach {detach}");
                // Compressed only where it saves bytes.
                let plain = wire::encode(frame, codec, PROTOCOL_VERSION).expect("encodes");
                let size: usize = sent.iter().map(Transmit::len).sum();
                if sent[0] != plain && sent.len() == 1 {
                    assert!(
                        size < plain.len(),
                        "compressed to {size} of {}",
                        plain.len()
                    );
                    assert!(
                        receive(&mut wire::Decoder::new(), &sent).is_err(),
                        "taken where compression was not agreed"
                    );
                }
            }
        }
    }
}

fn hostile(input: &ArbCompressed, probe: &dyn AllocProbe) {
    let mut stream = if input.deflate_first {
        miniz_oxide::deflate::compress_to_vec(&input.data, 1 + input.level % 9)
    } else {
        input.data.clone()
    };
    // Every message within the limit: only the announced length may be over.
    stream.truncate(INFLATE_MAX / 2);
    if let Some((at, xor)) = input.flip {
        if !stream.is_empty() {
            let i = usize::from(at) % stream.len();
            stream[i] ^= xor;
        }
    }
    // The oracle: what the stream inflates to, a little past the limit.
    let truth = miniz_oxide::inflate::decompress_to_vec_with_limit(&stream, INFLATE_MAX + 1).ok();
    let announced = input
        .announce
        .map(u64::from)
        .or(truth.as_ref().map(|t| t.len() as u64))
        .unwrap_or(0);
    let kind = [PayloadKind::Json, PayloadKind::MsgPack, PayloadKind::Binary]
        [usize::from(input.form / 3) % 3];
    let messages = hostile_messages(&stream, announced, input.form, kind);
    let wire_len: usize = messages.iter().map(Vec::len).sum();
    let mut d = agreed();
    probe.reset();
    let mut result = Ok(None);
    for (i, m) in messages.iter().enumerate() {
        let incoming = if i == 0 && input.form % 3 == 0 {
            Incoming::Text(std::str::from_utf8(m).expect("written as text"))
        } else {
            Incoming::Binary(m)
        };
        result = d.decode(incoming, &limits());
        if result.is_err() {
            break;
        }
    }
    let peak = probe.peak();
    let inflated = usize::try_from(announced).map_or(0, |a| a.min(INFLATE_MAX));
    let bound = inflated + ALLOC_PER_BYTE * wire_len + ALLOC_SLACK + INFLATE_SLACK;
    assert!(peak <= bound, "{peak} bytes at peak (bound {bound})");
    let over = announced > INFLATE_MAX as u64;
    match result {
        Err(DecodeError::TooLarge { size, max }) => {
            assert!(over, "{size} refused as over {max}");
        }
        _ if over => panic!("{announced} bytes announced, over the limit: {result:?}"),
        Err(DecodeError::Compression { .. }) => {
            // Refused: the stream does not inflate to exactly that length
            // (or has bytes after its end, which the oracle ignores).
            if let Some(t) = &truth {
                assert!(
                    t.len() as u64 != announced || trailing(&stream),
                    "a stream of {announced} bytes refused"
                );
            }
        }
        Ok(Some(Frame::Raw(data))) => assert_eq!(Some(&data[..]), truth.as_deref()),
        Ok(Some(Frame::Msg(m))) => match m.kind {
            // A JSON payload that is not JSON once inflated.
            MsgKind::Invalid(_) => {
                assert_eq!(kind, PayloadKind::Json);
                let t = truth.expect("inflated before it was checked");
                assert!(Payload::json(t).is_err());
            }
            _ => assert_eq!(Some(&m.payload.data()[..]), truth.as_deref()),
        },
        other => panic!("unexpected {other:?}"),
    }
}

/// Whether `stream` holds bytes after the end of its deflate stream.
fn trailing(stream: &[u8]) -> bool {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    let mut out = vec![0u8; INFLATE_MAX + 1];
    let mut state = Box::<DecompressorOxide>::default();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (_, read, _) = decompress(&mut state, stream, &mut out, 0, flags);
    read < stream.len()
}

/// `stream` announced as a compressed payload of `announced` bytes in the
/// form `form` picks: the messages a peer would send.
fn hostile_messages(stream: &[u8], announced: u64, form: u8, kind: PayloadKind) -> Vec<Vec<u8>> {
    let key = |prefix: char| {
        let k = match kind {
            PayloadKind::Json => 'j',
            PayloadKind::MsgPack => 'm',
            _ => 'b',
        };
        format!("{prefix}{k}")
    };
    let detached = (form / 9) % 2 == 1;
    match form % 3 {
        // A JSON envelope.
        0 => {
            let text = if detached {
                format!(
                    r#"{{"t":"msg","seq":1,"id":1,"{}":{},"z":{announced}}}"#,
                    key('d'),
                    stream.len()
                )
            } else {
                format!(
                    r#"{{"t":"msg","seq":1,"id":1,"{}":"{}","z":{announced}}}"#,
                    key('z'),
                    crate::base64::encode(stream)
                )
            };
            let mut out = vec![text.into_bytes()];
            if detached {
                out.push(stream.to_vec());
            }
            out
        }
        // A MessagePack envelope.
        1 => {
            let mut body = Vec::new();
            let _ = rmp::encode::write_map_len(&mut body, 5);
            for (k, v) in [("t", None), ("seq", Some(1)), ("id", Some(1))] {
                let _ = rmp::encode::write_str(&mut body, k);
                match v {
                    None => {
                        let _ = rmp::encode::write_str(&mut body, "msg");
                    }
                    Some(v) => {
                        let _ = rmp::encode::write_uint(&mut body, v);
                    }
                }
            }
            if detached {
                let _ = rmp::encode::write_str(&mut body, &key('d'));
                let _ = rmp::encode::write_uint(&mut body, stream.len() as u64);
            } else {
                let _ = rmp::encode::write_str(&mut body, &key('z'));
                let _ = rmp::encode::write_bin(&mut body, stream);
            }
            let _ = rmp::encode::write_str(&mut body, "z");
            let _ = rmp::encode::write_uint(&mut body, announced);
            let mut msg = vec![KIND_MSGPACK, PROTOCOL_VERSION];
            msg.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
            msg.extend_from_slice(&body);
            let mut out = vec![msg];
            if detached {
                out.push(stream.to_vec());
            }
            out
        }
        // A datagram: its length (u32), then the stream.
        _ => {
            let len = u32::try_from(announced).unwrap_or(u32::MAX);
            let mut msg = vec![KIND_DEFLATE_RAW, PROTOCOL_VERSION, 0, 0, 0, 0];
            msg.extend_from_slice(&len.to_le_bytes());
            msg.extend_from_slice(stream);
            let body = u32::try_from(msg.len() - BINARY_HEADER_LEN).unwrap_or(0);
            msg[2..BINARY_HEADER_LEN].copy_from_slice(&body.to_le_bytes());
            vec![msg]
        }
    }
}
