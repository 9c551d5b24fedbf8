//! A session carried across the end of the process that holds it: a
//! browser page reloaded, an app restarted within the server's grace
//! period.
//!
//! Owns [`Snapshot`] (what must survive: the client and session ids, the
//! resume key, what was delivered, every message sent and not yet
//! acknowledged with its number, every message still queued, the rooms and
//! where their streams stand), `Client::suspend`, which takes it and
//! abandons the connection so that the server keeps the session, and
//! `Client::restore`, which builds a machine that resumes it. It never
//! stores the snapshot anywhere: the driver does (a page's
//! `sessionStorage`), and must keep it as secret as the resume key it holds.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::close::CloseCode;
use crate::config::{ClientConfig, ConfigError};
use crate::reliable::{MessageId, RoomName, Sent, Waiting};
use crate::time::Instant;
use crate::wire::{ClientId, MsgKind, Payload, PayloadKind, ResumeKey, SessionId};

use super::streams::Position;
use super::{Client, State};

/// Everything a client needs to resume its session in another process,
/// and lose nothing it had accepted. Serialize it (JSON with serde) and
/// hand it to [`Client::restore`]. It holds the session's resume key:
/// keep it where only this client can read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The client instance (hex).
    client: String,
    /// The session (hex), if one was open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    /// Its resume key (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// The last sequence number delivered from the server.
    delivered: u64,
    /// The id the next message gets.
    next_id: u64,
    /// The sequence number the next message gets.
    next_seq: u64,
    /// Numbered and not yet acknowledged, in order.
    sent: Vec<SavedMessage>,
    /// Accepted and not yet numbered, in order.
    waiting: Vec<SavedMessage>,
    /// The rooms asked for.
    rooms: Vec<String>,
    /// Room streams followed: (room, epoch, last offset).
    streams: Vec<(String, u64, u64)>,
    /// Leaves not yet acknowledged: (id, room).
    leaving: Vec<(u64, String)>,
}

/// One message of a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SavedMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ts: Option<u64>,
    /// `msg`, `request`, `response`, `join` or `leave`.
    kind: String,
    /// The request a response answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    room: Option<String>,
    /// `json`, `msgpack` or `bytes`.
    enc: String,
    /// The payload, base64.
    data: String,
    /// Sent by the machine on its own (a join repeated after a lost
    /// session): never reported as acknowledged or lost.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    own: bool,
}

/// A snapshot that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The settings cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A field is not what a snapshot holds.
    #[error("snapshot: {0}")]
    Invalid(String),
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl SavedMessage {
    fn new(
        seq: Option<u64>,
        id: MessageId,
        ts: Option<u64>,
        kind: MsgKind,
        room: Option<&RoomName>,
        payload: &Payload,
        own: bool,
    ) -> SavedMessage {
        let (kind, to) = match kind {
            MsgKind::Request => ("request", None),
            MsgKind::Response(to) => ("response", Some(to)),
            MsgKind::Join => ("join", None),
            MsgKind::Leave => ("leave", None),
            // A client sends nothing else.
            _ => ("msg", None),
        };
        SavedMessage {
            seq,
            id: id.0,
            ts,
            kind: kind.into(),
            to,
            room: room.map(|r| r.to_string()),
            enc: match payload.kind() {
                PayloadKind::MsgPack => "msgpack",
                PayloadKind::Binary => "bytes",
                _ => "json",
            }
            .into(),
            data: b64().encode(payload.data()),
            own,
        }
    }

    fn parts(&self) -> Result<(MsgKind, Option<RoomName>, Payload), RestoreError> {
        let bad = |what: &str| RestoreError::Invalid(format!("message {}: {what}", self.id));
        let kind = match (self.kind.as_str(), self.to) {
            ("msg", _) => MsgKind::Plain,
            ("request", _) => MsgKind::Request,
            ("response", Some(to)) => MsgKind::Response(to),
            ("join", _) => MsgKind::Join,
            ("leave", _) => MsgKind::Leave,
            _ => return Err(bad("unknown kind")),
        };
        let data = b64()
            .decode(&self.data)
            .map_err(|_| bad("payload is not base64"))?;
        let payload = match self.enc.as_str() {
            "json" => Payload::json(data).map_err(|e| bad(&e.to_string()))?,
            "msgpack" => Payload::msgpack(data).map_err(|e| bad(&e.to_string()))?,
            "bytes" => Payload::binary(data),
            _ => return Err(bad("unknown encoding")),
        };
        Ok((kind, self.room.as_deref().map(RoomName::from), payload))
    }
}

impl Client {
    /// Takes what the session needs to survive this process (a page
    /// about to unload and come back), then abandons the connection with
    /// 4000, so that the server keeps the session for its grace period,
    /// and stops: the machine ends `Closed` with 4000 and reports no loss.
    /// Values held by `send_latest` are queued first, so they are saved
    /// too. Resume in the next process with [`Client::restore`].
    pub fn suspend(&mut self, now: Instant) -> Snapshot {
        self.advance(now);
        self.release_latest(true);
        let (next_seq, window, waiting) = self.link.outbound.saved();
        let snapshot = Snapshot {
            client: self.client_id.to_hex(),
            session: self.session.map(|s| s.to_hex()),
            key: self.resume_key.map(|k| k.to_hex()),
            delivered: self.link.inbound.delivered(),
            next_id: self.next_id,
            next_seq,
            sent: window
                .map(|s| {
                    SavedMessage::new(
                        Some(s.seq),
                        s.id,
                        s.ts,
                        s.kind,
                        s.room.as_ref(),
                        &s.payload,
                        s.own,
                    )
                })
                .collect(),
            waiting: waiting
                .map(|w| {
                    SavedMessage::new(None, w.id, w.ts, w.kind, w.room.as_ref(), &w.payload, w.own)
                })
                .collect(),
            rooms: self.rooms.iter().map(|r| r.to_string()).collect(),
            streams: self
                .streams
                .iter()
                .map(|(r, p)| (r.to_string(), p.epoch, p.offset))
                .collect(),
            leaving: self
                .leaving
                .iter()
                .map(|(id, r)| (id.0, r.to_string()))
                .collect(),
        };
        // What the server sent is not acknowledged now: it is kept for
        // the resume, which says what was delivered.
        self.drop_connection(CloseCode::RETRY, "suspended");
        for t in <super::Timer as crate::timer::TimerKind>::ALL {
            self.timers.stop(*t);
        }
        if !matches!(self.state, State::Closed { .. }) {
            self.set_state(State::Closed {
                code: CloseCode::RETRY,
            });
        }
        snapshot
    }

    /// A machine that resumes the session of `snapshot` on its first
    /// connection: messages sent and not acknowledged go again after the
    /// server's `delivered`, queued ones follow, ids continue, rooms and
    /// their streams carry on. If the server no longer holds the session,
    /// the unacknowledged ones are reported by id as for any lost session.
    /// `config` and `seed` are as for [`Client::new`].
    pub fn restore(
        config: ClientConfig,
        snapshot: &Snapshot,
        seed: u64,
    ) -> Result<Client, RestoreError> {
        let bad = |what: &str| RestoreError::Invalid(what.into());
        let client_id = ClientId::from_hex(&snapshot.client)
            .ok_or_else(|| bad("client is not 32 hex digits"))?;
        let mut c = Client::new(config, client_id, seed)?;
        c.session = match &snapshot.session {
            Some(s) => {
                Some(SessionId::from_hex(s).ok_or_else(|| bad("session is not 32 hex digits"))?)
            }
            None => None,
        };
        c.resume_key = match &snapshot.key {
            Some(k) => Some(ResumeKey::from_hex(k).ok_or_else(|| bad("key is not 32 hex digits"))?),
            None => None,
        };
        if c.session.is_some() {
            c.link.inbound.restore(snapshot.delivered);
        }
        let mut window = Vec::with_capacity(snapshot.sent.len());
        let mut last = 0;
        for m in &snapshot.sent {
            let (kind, room, payload) = m.parts()?;
            let seq = m
                .seq
                .filter(|s| *s > last)
                .ok_or_else(|| bad("sent messages out of order"))?;
            last = seq;
            window.push(Sent {
                seq,
                id: MessageId(m.id),
                ts: m.ts,
                kind,
                room,
                payload,
                sent_at: None,
                own: m.own,
            });
        }
        let mut waiting = Vec::with_capacity(snapshot.waiting.len());
        for m in &snapshot.waiting {
            let (kind, room, payload) = m.parts()?;
            waiting.push(Waiting {
                id: MessageId(m.id),
                ts: m.ts,
                kind,
                room,
                payload,
                own: m.own,
            });
        }
        if c.session.is_none() && !window.is_empty() {
            return Err(bad("sent messages without a session"));
        }
        c.link.outbound.restore(snapshot.next_seq, window, waiting);
        c.next_id = snapshot.next_id.max(1);
        c.rooms = snapshot
            .rooms
            .iter()
            .map(|r| RoomName::from(r.as_str()))
            .collect::<BTreeSet<_>>();
        c.streams = snapshot
            .streams
            .iter()
            .map(|(r, epoch, offset)| {
                (
                    RoomName::from(r.as_str()),
                    Position {
                        epoch: *epoch,
                        offset: *offset,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>();
        c.leaving = snapshot
            .leaving
            .iter()
            .map(|(id, r)| (MessageId(*id), RoomName::from(r.as_str())))
            .collect();
        Ok(c)
    }
}

impl Snapshot {
    /// The ids of the messages it holds that no acknowledgment has
    /// covered yet (sent or queued), in order: what the restored machine
    /// will report as acknowledged, or lost.
    pub fn pending(&self) -> Vec<MessageId> {
        self.sent
            .iter()
            .chain(&self.waiting)
            .filter(|m| !m.own)
            .map(|m| MessageId(m.id))
            .collect()
    }
}
