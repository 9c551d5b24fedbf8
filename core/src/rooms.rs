//! Rooms: membership, the authorization policy, and presence payloads.
//!
//! Owns who is in which room and how a member is shown to others. It is pure
//! data: the server machine decides when to call it and turns its answers
//! into messages. Membership belongs to sessions, never to connections, so a
//! member whose connection drops stays in its rooms through the grace period.
//! A member is shown by client id and identity, never by session id (a
//! session id is the secret that lets a client resume).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::wire::{ClientId, JsonReader, SessionId};

/// How a member appears to the other members of a room.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The member's client instance, as 32 hex digits.
    pub client: String,
    /// The identity its connection authenticated as, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl Member {
    pub(crate) fn new(client: ClientId, identity: Option<&str>) -> Member {
        Member {
            client: client.to_hex(),
            identity: identity.map(str::to_owned),
        }
    }
}

/// A change in a room's membership, or its full list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// True when `joined` is the complete member list (sent on join and
    /// after a lost session is rejoined), false for a diff.
    #[serde(default)]
    pub snapshot: bool,
    /// Members who joined (or, in a snapshot, every member).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joined: Vec<Member>,
    /// Members who left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<Member>,
}

/// Why a join or publish was refused, as the client sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What was refused: `"join"`, `"leave"`, `"publish"` or `"message"`.
    pub op: String,
    /// Why, for people.
    pub reason: String,
    /// Why, for programs: `invalid`, `rate_limited`, `not_member`,
    /// `forbidden`, `room_full`, `too_many_rooms` (PROTOCOL.md, section
    /// 3.3). Absent in refusals from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// Each field of a payload once: serde refuses a duplicate.
fn first(seen: &mut u8, bit: u8) -> Option<()> {
    let mask = 1 << bit;
    (*seen & mask == 0).then(|| *seen |= mask)
}

impl Member {
    fn read(rd: &mut JsonReader<'_>) -> Option<Member> {
        let (mut seen, mut client, mut identity) = (0, None, None);
        rd.object(|rd, key| {
            match key {
                b"client" => {
                    first(&mut seen, 0)?;
                    client = Some(rd.str()?.into_owned());
                }
                b"identity" => {
                    first(&mut seen, 1)?;
                    identity = rd.opt(|rd| rd.str().map(|s| s.into_owned()))?;
                }
                _ => rd.skip()?,
            }
            Some(())
        })?;
        Some(Member {
            client: client?,
            identity,
        })
    }
}

impl Presence {
    /// Reads a presence payload as serde reads it from this JSON, for the
    /// forms the hand-written reader takes (see `wire::JsonReader`); `None`
    /// otherwise (with `json-serde`, serde then reads it).
    pub(crate) fn from_json(json: &[u8]) -> Option<Presence> {
        let mut rd = JsonReader::new(std::str::from_utf8(json).ok()?);
        let mut seen = 0;
        let mut p = Presence::default();
        let members = |rd: &mut JsonReader<'_>, list: &mut Vec<Member>| {
            rd.array(|rd| Member::read(rd).map(|m| list.push(m)))
        };
        rd.object(|rd, key| {
            match key {
                b"snapshot" => {
                    first(&mut seen, 0)?;
                    p.snapshot = rd.bool()?;
                }
                b"joined" => {
                    first(&mut seen, 1)?;
                    members(rd, &mut p.joined)?;
                }
                b"left" => {
                    first(&mut seen, 2)?;
                    members(rd, &mut p.left)?;
                }
                _ => rd.skip()?,
            }
            Some(())
        })?;
        rd.at_end().then_some(p)
    }
}

impl Refusal {
    /// Reads a refusal payload as serde reads it from this JSON, on the
    /// terms of [`Presence::from_json`].
    pub(crate) fn from_json(json: &[u8]) -> Option<Refusal> {
        let mut rd = JsonReader::new(std::str::from_utf8(json).ok()?);
        let (mut seen, mut op, mut reason, mut code) = (0, None, None, None);
        let string = |rd: &mut JsonReader<'_>| rd.str().map(|s| s.into_owned());
        rd.object(|rd, key| {
            match key {
                b"op" => {
                    first(&mut seen, 0)?;
                    op = Some(string(rd)?);
                }
                b"reason" => {
                    first(&mut seen, 1)?;
                    reason = Some(string(rd)?);
                }
                b"code" => {
                    first(&mut seen, 2)?;
                    code = rd.opt(string)?;
                }
                _ => rd.skip()?,
            }
            Some(())
        })?;
        rd.at_end().then_some(Refusal {
            op: op?,
            reason: reason?,
            code,
        })
    }
}

/// Decides who may join and publish to which room. Called by the server
/// machine for every join and every publish a client asks for; the
/// application's own calls (`Server::join`, `Server::broadcast`) are not
/// checked. Must be deterministic and must not block: it runs inside the
/// machine.
pub trait RoomPolicy: Send + Sync {
    /// `Ok` to let `who` join `room`; `Err(reason)` refuses (the client gets
    /// the reason).
    fn authorize_join(&self, who: &Member, room: &str) -> Result<(), String> {
        let _ = (who, room);
        Ok(())
    }

    /// `Ok` to let `who` publish to `room`, of which it is a member.
    fn authorize_publish(&self, who: &Member, room: &str) -> Result<(), String> {
        let _ = (who, room);
        Ok(())
    }

    /// `Ok` to let `who`, a member of `room`, write `key` of the room's
    /// synced map `map` (a map whose writers are the members; see
    /// `MapOptions` in the server module). Default: allowed.
    fn authorize_map_write(
        &self,
        who: &Member,
        room: &str,
        map: &str,
        key: &str,
    ) -> Result<(), String> {
        let _ = (who, room, map, key);
        Ok(())
    }

    /// Whether the members of `room` see each other: the member list on
    /// joining and a diff whenever someone joins or leaves. Default `true`.
    /// Answer `false` for rooms used as broadcast channels with many
    /// listeners: each join otherwise costs a message to every member (and a
    /// list of every member to the joiner), so filling a room of N costs
    /// about N²/2 presence messages. Membership, broadcasts and
    /// `Server::members` work the same either way. Asked at every join and
    /// leave, so the answer for a room should not change while it has
    /// members.
    fn presence(&self, room: &str) -> bool {
        let _ = room;
        true
    }
}

/// The default policy: every member may join and publish anywhere.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl RoomPolicy for AllowAll {}

/// Any closure pair can be a policy.
pub struct PolicyFn<J, P> {
    /// Join check.
    pub join: J,
    /// Publish check.
    pub publish: P,
}

impl<J, P> RoomPolicy for PolicyFn<J, P>
where
    J: Fn(&Member, &str) -> Result<(), String> + Send + Sync,
    P: Fn(&Member, &str) -> Result<(), String> + Send + Sync,
{
    fn authorize_join(&self, who: &Member, room: &str) -> Result<(), String> {
        (self.join)(who, room)
    }

    fn authorize_publish(&self, who: &Member, room: &str) -> Result<(), String> {
        (self.publish)(who, room)
    }
}

impl fmt::Debug for dyn RoomPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RoomPolicy")
    }
}

/// A room's members: a hash set, so that a join or a leave in a room of
/// thousands touches one or two cache lines instead of walking a tree
/// (random session ids spread well under FxHash). Iteration order is the
/// set's, the same for the same history of joins and leaves; what callers
/// show or compare is sorted by them.
type Members = HashSet<SessionId, rustc_hash::FxBuildHasher>;

/// Every room and its members.
#[derive(Debug, Default)]
pub(crate) struct Rooms {
    rooms: BTreeMap<Arc<str>, Members>,
    memberships: usize,
}

/// Why a join could not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JoinError {
    RoomFull,
}

impl Rooms {
    /// The shared name for `room`, reusing the existing one if the room exists.
    pub(crate) fn name(&self, room: &str) -> Arc<str> {
        match self.rooms.get_key_value(room) {
            Some((k, _)) => k.clone(),
            None => Arc::from(room),
        }
    }

    /// Adds `session`; `Ok(false)` if it was already a member.
    pub(crate) fn join(
        &mut self,
        room: &Arc<str>,
        session: SessionId,
        max: usize,
    ) -> Result<bool, JoinError> {
        let members = self.rooms.entry(room.clone()).or_default();
        if members.len() >= max {
            if members.contains(&session) {
                return Ok(false);
            }
            if members.is_empty() {
                self.rooms.remove(room);
            }
            return Err(JoinError::RoomFull);
        }
        if !members.insert(session) {
            return Ok(false);
        }
        self.memberships += 1;
        Ok(true)
    }

    /// Removes `session`; false if it was not a member. Empty rooms vanish.
    pub(crate) fn leave(&mut self, room: &str, session: SessionId) -> bool {
        let Some(members) = self.rooms.get_mut(room) else {
            return false;
        };
        let removed = members.remove(&session);
        if removed {
            self.memberships -= 1;
        }
        if members.is_empty() {
            self.rooms.remove(room);
        }
        removed
    }

    pub(crate) fn members(&self, room: &str) -> impl Iterator<Item = SessionId> + '_ {
        self.rooms
            .get(room)
            .into_iter()
            .flat_map(|m| m.iter().copied())
    }

    pub(crate) fn is_member(&self, room: &str, session: SessionId) -> bool {
        self.rooms.get(room).is_some_and(|m| m.contains(&session))
    }

    pub(crate) fn size(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, Members::len)
    }

    pub(crate) fn count(&self) -> usize {
        self.rooms.len()
    }

    pub(crate) fn memberships(&self) -> usize {
        self.memberships
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn membership_is_counted_and_bounded() {
        let mut r = Rooms::default();
        let room = r.name("lobby");
        assert_eq!(r.join(&room, SessionId([1; 16]), 2), Ok(true));
        assert_eq!(r.join(&room, SessionId([1; 16]), 2), Ok(false));
        assert_eq!(r.join(&room, SessionId([2; 16]), 2), Ok(true));
        assert_eq!(
            r.join(&room, SessionId([3; 16]), 2),
            Err(JoinError::RoomFull)
        );
        assert_eq!(r.memberships(), 2);
        assert!(Arc::ptr_eq(&r.name("lobby"), &room), "names are shared");
        assert!(r.leave("lobby", SessionId([1; 16])));
        assert!(!r.leave("lobby", SessionId([1; 16])));
        assert!(r.leave("lobby", SessionId([2; 16])));
        assert_eq!(r.count(), 0, "empty rooms vanish");
        let full = r.name("tiny");
        assert_eq!(
            r.join(&full, SessionId([1; 16]), 0),
            Err(JoinError::RoomFull)
        );
        assert_eq!(r.count(), 0);
    }

    #[test]
    fn presence_json_is_compact() {
        let p = Presence {
            snapshot: false,
            joined: vec![Member::new(ClientId([0xab; 16]), Some("alice"))],
            left: vec![],
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"snapshot":false,"joined":[{"client":"abababababababababababababababab","identity":"alice"}]}"#
        );
    }
}
