//! A session handed from one server to another: a node that shuts down
//! for a deploy, or a client whose reconnect reached another node.
//!
//! Owns [`SessionImage`] (everything a session is, as data: its ids and
//! identity, both numberings, every message numbered and not acknowledged
//! and every message still queued, the refusals holding acknowledgments
//! back, its rooms and where its streams started, how much of its grace
//! period is left), [`Server::export_session`], which takes a session out
//! of this server, and [`Server::import_session`], which puts it into
//! another, detached, to be resumed by its client as after any dropped
//! connection. An exported session leaves its rooms and an imported one
//! joins them without presence changes: the member moved, it did not
//! leave.
//!
//! It never stores or sends an image: the driver's backplane does. An image
//! read back is checked as hostile input (numbers that must rise, payloads
//! checked again by their kind, this server's bounds) and refused with an
//! [`ImportError`], never trusted into a broken session.

use core::time::Duration;

use serde::{Deserialize, Serialize};

use crate::close::CloseCode;
use crate::config::Acknowledge;
use crate::link::Link;
use crate::reliable::{MessageId, Outbound, RoomName};
use crate::saved::SavedMessage;
use crate::time::Instant;
use crate::wire::{ClientId, Frame, SessionId, MAX_TOKEN_LEN};

use super::delivery::LinkDeadlines;
use super::session::{Session, SessionState};
use super::streams::Joined;
use super::{duration_ms, Server, ServerEvent, ServerTimer};

/// The image format this version writes and reads.
const FORMAT: u32 = 1;

/// A session as data, taken out of one server by
/// [`Server::export_session`] and put into another by
/// [`Server::import_session`]: both numberings, every message numbered and
/// not yet acknowledged, every message still queued, the rooms, and how
/// long it may still wait for its client. Serialize it with serde (JSON or
/// MessagePack) to store or send it.
///
/// It holds the messages' payloads and the identity that owns the session:
/// keep it where only the servers can read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionImage {
    /// The image format (1).
    format: u32,
    /// The session (hex).
    session: String,
    /// The client instance (hex).
    client: String,
    /// The identity that created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
    /// Its rooms come as room streams.
    #[serde(default)]
    stream: bool,
    /// Its rooms' latest values come as `lv` frames.
    #[serde(default)]
    latest: bool,
    /// How its last connection ended (the exporting server's own close
    /// for an attached session).
    code: u16,
    /// Milliseconds of its grace period left when exported.
    grace_ms: u64,
    /// The highest sequence number delivered from the client.
    delivered: u64,
    /// Refused client messages holding acknowledgments back: (sequence
    /// number, id of the refusal sent for it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    held: Vec<(u64, u64)>,
    /// Client messages handed to the application and not yet handled
    /// (`Acknowledge::AfterHandled`), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unhandled: Vec<u64>,
    /// The sequence number the next message to the client gets.
    next_seq: u64,
    /// The highest sequence number that went out on a connection.
    sent_through: u64,
    /// Numbered and not acknowledged, in order.
    sent: Vec<SavedMessage>,
    /// Accepted and not numbered, in order.
    waiting: Vec<SavedMessage>,
    /// Its rooms: (name, the room stream's offset when it joined).
    rooms: Vec<(String, u64)>,
    /// Every message id the exporting server had given out is below this.
    next_id: u64,
}

/// Why [`Server::import_session`] refused an image. The image is not
/// changed: its messages can still be reported by id
/// ([`SessionImage::unconfirmed`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The image was written by a format this server does not read.
    #[error("session image format {0} is not supported (this server reads format 1)")]
    Format(u32),
    /// A field is not what an image holds, or the numbers do not agree.
    #[error("session image: {0}")]
    Invalid(String),
    /// This server already holds the session.
    #[error("session {0} is already here")]
    Exists(SessionId),
    /// This server is at its session limit.
    #[error("session limit reached")]
    SessionLimit,
    /// The session holds more than this server's bounds allow.
    #[error("session {session} holds more than this server allows: {what}")]
    TooLarge {
        /// The session.
        session: SessionId,
        /// Which bound.
        what: &'static str,
    },
}

/// What a cluster keeps of a session so that another server can take it
/// up if the one holding it is lost ([`Server::session_record`],
/// [`Server::recover_session`]): its ids, identity, stream choice and
/// rooms, and nothing else (no messages, no numbers: those come from the
/// client). Serialize it with serde.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The record format (1).
    format: u32,
    /// The session (hex).
    session: String,
    /// The client instance (hex).
    client: String,
    /// The identity that owns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
    /// Its rooms come as room streams.
    #[serde(default)]
    stream: bool,
    /// Its rooms' latest values come as `lv` frames.
    #[serde(default)]
    latest: bool,
    /// Its rooms: (name, the room stream's offset when it joined).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rooms: Vec<(String, u64)>,
}

impl SessionRecord {
    /// The session.
    pub fn session(&self) -> Option<SessionId> {
        SessionId::from_hex(&self.session)
    }

    /// The identity that owns it.
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// The rooms it is a member of.
    pub fn rooms(&self) -> impl Iterator<Item = &str> {
        self.rooms.iter().map(|(r, _)| r.as_str())
    }
}

impl SessionImage {
    /// The session.
    pub fn session(&self) -> Option<SessionId> {
        SessionId::from_hex(&self.session)
    }

    /// The identity that owns it.
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// The application's messages it holds that the client has not
    /// acknowledged (sent or queued), in order: if the image cannot be
    /// imported anywhere, these are what the session loses.
    pub fn unconfirmed(&self) -> Vec<MessageId> {
        self.sent
            .iter()
            .chain(&self.waiting)
            .filter(|m| !m.own())
            .map(|m| m.id())
            .collect()
    }

    /// How long the session may still wait for its client.
    pub fn grace_left(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    /// The rooms it is a member of.
    pub fn rooms(&self) -> impl Iterator<Item = &str> {
        self.rooms.iter().map(|(r, _)| r.as_str())
    }
}

impl Server {
    /// Takes `session` out of this server, for another to
    /// [`import`](Self::import_session): its connection, if it has one, is
    /// sent a `goaway` and closed with 4011 (reconnect at once and resume),
    /// it leaves its rooms
    /// without a presence change, and [`ServerEvent::SessionMoved`]
    /// reports it gone. Nothing it held is reported lost: the image holds
    /// it. `None` if there is no such session.
    ///
    /// What the client sends meanwhile reaches no session here and is
    /// sent again after its resume; what it receives from the closing
    /// connection it acknowledges in its resuming `hello`.
    pub fn export_session(&mut self, now: Instant, session: SessionId) -> Option<SessionImage> {
        self.advance(now);
        let s = self.sessions.remove(&session)?;
        let (code, grace) = match s.state {
            SessionState::Attached(conn) => {
                // A `goaway` first, as for a rotation: the client resumes
                // at once instead of backing off as after a failure.
                self.transmit(
                    conn,
                    &Frame::GoAway {
                        code: CloseCode::ROTATE.0,
                        retry_after_ms: None,
                    },
                );
                self.close_conn(conn, CloseCode::ROTATE, Some("session moved"));
                (CloseCode::ROTATE, self.config.session_grace)
            }
            SessionState::Detached { code, expires_at } => {
                (code, expires_at.saturating_duration_since(self.now))
            }
        };
        let (next_seq, window, waiting) = s.link.outbound.saved();
        // Messages handed to this server's application and not handled are
        // not the other server's application's to acknowledge (it never
        // saw them): the image counts as delivered only what came before
        // the first of them, and the client, which has not seen them
        // acknowledged, sends them (and whatever followed) again there.
        let (delivered, held) = image_position(&s.link.inbound);
        let image = SessionImage {
            format: FORMAT,
            session: session.to_hex(),
            client: s.client.to_hex(),
            identity: s.identity.clone(),
            stream: s.stream,
            latest: s.latest,
            code: code.0,
            grace_ms: duration_ms(grace),
            delivered,
            held,
            unhandled: Vec::new(),
            next_seq,
            sent_through: s.link.outbound.sent_through(),
            sent: window.map(SavedMessage::sent).collect(),
            waiting: waiting.map(SavedMessage::waiting).collect(),
            rooms: s.rooms.iter().map(|j| (j.room.to_string(), j.at)).collect(),
            next_id: self.next_id,
        };
        for Joined { room, .. } in &s.rooms {
            self.rooms.leave(room, session);
            self.drop_stream_if_empty(room);
        }
        self.stats.sessions_moved_out += 1;
        self.emit(ServerEvent::SessionMoved { session });
        Some(image)
    }

    /// Puts a session another server [exported](Self::export_session)
    /// into this one, detached: its client resumes it as after any dropped
    /// connection, within the grace period the image has left, and
    /// everything it held is sent again after the client's `delivered`.
    /// It joins its rooms without a presence change, and
    /// [`ServerEvent::SessionArrived`] reports it. Message ids this server
    /// gives out from now on are above every id the image's server gave.
    ///
    /// Refused, with nothing changed, when the image is malformed, names a
    /// session this server holds, or holds more than this server's bounds
    /// allow.
    pub fn import_session(
        &mut self,
        now: Instant,
        image: &SessionImage,
    ) -> Result<SessionId, ImportError> {
        self.advance(now);
        if image.format != FORMAT {
            return Err(ImportError::Format(image.format));
        }
        let bad = |what: &str| ImportError::Invalid(what.into());
        let session = image
            .session()
            .ok_or_else(|| bad("session is not 32 hex digits"))?;
        let client =
            ClientId::from_hex(&image.client).ok_or_else(|| bad("client is not 32 hex digits"))?;
        if self.sessions.contains_key(&session) {
            return Err(ImportError::Exists(session));
        }
        if self.sessions.len() >= self.config.max_sessions {
            return Err(ImportError::SessionLimit);
        }
        let too_large = |what| ImportError::TooLarge { session, what };

        // The window: contiguous numbers ending just below `next_seq`.
        let mut window = Vec::with_capacity(image.sent.len());
        let mut last = 0;
        for m in &image.sent {
            let sent = m.to_sent(last).map_err(ImportError::Invalid)?;
            if last != 0 && sent.seq != last + 1 {
                return Err(bad("numbered messages are not contiguous"));
            }
            last = sent.seq;
            window.push(sent);
        }
        if image.next_seq == 0 || (last != 0 && last + 1 != image.next_seq) {
            return Err(bad("next_seq does not follow the numbered messages"));
        }
        let acked_through = window.first().map_or(image.next_seq - 1, |s| s.seq - 1);
        if image.sent_through >= image.next_seq || image.sent_through < acked_through {
            return Err(bad("sent_through is outside the numbered messages"));
        }
        let waiting = image
            .waiting
            .iter()
            .map(|m| m.to_waiting().map_err(ImportError::Invalid))
            .collect::<Result<Vec<_>, _>>()?;
        let ids = window
            .iter()
            .map(|s| s.id)
            .chain(waiting.iter().map(|w| w.id));
        if ids.clone().any(|id| id.0 >= image.next_id) {
            return Err(bad("a message id is not below next_id"));
        }

        // Refusals holding acknowledgments back: rising, delivered.
        let mut prev = 0;
        for &(seq, _) in &image.held {
            if seq <= prev || seq > image.delivered {
                return Err(bad("held refusals out of order"));
            }
            prev = seq;
        }

        let mut prev = 0;
        for &seq in &image.unhandled {
            if seq <= prev || seq > image.delivered {
                return Err(bad("unhandled messages out of order"));
            }
            prev = seq;
        }

        // This server's bounds. The machine's own messages (one per room at
        // most) are not counted against the queue, as when they were queued.
        let queue = &self.config.queue;
        let app_waiting = waiting.iter().filter(|w| !w.own).count();
        if app_waiting > queue.max_messages
            || waiting.len() > queue.max_messages + image.rooms.len()
        {
            return Err(too_large("queued messages"));
        }
        let rel = &self.config.reliability;
        if window.len() > rel.window_messages.max(1) {
            return Err(too_large("unacknowledged messages"));
        }
        if image.held.len() > self.config.reliability.window_messages.max(1) {
            return Err(too_large("held refusals"));
        }
        if image.unhandled.len() > self.config.reliability.window_messages.max(1) {
            return Err(too_large("unhandled messages"));
        }
        let rooms = self.rooms_of_image(session, &image.rooms)?;
        let code = CloseCode(image.code);
        let code = if code.is_sendable() {
            code
        } else {
            CloseCode::ABNORMAL
        };

        let mut outbound = Outbound::new(&self.config.queue, &self.config.reliability);
        outbound.import(image.next_seq, image.sent_through, window, waiting);
        let mut link = Link::new(outbound);
        // This server's acknowledgment mode. Messages the other server's
        // application had not handled (an image that lists them) were
        // never seen by this one's: they count as not delivered, and the
        // client sends them again.
        let waits = self.config.acknowledge == Acknowledge::AfterHandled;
        let delivered = image
            .unhandled
            .first()
            .map_or(image.delivered, |&first| first - 1);
        let held: Vec<(u64, u64)> = image
            .held
            .iter()
            .copied()
            .filter(|&(seq, _)| seq <= delivered)
            .collect();
        link.inbound
            .import(delivered, &held, waits.then_some(&[][..]));
        let grace = Duration::from_millis(image.grace_ms);
        let identity = image.identity.clone();
        self.insert_arrived(
            session,
            client,
            identity,
            image.stream,
            image.latest,
            link,
            rooms,
            code,
            grace,
        );
        self.next_id = self.next_id.max(image.next_id);
        self.stats.sessions_moved_in += 1;
        self.emit(ServerEvent::SessionArrived {
            session,
            client,
            identity: image.identity.clone(),
            recovered: false,
        });
        Ok(session)
    }

    /// What a cluster keeps of `session` to take it up should this server
    /// be lost: its ids, identity, stream choice and rooms.
    pub fn session_record(&self, session: SessionId) -> Option<SessionRecord> {
        let s = self.sessions.get(&session)?;
        Some(SessionRecord {
            format: FORMAT,
            session: session.to_hex(),
            client: s.client.to_hex(),
            identity: s.identity.clone(),
            stream: s.stream,
            latest: s.latest,
            rooms: s.rooms.iter().map(|j| (j.room.to_string(), j.at)).collect(),
        })
    }

    /// Takes up a session whose server was lost (a crashed node), from
    /// its [`SessionRecord`]: detached, for a grace period, with no
    /// messages and no numbers until its client's resuming `hello` brings
    /// them (the client's `delivered` and `acked`; a client that does not
    /// send `acked` cannot be taken up and gets a new session). The
    /// `welcome` says `recovered`: the client sends again everything the
    /// lost server had not acknowledged, and learns that what that server
    /// had sent it and it never received may be gone.
    /// [`ServerEvent::SessionArrived`] with `recovered` reports it.
    pub fn recover_session(
        &mut self,
        now: Instant,
        record: &SessionRecord,
    ) -> Result<SessionId, ImportError> {
        self.advance(now);
        if record.format != FORMAT {
            return Err(ImportError::Format(record.format));
        }
        let bad = |what: &str| ImportError::Invalid(what.into());
        let session = SessionId::from_hex(&record.session)
            .ok_or_else(|| bad("session is not 32 hex digits"))?;
        let client =
            ClientId::from_hex(&record.client).ok_or_else(|| bad("client is not 32 hex digits"))?;
        if self.sessions.contains_key(&session) {
            return Err(ImportError::Exists(session));
        }
        if self.sessions.len() >= self.config.max_sessions {
            return Err(ImportError::SessionLimit);
        }
        let rooms = self.rooms_of_image(session, &record.rooms)?;
        let mut link = Link::new(Outbound::new(&self.config.queue, &self.config.reliability));
        if self.config.acknowledge == Acknowledge::AfterHandled {
            link.inbound.wait_for_handling();
        }
        let (identity, grace) = (record.identity.clone(), self.config.session_grace);
        let code = CloseCode::ABNORMAL;
        self.insert_arrived(
            session,
            client,
            identity,
            record.stream,
            record.latest,
            link,
            rooms,
            code,
            grace,
        );
        if let Some(s) = self.sessions.get_mut(&session) {
            s.recovering = true;
        }
        self.emit(ServerEvent::SessionArrived {
            session,
            client,
            identity: record.identity.clone(),
            recovered: true,
        });
        Ok(session)
    }

    /// An image's or record's rooms, checked against this server's bounds.
    fn rooms_of_image(
        &self,
        session: SessionId,
        names: &[(String, u64)],
    ) -> Result<Vec<Joined>, ImportError> {
        let bad = |what: &str| ImportError::Invalid(what.into());
        let too_large = |what| ImportError::TooLarge { session, what };
        if names.len() > self.config.max_rooms_per_session {
            return Err(too_large("rooms"));
        }
        let mut rooms = Vec::with_capacity(names.len());
        for (name, at) in names {
            if name.is_empty() || name.len() > MAX_TOKEN_LEN {
                return Err(bad("room names are 1 to 256 bytes"));
            }
            if rooms.iter().any(|j: &Joined| &*j.room == name.as_str()) {
                return Err(bad("a room is named twice"));
            }
            if self.rooms.size(name) >= self.config.max_room_size {
                return Err(too_large("a room is full here"));
            }
            rooms.push(Joined {
                room: RoomName::from(name.as_str()),
                at: *at,
                told: None,
            });
        }
        Ok(rooms)
    }

    /// Puts a session that came from elsewhere into the registry,
    /// detached for `grace`, a member of its rooms without a presence
    /// change. Its rooms were checked.
    #[allow(clippy::too_many_arguments)]
    fn insert_arrived(
        &mut self,
        session: SessionId,
        client: ClientId,
        identity: Option<String>,
        stream: bool,
        latest: bool,
        link: Link,
        mut rooms: Vec<Joined>,
        code: CloseCode,
        grace: Duration,
    ) {
        for j in &mut rooms {
            j.room = self.rooms.name(&j.room);
            // Checked: the room has room.
            let _ = self.rooms.join(&j.room, session, self.config.max_room_size);
        }
        let expires_at = self.now + grace;
        self.sessions.insert(
            session,
            Box::new(Session {
                client,
                identity,
                state: SessionState::Detached { code, expires_at },
                link,
                deadlines: LinkDeadlines::default(),
                rooms,
                stream,
                awaiting_subs: false,
                latest,
                recovering: false,
                codec: None,
            }),
        );
        self.arm(expires_at, ServerTimer::Expiry(session));
    }

    /// Every session this server holds, attached or detached, in no
    /// particular order: what a server that shuts down for a deploy
    /// exports.
    pub fn session_ids(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }
}

/// What an image says was delivered, and the refusals that hold
/// acknowledgments back below it: everything before the first message the
/// application has not handled (all of it when there is none).
fn image_position(inbound: &crate::reliable::Inbound) -> (u64, Vec<(u64, u64)>) {
    let delivered = inbound
        .unhandled()
        .next()
        .map_or(inbound.delivered(), |first| first - 1);
    let held = inbound
        .held()
        .filter(|&(seq, _)| seq <= delivered)
        .collect();
    (delivered, held)
}
