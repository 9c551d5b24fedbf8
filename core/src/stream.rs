//! Room streams: one ordered, numbered stream per room, shared by its
//! members, with a bounded history.
//!
//! Owns a room's offsets, its epoch and its history: every broadcast,
//! publish and presence change in a room becomes one `Entry` with the next
//! offset, encoded at most once per codec and shared, bytes and all, by
//! every member that receives it. A member that was away is sent what it
//! missed from the history; what the history no longer holds is reported
//! to it by offset (PROTOCOL.md, section 3.4). It is pure data: the server
//! machine decides who receives what and when; this module never looks at
//! members, connections or time.

use std::collections::VecDeque;
use std::sync::Arc;

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

/// One entry of a room's stream.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) frame: StreamEntry,
    /// The one session the entry is not for (a publisher that does not get
    /// its own publish back, or the joiner a presence diff announces): it is
    /// sent a `skip` for this offset instead.
    pub(crate) except: Option<SessionId>,
    /// The entry encoded for protocol version 1, once per codec, when first
    /// needed: `[JSON, MessagePack]`.
    encoded: [Option<Transmit>; 2],
}

impl Entry {
    /// The entry as `codec` at `version` writes it: encoded once and shared
    /// (`None` only through a bug: the payload would not encode).
    pub(crate) fn transmit(&mut self, codec: Codec, version: u8) -> Option<Transmit> {
        let frame = Frame::Pub(self.frame.clone());
        if version != wire::PROTOCOL_VERSION {
            return wire::encode(&frame, codec, version).ok();
        }
        let slot = &mut self.encoded[usize::from(codec == Codec::MsgPack)];
        if slot.is_none() {
            *slot = wire::encode(&frame, codec, version).ok();
        }
        slot.clone()
    }

    fn bytes(&self) -> usize {
        self.frame.payload.len()
    }
}

/// A room's stream.
#[derive(Debug)]
pub(crate) struct RoomStream {
    epoch: u64,
    /// The last offset given out (0: none yet).
    last: u64,
    history: VecDeque<Entry>,
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
            .map_or(self.last + 1, |e| e.frame.offset)
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
        let entry = Entry {
            frame: StreamEntry {
                room: room.clone(),
                offset: self.last,
                kind,
                ts: None,
                payload,
            },
            except,
            encoded: [None, None],
        };
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
    pub(crate) fn newest(&mut self) -> Option<&mut Entry> {
        self.history.back_mut()
    }

    /// The entry at `offset`, if the history still holds it.
    pub(crate) fn get_mut(&mut self, offset: u64) -> Option<&mut Entry> {
        let index = offset.checked_sub(self.first())?;
        self.history.get_mut(usize::try_from(index).ok()?)
    }

    /// The entries after `offset`, oldest first (those still held).
    #[cfg(test)]
    pub(crate) fn after(&mut self, offset: u64) -> impl Iterator<Item = &mut Entry> {
        let first = self.first();
        let skip =
            usize::try_from(offset.saturating_add(1).saturating_sub(first)).unwrap_or(usize::MAX);
        self.history.iter_mut().skip(skip)
    }

    /// Entries and payload bytes held.
    pub(crate) fn held(&self) -> (usize, usize) {
        (self.history.len(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let offsets: Vec<u64> = s.after(3).map(|e| e.frame.offset).collect();
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
        let e = s.newest().unwrap();
        let a = e.transmit(Codec::Json, 1).unwrap();
        let b = e.transmit(Codec::Json, 1).unwrap();
        assert_eq!(a.data().as_ptr(), b.data().as_ptr(), "the same bytes");
        let m = e.transmit(Codec::MsgPack, 1).unwrap();
        assert_ne!(a, m);
        let limits = wire::Limits {
            max_message: 1 << 20,
            version: 1,
        };
        let back = wire::decode(m.as_incoming(), &limits).unwrap();
        assert_eq!(back, Frame::Pub(e.frame.clone()));
    }
}
