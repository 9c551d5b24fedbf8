//! Rooms on the server: the application's commands ([`Server::join`],
//! [`Server::leave`], [`Server::broadcast`], the membership queries and the
//! policy), the clients' joins, leaves and publishes (`dispatch`), their
//! refusals, and presence: diffs to the members, a full snapshot to the
//! joiner.
//!
//! Who is in which room is kept by [`Rooms`]; this file keeps it and each
//! session's list of rooms in step. A member whose buffers are full is
//! evicted after the current operation (`send_to_member`), never waited
//! on: one slow member never holds up the others.

use std::sync::Arc;

use crate::link::Received;
use crate::reliable::{MessageId, Outgoing, RoomName, SendError};
use crate::rooms::{JoinError, Member, Presence, RoomPolicy};
use crate::time::Instant;
use crate::wire::{self, Msg, MsgKind, Payload, SessionId};

use super::cluster::{ClientOp, ClusterOutput};
use super::streams::Joined;
use super::{RoomError, RoomOp, Server, ServerEvent};

// Named only in links in the docs.
#[cfg(doc)]
use crate::rooms::{AllowAll, Rooms};

impl Server {
    /// Replaces the policy that authorizes clients' joins and publishes
    /// (default: [`AllowAll`]).
    pub fn set_policy(&mut self, policy: Box<dyn RoomPolicy>) {
        self.policy = policy;
    }

    /// Puts a session in a room, bypassing the policy (the application
    /// decided). Members are told, and the session gets the member list.
    pub fn join(&mut self, now: Instant, session: SessionId, room: &str) -> Result<(), RoomError> {
        self.advance(now);
        check_room_name(room)?;
        let r = self.do_join(session, room, false, None);
        self.process_evictions();
        r
    }

    /// Takes a session out of a room; false if it was not in it.
    ///
    /// With shared rooms ([`Server::set_shared_rooms`]), the session leaves
    /// here at once and the cluster is told ([`ClusterOutput::Leave`]).
    pub fn leave(&mut self, now: Instant, session: SessionId, room: &str) -> bool {
        self.advance(now);
        let r = if self.shared_rooms {
            let member = self.member_of(session);
            let left = self.leave_here(session, room);
            if let (true, Some(member)) = (left, member) {
                let room = self.rooms.name(room);
                self.leave_cluster_room(room, session, member, false, None);
            }
            left
        } else {
            self.do_leave(session, room)
        };
        self.process_evictions();
        r
    }

    /// Sends `payload` to every member of `room` but `exclude`, each through
    /// its own reliable sequence, sharing one copy of the payload. Members
    /// whose buffers are full are slow consumers: they are closed with 4009
    /// and their sessions ended, and the others are not held up. Returns how
    /// many members it was queued for.
    ///
    /// With shared rooms ([`Server::set_shared_rooms`]) the broadcast goes
    /// to the cluster ([`ClusterOutput::Publish`]), which numbers it and
    /// hands it back to every server with members, this one included
    /// ([`Server::room_entry`]): 0 is returned.
    pub fn broadcast(
        &mut self,
        now: Instant,
        room: &str,
        payload: Payload,
        exclude: Option<SessionId>,
    ) -> Result<usize, SendError> {
        self.advance(now);
        let max = self.config.max_message_size;
        SendError::check_size(payload.len(), max)?;
        let n = self.do_broadcast(room, &payload, exclude, None);
        self.process_evictions();
        Ok(n)
    }

    /// Who is in `room`, as members see each other.
    pub fn members(&self, room: &str) -> Vec<Member> {
        let mut members: Vec<Member> = self
            .rooms
            .members(room)
            .filter_map(|m| self.member_of(m))
            .collect();
        members.sort();
        members
    }

    /// The sessions in `room`, in order.
    pub fn member_sessions(&self, room: &str) -> Vec<SessionId> {
        let mut sessions: Vec<SessionId> = self.rooms.members(room).collect();
        sessions.sort_unstable();
        sessions
    }

    /// Members in `room`.
    pub fn room_size(&self, room: &str) -> usize {
        self.rooms.size(room)
    }

    /// The rooms a session is in.
    pub fn rooms_of(&self, session: SessionId) -> Vec<Arc<str>> {
        self.sessions
            .get(&session)
            .map(|s| s.rooms.iter().map(|j| j.room.clone()).collect())
            .unwrap_or_default()
    }

    /// Queues a message for a room member; a member whose buffers are full
    /// is a slow consumer and is evicted after the current operation, so it
    /// never holds up the others.
    pub(super) fn send_to_member(
        &mut self,
        member: SessionId,
        payload: Payload,
        kind: MsgKind,
        room: &RoomName,
    ) -> bool {
        if self.evictions.contains(&member) {
            return false;
        }
        let msg = Outgoing::new(kind, payload).in_room(room.clone()).own();
        match self.enqueue_raw(member, msg) {
            Ok(_) => true,
            Err(SendError::QueueFull { .. }) => {
                self.evictions.push(member);
                false
            }
            Err(_) => false,
        }
    }

    /// Tells every member of `room` but `except` about a membership change.
    pub(super) fn presence_diff(
        &mut self,
        room: &RoomName,
        except: Option<SessionId>,
        diff: Presence,
    ) {
        if !self.presence_here(room) {
            return;
        }
        let Ok(json) = serde_json::to_vec(&diff) else {
            return;
        };
        let Ok(payload) = Payload::json(json) else {
            return;
        };
        let members: Vec<SessionId> = self.rooms.members(room).collect();
        let kind = MsgKind::Presence;
        let (legacy, _) = self.publish_entry(room, kind, payload.clone(), except, &members);
        for m in legacy.into_iter().filter(|m| Some(*m) != except) {
            self.send_to_member(m, payload.clone(), kind, room);
        }
    }

    /// Whether this server tells `room`'s members of joins and leaves
    /// itself: its policy has presence there, and the room is not shared
    /// (a cluster numbers a shared room's presence changes). Checked before
    /// a diff is built, so a room without presence costs no member record.
    pub(super) fn presence_here(&self, room: &str) -> bool {
        !self.shared_rooms && self.policy.presence(room)
    }

    pub(super) fn member_of(&self, session: SessionId) -> Option<Member> {
        self.sessions
            .get(&session)
            .map(|s| Member::new(s.client, s.identity.as_deref()))
    }

    /// Refuses a client's join or publish: reported to the application, and
    /// to the client by the message's id.
    fn refuse(
        &mut self,
        origin: ClientOp,
        room: &RoomName,
        op: RoomOp,
        code: &'static str,
        reason: String,
    ) {
        let ClientOp { session, seq, id } = origin;
        self.emit(ServerEvent::Refused {
            session,
            room: room.clone(),
            op,
            reason: reason.clone(),
        });
        let op = op.as_str();
        self.refuse_msg(session, seq, id, Some(room.clone()), op, code, reason);
    }

    /// A join the client asked for in the `hello` that opened `session`:
    /// as a `join` message would be, refused by id 0 (it has none).
    pub(super) fn join_from_hello(&mut self, session: SessionId, room: &str) {
        let op = ClientOp::hello(session);
        if let Err(e) = self.do_join(session, room, true, Some(op)) {
            let name = self.rooms.name(room);
            self.refuse(op, &name, RoomOp::Join, e.code(), e.to_string());
        }
    }

    /// A join, by the client (`check`: run the policy) or by the application.
    fn do_join(
        &mut self,
        session: SessionId,
        room: &str,
        check: bool,
        origin: Option<ClientOp>,
    ) -> Result<(), RoomError> {
        let member = self.member_of(session).ok_or(RoomError::UnknownSession)?;
        let name = self.rooms.name(room);
        if check {
            if let Err(reason) = self.policy.authorize_join(&member, room) {
                return Err(RoomError::Forbidden(reason));
            }
        }
        // The session's own list (a few rooms) rather than the room's
        // member set (up to thousands): the same answer, without walking
        // a large tree.
        let already = self
            .sessions
            .get(&session)
            .is_some_and(|s| s.rooms.iter().any(|j| &*j.room == room));
        debug_assert_eq!(already, self.rooms.is_member(room, session));
        if self.shared_rooms {
            // The room's size is the cluster's to check; the join, its
            // presence diff and the joiner's snapshot come back from it.
            let count = self.sessions.get(&session).map_or(0, |s| s.rooms.len());
            if !already && count >= self.config.max_rooms_per_session {
                return Err(RoomError::TooManyRooms {
                    max: self.config.max_rooms_per_session,
                });
            }
            let presence = self.policy.presence(&name);
            self.send_to_cluster(ClusterOutput::Join {
                room: name,
                session,
                member,
                presence,
                max_members: self.config.max_room_size,
                origin,
            });
            return Ok(());
        }
        if !already {
            let count = self.sessions.get(&session).map_or(0, |s| s.rooms.len());
            if count >= self.config.max_rooms_per_session {
                return Err(RoomError::TooManyRooms {
                    max: self.config.max_rooms_per_session,
                });
            }
            match self.rooms.join(&name, session, self.config.max_room_size) {
                Ok(_) => {}
                Err(JoinError::RoomFull) => {
                    return Err(RoomError::RoomFull {
                        max: self.config.max_room_size,
                    })
                }
            }
            // A stream-served member is told where its stream starts before
            // the presence diff that announces it (an entry it skips).
            let at = if self.streams_session(session) {
                self.stream_joined(session, &name)
            } else {
                0
            };
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
            self.emit(ServerEvent::Joined {
                session,
                room: name.clone(),
            });
            self.latest_joined(session, &name);
            self.maps_joined(session, &name);
            if self.presence_here(&name) {
                self.presence_diff(
                    &name,
                    Some(session),
                    Presence {
                        snapshot: false,
                        joined: vec![member],
                        left: Vec::new(),
                    },
                );
            }
        }
        if !self.policy.presence(&name) {
            return Ok(());
        }
        // The joiner always gets the full list, so a rejoin after a lost
        // session starts from the truth.
        let members: Vec<Member> = self
            .rooms
            .members(room)
            .filter_map(|m| self.member_of(m))
            .collect();
        self.send_snapshot(session, &name, members);
        Ok(())
    }

    /// Sends `session` the full member list of `room` (sorted, each once).
    pub(super) fn send_snapshot(
        &mut self,
        session: SessionId,
        room: &RoomName,
        mut members: Vec<Member>,
    ) {
        members.sort();
        members.dedup();
        let snapshot = Presence {
            snapshot: true,
            joined: members,
            left: Vec::new(),
        };
        if let Ok(payload) = serde_json::to_vec(&snapshot)
            .map_err(|_| ())
            .and_then(|j| Payload::json(j).map_err(|_| ()))
        {
            self.send_to_member(session, payload, MsgKind::Presence, room);
        }
    }

    fn do_leave(&mut self, session: SessionId, room: &str) -> bool {
        if !self.rooms.leave(room, session) {
            return false;
        }
        let name = self.rooms.name(room);
        self.unfollow(session, &name);
        let member = if self.presence_here(&name) {
            self.member_of(session)
        } else {
            None
        };
        if let Some(s) = self.sessions.get_mut(&session) {
            s.rooms.retain(|j| &*j.room != room);
        }
        self.emit(ServerEvent::Left {
            session,
            room: name.clone(),
        });
        if let Some(member) = member {
            self.presence_diff(
                &name,
                None,
                Presence {
                    snapshot: false,
                    joined: Vec::new(),
                    left: vec![member],
                },
            );
        }
        self.drop_stream_if_empty(&name);
        true
    }

    fn do_broadcast(
        &mut self,
        room: &str,
        payload: &Payload,
        exclude: Option<SessionId>,
        origin: Option<ClientOp>,
    ) -> usize {
        let name = self.rooms.name(room);
        if self.shared_rooms {
            self.send_to_cluster(ClusterOutput::Publish {
                room: name,
                payload: payload.clone(),
                except: exclude,
                origin,
            });
            return 0;
        }
        let members: Vec<SessionId> = self.rooms.members(room).collect();
        let (legacy, mut queued) =
            self.publish_entry(&name, MsgKind::Plain, payload.clone(), exclude, &members);
        for m in legacy.into_iter().filter(|m| Some(*m) != exclude) {
            if self.send_to_member(m, payload.clone(), MsgKind::Plain, &name) {
                queued += 1;
            }
        }
        self.stats.broadcasts += 1;
        queued
    }

    /// Hands a delivered client message to the room logic or the application.
    pub(super) fn dispatch(&mut self, session: SessionId, m: Msg) {
        let op = ClientOp {
            session,
            seq: m.seq,
            id: MessageId(m.id),
        };
        match (m.kind, m.room.clone()) {
            (MsgKind::Join, Some(room)) => {
                let name = self.rooms.name(&room);
                if let Err(e) = self.do_join(session, &room, true, Some(op)) {
                    self.refuse(op, &name, RoomOp::Join, e.code(), e.to_string());
                }
            }
            (MsgKind::Leave, Some(room)) if self.shared_rooms => {
                // Left here once the cluster has taken it (`room_left`):
                // after a join of the same room still on its way.
                let Some(member) = self.member_of(session) else {
                    return;
                };
                let room = self.rooms.name(&room);
                self.leave_cluster_room(room, session, member, false, Some(op));
            }
            (MsgKind::Leave, Some(room)) => {
                self.do_leave(session, &room);
            }
            (MsgKind::MapWrite, Some(room)) => self.on_map_write(session, &m, room),
            (MsgKind::Plain | MsgKind::Request, Some(room)) => {
                let name = self.rooms.name(&room);
                let Some(member) = self.member_of(session) else {
                    return;
                };
                if !self.rooms.is_member(&room, session) {
                    let reason = "not a member of the room".into();
                    self.refuse(op, &name, RoomOp::Publish, "not_member", reason);
                    return;
                }
                if let Err(reason) = self.policy.authorize_publish(&member, &room) {
                    self.refuse(op, &name, RoomOp::Publish, "forbidden", reason);
                    return;
                }
                let exclude = (!self.config.echo_publish).then_some(session);
                let payload = m.payload.clone();
                self.emit(ServerEvent::Message {
                    session,
                    message: Received::from_msg(m),
                });
                self.do_broadcast(&name, &payload, exclude, Some(op));
            }
            _ => {
                // The application's to handle: with `AfterHandled`, not
                // acknowledged until it says so.
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.link.inbound.handed_over(m.seq);
                }
                self.emit(ServerEvent::Message {
                    session,
                    message: Received::from_msg(m),
                })
            }
        }
    }
}

fn check_room_name(room: &str) -> Result<(), RoomError> {
    if room.is_empty() || room.len() > wire::MAX_TOKEN_LEN {
        return Err(RoomError::BadName);
    }
    Ok(())
}
