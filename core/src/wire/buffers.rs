//! The encoder's memory: the blocks small frames are cut from, and the pool
//! of buffers large frames are encoded into.
//!
//! Owns [`Encoder`], which each machine keeps, and the bounded reuse that
//! lets steady traffic encode without allocating. It never decides what
//! bytes a frame is (the `encode` module does), and never keeps more memory
//! than its bounds: what does not fit is freed as usual.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

#[cfg(feature = "compression")]
use super::compress::{Deflater, KIND_DEFLATE_RAW, RAW_LEN_PREFIX};
#[cfg(all(feature = "compression", any(feature = "server", test)))]
use super::deflated::write_deflated_entry;
#[cfg(feature = "compression")]
use super::deflated::{write_json_batch, write_pack_batch};
#[cfg(any(feature = "server", test, feature = "compression"))]
use super::encode::Form;
#[cfg(feature = "compression")]
use super::header::seal_msgpack;
use super::{
    detaches, encode_detached_into, encode_into, Codec, CompressionConfig, EncodeError, Frame,
    Transmit,
};
#[cfg(any(feature = "server", test))]
use super::{encode_map_value_into, MapValue, DETACH_FROM};
#[cfg(feature = "compression")]
use super::{encode_msg_into, FrameKind, Msg, MsgKind, Payload, PayloadKind, BINARY_HEADER_LEN};

/// Payloads from this size up are encoded without the scratch buffer.
const DIRECT_ENCODE: usize = 1024;

/// Bytes of the blocks small frames are cut from, to start with.
const BLOCK_SIZE: usize = 1024;

/// Largest block a server's encoder grows to in bursts (a client's stays
/// at [`BLOCK_SIZE`]).
const SERVER_BLOCK_MAX: usize = 64 * 1024;

/// Full blocks a server's encoder keeps for reuse (a client's: 2).
const SERVER_SPENT_BLOCKS: usize = 16;

/// Largest encoded frame cut from a block; larger ones get their own
/// allocation.
const BLOCK_MAX_FRAME: usize = 256;

/// Most buffers a machine keeps for reuse by its large frames.
const POOL_BUFFERS: usize = 8;

/// Largest buffer a machine keeps for reuse; bigger ones are freed.
const POOL_MAX_CAPACITY: usize = 64 * 1024;

/// Encodes a machine's frames. The machines keep one each.
///
/// Small frames are encoded into a scratch buffer and appended to a block,
/// from which each frame is cut as a `Bytes` of its own (see [`Blocks`]): a
/// steady stream of small frames allocates nothing, and a burst (a
/// broadcast to thousands of members) reuses the blocks of the one before.
/// Frames over [`BLOCK_MAX_FRAME`] bytes get an allocation of their exact
/// size instead.
///
/// A frame with a large payload is encoded straight into a buffer of its
/// own, which becomes the frame without a copy; that buffer comes back to
/// the encoder when the last reference to the frame is dropped (after the
/// socket took it), so a steady stream of large frames reuses a few
/// buffers instead of allocating and freeing one per frame. Freeing a fresh
/// large buffer per frame made the system allocator hand memory back to the
/// operating system and fault it in again on every few frames. The pool is
/// bounded ([`POOL_BUFFERS`] buffers of at most [`POOL_MAX_CAPACITY`]
/// bytes); a buffer that does not fit is freed as usual.
#[derive(Default)]
pub(crate) struct Encoder {
    scratch: Vec<u8>,
    blocks: Blocks,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    /// The compressor, made when a connection first compresses.
    #[cfg(feature = "compression")]
    deflater: Option<Deflater>,
    /// Deflated payloads on their way into an envelope.
    #[cfg(feature = "compression")]
    deflated: Vec<u8>,
}

/// The blocks an [`Encoder`] cuts small frames from.
///
/// A block is shared and reference-counted by the frames cut from it. When
/// the current block is full it is reused in place if every frame cut from
/// it has been dropped (written by the socket). If not, frames are queued
/// faster than they are written: the block joins a short list of spent
/// blocks, and the next block is the oldest spent one whose frames are all
/// gone by now, or else a new one twice as large as the last (up to
/// `max`). Reusing blocks matters as much as not allocating: memory freed
/// after every burst was handed back to the operating system by the
/// allocator and faulted in again by the next burst. Once traffic keeps up
/// again, the spent blocks are let go and the block size halves at each
/// refill, back to [`BLOCK_SIZE`].
///
/// Memory: a queued frame keeps its whole block alive, and the encoder
/// keeps at most `max_spent` spent blocks of at most `max` bytes beside the
/// current one (a server: 16 of 64 KiB; a client: 2 of 1 KiB).
#[derive(Debug)]
struct Blocks {
    current: BytesMut,
    /// The capacity `current` was made with; 0 before the first.
    size: usize,
    /// Full blocks whose frames may still be queued, oldest first.
    spent: VecDeque<(BytesMut, usize)>,
    max: usize,
    max_spent: usize,
    /// Blocks allocated so far.
    made: u64,
}

impl Default for Blocks {
    fn default() -> Self {
        Blocks::new(BLOCK_SIZE, 2)
    }
}

impl Blocks {
    fn new(max: usize, max_spent: usize) -> Self {
        Blocks {
            current: BytesMut::new(),
            size: 0,
            spent: VecDeque::new(),
            max: max.max(BLOCK_SIZE),
            max_spent,
            made: 0,
        }
    }

    /// `frame` (at most [`BLOCK_MAX_FRAME`] bytes) as `Bytes` cut from the
    /// current block.
    fn cut(&mut self, frame: &[u8]) -> Bytes {
        if self.current.capacity() < frame.len() {
            self.refill();
        }
        self.current.extend_from_slice(frame);
        self.current.split().freeze()
    }

    fn refill(&mut self) {
        let mut full = std::mem::take(&mut self.current);
        if self.size > 0 && full.try_reclaim(self.size) {
            // Every frame cut from it is gone: writes keep up.
            self.spent.clear();
            if self.size > BLOCK_SIZE {
                self.size /= 2;
                self.made += 1;
                self.current = BytesMut::with_capacity(self.size);
            } else {
                self.current = full;
            }
            return;
        }
        if self.size > 0 && self.max_spent > 0 {
            if self.spent.len() == self.max_spent {
                // Freed once its frames are.
                self.spent.pop_front();
            }
            self.spent.push_back((full, self.size));
            if let Some((mut oldest, size)) = self.spent.pop_front() {
                if oldest.try_reclaim(size) {
                    self.current = oldest;
                    self.size = size;
                    return;
                }
                self.spent.push_front((oldest, size));
            }
        }
        self.size = (self.size * 2).clamp(BLOCK_SIZE, self.max);
        self.made += 1;
        self.current = BytesMut::with_capacity(self.size);
    }
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pooled = self.pool.lock().map(|p| p.len()).unwrap_or(0);
        f.debug_struct("Encoder")
            .field("scratch_capacity", &self.scratch.capacity())
            .field("block_free", &self.blocks.current.capacity())
            .field("spent_blocks", &self.blocks.spent.len())
            .field("blocks_made", &self.blocks.made)
            .field("pooled", &pooled)
            .finish()
    }
}

/// A pooled buffer that an encoded frame's `Bytes` owns.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if self.buf.capacity() > POOL_MAX_CAPACITY {
            return;
        }
        // A poisoned pool only means a panic elsewhere; the buffer is freed.
        if let Ok(mut pool) = self.pool.lock() {
            if pool.len() < POOL_BUFFERS {
                let mut buf = std::mem::take(&mut self.buf);
                buf.clear();
                pool.push(buf);
            }
        }
    }
}

impl Encoder {
    /// A server's encoder: its blocks grow in bursts (see [`Blocks`]).
    pub(crate) fn for_server() -> Self {
        Encoder {
            blocks: Blocks::new(SERVER_BLOCK_MAX, SERVER_SPENT_BLOCKS),
            ..Encoder::default()
        }
    }

    /// Encodes `frame` with the negotiated codec and version.
    pub(crate) fn encode(
        &mut self,
        frame: &Frame,
        codec: Codec,
        version: u8,
    ) -> Result<Transmit, EncodeError> {
        if let Frame::Msg(m) = frame {
            let len = m.payload.data().len();
            if len >= DIRECT_ENCODE {
                // Base64 in JSON grows the payload by a third.
                let want = len + len / 3 + 256;
                let mut out = self.take_buffer(want);
                let kind = encode_into(frame, codec, version, &mut out)?;
                if out.capacity() > POOL_MAX_CAPACITY {
                    return Ok(kind.with(Bytes::from(out)));
                }
                let owner = Pooled {
                    buf: out,
                    pool: Arc::clone(&self.pool),
                };
                return Ok(kind.with(Bytes::from_owner(owner)));
            }
        }
        let kind = encode_into(frame, codec, version, &mut self.scratch)?;
        Ok(kind.with(self.cut_scratch()))
    }

    /// Encodes `frame` and hands its messages to `emit`: one, or two for a
    /// `msg` or `mv` whose payload goes detached, which it does when
    /// `detach` (the peer can receive it) and the payload is at least
    /// [`DETACH_FROM`] bytes. With `deflate` (the connection agreed on
    /// compression), a payload or datagram of at least its threshold is
    /// deflated when that makes the message smaller, and then detached by
    /// its deflated size.
    pub(crate) fn encode_each(
        &mut self,
        frame: &Frame,
        codec: Codec,
        version: u8,
        detach: bool,
        deflate: Option<&CompressionConfig>,
        mut emit: impl FnMut(Transmit),
    ) -> Result<(), EncodeError> {
        #[cfg(feature = "compression")]
        if let Some(config) = deflate {
            if self.encode_deflated(frame, codec, version, detach, config, &mut emit)? {
                return Ok(());
            }
        }
        #[cfg(not(feature = "compression"))]
        let _ = deflate;
        match frame {
            Frame::Msg(m) if detaches(m, detach) => {
                let kind = encode_detached_into(m, codec, version, &mut self.scratch)?;
                emit(kind.with(self.cut_scratch()));
                emit(Transmit::Binary(m.payload.data.clone()));
                Ok(())
            }
            // A map value goes detached by the same rule as a message's
            // payload (only a server sends one).
            #[cfg(any(feature = "server", test))]
            Frame::MapValue(v @ MapValue { value: Some(p), .. })
                if detach && p.len() >= DETACH_FROM =>
            {
                let kind =
                    encode_map_value_into(v, Form::Detached, codec, version, &mut self.scratch)?;
                emit(kind.with(self.cut_scratch()));
                emit(Transmit::Binary(p.data.clone()));
                Ok(())
            }
            _ => {
                emit(self.encode(frame, codec, version)?);
                Ok(())
            }
        }
    }

    /// One frame with one payload (a message's, a map entry's value):
    /// deflated into `deflated`, then sent as the next message when large
    /// and the peer takes detached payloads, else embedded if that saves;
    /// `Ok(false)` when it is to be encoded as usual.
    #[cfg(feature = "compression")]
    #[allow(clippy::too_many_arguments)]
    fn send_deflated(
        &mut self,
        payload: &Payload,
        encode: impl Fn(Form<'_>, &mut Vec<u8>) -> Result<FrameKind, EncodeError>,
        codec: Codec,
        detach: bool,
        config: &CompressionConfig,
        deflated: &mut Vec<u8>,
        emit: &mut impl FnMut(Transmit),
    ) -> Result<bool, EncodeError> {
        if !self.deflate_payload(payload, config, deflated) {
            return Ok(false);
        }
        if detach && deflated.len() >= detach_deflated_from(codec) {
            // The deflated payload is the next message, as it is.
            let bytes = Bytes::from(std::mem::take(deflated));
            let form = Form::Deflated {
                bytes: &bytes,
                detached: true,
            };
            let kind = encode(form, &mut self.scratch)?;
            emit(kind.with(self.cut_scratch()));
            emit(Transmit::Binary(bytes));
            return Ok(true);
        }
        if !embedded_saves(payload, codec, deflated.len()) {
            return Ok(false);
        }
        let form = Form::Deflated {
            bytes: deflated,
            detached: false,
        };
        let kind = encode(form, &mut self.scratch)?;
        emit(kind.with(self.cut_scratch()));
        Ok(true)
    }

    /// Encodes `frame` with its payloads deflated, if one is at least
    /// `config.threshold` bytes and deflating makes it smaller: `Ok(false)`
    /// when nothing was, and the frame is to be encoded as usual.
    #[cfg(feature = "compression")]
    fn encode_deflated(
        &mut self,
        frame: &Frame,
        codec: Codec,
        version: u8,
        detach: bool,
        config: &CompressionConfig,
        emit: &mut impl FnMut(Transmit),
    ) -> Result<bool, EncodeError> {
        let worth = |len: usize| len >= config.threshold.max(1);
        let mut deflated = std::mem::take(&mut self.deflated);
        deflated.clear();
        let sent = match frame {
            Frame::Msg(m) if worth(m.payload.len()) && !is_invalid(m) => {
                let encode = |form: Form<'_>, out: &mut Vec<u8>| {
                    encode_msg_into(m, form, codec, version, out)
                };
                self.send_deflated(
                    &m.payload,
                    encode,
                    codec,
                    detach,
                    config,
                    &mut deflated,
                    emit,
                )?
            }
            // As a message's payload: detached when large, else embedded
            // if that saves.
            #[cfg(any(feature = "server", test))]
            Frame::MapValue(v @ MapValue { value: Some(p), .. }) if worth(p.len()) => {
                let encode = |form: Form<'_>, out: &mut Vec<u8>| {
                    encode_map_value_into(v, form, codec, version, out)
                };
                self.send_deflated(p, encode, codec, detach, config, &mut deflated, emit)?
            }
            Frame::Batch(msgs) if msgs.iter().any(|m| worth(m.payload.len())) => {
                // Each message's deflated payload, as a span of `deflated`.
                let mut spans = Vec::with_capacity(msgs.len());
                for m in msgs {
                    let start = deflated.len();
                    let kept = worth(m.payload.len())
                        && !is_invalid(m)
                        && self.deflate_payload(&m.payload, config, &mut deflated)
                        && embedded_saves(&m.payload, codec, deflated.len() - start);
                    if !kept {
                        deflated.truncate(start);
                    }
                    spans.push(kept.then_some((start, deflated.len())));
                }
                if spans.iter().all(Option::is_none) {
                    false
                } else {
                    let form = |i: usize| match spans[i] {
                        Some((a, b)) => Form::Deflated {
                            bytes: &deflated[a..b],
                            detached: false,
                        },
                        None => Form::Embedded,
                    };
                    let out = &mut self.scratch;
                    out.clear();
                    let kind = match codec {
                        Codec::Json => {
                            write_json_batch(msgs, form, out)?;
                            FrameKind::Text
                        }
                        Codec::MsgPack => {
                            out.extend_from_slice(&[0; BINARY_HEADER_LEN]);
                            write_pack_batch(msgs, form, out)?;
                            seal_msgpack(out, version)?;
                            FrameKind::Binary
                        }
                    };
                    emit(kind.with(self.cut_scratch()));
                    true
                }
            }
            #[cfg(any(feature = "server", test))]
            Frame::Pub(e) if worth(e.payload.len()) => {
                let budget = saving_budget(e.payload.len());
                let (data, level) = (e.payload.data(), config.level);
                if !self.deflater().compress(data, level, budget, &mut deflated) {
                    false
                } else {
                    let out = &mut self.scratch;
                    out.clear();
                    let kind = match codec {
                        Codec::Json => {
                            write_deflated_entry(e, &deflated, codec, out)?;
                            FrameKind::Text
                        }
                        Codec::MsgPack => {
                            out.extend_from_slice(&[0; BINARY_HEADER_LEN]);
                            write_deflated_entry(e, &deflated, codec, out)?;
                            seal_msgpack(out, version)?;
                            FrameKind::Binary
                        }
                    };
                    emit(kind.with(self.cut_scratch()));
                    true
                }
            }
            Frame::Raw(data) if worth(data.len()) => {
                // The header, the inflated length, then the deflate stream.
                let len = u32::try_from(data.len()).map_err(|_| EncodeError::TooLarge)?;
                let mut out = std::mem::take(&mut self.scratch);
                out.clear();
                out.extend_from_slice(&[0; BINARY_HEADER_LEN]);
                out.extend_from_slice(&len.to_le_bytes());
                let budget = saving_budget(data.len());
                let sent = self
                    .deflater()
                    .compress(data, config.level, budget, &mut out);
                if sent {
                    let body = u32::try_from(out.len() - BINARY_HEADER_LEN)
                        .map_err(|_| EncodeError::TooLarge)?;
                    out[0] = KIND_DEFLATE_RAW;
                    out[1] = version;
                    out[2..BINARY_HEADER_LEN].copy_from_slice(&body.to_le_bytes());
                    debug_assert!(out.len() >= BINARY_HEADER_LEN + RAW_LEN_PREFIX);
                }
                self.scratch = out;
                if sent {
                    emit(Transmit::Binary(self.cut_scratch()));
                }
                sent
            }
            _ => false,
        };
        self.deflated = deflated;
        Ok(sent)
    }

    /// The compressor, made on first use.
    #[cfg(feature = "compression")]
    fn deflater(&mut self) -> &mut Deflater {
        self.deflater.get_or_insert_with(Deflater::new)
    }

    /// Appends `payload` deflated to `out`, if that saves enough to pay
    /// for the fields that announce it.
    #[cfg(feature = "compression")]
    fn deflate_payload(
        &mut self,
        payload: &Payload,
        config: &CompressionConfig,
        out: &mut Vec<u8>,
    ) -> bool {
        let budget = saving_budget(payload.len());
        self.deflater()
            .compress(payload.data(), config.level, budget, out)
    }

    /// The scratch buffer's frame as `Bytes`: cut from a block if small.
    fn cut_scratch(&mut self) -> Bytes {
        let b = if self.scratch.len() > BLOCK_MAX_FRAME {
            Bytes::copy_from_slice(&self.scratch)
        } else {
            self.blocks.cut(&self.scratch)
        };
        // A rare huge frame should not pin its memory for the machine's life.
        if self.scratch.capacity() > POOL_MAX_CAPACITY {
            self.scratch = Vec::new();
        }
        b
    }

    /// Bytes of the current block not yet cut into frames.
    #[cfg(test)]
    fn block_free(&self) -> usize {
        self.blocks.current.capacity()
    }

    /// A pooled buffer with room for `want` bytes, or a new one.
    fn take_buffer(&mut self, want: usize) -> Vec<u8> {
        if want <= POOL_MAX_CAPACITY {
            if let Ok(mut pool) = self.pool.lock() {
                // The most recently returned buffer first: the socket has
                // just read it, so it is likely still in the cache.
                if let Some(i) = pool.iter().rposition(|b| b.capacity() >= want) {
                    return pool.remove(i);
                }
            }
        }
        Vec::with_capacity(want)
    }

    /// Buffers waiting for reuse.
    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.pool.lock().map(|p| p.len()).unwrap_or(0)
    }
}

/// Deflated payloads from this size up go detached in a JSON envelope (to
/// a peer that can take them): embedded, base64 would make them a third
/// larger, which costs more than a message of their own.
#[cfg(feature = "compression")]
const DETACH_DEFLATED_JSON: usize = 1024;

/// The size from which a deflated payload goes detached in `codec`'s
/// envelopes: [`DETACH_DEFLATED_JSON`] in JSON, where it would be base64,
/// and [`DETACH_FROM`](super::DETACH_FROM) as for any payload in
/// MessagePack, which carries bytes as they are.
#[cfg(feature = "compression")]
fn detach_deflated_from(codec: Codec) -> usize {
    match codec {
        Codec::Json => DETACH_DEFLATED_JSON,
        Codec::MsgPack => super::DETACH_FROM,
    }
}

/// Bytes a deflated payload must save at least: what `z` and its key cost.
#[cfg(feature = "compression")]
const MIN_SAVING: usize = 12;

/// The most bytes a deflated payload of `len` bytes may take to be worth
/// sending: [`MIN_SAVING`] fewer.
#[cfg(feature = "compression")]
fn saving_budget(len: usize) -> usize {
    len.saturating_sub(MIN_SAVING)
}

/// Whether `payload`, deflated to `deflated` bytes and embedded, makes
/// the envelope smaller: in a JSON envelope the deflated bytes travel in
/// base64, a third larger, where a JSON payload travelled as it is.
#[cfg(feature = "compression")]
fn embedded_saves(payload: &Payload, codec: Codec, deflated: usize) -> bool {
    let len = payload.len();
    if codec == Codec::Json && payload.kind() == PayloadKind::Json {
        deflated.div_ceil(3) * 4 <= saving_budget(len)
    } else {
        deflated <= saving_budget(len)
    }
}

/// A message the decoder could not read is never sent.
#[cfg(feature = "compression")]
fn is_invalid(m: &Msg) -> bool {
    matches!(m.kind, MsgKind::Invalid(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::{msg_with, payload_of, LIMITS};
    use crate::wire::{decode, encode, Incoming, Msg, MsgKind, Payload};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn within(inner: &Bytes, outer: &Bytes) -> bool {
        let (a, b) = (inner.as_ptr() as usize, outer.as_ptr() as usize);
        a >= b && a + inner.len() <= b + outer.len()
    }

    #[test]
    fn large_payloads_are_shared_with_their_frame_and_small_ones_copied() {
        let big = Payload::binary(vec![9u8; 16 * 1024]);
        let small = Payload::binary(vec![9u8; 32]);
        for (frame, shared) in [
            (msg_with(big.clone()), true),
            (msg_with(small), false),
            (Frame::Raw(Bytes::from(vec![3u8; 4096])), true),
        ] {
            let wire = encode(&frame, Codec::MsgPack, 1).unwrap();
            let backing = wire.data().clone();
            let copied = decode(Incoming::Binary(&backing), &LIMITS).unwrap();
            let sliced = decode(Incoming::SharedBinary(&backing), &LIMITS).unwrap();
            assert_eq!(copied, frame);
            assert_eq!(sliced, frame);
            assert!(!within(payload_of(&copied), &backing));
            assert_eq!(within(payload_of(&sliced), &backing), shared);
        }
        // Large payloads are encoded without the scratch copy, and the
        // result is the same bytes.
        let mut encoder = Encoder::default();
        let direct = encoder
            .encode(&msg_with(big.clone()), Codec::MsgPack, 1)
            .unwrap();
        assert_eq!(
            direct,
            encode(&msg_with(big.clone()), Codec::MsgPack, 1).unwrap()
        );
        assert!(
            encoder.scratch.is_empty(),
            "the scratch buffer was not used"
        );
        // Its buffer comes back when the frame is dropped, and is reused.
        let first = direct.data().as_ptr();
        assert_eq!(encoder.pooled(), 0);
        drop(direct);
        assert_eq!(encoder.pooled(), 1);
        let again = encoder
            .encode(&msg_with(big.clone()), Codec::MsgPack, 1)
            .unwrap();
        assert_eq!(again.data().as_ptr(), first, "the buffer was reused");
        assert_eq!(encoder.pooled(), 0);
        // The pool is bounded: more frames in flight than it holds are
        // freed as usual when dropped.
        let many: Vec<_> = (0..POOL_BUFFERS + 3)
            .map(|_| {
                encoder
                    .encode(&msg_with(big.clone()), Codec::MsgPack, 1)
                    .unwrap()
            })
            .collect();
        drop(again);
        drop(many);
        assert_eq!(encoder.pooled(), POOL_BUFFERS);
        // Buffers too large to keep are never pooled.
        let huge = Payload::binary(vec![1u8; POOL_MAX_CAPACITY]);
        let mut encoder = Encoder::default();
        drop(encoder.encode(&msg_with(huge), Codec::MsgPack, 1).unwrap());
        assert_eq!(encoder.pooled(), 0);
    }

    #[test]
    fn small_frames_are_cut_from_a_block_that_is_reused_once_they_are_dropped() {
        let small = |i: u8| msg_with(Payload::binary(vec![i; 32]));
        let mut encoder = Encoder::default();
        // Frames dropped as soon as they are made (written by the socket):
        // once the first block is full, the next frame starts again at its
        // beginning, in the same memory.
        let first = encoder.encode(&small(0), Codec::MsgPack, 1).unwrap();
        let (start, len) = (first.data().as_ptr() as usize, first.len());
        assert_eq!(first, encode(&small(0), Codec::MsgPack, 1).unwrap());
        drop(first);
        let per_block = BLOCK_SIZE / len;
        let mut reused = false;
        for i in 1..=per_block {
            let t = encoder.encode(&small(i as u8), Codec::MsgPack, 1).unwrap();
            let at = t.data().as_ptr() as usize;
            assert!(
                at >= start && at + t.len() <= start + BLOCK_SIZE,
                "frame {i} left the block"
            );
            reused |= at == start;
        }
        assert!(reused, "the block was not reused in place");
        // Frames still alive keep their block; new frames go to a new one,
        // and the old frames' bytes stay as they were.
        let kept: Vec<_> = (0..2 * per_block)
            .map(|i| {
                let f = small(i as u8);
                (encoder.encode(&f, Codec::MsgPack, 1).unwrap(), f)
            })
            .collect();
        for (t, f) in &kept {
            assert_eq!(decode(t.as_incoming(), &LIMITS).unwrap(), *f);
        }
        // Cut one after the other: each frame starts where the one before
        // ended, except where a block starts.
        let adjacent = kept
            .windows(2)
            .filter(|w| {
                w[0].0.data().as_ptr() as usize + w[0].0.len() == w[1].0.data().as_ptr() as usize
            })
            .count();
        assert!(
            adjacent + 3 >= kept.len(),
            "{adjacent} of {} adjacent",
            kept.len()
        );
        let outside = kept
            .iter()
            .filter(|(t, _)| {
                let at = t.data().as_ptr() as usize;
                at < start || at >= start + BLOCK_SIZE
            })
            .count();
        assert!(outside >= per_block, "only {outside} frames in a new block");
        // JSON frames are cut the same way; frames over the limit are not.
        let text = encoder.encode(&small(9), Codec::Json, 1).unwrap();
        assert_eq!(text, encode(&small(9), Codec::Json, 1).unwrap());
        let free = encoder.block_free();
        let big = msg_with(Payload::binary(vec![5u8; BLOCK_MAX_FRAME]));
        let t = encoder.encode(&big, Codec::MsgPack, 1).unwrap();
        assert!(t.len() > BLOCK_MAX_FRAME);
        assert_eq!(encoder.block_free(), free, "a large frame used the block");
        assert_eq!(decode(t.as_incoming(), &LIMITS).unwrap(), big);
    }

    #[test]
    fn a_servers_bursts_reuse_the_blocks_of_the_burst_before() {
        let frame = |i: u64| {
            Frame::Msg(Msg {
                seq: i + 1,
                id: i + 1,
                ack: Some(i),
                ts: None,
                kind: MsgKind::Plain,
                room: Some(std::sync::Arc::from("lobby")),
                payload: Payload::binary(vec![7u8; 32]),
            })
        };
        let mut encoder = Encoder::for_server();
        // A broadcast to 10 000 members: every frame queued at once.
        let burst = |encoder: &mut Encoder, from: u64| -> Vec<Transmit> {
            (from..from + 10_000)
                .map(|i| encoder.encode(&frame(i), Codec::MsgPack, 1).unwrap())
                .collect()
        };
        let first = burst(&mut encoder, 0);
        let made = encoder.blocks.made;
        assert!(made < 40, "{made} blocks for one burst");
        for (i, t) in first.iter().enumerate() {
            assert_eq!(decode(t.as_incoming(), &LIMITS).unwrap(), frame(i as u64));
        }
        // Written by the sockets, then the next broadcast: its frames fit
        // in the blocks the first one left, and nothing the first one
        // still holds is overwritten.
        drop(first);
        let second = burst(&mut encoder, 10_000);
        assert!(
            encoder.blocks.made <= made + 1,
            "the second burst made {} new blocks",
            encoder.blocks.made - made
        );
        let third_while_queued = burst(&mut encoder, 20_000);
        for (i, t) in second.iter().enumerate() {
            assert_eq!(
                decode(t.as_incoming(), &LIMITS).unwrap(),
                frame(10_000 + i as u64)
            );
        }
        assert!(encoder.blocks.spent.len() <= SERVER_SPENT_BLOCKS);
        assert!(encoder.blocks.size <= SERVER_BLOCK_MAX);
        drop((second, third_while_queued));
        // Steady traffic, each frame written before the next: the blocks
        // shrink back and the spent ones are let go.
        for i in 0..50_000 {
            drop(encoder.encode(&frame(i), Codec::MsgPack, 1).unwrap());
        }
        assert_eq!(encoder.blocks.size, BLOCK_SIZE);
        assert!(encoder.blocks.spent.is_empty());
    }
}
