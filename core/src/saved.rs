//! A queued or unacknowledged message written down outside a machine: in a
//! client's [`Snapshot`](crate::client::Snapshot) or a server's
//! [`SessionImage`](crate::server::SessionImage).
//!
//! Owns `SavedMessage`, its serde form (every field a plain string or
//! number, the payload in base64, so the same form reads back from JSON or
//! MessagePack), and the checks made when it is read back: a payload is
//! checked again by its kind's constructor, and a kind no machine queues is
//! refused. It never decides what is saved or when; the snapshot and the
//! session image do.

use serde::{Deserialize, Serialize};

use crate::reliable::{MessageId, RoomName, Sent, Waiting};
use crate::wire::{push_json_str, push_uint, JsonReader, MsgKind, Payload, PayloadKind};

/// One message of a snapshot or a session image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct SavedMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ts: Option<u64>,
    /// `msg`, `request`, `response`, `join`, `leave`, `presence`,
    /// `refused`, `refused_message` or `mset`.
    kind: String,
    /// The request a response answers; the message a refusal names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    room: Option<String>,
    /// `json`, `msgpack` or `bytes`.
    enc: String,
    /// The payload, base64.
    data: String,
    /// Sent by the machine on its own (a join repeated after a lost
    /// session, a presence update, a refusal): never reported as
    /// acknowledged or lost.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    own: bool,
}

/// A saved message's parts, checked.
pub(crate) struct Parts {
    pub(crate) kind: MsgKind,
    pub(crate) room: Option<RoomName>,
    pub(crate) payload: Payload,
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
            MsgKind::Presence => ("presence", None),
            MsgKind::Refused => ("refused", None),
            MsgKind::RefusedMessage(to) => ("refused_message", Some(to)),
            MsgKind::MapWrite => ("mset", None),
            // Only the decoder makes `Invalid`; no machine queues one.
            MsgKind::Plain | MsgKind::Invalid(_) => ("msg", None),
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
            data: crate::base64::encode(payload.data()),
            own,
        }
    }

    /// A numbered, unacknowledged message.
    pub(crate) fn sent(s: &Sent) -> SavedMessage {
        Self::new(
            Some(s.seq),
            s.id,
            s.ts,
            s.kind,
            s.room.as_ref(),
            &s.payload,
            s.own,
        )
    }

    /// A message accepted and not yet numbered.
    pub(crate) fn waiting(w: &Waiting) -> SavedMessage {
        Self::new(None, w.id, w.ts, w.kind, w.room.as_ref(), &w.payload, w.own)
    }

    /// Writes it as serde_json writes it (the tests check the two agree).
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        let key = |out: &mut Vec<u8>, k: &str| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b"\":");
        };
        out.push(b'{');
        if let Some(seq) = self.seq {
            out.extend_from_slice(b"\"seq\":");
            push_uint(out, seq);
            out.push(b',');
        }
        out.extend_from_slice(b"\"id\":");
        push_uint(out, self.id);
        if let Some(ts) = self.ts {
            key(out, "ts");
            push_uint(out, ts);
        }
        key(out, "kind");
        push_json_str(out, &self.kind);
        if let Some(to) = self.to {
            key(out, "to");
            push_uint(out, to);
        }
        if let Some(room) = &self.room {
            key(out, "room");
            push_json_str(out, room);
        }
        key(out, "enc");
        push_json_str(out, &self.enc);
        key(out, "data");
        push_json_str(out, &self.data);
        if self.own {
            key(out, "own");
            out.extend_from_slice(b"true");
        }
        out.push(b'}');
    }

    /// Reads one as serde reads it, for the forms the hand-written reader
    /// takes (`None` otherwise).
    pub(crate) fn read_json(rd: &mut JsonReader<'_>) -> Option<SavedMessage> {
        let mut seen = 0u16;
        let mut first = |bit: u16| {
            let mask = 1 << bit;
            (seen & mask == 0).then(|| seen |= mask)
        };
        let string = |rd: &mut JsonReader<'_>| rd.str().map(|s| s.into_owned());
        let (mut seq, mut id, mut ts, mut kind, mut to) = (None, None, None, None, None);
        let (mut room, mut enc, mut data, mut own) = (None, None, None, None);
        rd.object(|rd, k| {
            match k {
                b"seq" => {
                    first(0)?;
                    seq = rd.opt(JsonReader::uint)?;
                }
                b"id" => {
                    first(1)?;
                    id = Some(rd.uint()?);
                }
                b"ts" => {
                    first(2)?;
                    ts = rd.opt(JsonReader::uint)?;
                }
                b"kind" => {
                    first(3)?;
                    kind = Some(string(rd)?);
                }
                b"to" => {
                    first(4)?;
                    to = rd.opt(JsonReader::uint)?;
                }
                b"room" => {
                    first(5)?;
                    room = rd.opt(string)?;
                }
                b"enc" => {
                    first(6)?;
                    enc = Some(string(rd)?);
                }
                b"data" => {
                    first(7)?;
                    data = Some(string(rd)?);
                }
                b"own" => {
                    first(8)?;
                    own = Some(rd.bool()?);
                }
                _ => rd.skip()?,
            }
            Some(())
        })?;
        Some(SavedMessage {
            seq,
            id: id?,
            ts,
            kind: kind?,
            to,
            room,
            enc: enc?,
            data: data?,
            own: own.unwrap_or(false),
        })
    }

    /// Its id.
    pub(crate) fn id(&self) -> MessageId {
        MessageId(self.id)
    }

    /// Whether the machine sent it on its own.
    pub(crate) fn own(&self) -> bool {
        self.own
    }

    /// Its kind, room and payload, each checked; or what is wrong, naming
    /// the message.
    pub(crate) fn parts(&self) -> Result<Parts, String> {
        let bad = |what: &str| format!("message {}: {what}", self.id);
        let kind = match (self.kind.as_str(), self.to) {
            ("msg", _) => MsgKind::Plain,
            ("request", _) => MsgKind::Request,
            ("response", Some(to)) => MsgKind::Response(to),
            ("join", _) => MsgKind::Join,
            ("leave", _) => MsgKind::Leave,
            ("presence", _) => MsgKind::Presence,
            ("refused", _) => MsgKind::Refused,
            ("refused_message", Some(to)) => MsgKind::RefusedMessage(to),
            ("mset", None) => MsgKind::MapWrite,
            _ => return Err(bad("unknown kind")),
        };
        let data = crate::base64::decode(self.data.as_bytes())
            .ok_or_else(|| bad("payload is not base64"))?;
        let payload = match self.enc.as_str() {
            "json" => Payload::json(data).map_err(|e| bad(&e.to_string()))?,
            "msgpack" => Payload::msgpack(data).map_err(|e| bad(&e.to_string()))?,
            "bytes" => Payload::binary(data),
            _ => return Err(bad("unknown encoding")),
        };
        let room = match self.room.as_deref() {
            Some(r) if r.is_empty() || r.len() > crate::wire::MAX_TOKEN_LEN => {
                return Err(bad("room names are 1 to 256 bytes"))
            }
            r => r.map(RoomName::from),
        };
        Ok(Parts {
            kind,
            room,
            payload,
        })
    }

    /// The numbered message it saved; `last` is the number of the one
    /// before it (numbers must rise).
    pub(crate) fn to_sent(&self, last: u64) -> Result<Sent, String> {
        let seq = self
            .seq
            .filter(|s| *s > last)
            .ok_or_else(|| format!("message {}: numbered out of order", self.id))?;
        let p = self.parts()?;
        Ok(Sent {
            seq,
            id: MessageId(self.id),
            ts: self.ts,
            kind: p.kind,
            room: p.room,
            payload: p.payload,
            sent_at: None,
            own: self.own,
        })
    }

    /// The queued message it saved.
    pub(crate) fn to_waiting(&self) -> Result<Waiting, String> {
        let p = self.parts()?;
        Ok(Waiting {
            id: MessageId(self.id),
            ts: self.ts,
            kind: p.kind,
            room: p.room,
            payload: p.payload,
            own: self.own,
        })
    }
}
