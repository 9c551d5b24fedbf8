//! Room streams on the client: where each room's stream stands, entries
//! delivered once and in offset order, what was missed reported by offset,
//! and the positions a resumed session hands back (`subs`).
//!
//! A server that announced `stream` sends a room's broadcasts, publishes
//! and presence changes as that room's stream (PROTOCOL.md, section 3.4):
//! a `sub` says where the stream starts on this connection, then entries
//! (`pub`) and the offsets not meant for this client (`skip`) follow
//! without gaps. This file keeps one position per room, drops what it has
//! already seen, reports what the server says is gone
//! ([`Event::Missed`]), and treats a gap as the protocol error it is. It
//! never sends room operations (joins and leaves are messages of the
//! session's own sequence).
//!
//! It also keeps, per room and key, the version of the newest latest
//! value (`lv`, section 3.5) this client has, so that a value comes to the
//! application at most once and never after a newer one.

use crate::link::Received;
use crate::reliable::{MessageId, RoomName};
use crate::wire::{Frame, LatestValue, MsgKind, StreamEntry, StreamPos};

use super::{Client, Event};

/// Where a room's stream stands for this client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Position {
    pub(super) epoch: u64,
    /// The last offset seen (delivered or skipped).
    pub(super) offset: u64,
}

/// Most rooms and keys whose latest version the client keeps. Past it, a
/// value of a new key is delivered without being kept: after a reconnect,
/// the server's snapshot may deliver it again.
pub const MAX_LATEST_TRACKED: usize = 4096;

impl Client {
    /// A room's latest value of a key: delivered unless this client has
    /// it or a newer one of the same epoch.
    pub(super) fn on_latest(&mut self, v: LatestValue) {
        let id = (v.room, v.key);
        let room_for_more = self.latest.len() < MAX_LATEST_TRACKED;
        match self.latest.get_mut(&id) {
            Some((epoch, version)) if *epoch == v.epoch && *version >= v.version => {
                self.stats.latest_stale += 1;
                return;
            }
            Some(had) => *had = (v.epoch, v.version),
            None if room_for_more => {
                self.latest.insert(id.clone(), (v.epoch, v.version));
            }
            None => {}
        }
        self.stats.latest += 1;
        let (room, key) = id;
        self.emit(Event::Latest {
            room,
            key,
            payload: v.payload,
        });
    }

    /// Forgets the latest values of `room` (left, or its join refused):
    /// joined again, it gets them afresh.
    pub(super) fn forget_latest(&mut self, room: &RoomName) {
        self.latest.retain(|(r, _), _| r != room);
    }

    /// The server says where `pos.room`'s stream continues.
    pub(super) fn on_sub(&mut self, pos: StreamPos) {
        let room = pos.room.clone();
        if let Some(from) = pos.missed_from {
            self.emit(Event::Missed {
                room: room.clone(),
                from,
                to: Some(pos.offset),
            });
        }
        let offset = match self.streams.get(&room) {
            // The same stream: never go back (what came before is had).
            Some(p) if p.epoch == pos.epoch => p.offset.max(pos.offset),
            // Another stream: the rest of the old one is gone, how much of
            // it unknown.
            Some(p) => {
                let from = p.offset + 1;
                self.emit(Event::Missed {
                    room: room.clone(),
                    from,
                    to: None,
                });
                pos.offset
            }
            None => pos.offset,
        };
        self.streams.insert(
            room,
            Position {
                epoch: pos.epoch,
                offset,
            },
        );
    }

    /// The next entry of a room's stream (`entry`), or an offset not meant
    /// for this client (`None`).
    pub(super) fn on_stream_entry(
        &mut self,
        room: RoomName,
        offset: u64,
        entry: Option<StreamEntry>,
    ) {
        let Some(pos) = self.streams.get_mut(&room) else {
            // Not a room this client follows (it has left, or the stream
            // has not started): nothing to deliver.
            self.stats.unknown_frames += 1;
            return;
        };
        if offset <= pos.offset {
            self.stats.delivery.duplicates += 1;
            return;
        }
        if offset != pos.offset + 1 {
            let expected = pos.offset + 1;
            self.protocol_error(format!(
                "room `{room}`: stream offset {offset} where {expected} was next"
            ));
            return;
        }
        pos.offset = offset;
        let Some(e) = entry else { return };
        self.stats.delivery.messages_received += 1;
        if e.kind == MsgKind::Presence {
            self.on_room_notice(room, &e.payload);
            return;
        }
        self.emit(Event::Message(Received {
            id: MessageId(offset),
            seq: offset,
            timestamp: e.ts,
            request: false,
            in_stream: true,
            response_to: None,
            room: Some(room),
            payload: e.payload,
        }));
    }

    /// Messages up to `last` are acknowledged: the rooms left by them are
    /// no longer followed (everything broadcast in them before the server
    /// took the leave has arrived), unless joined again since.
    pub(super) fn left_through(&mut self, last: MessageId) {
        while let Some((id, _)) = self.leaving.first() {
            if *id > last {
                break;
            }
            let (_, room) = self.leaving.remove(0);
            if !self.rooms.contains(&room) {
                self.streams.remove(&room);
                self.forget_latest(&room);
                self.forget_maps(&room);
            }
        }
    }

    /// Right after a resumed `welcome`: where each stream stands, so the
    /// server sends what this client missed.
    pub(super) fn send_subs(&mut self) {
        let list = self
            .streams
            .iter()
            .map(|(room, p)| StreamPos {
                room: room.clone(),
                epoch: p.epoch,
                offset: p.offset,
                missed_from: None,
            })
            .collect();
        self.transmit(&Frame::Subs(list));
    }
}
