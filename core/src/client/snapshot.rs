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

use serde::{Deserialize, Serialize};

use crate::close::CloseCode;
use crate::config::{ClientConfig, ConfigError};
use crate::reliable::{MessageId, RoomName};
use crate::saved::SavedMessage;
use crate::time::Instant;
use crate::vecmap::{VecMap, VecSet};
use crate::wire::{push_json_str, push_uint, ClientId, JsonReader, ResumeKey, SessionId};

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
        self.restore_hello_joins();
        let (next_seq, window, waiting) = self.link.outbound.saved();
        let snapshot = Snapshot {
            client: self.client_id.to_hex(),
            session: self.session.map(|s| s.to_hex()),
            key: self.resume_key.map(|k| k.to_hex()),
            delivered: self.link.inbound.delivered(),
            next_id: self.next_id,
            next_seq,
            sent: window.map(SavedMessage::sent).collect(),
            waiting: waiting.map(SavedMessage::waiting).collect(),
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
            let sent = m.to_sent(last).map_err(RestoreError::Invalid)?;
            last = sent.seq;
            window.push(sent);
        }
        let waiting = snapshot
            .waiting
            .iter()
            .map(|m| m.to_waiting().map_err(RestoreError::Invalid))
            .collect::<Result<Vec<_>, _>>()?;
        if c.session.is_none() && !window.is_empty() {
            return Err(bad("sent messages without a session"));
        }
        c.link.outbound.restore(snapshot.next_seq, window, waiting);
        c.next_id = snapshot.next_id.max(1);
        c.rooms = snapshot
            .rooms
            .iter()
            .map(|r| RoomName::from(r.as_str()))
            .collect::<VecSet<_>>();
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
            .collect::<VecMap<_, _>>();
        c.leaving = snapshot
            .leaving
            .iter()
            .map(|(id, r)| (MessageId(*id), RoomName::from(r.as_str())))
            .collect();
        Ok(c)
    }
}

impl Snapshot {
    /// The snapshot as JSON text: what serde_json writes for it, written
    /// without serde.
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(256);
        let key = |out: &mut Vec<u8>, k: &str| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b"\":");
        };
        let messages = |out: &mut Vec<u8>, list: &[SavedMessage]| {
            out.push(b'[');
            for (i, m) in list.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                m.write_json(out);
            }
            out.push(b']');
        };
        out.extend_from_slice(b"{\"client\":");
        push_json_str(&mut out, &self.client);
        if let Some(session) = &self.session {
            key(&mut out, "session");
            push_json_str(&mut out, session);
        }
        if let Some(k) = &self.key {
            key(&mut out, "key");
            push_json_str(&mut out, k);
        }
        key(&mut out, "delivered");
        push_uint(&mut out, self.delivered);
        key(&mut out, "next_id");
        push_uint(&mut out, self.next_id);
        key(&mut out, "next_seq");
        push_uint(&mut out, self.next_seq);
        key(&mut out, "sent");
        messages(&mut out, &self.sent);
        key(&mut out, "waiting");
        messages(&mut out, &self.waiting);
        key(&mut out, "rooms");
        out.push(b'[');
        for (i, r) in self.rooms.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_json_str(&mut out, r);
        }
        out.push(b']');
        key(&mut out, "streams");
        out.push(b'[');
        for (i, (r, epoch, offset)) in self.streams.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'[');
            push_json_str(&mut out, r);
            out.push(b',');
            push_uint(&mut out, *epoch);
            out.push(b',');
            push_uint(&mut out, *offset);
            out.push(b']');
        }
        out.push(b']');
        key(&mut out, "leaving");
        out.push(b'[');
        for (i, (id, r)) in self.leaving.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'[');
            push_uint(&mut out, *id);
            out.push(b',');
            push_json_str(&mut out, r);
            out.push(b']');
        }
        out.extend_from_slice(b"]}");
        // Every piece written is UTF-8.
        String::from_utf8(out).unwrap_or_default()
    }

    /// A snapshot from the JSON [`to_json`](Self::to_json) (or serde_json)
    /// wrote. Read without serde for the forms any JSON writer produces;
    /// with the `json-serde` feature, serde reads what that reader leaves.
    pub fn from_json(json: &str) -> Result<Snapshot, RestoreError> {
        let mut rd = JsonReader::new(json);
        if let Some(snapshot) = Snapshot::read_json(&mut rd) {
            return Ok(snapshot);
        }
        #[cfg(feature = "json-serde")]
        {
            serde_json::from_str(json).map_err(|e| RestoreError::Invalid(e.to_string()))
        }
        #[cfg(not(feature = "json-serde"))]
        Err(RestoreError::Invalid(format!(
            "not a snapshot in JSON (byte {})",
            rd.position()
        )))
    }

    fn read_json(rd: &mut JsonReader<'_>) -> Option<Snapshot> {
        let mut seen = 0u16;
        let mut first = |bit: u16| {
            let mask = 1 << bit;
            (seen & mask == 0).then(|| seen |= mask)
        };
        let string = |rd: &mut JsonReader<'_>| rd.str().map(|s| s.into_owned());
        let messages = |rd: &mut JsonReader<'_>| {
            let mut list = Vec::new();
            rd.array(|rd| SavedMessage::read_json(rd).map(|m| list.push(m)))?;
            Some(list)
        };
        let (mut client, mut session, mut key, mut delivered) = (None, None, None, None);
        let (mut next_id, mut next_seq, mut sent, mut waiting) = (None, None, None, None);
        let (mut rooms, mut streams, mut leaving) = (None, None, None);
        rd.object(|rd, k| {
            match k {
                b"client" => {
                    first(0)?;
                    client = Some(string(rd)?);
                }
                b"session" => {
                    first(1)?;
                    session = rd.opt(string)?;
                }
                b"key" => {
                    first(2)?;
                    key = rd.opt(string)?;
                }
                b"delivered" => {
                    first(3)?;
                    delivered = Some(rd.uint()?);
                }
                b"next_id" => {
                    first(4)?;
                    next_id = Some(rd.uint()?);
                }
                b"next_seq" => {
                    first(5)?;
                    next_seq = Some(rd.uint()?);
                }
                b"sent" => {
                    first(6)?;
                    sent = Some(messages(rd)?);
                }
                b"waiting" => {
                    first(7)?;
                    waiting = Some(messages(rd)?);
                }
                b"rooms" => {
                    first(8)?;
                    let mut list = Vec::new();
                    rd.array(|rd| string(rd).map(|r| list.push(r)))?;
                    rooms = Some(list);
                }
                b"streams" => {
                    first(9)?;
                    let mut list = Vec::new();
                    rd.array(|rd| {
                        let mut parts = (None, None, None, 0);
                        rd.array(|rd| {
                            match parts.3 {
                                0 => parts.0 = Some(string(rd)?),
                                1 => parts.1 = Some(rd.uint()?),
                                2 => parts.2 = Some(rd.uint()?),
                                _ => return None,
                            }
                            parts.3 += 1;
                            Some(())
                        })?;
                        list.push((parts.0?, parts.1?, parts.2?));
                        Some(())
                    })?;
                    streams = Some(list);
                }
                b"leaving" => {
                    first(10)?;
                    let mut list = Vec::new();
                    rd.array(|rd| {
                        let mut parts = (None, None, 0);
                        rd.array(|rd| {
                            match parts.2 {
                                0 => parts.0 = Some(rd.uint()?),
                                1 => parts.1 = Some(string(rd)?),
                                _ => return None,
                            }
                            parts.2 += 1;
                            Some(())
                        })?;
                        list.push((parts.0?, parts.1?));
                        Some(())
                    })?;
                    leaving = Some(list);
                }
                _ => rd.skip()?,
            }
            Some(())
        })?;
        if !rd.at_end() {
            return None;
        }
        Some(Snapshot {
            client: client?,
            session,
            key,
            delivered: delivered?,
            next_id: next_id?,
            next_seq: next_seq?,
            sent: sent?,
            waiting: waiting?,
            rooms: rooms?,
            streams: streams?,
            leaving: leaving?,
        })
    }

    /// The ids of the messages it holds that no acknowledgment has
    /// covered yet (sent or queued), in order: what the restored machine
    /// will report as acknowledged, or lost.
    pub fn pending(&self) -> Vec<MessageId> {
        self.sent
            .iter()
            .chain(&self.waiting)
            .filter(|m| !m.own())
            .map(|m| m.id())
            .collect()
    }
}
