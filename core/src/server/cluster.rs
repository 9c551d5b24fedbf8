//! Rooms shared by the servers of a cluster: membership, presence and room
//! streams kept in a store the servers share, numbered there, and carried
//! out here only for this server's own members.
//!
//! With shared rooms ([`Server::set_shared_rooms`]), a room's stream is
//! numbered by the cluster, not by this server: a client's join, leave or
//! publish becomes a [`ClusterOutput`] that the driver takes to the
//! cluster, and its message is not acknowledged until the driver says how
//! it went ([`Server::room_joined`], [`Server::room_left`],
//! [`Server::room_published`], [`Server::room_failed`]); every entry of
//! the room's stream, this server's own included, comes back through
//! [`Server::room_entry`] with its cluster-wide offset, in order, and
//! reaches this server's members exactly as a local broadcast would. A
//! local copy of each followed room's stream keeps the history that
//! resumed members recover from, so a member that moves between servers
//! finds the same offsets and epochs on each.
//!
//! This file owns the outputs, the entry points the driver calls with
//! what the cluster said, and the local copy's consistency (no gaps: an
//! entry out of order is refused with where the copy stands, and the
//! driver fills the gap first). It never talks to the store, never decides
//! membership on its own, and never numbers an entry.

use crate::reliable::{MessageId, RoomName};
use crate::rooms::Member;
use crate::stream::RoomStream;
use crate::time::Instant;
use crate::wire::{Frame, MsgKind, Payload, SessionId, StreamPos};

use super::delivery::SessionTimers;
use super::streams::Joined;
use super::{FeedOutput, RoomError, RoomOp, Server, ServerEvent, ServerOutput};

/// A client message whose room operation waits for the cluster: it is
/// acknowledged once the driver says how the operation went, or refused by
/// its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientOp {
    /// The session that sent it.
    pub session: SessionId,
    /// Its sequence number.
    pub seq: u64,
    /// Its id (a refusal names it).
    pub id: MessageId,
}

impl ClientOp {
    /// A join asked for in the `hello` that opened `session`: no message
    /// carried it, so it has sequence number and id 0, holds no
    /// acknowledgment back, and a refusal names id 0.
    pub fn hello(session: SessionId) -> ClientOp {
        ClientOp {
            session,
            seq: 0,
            id: MessageId(0),
        }
    }

    /// Whether it is a join asked for in a `hello` ([`ClientOp::hello`]).
    pub fn from_hello(&self) -> bool {
        self.seq == 0
    }
}

/// What a server with shared rooms asks its driver to take to the cluster
/// ([`ServerOutput::Cluster`]), in the order given: the cluster must apply
/// them in that order.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ClusterOutput {
    /// Append a message to `room`'s stream, for every member but `except`.
    /// Then [`Server::room_published`] or [`Server::room_failed`] with
    /// `origin`, if there is one.
    Publish {
        /// The room.
        room: RoomName,
        /// The message.
        payload: Payload,
        /// The member it is not for (a publisher that does not get its
        /// own publish back).
        except: Option<SessionId>,
        /// The client message it came from.
        origin: Option<ClientOp>,
    },
    /// Make `session` a member of `room` (with `presence`, announce it to
    /// the members in the room's stream). Then [`Server::room_joined`]
    /// with where the room's stream stands and its members, or
    /// [`Server::room_failed`].
    Join {
        /// The room.
        room: RoomName,
        /// The session.
        session: SessionId,
        /// How its members see it.
        member: Member,
        /// Whether the room has presence (the policy's choice).
        presence: bool,
        /// At most this many members in the room, cluster-wide.
        max_members: usize,
        /// The client message it came from.
        origin: Option<ClientOp>,
    },
    /// Take `session` out of `room` (with `presence`, announce it). Then
    /// [`Server::room_left`] (which takes it out here, for a client's
    /// leave) or [`Server::room_failed`]. Without `origin` the session has
    /// left this server's copy already (its session ended, or it was
    /// evicted).
    Leave {
        /// The room.
        room: RoomName,
        /// The session.
        session: SessionId,
        /// How its members saw it.
        member: Member,
        /// Whether the room has presence.
        presence: bool,
        /// The session ended: it will never send again, so what the
        /// cluster remembers of its publishes (to take each once) can go.
        ended: bool,
        /// The client message it came from.
        origin: Option<ClientOp>,
    },
}

impl ClusterOutput {
    /// The leave of `session` from `room` that repairs the store: the
    /// session is no longer on this server (or never took the room up
    /// here), so there is no member to describe and no client message
    /// behind it.
    pub fn repair_leave(room: &str, session: SessionId, presence: bool) -> ClusterOutput {
        ClusterOutput::Leave {
            room: room.into(),
            session,
            member: Member {
                client: String::new(),
                identity: None,
            },
            presence,
            ended: false,
            origin: None,
        }
    }
}

/// Where a member's stream starts in a room the cluster made it a member
/// of ([`Server::room_joined`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinedAt {
    /// The room stream's epoch.
    pub epoch: u64,
    /// The member's stream starts after this offset (its join's
    /// announcement, or the last entry when there was none).
    pub at: u64,
    /// The room's members, cluster-wide, as of `at` (empty when the room
    /// has no presence).
    pub members: Vec<Member>,
}

/// One entry of a shared room's stream, as the cluster numbered it.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedEntry {
    /// Its offset in the room's stream.
    pub offset: u64,
    /// A message ([`MsgKind::Plain`]) or a presence diff
    /// ([`MsgKind::Presence`]).
    pub kind: MsgKind,
    /// Its payload.
    pub payload: Payload,
    /// The member it is not for (it gets a `skip`).
    pub except: Option<SessionId>,
}

/// What [`Server::room_entry`] did with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum EntryOutcome {
    /// Delivered to this server's members.
    Applied,
    /// At or below where the local copy stands: already had.
    Duplicate,
    /// Beyond the next offset: the entries after `after` are missing. Fill
    /// them from the cluster first ([`Server::room_open`]), then this one.
    Gap {
        /// Where the local copy stands.
        after: u64,
    },
    /// Of another epoch than the local copy: the cluster's stream was made
    /// again (its store lost it). Open the room again from the cluster.
    OtherEpoch,
    /// No local member follows the room.
    NotFollowed,
}

impl Server {
    /// Shares rooms with the other servers of a cluster (module docs of
    /// `cluster.rs`): joins, leaves and publishes become
    /// [`ClusterOutput`]s, and room streams are numbered by the cluster.
    /// Off by default; set it before the first connection.
    pub fn set_shared_rooms(&mut self, on: bool) {
        self.shared_rooms = on;
    }

    /// Whether rooms are shared with a cluster.
    pub fn shared_rooms(&self) -> bool {
        self.shared_rooms
    }

    /// Where this server's copy of `room`'s stream stands: its epoch and
    /// last offset (`None`: no local member follows the room).
    pub fn room_position(&self, room: &str) -> Option<(u64, u64)> {
        self.streams.get(room).map(|s| (s.epoch(), s.last()))
    }

    /// Whether `room` has presence (the policy's choice): what a
    /// [`ClusterOutput`] for it says, for a driver that acts on its own
    /// (taking a crashed server's members out, say).
    pub fn room_presence(&self, room: &str) -> bool {
        self.policy.presence(room)
    }

    /// How `session` is seen by the other members of its rooms.
    pub fn member(&self, session: SessionId) -> Option<Member> {
        self.member_of(session)
    }

    /// Forgets the copy of `room`'s stream if no local member is left
    /// (one opened for a join the cluster then refused).
    pub fn room_close_if_empty(&mut self, now: Instant, room: &str) {
        self.advance(now);
        self.drop_stream_if_empty(room);
    }

    /// The rooms this server keeps a copy of (those with local members).
    pub fn followed_rooms(&self) -> Vec<RoomName> {
        self.streams.keys().cloned().collect()
    }

    /// Opens (or brings up to date) this server's copy of `room`'s stream:
    /// epoch `epoch`, the cluster's last offset `last`, and the newest
    /// entries its history holds (`history`, in offset order, ending at
    /// `last`). Call it before a session that is a member of `room` is
    /// imported or taken up here, and to fill a gap ([`EntryOutcome`]).
    ///
    /// Entries the copy lacks are delivered to the local members; if the
    /// history no longer reaches back to where the copy stands, or the
    /// epoch changed, the local members are told where their streams now
    /// stand (a `sub` that names what they missed).
    pub fn room_open(
        &mut self,
        now: Instant,
        room: &str,
        epoch: u64,
        last: u64,
        history: Vec<SharedEntry>,
    ) {
        self.advance(now);
        let name = self.rooms.name(room);
        let first = history.first().map_or(last + 1, |e| e.offset);
        let Some(stream) = self.streams.get(room) else {
            let mut stream = RoomStream::continuing(epoch, first - 1);
            let limits = self.config.history;
            for e in history.into_iter().filter(|e| e.offset <= last) {
                if e.offset != stream.last() + 1 {
                    break;
                }
                stream.push(&name, e.kind, e.payload, e.except, &limits);
                if self.room_feeds {
                    if let Some(entry) = stream.newest().cloned() {
                        self.outputs
                            .push_back(ServerOutput::Feed(FeedOutput::Publish { entry, epoch }));
                    }
                }
            }
            if stream.last() < last {
                stream = RoomStream::continuing(epoch, last);
            }
            let first = stream.first();
            self.streams.insert(name.clone(), stream);
            // Members already here (a session imported before its room
            // could be opened) are told where their streams stand now.
            let members: Vec<SessionId> = self.rooms.members(room).collect();
            for m in members {
                // Where the member stands: what its client said, if that
                // is this stream, else where it joined.
                let at = self.sessions.get_mut(&m).and_then(|s| {
                    let j = s.rooms.iter_mut().find(|j| j.room == name)?;
                    let told = j.told.take();
                    Some(match told {
                        Some((e, offset)) if e == epoch && offset <= last => j.at.max(offset),
                        _ => j.at,
                    })
                });
                let (Some(at), Some(conn)) = (at, self.live_connection(m)) else {
                    continue;
                };
                if !self.streams_session(m) {
                    continue;
                }
                let (offset, missed_from) = if at + 1 < first {
                    (first - 1, Some(at + 1))
                } else {
                    (at, None)
                };
                let sub = Frame::Sub(StreamPos {
                    room: name.clone(),
                    epoch,
                    offset,
                    missed_from,
                });
                self.transmit(conn, &sub);
                self.follow(conn, &name, offset);
                if !self.room_feeds {
                    let last = self.streams.get(room).map_or(0, |s| s.last());
                    for o in offset + 1..=last {
                        self.send_stored(conn, m, &name, o);
                    }
                }
            }
            return;
        };
        let (had_epoch, had) = (stream.epoch(), stream.last());
        if had_epoch == epoch && first <= had + 1 {
            // The same stream: deliver what the copy lacks.
            for e in history.into_iter().filter(|e| e.offset > had) {
                let at = e.offset;
                if self.apply_entry(&name, e) != EntryOutcome::Applied {
                    break;
                }
                if at >= last {
                    break;
                }
            }
            return;
        }
        // Another stream, or entries gone from between: start the copy
        // again and tell each member where it stands now.
        let missed_from = (had_epoch == epoch).then_some(had + 1);
        let mut stream = RoomStream::continuing(epoch, first - 1);
        let limits = self.config.history;
        let mut entries = Vec::new();
        for e in history.into_iter().filter(|e| e.offset <= last) {
            if e.offset != stream.last() + 1 {
                break;
            }
            stream.push(&name, e.kind, e.payload, e.except, &limits);
            if let Some(entry) = stream.newest().cloned() {
                entries.push(entry);
            }
        }
        let start = first - 1;
        self.streams.insert(name.clone(), stream);
        let members: Vec<SessionId> = self.rooms.members(room).collect();
        for m in members {
            if let Some(s) = self.sessions.get_mut(&m) {
                for j in s.rooms.iter_mut().filter(|j| j.room == name) {
                    // In the same stream a member that was away still
                    // learns what it missed; in a new one it starts at
                    // the copy's beginning.
                    j.at = if missed_from.is_some() {
                        j.at.min(start)
                    } else {
                        start
                    };
                }
            }
            if !self.streams_session(m) {
                continue;
            }
            let Some(conn) = self.live_connection(m) else {
                continue;
            };
            let sub = Frame::Sub(StreamPos {
                room: name.clone(),
                epoch,
                offset: start,
                missed_from: missed_from.filter(|&f| f <= start),
            });
            self.transmit(conn, &sub);
            self.follow(conn, &name, start);
        }
        if self.room_feeds {
            for entry in entries {
                self.outputs
                    .push_back(ServerOutput::Feed(FeedOutput::Publish { entry, epoch }));
            }
        } else {
            let offsets: Vec<u64> =
                (start + 1..=self.streams.get(room).map_or(0, |s| s.last())).collect();
            for o in offsets {
                self.deliver_stored(&name, o);
            }
        }
        self.process_evictions();
    }

    /// The cluster's next entry of `room`'s stream (epoch `epoch`): handed
    /// to this server's members if it is the next one the local copy
    /// needs. Entries must come in offset order; what to do with the
    /// others, [`EntryOutcome`] says.
    pub fn room_entry(
        &mut self,
        now: Instant,
        room: &str,
        epoch: u64,
        entry: SharedEntry,
    ) -> EntryOutcome {
        self.advance(now);
        let Some(stream) = self.streams.get(room) else {
            return EntryOutcome::NotFollowed;
        };
        if stream.epoch() != epoch {
            return EntryOutcome::OtherEpoch;
        }
        let name = self.rooms.name(room);
        let outcome = self.apply_entry(&name, entry);
        self.process_evictions();
        outcome
    }

    /// Appends `e` to the local copy and delivers it, if it is the next.
    fn apply_entry(&mut self, room: &RoomName, e: SharedEntry) -> EntryOutcome {
        let Some(stream) = self.streams.get(room) else {
            return EntryOutcome::NotFollowed;
        };
        let last = stream.last();
        if e.offset <= last {
            return EntryOutcome::Duplicate;
        }
        if e.offset != last + 1 {
            return EntryOutcome::Gap { after: last };
        }
        let offset = e.offset;
        // Members served through their own sequence get a copy, if they
        // joined before this entry.
        let legacy: Vec<SessionId> = self
            .rooms
            .members(room)
            .filter(|m| Some(*m) != e.except && !self.streams_session(*m))
            .filter(|m| self.joined_before(*m, room, offset))
            .collect();
        let limits = self.config.history;
        let Some(stream) = self.streams.get_mut(room) else {
            return EntryOutcome::NotFollowed;
        };
        let epoch = stream.epoch();
        stream.push(room, e.kind, e.payload.clone(), e.except, &limits);
        for m in legacy {
            self.send_to_member(m, e.payload.clone(), e.kind, room);
        }
        if e.kind == MsgKind::Plain {
            self.stats.broadcasts += 1;
        }
        if self.room_feeds {
            if let Some(entry) = self.streams.get(room).and_then(|s| s.newest()).cloned() {
                self.outputs
                    .push_back(ServerOutput::Feed(FeedOutput::Publish { entry, epoch }));
            }
        } else {
            self.deliver_stored(room, offset);
        }
        EntryOutcome::Applied
    }

    /// Without feeds: the stored entry at `offset` to each live stream
    /// member that joined before it.
    fn deliver_stored(&mut self, room: &RoomName, offset: u64) {
        let live: Vec<(SessionId, super::ConnectionId)> = self
            .rooms
            .members(room)
            .filter(|m| self.streams_session(*m) && self.joined_before(*m, room, offset))
            .filter_map(|m| Some((m, self.live_connection(m)?)))
            .collect();
        for (m, conn) in live {
            self.send_stored(conn, m, room, offset);
        }
    }

    /// Whether `session`'s membership of `room` began before `offset`.
    fn joined_before(&self, session: SessionId, room: &str, offset: u64) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| s.rooms.iter().any(|j| &*j.room == room && j.at < offset))
    }

    /// The cluster made `session` a member of `room` ([`ClusterOutput::Join`]):
    /// where its stream starts, and the room's members as of there (the
    /// joiner's snapshot, if the room has presence). Open the room here first
    /// ([`Server::room_open`]).
    ///
    /// False when the session is no longer here or the room's copy is of
    /// another epoch: take the membership back in the cluster (a
    /// [`ClusterOutput::Leave`] without origin).
    pub fn room_joined(
        &mut self,
        now: Instant,
        session: SessionId,
        room: &str,
        joined: JoinedAt,
        origin: Option<ClientOp>,
    ) -> bool {
        self.advance(now);
        let JoinedAt { epoch, at, members } = joined;
        let ok = self.sessions.contains_key(&session)
            && self.streams.get(room).is_some_and(|s| s.epoch() == epoch);
        if !ok {
            if let Some(op) = origin {
                self.fail_op(
                    op,
                    room,
                    RoomOp::Join,
                    "unavailable",
                    "the room changed meanwhile; try again".into(),
                );
            }
            self.process_evictions();
            return false;
        }
        let name = self.rooms.name(room);
        if !self.rooms.is_member(room, session) {
            // Local membership is bounded by the cluster's (the store
            // checked the room's size).
            let _ = self.rooms.join(&name, session, usize::MAX);
            if let Some(s) = self.sessions.get_mut(&session) {
                // One at a time: most sessions are in a room or two, and an
                // idle one should hold no spare room.
                s.rooms.reserve_exact(1);
                s.rooms.push(Joined {
                    room: name.clone(),
                    at,
                    told: None,
                });
            }
            self.watch_lag(session);
            if self.streams_session(session) {
                if let Some(conn) = self.live_connection(session) {
                    let sub = Frame::Sub(StreamPos {
                        room: name.clone(),
                        epoch,
                        offset: at,
                        missed_from: None,
                    });
                    self.transmit(conn, &sub);
                    self.follow(conn, &name, at);
                    if !self.room_feeds {
                        let last = self.streams.get(room).map_or(0, |s| s.last());
                        for o in at + 1..=last {
                            self.send_stored(conn, session, &name, o);
                        }
                    }
                }
            }
            self.emit(ServerEvent::Joined {
                session,
                room: name.clone(),
            });
            self.maps_joined(session, &name);
        }
        if self.policy.presence(&name) {
            self.send_snapshot(session, &name, members);
        }
        if let Some(op) = origin {
            self.settle(op);
        }
        self.process_evictions();
        true
    }

    /// The cluster took `session` out of `room` ([`ClusterOutput::Leave`]):
    /// it leaves this server's copy too.
    pub fn room_left(
        &mut self,
        now: Instant,
        session: SessionId,
        room: &str,
        origin: Option<ClientOp>,
    ) {
        self.advance(now);
        self.leave_here(session, room);
        if let Some(op) = origin {
            self.settle(op);
        }
        self.process_evictions();
    }

    /// The cluster appended a client's publish ([`ClusterOutput::Publish`]).
    pub fn room_published(&mut self, now: Instant, origin: ClientOp) {
        self.advance(now);
        self.settle(origin);
    }

    /// The cluster could not carry out a client's room operation (its
    /// store unreachable, the room full): the client hears it refused by
    /// id, with `code` (`room_full`, `unavailable`, ...) and `reason`, and
    /// the application as [`ServerEvent::Refused`].
    pub fn room_failed(
        &mut self,
        now: Instant,
        origin: ClientOp,
        room: &str,
        op: RoomOp,
        error: RoomError,
    ) {
        self.advance(now);
        let code = error.code();
        self.fail_op(origin, room, op, code, error.to_string());
        self.process_evictions();
    }

    /// How many of `session`'s client messages the application was given
    /// and has not handled (`Acknowledge::AfterHandled`): exported now,
    /// they would be given again to the application of the server that
    /// imports the session.
    pub fn unhandled_messages(&self, session: SessionId) -> usize {
        self.sessions
            .get(&session)
            .map_or(0, |s| s.link.inbound.unhandled().count())
    }

    /// Whether `session` has room operations waiting for the cluster (it
    /// cannot be exported until they are settled).
    pub fn room_ops_pending(&self, session: SessionId) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| s.link.inbound.waits_for_cluster())
    }

    fn fail_op(
        &mut self,
        op: ClientOp,
        room: &str,
        what: RoomOp,
        code: &'static str,
        reason: String,
    ) {
        let name = self.rooms.name(room);
        self.emit(ServerEvent::Refused {
            session: op.session,
            room: name.clone(),
            op: what,
            reason: reason.clone(),
        });
        let Some(s) = self.sessions.get_mut(&op.session) else {
            return;
        };
        if !op.from_hello() {
            s.link.inbound.settled(op.seq);
        }
        let label = what.as_str();
        self.refuse_msg(op.session, op.seq, op.id, Some(name), label, code, reason);
        self.flush_ack(op.session);
    }

    /// A client's room operation is settled: its message may be
    /// acknowledged.
    fn settle(&mut self, op: ClientOp) {
        if op.from_hello() {
            return; // no message waits for it
        }
        let Some(s) = self.sessions.get_mut(&op.session) else {
            return;
        };
        let mut timers = SessionTimers {
            session: op.session,
            deadlines: &mut s.deadlines,
            heap: &mut self.timers,
        };
        let rel = &self.config.reliability;
        if s.link.settled(self.now, op.seq, rel, &mut timers) {
            self.flush_ack(op.session);
        }
    }

    /// `session` (as `member`) leaves `room` in the cluster, with the
    /// room's presence setting; `ended`: because its session ended;
    /// `origin`: the client's leave, if it asked.
    pub(super) fn leave_cluster_room(
        &mut self,
        room: RoomName,
        session: SessionId,
        member: Member,
        ended: bool,
        origin: Option<ClientOp>,
    ) {
        let presence = self.policy.presence(&room);
        self.send_to_cluster(ClusterOutput::Leave {
            room,
            session,
            member,
            presence,
            ended,
            origin,
        });
    }

    /// A client's room operation goes to the cluster; its message waits.
    pub(super) fn send_to_cluster(&mut self, output: ClusterOutput) {
        let origin = match &output {
            ClusterOutput::Publish { origin, .. }
            | ClusterOutput::Join { origin, .. }
            | ClusterOutput::Leave { origin, .. } => *origin,
        };
        if let Some(op) = origin.filter(|op| !op.from_hello()) {
            if let Some(s) = self.sessions.get_mut(&op.session) {
                s.link.inbound.wait_for_cluster(op.seq);
            }
        }
        self.outputs.push_back(ServerOutput::Cluster(output));
    }

    /// Takes `session` out of this server's copy of `room`.
    pub(super) fn leave_here(&mut self, session: SessionId, room: &str) -> bool {
        if !self.rooms.leave(room, session) {
            return false;
        }
        let name = self.rooms.name(room);
        self.unfollow(session, &name);
        if let Some(s) = self.sessions.get_mut(&session) {
            s.rooms.retain(|j| &*j.room != room);
        }
        self.emit(ServerEvent::Left {
            session,
            room: name.clone(),
        });
        self.drop_stream_if_empty(&name);
        true
    }
}
