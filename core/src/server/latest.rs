//! Latest values: a room's newest value per key, sent to its members as
//! `lv` frames that supersede each other (PROTOCOL.md, section 3.5).
//!
//! Owns each room's values ([`LatestRoom`]: the newest payload of every
//! key, its version and the room's epoch), [`Server::broadcast_latest`],
//! and the snapshot a member's connection gets when it opens or joins. A
//! member whose client announced [`wire::CAP_LATEST`] gets `lv` frames
//! outside its session's sequence: nothing is kept per member, a frame
//! lost with a connection is made good by the snapshot on the next one,
//! and a driver that turned on [`Server::set_latest_slots`] gets each as a
//! [`ServerOutput::Latest`] it may replace with a newer one of the same key
//! while the connection is not writable. A member whose client did not
//! announce it gets each value as an ordinary room message in its own
//! sequence (acknowledged, and a slow consumer like any other).
//!
//! It never decides membership; a room's values live while the room has
//! members, like its stream.

use std::sync::Arc;

use crate::reliable::{RoomName, SendError};
use crate::time::Instant;
use crate::wire::{self, Frame, LatestValue, MsgKind, Payload, SessionId, Transmit};

use super::conn::ConnPhase;
use super::session::SessionState;
use super::{ConnectionId, Map, Server, ServerOutput};

/// A latest value on its way to one connection
/// ([`ServerOutput::Latest`]): the frame, and what it supersedes.
#[derive(Clone, Debug, PartialEq)]
pub struct LatestOut {
    /// The room.
    pub room: Arc<str>,
    /// The key: a newer frame of the same room and key makes this one
    /// useless, so a driver that has not written it yet may drop it.
    pub key: Arc<str>,
    /// The encoded `lv` frame.
    pub transmit: Transmit,
}

/// One room's latest values.
#[derive(Debug)]
pub(super) struct LatestRoom {
    epoch: u64,
    /// The last version given, over all keys.
    version: u64,
    values: Map<Arc<str>, (u64, Payload)>,
}

/// Whether `key` is a key a value may have: 1 to 256 bytes.
fn check_key(key: &str) -> Result<(), SendError> {
    if key.is_empty() || key.len() > wire::MAX_TOKEN_LEN {
        return Err(SendError::BadKey);
    }
    Ok(())
}

impl Server {
    /// Turns [`ServerOutput::Latest`] on: latest values to connections
    /// come as those, so the driver can keep only the newest of each key
    /// while a connection is not writable. Off, they come as
    /// [`ServerOutput::Transmit`].
    pub fn set_latest_slots(&mut self, on: bool) {
        self.latest_slots = on;
    }

    /// Sets `room`'s value of `key` and sends it to every member: as an
    /// `lv` frame to each connected member whose client announced
    /// `latest` (a member that reads slowly gets the newest value, not a
    /// backlog; one that is away gets every key's newest value when it
    /// comes back), and as a room message to the others. Returns how many
    /// members it went to; a room without members keeps nothing (0).
    ///
    /// Refused with [`SendError::BadKey`] for a key that is not 1 to 256
    /// bytes, [`SendError::TooLarge`] past the message size limit,
    /// [`SendError::TooManyKeys`] for a new key past
    /// [`ServerConfig::max_latest_keys`](crate::config::ServerConfig::max_latest_keys),
    /// and [`SendError::Unsupported`] in a cluster
    /// ([`Server::set_shared_rooms`]), whose servers do not share latest
    /// values.
    pub fn broadcast_latest(
        &mut self,
        now: Instant,
        room: &str,
        key: &str,
        payload: Payload,
    ) -> Result<usize, SendError> {
        self.advance(now);
        check_key(key)?;
        if room.is_empty() || room.len() > wire::MAX_TOKEN_LEN {
            return Err(SendError::BadRoom);
        }
        SendError::check_size(payload.len(), self.config.max_message_size)?;
        if self.shared_rooms {
            return Err(SendError::Unsupported(
                "latest values are not shared between the servers of a cluster",
            ));
        }
        if self.rooms.size(room) == 0 {
            return Ok(0);
        }
        let name = self.rooms.name(room);
        let max = self.config.max_latest_keys;
        if !self.latest.contains_key(&name) {
            let epoch = self.next_latest_epoch(&name);
            self.latest.insert(
                name.clone(),
                LatestRoom {
                    epoch,
                    version: 0,
                    values: Map::default(),
                },
            );
        }
        let values = self
            .latest
            .get_mut(&name)
            .unwrap_or_else(|| unreachable!("inserted above"));
        let key: Arc<str> = match values.values.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None if values.values.len() >= max => return Err(SendError::TooManyKeys { max }),
            None => Arc::from(key),
        };
        values.version += 1;
        let value = LatestValue {
            room: name.clone(),
            key: key.clone(),
            epoch: values.epoch,
            version: values.version,
            payload: payload.clone(),
        };
        values.values.insert(key, (values.version, payload.clone()));
        let members: Vec<SessionId> = self.rooms.members(room).collect();
        let frame = Frame::Latest(value);
        // Encoded once per codec and version the members use.
        let mut encoded: Vec<((wire::Codec, u8), Transmit)> = Vec::new();
        let mut sent = 0;
        for m in members {
            match self.latest_connection(m) {
                Some(Some((connection, form))) => {
                    let t = match encoded.iter().find(|(f, _)| *f == form) {
                        Some((_, t)) => t.clone(),
                        None => match wire::encode(&frame, form.0, form.1) {
                            Ok(t) => {
                                encoded.push((form, t.clone()));
                                t
                            }
                            Err(_) => continue,
                        },
                    };
                    self.send_latest_frame(connection, &frame, t);
                    sent += 1;
                }
                // Away: the snapshot on its next connection.
                Some(None) => sent += 1,
                None => {
                    if self.send_to_member(m, payload.clone(), MsgKind::Plain, &name) {
                        sent += 1;
                    }
                }
            }
        }
        self.stats.latest_values += 1;
        self.process_evictions();
        Ok(sent)
    }

    /// How `session` gets latest values: `None` as room messages (its
    /// client did not announce `latest`); `Some(None)` by a snapshot when
    /// it comes back (announced, not connected now); `Some(Some(..))` on
    /// this connection, with its codec and version.
    fn latest_connection(
        &self,
        session: SessionId,
    ) -> Option<Option<(ConnectionId, (wire::Codec, u8))>> {
        let s = self.sessions.get(&session)?;
        if !s.latest {
            return None;
        }
        let SessionState::Attached(connection) = s.state else {
            return Some(None);
        };
        match self.conns.get(&connection).map(|c| &c.phase) {
            Some(ConnPhase::Open { codec, version, .. }) => {
                Some(Some((connection, (*codec, *version))))
            }
            _ => Some(None),
        }
    }

    /// Hands one `lv` frame for `connection` to the driver: counted here
    /// as a `Transmit`; with slots, by the driver when it writes it (a
    /// newer value may replace it first).
    fn send_latest_frame(&mut self, connection: ConnectionId, frame: &Frame, t: Transmit) {
        if self.latest_slots {
            let Frame::Latest(v) = frame else {
                return;
            };
            self.outputs.push_back(ServerOutput::Latest(
                connection,
                LatestOut {
                    room: v.room.clone(),
                    key: v.key.clone(),
                    transmit: t,
                },
            ));
        } else {
            self.stats.traffic.frames_out += 1;
            self.stats.traffic.bytes_out += t.data().len() as u64;
            self.outputs
                .push_back(ServerOutput::Transmit(connection, t));
        }
    }

    /// A session's connection opened: every value of every room it is in,
    /// so what it missed while away (or lost with the last connection) is
    /// made good by the newest. `was_latest`: its previous connection took
    /// `lv` frames; if this one does not, the values come as room
    /// messages, for the ones sent while it was away were not queued.
    pub(super) fn latest_snapshot(&mut self, session: SessionId, was_latest: bool) {
        let rooms: Vec<RoomName> = match self.sessions.get(&session) {
            Some(s) if s.latest || was_latest => s.rooms.iter().map(|j| j.room.clone()).collect(),
            _ => return,
        };
        for room in rooms {
            self.latest_room_to(session, &room);
        }
    }

    /// `session` joined `room`: the room's values, as it gets them.
    pub(super) fn latest_joined(&mut self, session: SessionId, room: &RoomName) {
        self.latest_room_to(session, room);
    }

    /// Sends `room`'s values to `session`, oldest version first.
    fn latest_room_to(&mut self, session: SessionId, room: &RoomName) {
        let Some(values) = self.latest.get(room) else {
            return;
        };
        let mut all: Vec<(u64, Arc<str>, Payload)> = values
            .values
            .iter()
            .map(|(k, (v, p))| (*v, k.clone(), p.clone()))
            .collect();
        if all.is_empty() {
            return;
        }
        all.sort_unstable_by_key(|(v, _, _)| *v);
        let epoch = values.epoch;
        match self.latest_connection(session) {
            Some(Some((connection, (codec, version)))) => {
                for (v, key, payload) in all {
                    let frame = Frame::Latest(LatestValue {
                        room: room.clone(),
                        key,
                        epoch,
                        version: v,
                        payload,
                    });
                    match wire::encode(&frame, codec, version) {
                        Ok(t) => self.send_latest_frame(connection, &frame, t),
                        Err(_) => self.encode_failed(connection),
                    }
                }
            }
            Some(None) => {}
            None => {
                for (_, _, payload) in all {
                    self.send_to_member(session, payload, MsgKind::Plain, room);
                }
            }
        }
    }

    /// Forgets `room`'s values (it has no member left).
    pub(super) fn drop_latest(&mut self, room: &str) {
        self.latest.remove(room);
    }

    /// A room's values' epoch, made like a stream's, below
    /// [`wire::MAX_EPOCH`].
    fn next_latest_epoch(&mut self, room: &str) -> u64 {
        self.next_epoch_of(b"latest values", room) % wire::MAX_EPOCH
    }

    /// The latest values `room` holds (for tests and the application).
    pub fn latest_values(&self, room: &str) -> Vec<(Arc<str>, Payload)> {
        let Some(values) = self.latest.get(room) else {
            return Vec::new();
        };
        let mut all: Vec<(u64, Arc<str>, Payload)> = values
            .values
            .iter()
            .map(|(k, (v, p))| (*v, k.clone(), p.clone()))
            .collect();
        all.sort_unstable_by_key(|(v, _, _)| *v);
        all.into_iter().map(|(_, k, p)| (k, p)).collect()
    }
}
