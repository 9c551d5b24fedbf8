//! A reference for room feeds ([`FeedOutput`]): what a driver that turned
//! them on ([`Server::set_room_feeds`]) must write, one frame at a time, in
//! the simplest form that keeps the order the outputs give. The machine
//! targets run with feeds on and off through it, so the checks that hold
//! without feeds (offsets contiguous per connection, a `sub` before a
//! room's entries, exactly-once) check the feed outputs too.
//!
//! It asserts what a driver relies on: a feed's offsets have no gaps, a
//! connection never follows a room twice, and a follower never starts
//! before what its feed holds.
//!
//! [`Server::set_room_feeds`]: crate::server::Server::set_room_feeds

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::server::{ConnectionId, FeedOutput, RoomEntry, ServerOutput};
use crate::stream::HistoryConfig;
use crate::wire::{Codec, SessionId};

/// One connection following one room.
#[derive(Debug)]
struct Follow {
    room: Arc<str>,
    session: SessionId,
    epoch: u64,
    codec: Codec,
}

/// A room's feed: the entries its history holds.
#[derive(Debug)]
struct Feed {
    epoch: u64,
    /// The offset the next entry gets.
    next: u64,
    entries: VecDeque<RoomEntry>,
    bytes: usize,
}

/// Expands [`ServerOutput::Feed`] into the frames a driver writes.
#[derive(Debug)]
pub struct FeedModel {
    history: HistoryConfig,
    feeds: BTreeMap<Arc<str>, Feed>,
    follows: BTreeMap<ConnectionId, Vec<Follow>>,
}

impl FeedModel {
    /// A model whose feeds keep what a history bounded by `history` keeps.
    pub fn new(history: HistoryConfig) -> FeedModel {
        FeedModel {
            history,
            feeds: BTreeMap::new(),
            follows: BTreeMap::new(),
        }
    }

    /// Adds to `out` what output `o` means frame by frame: a published
    /// entry becomes a [`ServerOutput::Transmit`] for each follower, and a
    /// new follower is sent what the feed holds after its position, in the
    /// order the outputs come; every other output is passed on as it is.
    /// `log` names the case when an assertion fails.
    pub fn expand(&mut self, o: ServerOutput, out: &mut Vec<ServerOutput>, log: &str) {
        let feed = match o {
            ServerOutput::Feed(f) => f,
            ServerOutput::Disconnect(c, _, _) => {
                self.follows.remove(&c);
                out.push(o);
                return;
            }
            o => {
                out.push(o);
                return;
            }
        };
        match feed {
            FeedOutput::Publish { entry, epoch } => {
                let offset = entry.offset();
                let room = entry.room().clone();
                let limits = self.history;
                let feed = self.feed(&room, epoch, offset);
                assert_eq!(
                    feed.next, offset,
                    "room {room}: offset {offset} published after {}\n{log}",
                    feed.next
                );
                feed.next = offset + 1;
                feed.bytes += entry.payload_len();
                feed.entries.push_back(entry.clone());
                while feed.entries.len() > 1
                    && (feed.entries.len() > limits.max_entries.max(1)
                        || feed.bytes > limits.max_bytes)
                {
                    if let Some(old) = feed.entries.pop_front() {
                        feed.bytes -= old.payload_len();
                    }
                }
                for (&conn, follows) in &self.follows {
                    for f in follows
                        .iter()
                        .filter(|f| f.room == room && f.epoch == epoch)
                    {
                        out.push(ServerOutput::Transmit(conn, write(&entry, f, log)));
                    }
                }
            }
            FeedOutput::Follow {
                connection,
                session,
                room,
                epoch,
                after,
                codec,
            } => {
                let follows = self.follows.entry(connection).or_default();
                assert!(
                    follows.iter().all(|f| f.room != room),
                    "{connection:?} follows {room} twice\n{log}"
                );
                let f = Follow {
                    room: room.clone(),
                    session,
                    epoch,
                    codec,
                };
                let feed = self.feed(&room, epoch, after + 1);
                let first = feed.next - feed.entries.len() as u64;
                assert!(
                    after + 1 >= first && after < feed.next,
                    "{connection:?} follows {room} after {after}, and the feed holds {first}..{}\n{log}",
                    feed.next
                );
                for e in feed.entries.iter().filter(|e| e.offset() > after) {
                    out.push(ServerOutput::Transmit(connection, write(e, &f, log)));
                }
                self.follows.entry(connection).or_default().push(f);
            }
            FeedOutput::Unfollow { connection, room } => {
                if let Some(follows) = self.follows.get_mut(&connection) {
                    follows.retain(|f| f.room != room);
                }
            }
            FeedOutput::Close { room } => {
                for (conn, follows) in &self.follows {
                    assert!(
                        follows.iter().all(|f| f.room != room),
                        "{room} closed while {conn:?} follows it\n{log}"
                    );
                }
                self.feeds.remove(&room);
            }
        }
    }

    /// The connection is gone (the driver reported it closed).
    pub fn closed(&mut self, conn: ConnectionId) {
        self.follows.remove(&conn);
    }

    /// `room`'s feed of `epoch`, made (empty, its next offset `next`) if
    /// there is none of that epoch.
    fn feed(&mut self, room: &Arc<str>, epoch: u64, next: u64) -> &mut Feed {
        let feed = self.feeds.entry(room.clone()).or_insert(Feed {
            epoch,
            next,
            entries: VecDeque::new(),
            bytes: 0,
        });
        if feed.epoch != epoch {
            *feed = Feed {
                epoch,
                next,
                entries: VecDeque::new(),
                bytes: 0,
            };
        }
        feed
    }
}

/// What follower `f` is sent for `entry`.
fn write(entry: &RoomEntry, f: &Follow, log: &str) -> crate::wire::Transmit {
    match entry.transmit_for(f.session, f.codec) {
        Some(t) => t,
        None => panic!("an entry that does not encode\n{log}"),
    }
}
