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

use serde::{Deserialize, Serialize};

use crate::close::CloseCode;
use crate::config::{ClientConfig, ConfigError};
use crate::reliable::{MessageId, RoomName};
use crate::saved::SavedMessage;
use crate::time::Instant;
use crate::wire::{ClientId, ResumeKey, SessionId};

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
            .filter(|m| !m.own())
            .map(|m| m.id())
            .collect()
    }
}
