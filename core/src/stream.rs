//! Room streams: one ordered, numbered stream per room, shared by its
//! members, with a bounded history.
//!
//! Owns a room's offsets, its epoch and its history: every broadcast,
//! publish and presence change in a room becomes one `Entry` with the next
//! offset (a [`RoomEntry`]), encoded at most once per codec and shared,
//! bytes and all, by every member that receives it. A member that was away is sent what it
//! missed from the history; what the history no longer holds is reported
//! to it by offset (PROTOCOL.md, section 3.4). It is pure data: the server
//! machine decides who receives what and when; this module never looks at
//! members, connections or time.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use crate::wire::{self, Codec, Frame, MsgKind, Payload, SessionId, StreamEntry, Transmit};

/// How much of each room's stream the server keeps for members that were
/// away. A member that comes back further behind than this is told which
/// offsets it missed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Most entries kept per room. Default 1 024.
    pub max_entries: usize,
    /// Most payload bytes kept per room. Default 4 MiB. The newest entry is
    /// always kept, whatever its size.
    pub max_bytes: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_entries: 1024,
            max_bytes: 4 << 20,
        }
    }
}

/// One entry of a room's stream, shared by the history and whoever writes
/// it to members: cloning it clones a pointer, and it is encoded at most
/// once per codec, whichever thread asks first.
///
/// A driver that serves stream members from shared feeds
/// ([`Server::set_room_feeds`]) receives these in
/// [`FeedOutput::Publish`] and writes [`RoomEntry::transmit`] to each
/// follower.
///
/// [`Server::set_room_feeds`]: crate::server::Server::set_room_feeds
/// [`FeedOutput::Publish`]: crate::server::FeedOutput::Publish
#[derive(Clone, Debug)]
pub struct RoomEntry(Arc<EntryInner>);

#[derive(Debug)]
struct EntryInner {
    frame: StreamEntry,
    /// The one session the entry is not for (a publisher that does not get
    /// its own publish back, or the joiner a presence diff announces): it is
    /// sent a `skip` for this offset instead.
    except: Option<SessionId>,
    /// The entry encoded for protocol version 1, once per codec, when first
    /// needed: `[JSON, MessagePack]`.
    encoded: [OnceLock<Option<Transmit>>; 2],
    /// The `skip` for its offset, likewise.
    skip: [OnceLock<Option<Transmit>>; 2],
}

impl PartialEq for RoomEntry {
    fn eq(&self, other: &RoomEntry) -> bool {
        self.0.frame == other.0.frame && self.0.except == other.0.except
    }
}

impl RoomEntry {
    /// An entry carrying `frame`, for every member but `except`.
    pub fn new(frame: StreamEntry, except: Option<SessionId>) -> RoomEntry {
        RoomEntry(Arc::new(EntryInner {
            frame,
            except,
            encoded: [OnceLock::new(), OnceLock::new()],
            skip: [OnceLock::new(), OnceLock::new()],
        }))
    }

    /// The room.
    pub fn room(&self) -> &Arc<str> {
        &self.0.frame.room
    }

    /// The entry's offset in its room's stream.
    pub fn offset(&self) -> u64 {
        self.0.frame.offset
    }

    /// The session the entry is not for, if any (it gets a `skip`).
    pub fn except(&self) -> Option<SessionId> {
        self.0.except
    }

    /// The `pub` frame carrying the entry.
    pub fn frame(&self) -> &StreamEntry {
        &self.0.frame
    }

    /// The entry as `codec` writes it at the current protocol version:
    /// encoded once and shared (`None` only through a bug: the payload
    /// would not encode).
    pub fn transmit(&self, codec: Codec) -> Option<Transmit> {
        self.transmit_at(codec, wire::PROTOCOL_VERSION)
    }

    /// [`transmit`](Self::transmit) at protocol `version` (other versions
    /// than the current one are encoded each time).
    pub(crate) fn transmit_at(&self, codec: Codec, version: u8) -> Option<Transmit> {
        if version != wire::PROTOCOL_VERSION {
            return wire::encode(&Frame::Pub(self.0.frame.clone()), codec, version).ok();
        }
        self.0.encoded[usize::from(codec == Codec::MsgPack)]
            .get_or_init(|| wire::encode(&Frame::Pub(self.0.frame.clone()), codec, version).ok())
            .clone()
    }

    /// The `skip` for this entry's offset, which the session it is not for
    /// ([`except`](Self::except)) is sent instead, as `codec` writes it at
    /// the current protocol version: encoded once and shared.
    pub fn skip_transmit(&self, codec: Codec) -> Option<Transmit> {
        self.0.skip[usize::from(codec == Codec::MsgPack)]
            .get_or_init(|| wire::encode(&self.skip_frame(), codec, wire::PROTOCOL_VERSION).ok())
            .clone()
    }

    /// What `session` is sent for this entry as `codec` writes it: the
    /// entry, or its `skip` if the entry is not for `session`.
    pub fn transmit_for(&self, session: SessionId, codec: Codec) -> Option<Transmit> {
        if self.0.except == Some(session) {
            self.skip_transmit(codec)
        } else {
            self.transmit(codec)
        }
    }

    /// The `skip` frame for this entry's offset.
    pub(crate) fn skip_frame(&self) -> Frame {
        Frame::Skip {
            room: self.0.frame.room.clone(),
            offset: self.0.frame.offset,
        }
    }

    /// The payload's size.
    pub fn payload_len(&self) -> usize {
        self.0.frame.payload.len()
    }

    fn bytes(&self) -> usize {
        self.payload_len()
    }
}

/// A room's stream.
#[derive(Debug)]
pub(crate) struct RoomStream {
    epoch: u64,
    /// The last offset given out (0: none yet).
    last: u64,
    history: VecDeque<RoomEntry>,
    bytes: usize,
}

impl RoomStream {
    pub(crate) fn new(epoch: u64) -> RoomStream {
        RoomStream {
            epoch: epoch % wire::MAX_EPOCH,
            last: 0,
            history: VecDeque::new(),
            bytes: 0,
        }
    }

    /// A stream numbered elsewhere (rooms shared by a cluster's servers):
    /// epoch `epoch`, its next entry `last + 1`.
    pub(crate) fn continuing(epoch: u64, last: u64) -> RoomStream {
        RoomStream {
            last,
            ..RoomStream::new(epoch)
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last offset given out.
    pub(crate) fn last(&self) -> u64 {
        self.last
    }

    /// The oldest offset still in the history (`last + 1` when it is empty).
    pub(crate) fn first(&self) -> u64 {
        self.history
            .front()
            .map_or(self.last + 1, RoomEntry::offset)
    }

    /// Appends an entry and returns its offset, trimming the history to its
    /// bounds.
    pub(crate) fn push(
        &mut self,
        room: &Arc<str>,
        kind: MsgKind,
        payload: Payload,
        except: Option<SessionId>,
        limits: &HistoryConfig,
    ) -> u64 {
        self.last += 1;
        let entry = RoomEntry::new(
            StreamEntry {
                room: room.clone(),
                offset: self.last,
                kind,
                ts: None,
                payload,
            },
            except,
        );
        self.bytes += entry.bytes();
        self.history.push_back(entry);
        while self.history.len() > 1
            && (self.history.len() > limits.max_entries.max(1) || self.bytes > limits.max_bytes)
        {
            if let Some(old) = self.history.pop_front() {
                self.bytes -= old.bytes();
            }
        }
        self.last
    }

    /// The newest entry.
    pub(crate) fn newest(&self) -> Option<&RoomEntry> {
        self.history.back()
    }

    /// The entry at `offset`, if the history still holds it.
    pub(crate) fn get(&self, offset: u64) -> Option<&RoomEntry> {
        let index = offset.checked_sub(self.first())?;
        self.history.get(usize::try_from(index).ok()?)
    }

    /// The entries after `offset`, oldest first (those still held).
    #[cfg(test)]
    pub(crate) fn after(&self, offset: u64) -> impl Iterator<Item = &RoomEntry> {
        let first = self.first();
        let skip =
            usize::try_from(offset.saturating_add(1).saturating_sub(first)).unwrap_or(usize::MAX);
        self.history.iter().skip(skip)
    }

    /// Entries and payload bytes held.
    pub(crate) fn held(&self) -> (usize, usize) {
        (self.history.len(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn payload(n: usize) -> Payload {
        Payload::binary(vec![7; n])
    }

    #[test]
    fn offsets_run_from_one_and_history_keeps_its_bounds() {
        let room: Arc<str> = Arc::from("lobby");
        let limits = HistoryConfig {
            max_entries: 3,
            max_bytes: 100,
        };
        let mut s = RoomStream::new(9);
        assert_eq!((s.last(), s.first()), (0, 1));
        for i in 1..=5 {
            assert_eq!(s.push(&room, MsgKind::Plain, payload(10), None, &limits), i);
        }
        assert_eq!((s.first(), s.last()), (3, 5));
        assert_eq!(s.held(), (3, 30));
        let offsets: Vec<u64> = s.after(3).map(RoomEntry::offset).collect();
        assert_eq!(offsets, vec![4, 5]);
        assert_eq!(
            s.after(0).count(),
            3,
            "from before the history: all it holds"
        );
        assert_eq!(s.after(5).count(), 0);
        // Bytes bound the history too; the newest entry always stays.
        s.push(&room, MsgKind::Plain, payload(95), None, &limits);
        assert_eq!((s.first(), s.last()), (6, 6));
        s.push(&room, MsgKind::Plain, payload(500), None, &limits);
        assert_eq!((s.first(), s.last()), (7, 7));
    }

    #[test]
    fn an_entry_is_encoded_once_per_codec_and_shared() {
        let room: Arc<str> = Arc::from("lobby");
        let mut s = RoomStream::new(wire::MAX_EPOCH + 5);
        assert_eq!(s.epoch(), 5, "epochs stay below 2^53");
        s.push(
            &room,
            MsgKind::Plain,
            payload(10),
            None,
            &HistoryConfig::default(),
        );
        let e = s.newest().unwrap().clone();
        let a = e.transmit(Codec::Json).unwrap();
        let b = s.get(1).unwrap().transmit(Codec::Json).unwrap();
        assert_eq!(a.data().as_ptr(), b.data().as_ptr(), "the same bytes");
        let m = e.transmit(Codec::MsgPack).unwrap();
        assert_ne!(a, m);
        let limits = wire::Limits {
            max_message: 1 << 20,
            version: 1,
        };
        let back = wire::decode(m.as_incoming(), &limits).unwrap();
        assert_eq!(back, Frame::Pub(e.frame().clone()));
    }
}
