//! A session's life: where it is ([`SessionState`] and its table,
//! [`SessionState::can_become`]), the registry's record of it (`Session`),
//! the one function that moves it between attached and detached
//! (`set_session_state`), the one path that closes a connection
//! (`disconnect`, `close_conn`), and how a session ends (`end_session`,
//! for slow consumers after the operation that overflowed them:
//! `process_evictions`; the lag bound, lag.rs, ends its slow consumers
//! through `end_session` too).
//!
//! Nothing else changes a session's state once it is created, and nothing
//! else takes a connection out of the registry. It never encodes a frame
//! itself.

use crate::close::CloseCode;
use crate::link::Link;
use crate::rooms::{Member, Presence};
use crate::time::Instant;
use crate::wire::{ClientId, Codec, SessionId};

use super::conn::ConnPhase;
use super::delivery::{LinkDeadlines, SessionTimers};
use super::streams::Joined;
use super::{ConnectionId, Server, ServerEvent, ServerOutput, ServerTimer, SessionEnd};

/// Where a session is in its life. A session begins attached to the
/// connection whose `hello` created it and ends (it is then gone) when the
/// client or the application closes it, its grace period runs out, or its
/// buffers overflow ([`SessionEnd`]). In between it moves only as
/// [`can_become`](Self::can_become) allows; the server checks every move in
/// debug builds, and the conformance suite checks the events that report
/// them ([`ServerEvent::SessionOpened`], [`ServerEvent::SessionDetached`],
/// [`ServerEvent::SessionEnded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionState {
    /// A connection carries it.
    Attached(ConnectionId),
    /// Its connection ended with `code`; it waits for a resume until
    /// `expires_at`.
    Detached {
        /// How the connection ended.
        code: CloseCode,
        /// When it ends if no client resumes it.
        expires_at: Instant,
    },
}

impl SessionState {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            SessionState::Attached(_) => "attached",
            SessionState::Detached { .. } => "detached",
        }
    }

    /// The connection carrying the session, if attached.
    pub fn connection(&self) -> Option<ConnectionId> {
        match *self {
            SessionState::Attached(c) => Some(c),
            SessionState::Detached { .. } => None,
        }
    }

    /// Whether the lifecycle allows moving from `self` to `next`:
    ///
    /// | from \ to | attached | detached |
    /// |---|---|---|
    /// | attached | to another connection (a resume took over from a half-open one) | its connection ended |
    /// | detached | resumed | never |
    ///
    /// Ending is allowed from both; a session is created attached.
    pub fn can_become(&self, next: &SessionState) -> bool {
        match (self, next) {
            (SessionState::Attached(a), SessionState::Attached(b)) => a != b,
            (SessionState::Attached(_), SessionState::Detached { .. }) => true,
            (SessionState::Detached { .. }, SessionState::Attached(_)) => true,
            (SessionState::Detached { .. }, SessionState::Detached { .. }) => false,
        }
    }
}

/// The registry's record of one session, kept through its connections.
#[derive(Debug)]
pub(super) struct Session {
    pub(super) client: ClientId,
    pub(super) identity: Option<String>,
    /// Changed only by [`Server::set_session_state`].
    pub(super) state: SessionState,
    /// Numbering, windows, batching, acknowledgments and retransmission.
    pub(super) link: Link,
    /// The link's deadlines (each also in the server's heap).
    pub(super) deadlines: LinkDeadlines,
    pub(super) rooms: Vec<Joined>,
    /// The client announced `stream`: its rooms come as room streams
    /// (`streams.rs`), not through its own sequence.
    pub(super) stream: bool,
    /// Resumed, and its client has not yet said where its streams stand:
    /// live entries wait in the history until it does.
    pub(super) awaiting_subs: bool,
    /// The client announced `latest` on its current (or last) connection:
    /// latest values come as `lv` frames (`latest.rs`), not as room
    /// messages.
    pub(super) latest: bool,
    /// Taken up from a [`SessionRecord`](super::SessionRecord) after the
    /// server holding it was lost: its numbers are set by the client's
    /// resuming `hello`.
    pub(super) recovering: bool,
    /// The codec of its current (or last) connection; `None` before its
    /// first connection on this server (an imported session).
    pub(super) codec: Option<Codec>,
}

impl Server {
    /// Tells the driver to close a connection and forgets it.
    pub(super) fn disconnect(
        &mut self,
        connection: ConnectionId,
        code: CloseCode,
        reason: &'static str,
    ) {
        // Codes come from the application too (`go_away`, `disconnect_connection`):
        // never put a reserved one on the wire.
        let code = if code.is_sendable() {
            code
        } else {
            CloseCode::INTERNAL_ERROR
        };
        self.close_conn(connection, code, Some(reason));
    }

    /// The one way a connection ends. With a `reason`, the driver is told
    /// to close it; without, it closed on its own. The session it carries,
    /// if it still does, detaches (grace period) or, if the client closed
    /// with 1000, ends.
    pub(super) fn close_conn(
        &mut self,
        connection: ConnectionId,
        code: CloseCode,
        reason: Option<&'static str>,
    ) {
        if !self.conns.contains_key(&connection) {
            return;
        }
        if let Some(reason) = reason {
            self.outputs
                .push_back(ServerOutput::Disconnect(connection, code, reason));
        }
        // What the rate limit did in the interval cut short is reported now.
        self.report_rate(connection);
        let Some(conn) = self.conns.remove(&connection) else {
            return;
        };
        self.stats.connections_closed += 1;
        *self.stats.close_codes.entry(code.0).or_default() += 1;
        let ConnPhase::Open { session, .. } = conn.phase else {
            self.emit(ServerEvent::ConnectionClosed { connection, code });
            return;
        };
        let carried = self
            .sessions
            .get(&session)
            .is_some_and(|s| s.state == SessionState::Attached(connection));
        if !carried {
            return;
        }
        if code == CloseCode::NORMAL {
            self.end_session(session, SessionEnd::ClientClosed, None);
            return;
        }
        let expires_at = self.now + self.config.session_grace;
        self.set_session_state(session, SessionState::Detached { code, expires_at });
    }

    /// The one function that moves a session between attached and
    /// detached, with what each move entails; checked against
    /// [`SessionState::can_become`] in debug builds.
    pub(super) fn set_session_state(&mut self, session: SessionId, new: SessionState) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        debug_assert!(
            s.state.can_become(&new),
            "illegal session transition {:?} -> {:?}",
            s.state,
            new
        );
        let old = core::mem::replace(&mut s.state, new);
        match new {
            SessionState::Attached(_) => {
                if let SessionState::Attached(previous) = old {
                    // The client came back before we noticed its old
                    // connection die (a half-open socket): the new
                    // connection takes over.
                    let reason = Some("replaced by a newer connection");
                    self.close_conn(previous, CloseCode::RETRY, reason);
                }
            }
            SessionState::Detached { code, expires_at } => {
                s.link.connection_lost(&mut SessionTimers {
                    session,
                    deadlines: &mut s.deadlines,
                    heap: &mut self.timers,
                });
                self.arm(expires_at, ServerTimer::Expiry(session));
                self.emit(ServerEvent::SessionDetached { session, code });
            }
        }
    }

    /// Ends a session: it is forgotten, its connection (if `close` says
    /// how) closed, its rooms left, and its unacknowledged messages
    /// reported.
    pub(super) fn end_session(
        &mut self,
        session: SessionId,
        reason: SessionEnd,
        close: Option<(CloseCode, &'static str)>,
    ) {
        let Some(mut s) = self.sessions.remove(&session) else {
            return;
        };
        if let (Some(conn), Some((code, why))) = (s.state.connection(), close) {
            self.close_conn(conn, code, Some(why));
        }
        let mut unconfirmed = s.link.outbound.reset_session();
        unconfirmed.extend(s.link.outbound.drain_waiting());
        match reason {
            SessionEnd::Expired => self.stats.sessions_expired += 1,
            SessionEnd::SlowConsumer => self.stats.slow_consumers += 1,
            _ => {}
        }
        // Built only for a cluster or a room with presence to tell.
        let member = (self.shared_rooms || s.rooms.iter().any(|j| self.presence_here(&j.room)))
            .then(|| Member::new(s.client, s.identity.as_deref()));
        for Joined { room, .. } in s.rooms {
            self.rooms.leave(&room, session);
            self.emit(ServerEvent::Left {
                session,
                room: room.clone(),
            });
            if let Some(member) = &member {
                if self.shared_rooms {
                    self.leave_cluster_room(room.clone(), session, member.clone(), true, None);
                }
                if self.presence_here(&room) {
                    self.presence_diff(
                        &room,
                        None,
                        Presence {
                            snapshot: false,
                            joined: Vec::new(),
                            left: vec![member.clone()],
                        },
                    );
                }
            }
            self.drop_stream_if_empty(&room);
        }
        self.emit(ServerEvent::SessionEnded {
            session,
            reason,
            unconfirmed,
        });
    }

    /// Ends every session that overflowed during the last operation.
    pub(super) fn process_evictions(&mut self) {
        while let Some(session) = self.evictions.pop() {
            let close = (CloseCode::SLOW_CONSUMER, "slow consumer");
            self.end_session(session, SessionEnd::SlowConsumer, Some(close));
        }
    }
}
