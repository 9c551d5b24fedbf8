//! A model of the store through which a cluster's servers share rooms
//! (what `kitestring-redis` keeps in Redis): each room's epoch, offsets,
//! bounded log and members, and the order in which it carries out the
//! operations a server hands it. Pure data for the simulator
//! ([`Sim::share_rooms`](crate::sim::Sim::share_rooms)): nothing here
//! reads a clock or does IO.

use std::collections::{BTreeMap, VecDeque};

use kitestring_core::rooms::{Member, Presence};
use kitestring_core::server::{ClusterOutput, JoinedAt, SharedEntry};
use kitestring_core::wire::{MsgKind, Payload, SessionId};

/// One room in the store.
#[derive(Debug, Default)]
struct Room {
    epoch: u64,
    top: u64,
    log: VecDeque<SharedEntry>,
    members: BTreeMap<SessionId, Member>,
}

/// What the store answered to one operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// A publish took an offset.
    Appended,
    /// A join: where the member's stream starts.
    Joined(JoinedAt),
    /// The room is full.
    Full,
    /// A leave.
    Left,
}

/// The store (module docs).
#[derive(Debug)]
pub struct ModelStore {
    rooms: BTreeMap<String, Room>,
    epochs: u64,
    history: usize,
}

/// A room's log as a read returns it: epoch, last offset, entries.
pub type Log = (u64, u64, Vec<SharedEntry>);

impl ModelStore {
    /// An empty store keeping `history` entries of each room's log.
    pub fn new(history: usize) -> ModelStore {
        ModelStore {
            rooms: BTreeMap::new(),
            epochs: 0,
            history: history.max(1),
        }
    }

    fn room(&mut self, name: &str) -> &mut Room {
        if !self.rooms.contains_key(name) {
            self.epochs += 1;
            let epoch = 7_000 + self.epochs;
            self.rooms.insert(
                name.to_owned(),
                Room {
                    epoch,
                    ..Room::default()
                },
            );
        }
        self.rooms
            .get_mut(name)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    fn append(
        &mut self,
        name: &str,
        kind: MsgKind,
        payload: Payload,
        except: Option<SessionId>,
    ) -> (u64, SharedEntry) {
        let history = self.history;
        let room = self.room(name);
        room.top += 1;
        let entry = SharedEntry {
            offset: room.top,
            kind,
            payload,
            except,
        };
        room.log.push_back(entry.clone());
        while room.log.len() > history {
            room.log.pop_front();
        }
        (room.epoch, entry)
    }

    /// Carries out one operation; returns the answer and the entry it
    /// appended (with its room's epoch), if any.
    pub fn apply(&mut self, output: &ClusterOutput) -> (Reply, Option<(String, u64, SharedEntry)>) {
        match output {
            ClusterOutput::Publish {
                room,
                payload,
                except,
                ..
            } => {
                let (epoch, e) = self.append(room, MsgKind::Plain, payload.clone(), *except);
                (Reply::Appended, Some((room.to_string(), epoch, e)))
            }
            ClusterOutput::Join {
                room,
                session,
                member,
                presence,
                max_members,
                ..
            } => {
                let r = self.room(room);
                let had = r.members.contains_key(session);
                if !had && r.members.len() >= *max_members {
                    return (Reply::Full, None);
                }
                r.members.insert(*session, member.clone());
                let mut appended = None;
                if !had && *presence {
                    let diff = Presence {
                        snapshot: false,
                        joined: vec![member.clone()],
                        left: Vec::new(),
                    };
                    let payload = presence_payload(&diff);
                    let (epoch, e) = self.append(room, MsgKind::Presence, payload, Some(*session));
                    appended = Some((room.to_string(), epoch, e));
                }
                let r = self.room(room);
                let members = if *presence {
                    r.members.values().cloned().collect()
                } else {
                    Vec::new()
                };
                let joined = JoinedAt {
                    epoch: r.epoch,
                    at: r.top,
                    members,
                };
                (Reply::Joined(joined), appended)
            }
            ClusterOutput::Leave {
                room,
                session,
                presence,
                ..
            } => {
                let Some(r) = self.rooms.get_mut(&**room) else {
                    return (Reply::Left, None);
                };
                let Some(member) = r.members.remove(session) else {
                    return (Reply::Left, None);
                };
                if r.members.is_empty() {
                    // The room ends; made again, it gets another epoch.
                    self.rooms.remove(&**room);
                    return (Reply::Left, None);
                }
                if !*presence {
                    return (Reply::Left, None);
                }
                let diff = Presence {
                    snapshot: false,
                    joined: Vec::new(),
                    left: vec![member],
                };
                let (epoch, e) =
                    self.append(room, MsgKind::Presence, presence_payload(&diff), None);
                (Reply::Left, Some((room.to_string(), epoch, e)))
            }
            _ => (Reply::Left, None),
        }
    }

    /// `room`'s log after `after` (making the room if it has none).
    pub fn read(&mut self, name: &str, after: u64) -> Log {
        let r = self.room(name);
        let entries = r.log.iter().filter(|e| e.offset > after).cloned().collect();
        (r.epoch, r.top, entries)
    }

    /// `room`'s epoch and last offset, if it exists.
    pub fn top(&self, name: &str) -> Option<(u64, u64)> {
        self.rooms.get(name).map(|r| (r.epoch, r.top))
    }

    /// The members the store records in `room`.
    pub fn members(&self, name: &str) -> Vec<SessionId> {
        self.rooms
            .get(name)
            .map(|r| r.members.keys().copied().collect())
            .unwrap_or_default()
    }
}

fn presence_payload(diff: &Presence) -> Payload {
    let json = serde_json::to_vec(diff).unwrap_or_default();
    Payload::json(json).unwrap_or_else(|_| Payload::binary(Vec::new()))
}
