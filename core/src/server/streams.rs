//! Room streams on the server: who of a room's members gets an entry, a
//! `skip` or nothing, the `sub` that starts a member's stream on a
//! connection, and the recovery of a resumed member from its offsets.
//!
//! A member whose client announced `stream` is served from the room's
//! stream ([`RoomStream`]): one entry per broadcast, publish or presence
//! change, encoded once and the same bytes for every member, with nothing
//! kept per member but where its stream started. A detached member costs
//! nothing per entry: when it resumes, it says where its streams stand
//! (`subs`) and is sent what the history still holds, and told by offset
//! what it no longer does (PROTOCOL.md, section 3.4). Members whose
//! clients did not announce `stream` keep their own sequenced copy
//! (`rooms.rs`). This file never decides membership or policy.

use std::collections::VecDeque;

use crate::reliable::RoomName;
use crate::stream::RoomStream;
use crate::wire::{Frame, MsgKind, Payload, SessionId, StreamPos, Transmit};

use super::conn::ConnPhase;
use super::session::SessionState;
use super::{ConnectionId, FeedOutput, Server, ServerOutput, ServerStats};

/// A session's membership of a room.
#[derive(Clone, Debug)]
pub(super) struct Joined {
    pub(super) room: RoomName,
    /// The room stream's last offset when the session joined: a member that
    /// comes back without a position for the room is sent everything after
    /// it.
    pub(super) at: u64,
    /// Shared rooms: where the client said its stream stands (epoch,
    /// offset) when the room had no copy here to recover from; used when
    /// the copy is opened.
    pub(super) told: Option<(u64, u64)>,
}

impl Server {
    /// The stream of `room`, made on first use with a fresh epoch.
    pub(super) fn stream_of(&mut self, room: &RoomName) -> &mut RoomStream {
        if !self.streams.contains_key(room) {
            let epoch = self.next_epoch(room);
            self.streams.insert(room.clone(), RoomStream::new(epoch));
        }
        self.streams
            .get_mut(room)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// A stream's epoch (see [`Server::next_epoch_of`]).
    fn next_epoch(&mut self, room: &str) -> u64 {
        self.next_epoch_of(b"room stream", room)
    }

    /// An epoch for what `label` names in `room` (a room's stream, its
    /// latest values): keyed by the resume secret (random per process
    /// unless the application sets it), the room and a count of the epochs
    /// this server made, so one made again, here or in another process, is
    /// told apart from the one a member remembers.
    pub(super) fn next_epoch_of(&mut self, label: &[u8], room: &str) -> u64 {
        use siphasher::sip::SipHasher13;
        self.streams_made += 1;
        let mut h = SipHasher13::new_with_key(&self.config.resume_secret.0);
        core::hash::Hasher::write(&mut h, label);
        core::hash::Hasher::write(&mut h, room.as_bytes());
        core::hash::Hasher::write_u64(&mut h, self.streams_made);
        core::hash::Hasher::finish(&h)
    }

    /// Forgets `room`'s stream and latest values once the room has no
    /// member left (and tells the driver to forget its feed).
    pub(super) fn drop_stream_if_empty(&mut self, room: &str) {
        if self.rooms.size(room) == 0 {
            self.drop_latest(room);
            if let Some((room, _)) = self.streams.remove_entry(room) {
                if self.room_feeds {
                    self.outputs
                        .push_back(ServerOutput::Feed(FeedOutput::Close { room }));
                }
            }
        }
    }

    /// Whether `session` is served from room streams.
    pub(super) fn streams_session(&self, session: SessionId) -> bool {
        self.sessions.get(&session).is_some_and(|s| s.stream)
    }

    /// Appends an entry to `room`'s stream, if any of `members` is served
    /// from streams, and sends it to each of those that is attached and not
    /// recovering (or, with room feeds, hands it to the driver once);
    /// `except` gets a `skip` instead. Returns the members served through
    /// their own sequence, for the caller, and how many stream-served
    /// members the entry is for.
    pub(super) fn publish_entry(
        &mut self,
        room: &RoomName,
        kind: MsgKind,
        payload: Payload,
        except: Option<SessionId>,
        members: &[SessionId],
    ) -> (Vec<SessionId>, usize) {
        let mut legacy = Vec::new();
        let mut live = Vec::new();
        let mut streamed = 0;
        let mut any_stream = false;
        let feeds = self.room_feeds;
        for &m in members {
            let Some(s) = self.sessions.get(&m) else {
                continue;
            };
            if !s.stream {
                legacy.push(m);
                continue;
            }
            any_stream = true;
            streamed += usize::from(Some(m) != except);
            if feeds {
                continue; // the feed's followers are the driver's
            }
            let Some(conn) = s.state.connection().filter(|_| !s.awaiting_subs) else {
                continue;
            };
            if let Some(&ConnPhase::Open { codec, version, .. }) =
                self.conns.get(&conn).map(|c| &c.phase)
            {
                live.push((m, conn, codec, version));
            }
        }
        if !any_stream {
            return (legacy, 0);
        }
        let limits = self.config.history;
        let offset = self
            .stream_of(room)
            .push(room, kind, payload, except, &limits);
        let Some(stream) = self.streams.get(room) else {
            return (legacy, streamed);
        };
        let epoch = stream.epoch();
        let Some(entry) = stream.newest().cloned() else {
            return (legacy, streamed);
        };
        if feeds {
            self.outputs
                .push_back(ServerOutput::Feed(FeedOutput::Publish { entry, epoch }));
            return (legacy, streamed);
        }
        let mut skip = None;
        let mut failed = Vec::new();
        for (m, conn, codec, version) in live {
            if Some(m) == except {
                skip = Some(conn);
                continue;
            }
            match entry.transmit_at(codec, version) {
                Some(t) => hand_over(&mut self.stats, &mut self.outputs, conn, t),
                None => failed.push(conn),
            }
        }
        if let Some(conn) = skip {
            let room = room.clone();
            self.transmit(conn, &Frame::Skip { room, offset });
        }
        for conn in failed {
            self.encode_failed(conn);
        }
        (legacy, streamed)
    }

    /// With room feeds: from now on `conn` writes `room`'s entries after
    /// offset `after` from the room's feed.
    pub(super) fn follow(&mut self, conn: ConnectionId, room: &RoomName, after: u64) {
        if !self.room_feeds {
            return;
        }
        let Some(&ConnPhase::Open { codec, session, .. }) = self.conns.get(&conn).map(|c| &c.phase)
        else {
            return;
        };
        let Some(epoch) = self.streams.get(room).map(RoomStream::epoch) else {
            return;
        };
        self.outputs
            .push_back(ServerOutput::Feed(FeedOutput::Follow {
                connection: conn,
                session,
                room: room.clone(),
                epoch,
                after,
                codec,
            }));
    }

    /// With room feeds: `session` left `room`; its connection, if it
    /// follows the room's feed, stops after what was published so far.
    pub(super) fn unfollow(&mut self, session: SessionId, room: &RoomName) {
        if !self.room_feeds || !self.streams_session(session) {
            return;
        }
        if let Some(conn) = self.live_connection(session) {
            self.outputs
                .push_back(ServerOutput::Feed(FeedOutput::Unfollow {
                    connection: conn,
                    room: room.clone(),
                }));
        }
    }

    /// The connection a stream-served session receives live entries on:
    /// attached, and not waiting for its `subs`.
    pub(super) fn live_connection(&self, session: SessionId) -> Option<ConnectionId> {
        let s = self.sessions.get(&session)?;
        if s.awaiting_subs {
            return None;
        }
        s.state.connection()
    }

    /// Sends the entry at `offset` of `room` (or a `skip`, if it is not for
    /// `session`) on `conn`.
    pub(super) fn send_stored(
        &mut self,
        conn: ConnectionId,
        session: SessionId,
        room: &str,
        offset: u64,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let ConnPhase::Open { codec, version, .. } = c.phase else {
            return;
        };
        let Some(stream) = self.streams.get(room) else {
            return;
        };
        let Some(entry) = stream.get(offset) else {
            return;
        };
        if entry.except() == Some(session) {
            let skip = Frame::Skip {
                room: entry.room().clone(),
                offset,
            };
            self.transmit(conn, &skip);
            return;
        }
        match entry.transmit_at(codec, version) {
            Some(t) => hand_over(&mut self.stats, &mut self.outputs, conn, t),
            None => self.encode_failed(conn),
        }
    }

    /// A stream-served session joined `room`: where its stream starts, and,
    /// if it receives live entries now, the `sub` that says so.
    pub(super) fn stream_joined(&mut self, session: SessionId, room: &RoomName) -> u64 {
        let (epoch, at) = {
            let stream = self.stream_of(room);
            (stream.epoch(), stream.last())
        };
        if let Some(conn) = self.live_connection(session) {
            let sub = Frame::Sub(StreamPos {
                room: room.clone(),
                epoch,
                offset: at,
                missed_from: None,
            });
            self.transmit(conn, &sub);
            self.follow(conn, room, at);
        }
        at
    }

    /// A resumed client says where its room streams stand: each of its
    /// session's rooms gets a `sub` and what the history holds after it;
    /// entries the history no longer holds are named in the `sub`. Rooms
    /// the client does not list start where the session joined them.
    pub(super) fn on_subs(
        &mut self,
        connection: ConnectionId,
        session: SessionId,
        list: Vec<StreamPos>,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        // Only the one `subs` a resume waits for: another would start the
        // member's streams again where they already run.
        if !s.stream || !s.awaiting_subs || s.state != SessionState::Attached(connection) {
            return;
        }
        s.awaiting_subs = false;
        let joined = s.rooms.clone();
        for j in joined {
            let told = list.iter().find(|p| *p.room == *j.room);
            self.recover(connection, session, &j, told);
        }
    }

    fn recover(
        &mut self,
        conn: ConnectionId,
        session: SessionId,
        joined: &Joined,
        told: Option<&StreamPos>,
    ) {
        let Some(stream) = self.streams.get(&joined.room) else {
            // No copy yet (shared rooms: it is opened when the cluster's
            // store answers): keep what the client said for then.
            if let Some(s) = self.sessions.get_mut(&session) {
                for j in s.rooms.iter_mut().filter(|j| j.room == joined.room) {
                    j.told = told.map(|p| (p.epoch, p.offset));
                }
            }
            return;
        };
        let (epoch, first, last) = (stream.epoch(), stream.first(), stream.last());
        // Where the member's copy stands in this stream: what it says, if it
        // is this stream and not ahead of it; else where it joined.
        let from = match told {
            Some(p) if p.epoch == epoch && p.offset <= last => p.offset.max(joined.at),
            _ => joined.at,
        };
        let (offset, missed_from) = if from + 1 < first {
            (first - 1, Some(from + 1))
        } else {
            (from, None)
        };
        let sub = Frame::Sub(StreamPos {
            room: joined.room.clone(),
            epoch,
            offset,
            missed_from,
        });
        self.transmit(conn, &sub);
        if self.room_feeds {
            // The feed holds what the history does: the connection writes
            // it from there, not through a queue of its own.
            self.follow(conn, &joined.room, offset);
            return;
        }
        for o in offset + 1..=last {
            self.send_stored(conn, session, &joined.room, o);
        }
    }
}

/// Queues an entry's shared bytes for `conn`, counted as traffic.
fn hand_over(
    stats: &mut ServerStats,
    outputs: &mut VecDeque<ServerOutput>,
    conn: ConnectionId,
    t: Transmit,
) {
    stats.traffic.frames_out += 1;
    stats.traffic.bytes_out += t.len() as u64;
    outputs.push_back(ServerOutput::Transmit(conn, t));
}
