//! Sequencing, acknowledgment and retransmission for one direction pair of
//! a session.
//!
//! Owns the numbers: which sequence number comes next, what the peer has
//! acknowledged, what must be kept for retransmission, and what has been
//! delivered. Shared by the client machine and the server's sessions. It
//! never encodes frames, never reads time except what it is handed, and never
//! decides about connections: callers ask it what to send and tell it what
//! arrived.
//!
//! Model: each direction numbers application messages 1, 2, 3, ... for the
//! life of a session. The receiver delivers strictly in order; a number at or
//! below what it delivered is a duplicate (dropped, acknowledged again); a
//! number beyond the next expected is a gap (dropped, and the sender is asked
//! to replay from the next expected: go-back-N, which is all an ordered
//! transport needs, since gaps only appear around reconnects).

use std::collections::VecDeque;

#[cfg(test)]
use bytes::Bytes;

use crate::config::QueueConfig;
use crate::time::Instant;
use crate::wire::{MsgKind, Payload};

pub use crate::config::{BatchConfig, OverflowPolicy, ReliabilityConfig};
pub use crate::ids::MessageId;
pub(crate) use crate::ids::RoomName;
/// Why a message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The queue of waiting messages is at its bound. Nothing was dropped;
    /// the caller may retry after acknowledgments free space.
    #[error("send queue full: {messages} messages, {bytes} bytes waiting")]
    QueueFull {
        /// Messages waiting.
        messages: usize,
        /// Bytes waiting.
        bytes: usize,
    },
    /// The payload exceeds the largest message the peer accepts.
    #[error("payload of {size} bytes exceeds the {max}-byte message limit")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The machine is closed or failed; call `connect`/`reconnect` first.
    #[error("the session is {0}; nothing can be sent")]
    NotConnected(&'static str),
    /// Raw datagrams are unreliable and only go out on an open connection.
    #[error("raw datagrams need an open connection")]
    NotOpen,
    /// The session was given up because its buffers overflowed
    /// ([`OverflowPolicy::FailSession`]).
    #[error("buffers overflowed; the session was discarded")]
    SessionFailed,
    /// No such session (server side).
    #[error("no such session")]
    UnknownSession,
    /// A room name is empty or longer than 256 bytes.
    #[error("room names are 1 to 256 bytes")]
    BadRoom,
    /// Too many requests are waiting for responses.
    #[error("{max} requests already wait for responses")]
    TooManyRequests {
        /// The limit.
        max: usize,
    },
    /// A latest value's key is empty or longer than 256 bytes.
    #[error("keys are 1 to 256 bytes")]
    BadKey,
    /// A room already holds the most latest values it may; a new key is
    /// refused (the existing ones can still be set).
    #[error("the room already holds {max} latest values")]
    TooManyKeys {
        /// The limit.
        max: usize,
    },
    /// The operation is not available in this configuration; says why.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The room was not joined (synced-map writes go to the maps of rooms
    /// this client is in).
    #[error("not a member of the room; join it first")]
    NotMember,
}

impl SendError {
    /// [`TooLarge`](Self::TooLarge) if `size` bytes exceed the limit `max`.
    pub(crate) fn check_size(size: usize, max: usize) -> Result<(), SendError> {
        if size > max {
            return Err(SendError::TooLarge { size, max });
        }
        Ok(())
    }
}

/// Messages collected for one batch frame.
#[derive(Debug, Default)]
pub(crate) struct Batcher {
    msgs: Vec<crate::wire::Msg>,
    bytes: usize,
}

impl Batcher {
    /// Adds a message; returns whether the batch is now full.
    pub(crate) fn push(&mut self, m: crate::wire::Msg, cfg: &BatchConfig) -> bool {
        self.bytes += m.payload.len();
        self.msgs.push(m);
        self.msgs.len() >= cfg.max_messages.clamp(1, crate::wire::MAX_BATCH)
            || self.bytes >= cfg.max_bytes
    }

    /// The frame to send: one message alone, several as a batch.
    pub(crate) fn take(&mut self) -> Option<crate::wire::Frame> {
        self.bytes = 0;
        match self.msgs.len() {
            0 => None,
            1 => self.msgs.pop().map(crate::wire::Frame::Msg),
            _ => Some(crate::wire::Frame::Batch(core::mem::take(&mut self.msgs))),
        }
    }
}

/// A message on its way into a send queue, before it has an id.
#[derive(Clone, Debug)]
pub(crate) struct Outgoing {
    pub(crate) kind: MsgKind,
    pub(crate) room: Option<RoomName>,
    /// The sender's timestamp, if it set one.
    pub(crate) ts: Option<u64>,
    pub(crate) payload: Payload,
    /// The machine's own message (presence, a refusal, a room copy, a
    /// rejoin), never reported to the application: its id is no id the
    /// application was given.
    pub(crate) own: bool,
}

impl Outgoing {
    /// A message of `kind` outside any room, without a timestamp.
    pub(crate) fn new(kind: MsgKind, payload: Payload) -> Outgoing {
        Outgoing {
            kind,
            room: None,
            ts: None,
            payload,
            own: false,
        }
    }

    /// The same message, as the machine's own.
    pub(crate) fn own(self) -> Outgoing {
        Outgoing { own: true, ..self }
    }

    /// The same message, in `room`.
    pub(crate) fn in_room(self, room: RoomName) -> Outgoing {
        Outgoing {
            room: Some(room),
            ..self
        }
    }

    /// The same message, with the sender's timestamp `ts`.
    pub(crate) fn at(self, ts: Option<u64>) -> Outgoing {
        Outgoing { ts, ..self }
    }

    /// Accepted under `id`.
    pub(crate) fn with_id(self, id: MessageId) -> Waiting {
        Waiting {
            id,
            ts: self.ts,
            kind: self.kind,
            room: self.room,
            payload: self.payload,
            own: self.own,
        }
    }
}

/// A message accepted but not yet given a sequence number.
#[derive(Clone, Debug)]
pub(crate) struct Waiting {
    pub(crate) id: MessageId,
    pub(crate) ts: Option<u64>,
    pub(crate) kind: MsgKind,
    pub(crate) room: Option<RoomName>,
    pub(crate) payload: Payload,
    /// See [`Outgoing::own`].
    pub(crate) own: bool,
}

/// A message given a sequence number and kept until acknowledged.
#[derive(Clone, Debug)]
pub(crate) struct Sent {
    pub(crate) seq: u64,
    pub(crate) id: MessageId,
    pub(crate) ts: Option<u64>,
    pub(crate) kind: MsgKind,
    pub(crate) room: Option<RoomName>,
    pub(crate) payload: Payload,
    /// When it was last put on a connection, if it has been.
    pub(crate) sent_at: Option<Instant>,
    /// See [`Outgoing::own`].
    pub(crate) own: bool,
}

/// What an acknowledgment released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Released {
    /// The first and last of the application's messages released, if any
    /// (the machine's own are never reported).
    pub(crate) reported: Option<(MessageId, MessageId)>,
    /// The id of the last message released, of either kind; `None` if
    /// nothing was.
    pub(crate) through: Option<MessageId>,
}

/// The peer acknowledged something that was never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckBeyondSent {
    pub(crate) ack: u64,
    pub(crate) last_sent: u64,
}

/// The sending half: waiting queue, then the window of unacknowledged messages.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// Sequence number the next sequenced message gets.
    next_seq: u64,
    waiting: VecDeque<Waiting>,
    waiting_bytes: usize,
    window: VecDeque<Sent>,
    window_bytes: usize,
    queue_limit: QueueConfig,
    window_limit_messages: usize,
    window_limit_bytes: usize,
    /// When an acknowledgment last released a message.
    progress_at: Instant,
    /// The highest sequence number put on a connection in this session
    /// (messages numbered while no connection was attached have not been).
    sent_through: u64,
}

impl Outbound {
    pub(crate) fn new(queue: &QueueConfig, rel: &ReliabilityConfig) -> Self {
        Outbound {
            next_seq: 1,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            window: VecDeque::new(),
            window_bytes: 0,
            queue_limit: queue.clone(),
            window_limit_messages: rel.window_messages.max(1),
            window_limit_bytes: rel.window_bytes.max(1),
            progress_at: Instant::ZERO,
            sent_through: 0,
        }
    }

    /// Accepts a message into the waiting queue, or says why not.
    pub(crate) fn push(&mut self, msg: Waiting) -> Result<(), SendError> {
        let size = msg.payload.len();
        let over_count = self.waiting.len() >= self.queue_limit.max_messages;
        // One message larger than the byte bound still fits in an empty queue,
        // or it could never be sent at all.
        let over_bytes = !self.waiting.is_empty()
            && self.waiting_bytes.saturating_add(size) > self.queue_limit.max_bytes;
        if over_count || over_bytes {
            return Err(SendError::QueueFull {
                messages: self.waiting.len(),
                bytes: self.waiting_bytes,
            });
        }
        self.waiting_bytes += size;
        self.waiting.push_back(msg);
        Ok(())
    }

    fn window_has_room(&self, size: usize) -> bool {
        self.window.len() < self.window_limit_messages
            && (self.window.is_empty()
                || self.window_bytes.saturating_add(size) <= self.window_limit_bytes)
    }

    /// Moves the next waiting message into the window and returns it, if the
    /// window has room.
    pub(crate) fn sequence_next(&mut self, now: Option<Instant>) -> Option<&Sent> {
        let size = self.waiting.front()?.payload.len();
        if !self.window_has_room(size) {
            return None;
        }
        let w = self.waiting.pop_front()?;
        self.waiting_bytes -= size;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.window_bytes += size;
        self.window.push_back(Sent {
            seq,
            id: w.id,
            ts: w.ts,
            kind: w.kind,
            room: w.room,
            payload: w.payload,
            sent_at: now,
            own: w.own,
        });
        self.window.back()
    }

    /// Puts a message the machine sends on its own at the front of the
    /// queue, ahead of the application's. Not bounded by the queue limits:
    /// callers bound how many they add (one per joined room).
    pub(crate) fn push_front_system(&mut self, msg: Waiting) {
        self.waiting_bytes += msg.payload.len();
        self.waiting.push_front(msg);
    }

    /// Takes the joins at the front of the waiting queue, at most `max`,
    /// in order: what a `hello` can carry without changing the order of
    /// anything the client asked for.
    pub(crate) fn take_front_joins(&mut self, max: usize) -> Vec<Waiting> {
        let mut taken = Vec::new();
        while taken.len() < max
            && self
                .waiting
                .front()
                .is_some_and(|w| w.kind == MsgKind::Join && w.room.is_some())
        {
            if let Some(w) = self.waiting.pop_front() {
                self.waiting_bytes -= w.payload.len();
                taken.push(w);
            }
        }
        taken
    }

    /// Returns the most recently sequenced message to the front of the
    /// waiting queue's place in history: it is removed entirely and its
    /// number is reused, so the peer sees no gap.
    pub(crate) fn unsequence_last(&mut self, seq: u64) {
        if self.window.back().is_some_and(|s| s.seq == seq) {
            if let Some(s) = self.window.pop_back() {
                self.window_bytes -= s.payload.len();
                self.next_seq -= 1;
            }
        }
    }

    /// Applies a cumulative acknowledgment: what it released.
    pub(crate) fn on_ack(&mut self, ack: u64) -> Result<Released, AckBeyondSent> {
        let last_sent = self.next_seq - 1;
        if ack > last_sent {
            return Err(AckBeyondSent { ack, last_sent });
        }
        let mut first = None;
        let mut last = None;
        let mut through = None;
        while let Some(front) = self.window.front() {
            if front.seq > ack {
                break;
            }
            if !front.own {
                first.get_or_insert(front.id);
                last = Some(front.id);
            }
            through = Some(front.id);
            self.window_bytes -= front.payload.len();
            self.window.pop_front();
        }
        Ok(Released {
            reported: first.zip(last),
            through,
        })
    }

    /// Whether a message pushed now would be numbered at once: nothing
    /// waits ahead of it and the window has room.
    pub(crate) fn has_room(&self) -> bool {
        self.waiting.is_empty() && self.window_has_room(0)
    }

    /// The highest sequence number the peer has acknowledged.
    pub(crate) fn acked_through(&self) -> u64 {
        self.window.front().map_or(self.next_seq - 1, |s| s.seq - 1)
    }

    /// Unacknowledged messages from `from` on, to put on the wire again.
    pub(crate) fn unacked_from(&mut self, from: u64) -> impl Iterator<Item = &mut Sent> {
        self.window.iter_mut().filter(move |s| s.seq >= from)
    }

    /// When the oldest unacknowledged message went out, if any did.
    pub(crate) fn oldest_in_flight(&self) -> Option<Instant> {
        self.window.iter().filter_map(|s| s.sent_at).min()
    }

    /// An acknowledgment released messages at `now`.
    pub(crate) fn note_progress(&mut self, now: Instant) {
        self.progress_at = self.progress_at.max(now);
    }

    /// Since when data has waited for an acknowledgment with none making
    /// progress: the later of the oldest unacknowledged message's send and
    /// the last acknowledgment that released something. `None` with
    /// nothing in flight. A slow link whose acknowledgments keep coming is
    /// never stuck, however old its oldest message.
    pub(crate) fn stuck_since(&self) -> Option<Instant> {
        self.oldest_in_flight()
            .map(|oldest| oldest.max(self.progress_at))
    }

    /// Forgets the send times (the connection carrying them is gone).
    pub(crate) fn mark_unsent(&mut self) {
        for s in &mut self.window {
            s.sent_at = None;
        }
    }

    /// The session is gone: returns the ids whose fate is unknown (sent, never
    /// acknowledged) and restarts numbering at 1. Waiting messages stay queued
    /// for the next session.
    pub(crate) fn reset_session(&mut self) -> Vec<MessageId> {
        let lost = self
            .window
            .drain(..)
            .filter(|s| !s.own)
            .map(|s| s.id)
            .collect();
        self.window_bytes = 0;
        self.next_seq = 1;
        self.sent_through = 0;
        lost
    }

    /// The session's messages for a [`Snapshot`](crate::client::Snapshot):
    /// the next sequence number, the window (numbered, unacknowledged) and
    /// the waiting queue, in order.
    pub(crate) fn saved(
        &self,
    ) -> (
        u64,
        impl Iterator<Item = &Sent>,
        impl Iterator<Item = &Waiting>,
    ) {
        (self.next_seq, self.window.iter(), self.waiting.iter())
    }

    /// Takes a saved session's messages back (into an empty machine): the
    /// window's are sent again on the next connection, after the peer's
    /// `delivered`, as after any resume.
    pub(crate) fn restore(&mut self, next_seq: u64, window: Vec<Sent>, waiting: Vec<Waiting>) {
        self.window_bytes = window.iter().map(|s| s.payload.len()).sum();
        self.waiting_bytes = waiting.iter().map(|w| w.payload.len()).sum();
        let last = window.last().map_or(0, |s| s.seq);
        self.next_seq = next_seq.max(last + 1);
        // Anything numbered may have gone out before the save.
        self.sent_through = self.next_seq - 1;
        self.window = window.into();
        self.waiting = waiting.into();
    }

    /// Takes a session's messages from another server (into an empty
    /// queue): like [`restore`](Self::restore), but the other server said
    /// how far it had sent. The caller checked the numbers.
    pub(crate) fn import(
        &mut self,
        next_seq: u64,
        sent_through: u64,
        window: Vec<Sent>,
        waiting: Vec<Waiting>,
    ) {
        self.restore(next_seq, window, waiting);
        self.sent_through = sent_through;
    }

    /// A session taken up after its server was lost (into an empty
    /// queue): numbering carries on after `delivered`, the last number the
    /// peer received.
    pub(crate) fn recover(&mut self, delivered: u64) {
        self.next_seq = delivered + 1;
        self.sent_through = delivered;
    }

    /// Drops everything waiting; returns the ids (never sent).
    pub(crate) fn drain_waiting(&mut self) -> Vec<MessageId> {
        self.waiting_bytes = 0;
        self.waiting
            .drain(..)
            .filter(|w| !w.own)
            .map(|w| w.id)
            .collect()
    }

    /// Ids of the messages still waiting, in order.
    pub(crate) fn waiting_ids(&self) -> Vec<MessageId> {
        self.waiting.iter().map(|w| w.id).collect()
    }

    pub(crate) fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn waiting_bytes(&self) -> usize {
        self.waiting_bytes
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.window.len()
    }

    pub(crate) fn in_flight_bytes(&self) -> usize {
        self.window_bytes
    }

    pub(crate) fn last_sequenced(&self) -> u64 {
        self.next_seq - 1
    }

    /// Messages up to `seq` went out on a connection.
    pub(crate) fn note_sent(&mut self, seq: u64) {
        self.sent_through = self.sent_through.max(seq);
    }

    /// The highest sequence number that went out on a connection: the
    /// most a peer can have received.
    pub(crate) fn sent_through(&self) -> u64 {
        self.sent_through
    }

    /// The message frame for a sequenced message, with a piggybacked ack.
    pub(crate) fn frame(s: &Sent, ack: u64) -> crate::wire::Frame {
        crate::wire::Frame::Msg(crate::wire::Msg {
            seq: s.seq,
            id: s.id.0,
            ack: Some(ack),
            ts: s.ts,
            kind: s.kind,
            room: s.room.clone(),
            payload: s.payload.clone(),
        })
    }

    /// Every payload held, for byte accounting checks in tests.
    #[cfg(test)]
    pub(crate) fn held(&self) -> impl Iterator<Item = &Bytes> {
        self.waiting
            .iter()
            .map(|w| w.payload.data())
            .chain(self.window.iter().map(|s| s.payload.data()))
    }
}

/// What the receiver does with an incoming sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The next expected message: deliver it.
    Deliver,
    /// Already delivered: drop it, acknowledge again.
    Duplicate,
    /// Beyond the next expected: drop it; ask for a replay from `from` unless
    /// one is already outstanding.
    Gap { from: u64, request: bool },
}

/// The receiving half: what was delivered and what was acknowledged.
#[derive(Debug, Default)]
pub(crate) struct Inbound {
    delivered: u64,
    acked: u64,
    /// Sequence number a replay was requested from, while the gap persists.
    replay_requested: Option<u64>,
    /// Whether an acknowledgment must go out even though nothing new was
    /// delivered (a duplicate arrived: the sender may have missed our ack).
    ack_forced: bool,
    /// Messages consumed but refused, each with the id of the refusal sent
    /// back for it, in order: acknowledgments stay below the first until the
    /// peer has acknowledged its refusal, so the peer learns of a refusal
    /// before any acknowledgment covers the refused message. At most one
    /// per message in the peer's window. Boxed: almost always empty.
    // Boxed so an idle session pays one pointer, not an empty VecDeque's
    // four words.
    #[allow(clippy::box_collection)]
    held: Option<Box<VecDeque<(u64, u64)>>>,
    /// Messages whose outcome is not settled yet, in order:
    /// acknowledgments stay below the first. Those handed to the
    /// application when acknowledgments wait for it
    /// (`Acknowledge::AfterHandled`), and, tagged with [`CLUSTER_TAG`],
    /// room operations waiting for the other servers of a cluster to take
    /// them. At most one per message in the peer's window.
    #[allow(clippy::box_collection)]
    unhandled: Option<Box<VecDeque<u64>>>,
    /// Acknowledgments wait for the application (`Acknowledge::AfterHandled`).
    app_handles: bool,
}

/// Marks a message of [`Inbound`]'s unsettled list that waits for the
/// cluster, not for the application (sequence numbers stay below 2^53).
const CLUSTER_TAG: u64 = 1 << 63;

impl Inbound {
    /// Holds acknowledgments below `seq` (just delivered, and refused) until
    /// the refusal with id `refusal` is acknowledged ([`release`](Self::release)).
    pub(crate) fn hold(&mut self, seq: u64, refusal: u64) {
        // Kept in sequence order: a refusal decided later (a room operation
        // the cluster failed) may be for an earlier message.
        let held = self.held.get_or_insert_with(Default::default);
        let at = held.partition_point(|&(s, _)| s < seq);
        held.insert(at, (seq, refusal));
    }

    /// The peer acknowledged our messages with ids up to `last`: the
    /// refusals among them no longer hold acknowledgments back. True if
    /// the acknowledgment point moved.
    pub(crate) fn release(&mut self, last: u64) -> bool {
        let Some(held) = self.held.as_mut() else {
            return false;
        };
        let before = held.front().copied();
        held.retain(|&(_, refusal)| refusal > last);
        let moved = held.front().copied() != before;
        if held.is_empty() {
            self.held = None;
        }
        moved
    }

    /// What may be acknowledged: everything delivered, or up to the first
    /// held message, or up to the first the application has not handled.
    pub(crate) fn ack_point(&self) -> u64 {
        let held = self
            .held
            .as_ref()
            .and_then(|h| h.front())
            .map_or(self.delivered, |&(seq, _)| seq - 1);
        let unhandled = self
            .unhandled
            .as_ref()
            .and_then(|u| u.front())
            .map_or(self.delivered, |&seq| (seq & !CLUSTER_TAG) - 1);
        held.min(unhandled)
    }

    /// Acknowledgments wait for the application from now on
    /// (`Acknowledge::AfterHandled`).
    pub(crate) fn wait_for_handling(&mut self) {
        self.app_handles = true;
    }

    /// Whether acknowledgments wait for the application.
    pub(crate) fn waits_for_handling(&self) -> bool {
        self.app_handles
    }

    /// The message numbered `seq` was handed to the application, which
    /// will say when it has handled it. Nothing if acknowledgments do not
    /// wait for it.
    pub(crate) fn handed_over(&mut self, seq: u64) {
        if self.app_handles {
            self.unhandled
                .get_or_insert_with(Default::default)
                .push_back(seq);
        }
    }

    /// The message numbered `seq` is a room operation that the cluster
    /// has yet to take: not acknowledged until [`settled`](Self::settled).
    pub(crate) fn wait_for_cluster(&mut self, seq: u64) {
        self.unhandled
            .get_or_insert_with(Default::default)
            .push_back(seq | CLUSTER_TAG);
    }

    /// The cluster took (or refused) the room operation numbered `seq`;
    /// true if the acknowledgment point moved.
    pub(crate) fn settled(&mut self, seq: u64) -> bool {
        self.remove_unsettled(|e| e == seq | CLUSTER_TAG)
    }

    /// Whether room operations still wait for the cluster.
    pub(crate) fn waits_for_cluster(&self) -> bool {
        self.unhandled
            .as_ref()
            .is_some_and(|u| u.iter().any(|&e| e & CLUSTER_TAG != 0))
    }

    /// The application handled every message up to `through`; true if the
    /// acknowledgment point moved.
    pub(crate) fn handled(&mut self, through: u64) -> bool {
        self.remove_unsettled(|e| e & CLUSTER_TAG == 0 && e <= through)
    }

    fn remove_unsettled(&mut self, done: impl Fn(u64) -> bool) -> bool {
        let Some(u) = self.unhandled.as_mut() else {
            return false;
        };
        let before = u.front().copied();
        u.retain(|&e| !done(e));
        let moved = u.front().copied() != before;
        if u.is_empty() {
            self.unhandled = None;
        }
        moved
    }

    /// Messages handed to the application and not yet handled, in order.
    pub(crate) fn unhandled(&self) -> impl Iterator<Item = u64> + '_ {
        self.unhandled
            .iter()
            .flat_map(|u| u.iter().copied())
            .filter(|&e| e & CLUSTER_TAG == 0)
    }

    pub(crate) fn on_msg(&mut self, seq: u64) -> Verdict {
        let next = self.delivered + 1;
        if seq < next {
            self.ack_forced = true;
            Verdict::Duplicate
        } else if seq == next {
            self.delivered = seq;
            if self.replay_requested.is_some_and(|r| r <= seq) {
                self.replay_requested = None;
            }
            Verdict::Deliver
        } else {
            let request = self.replay_requested != Some(next);
            self.replay_requested = Some(next);
            // A replay acknowledges everything before `from`: never more
            // than may be acknowledged (a refusal or the application may
            // still hold acknowledgments back). What is sent again below
            // `next` arrives as duplicates.
            Verdict::Gap {
                from: self.ack_point() + 1,
                request,
            }
        }
    }

    /// Highest sequence number delivered in order.
    pub(crate) fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Deliveries not yet acknowledged to the peer (that may be).
    pub(crate) fn unacked(&self) -> u64 {
        self.ack_point().saturating_sub(self.acked)
    }

    /// Whether an acknowledgment should go out.
    pub(crate) fn ack_pending(&self) -> bool {
        self.ack_point() > self.acked || self.ack_forced
    }

    /// Records that an acknowledgment of everything that may be
    /// acknowledged went out; returns its value.
    pub(crate) fn acked_now(&mut self) -> u64 {
        self.acked = self.ack_point();
        self.ack_forced = false;
        self.acked
    }

    /// A new connection: the peer learns the acknowledgment point from the
    /// handshake, so nothing is owed and any replay request is void.
    pub(crate) fn on_new_connection(&mut self) {
        self.acked = self.ack_point();
        self.ack_forced = false;
        self.replay_requested = None;
    }

    /// A saved session's position: everything up to `delivered` was
    /// delivered (and counts as acknowledged: the resuming `hello` says so).
    pub(crate) fn restore(&mut self, delivered: u64) {
        let waits = self.waits_for_handling();
        *self = Inbound::default();
        if waits {
            self.wait_for_handling();
        }
        self.delivered = delivered;
        self.acked = delivered;
    }

    /// The refused messages holding acknowledgments back, with the ids of
    /// their refusals, in order.
    pub(crate) fn held(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.held.iter().flat_map(|h| h.iter().copied())
    }

    /// A session's position taken from another server: like
    /// [`restore`](Self::restore), with the refusals still holding
    /// acknowledgments back. The caller checked them.
    pub(crate) fn import(
        &mut self,
        delivered: u64,
        held: &[(u64, u64)],
        unhandled: Option<&[u64]>,
    ) {
        self.restore(delivered);
        for &(seq, refusal) in held {
            self.hold(seq, refusal);
        }
        if let Some(unhandled) = unhandled {
            self.wait_for_handling();
            for &seq in unhandled {
                self.handed_over(seq);
            }
        }
        self.acked = self.ack_point();
    }

    /// A new session: numbering restarts.
    pub(crate) fn reset_session(&mut self) {
        let waits = self.waits_for_handling();
        *self = Inbound::default();
        if waits {
            self.wait_for_handling();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn out(max_messages: usize, window: usize) -> Outbound {
        Outbound::new(
            &QueueConfig {
                max_messages,
                max_bytes: 1000,
            },
            &ReliabilityConfig {
                window_messages: window,
                ..ReliabilityConfig::default()
            },
        )
    }

    fn msg(id: u64) -> Waiting {
        Waiting {
            id: MessageId(id),
            ts: None,
            kind: MsgKind::Plain,
            room: None,
            payload: Payload::binary(vec![0u8; 10]),
            own: false,
        }
    }

    #[test]
    fn window_and_queue_bound_and_release() {
        let mut o = out(2, 2);
        for id in 1..=2 {
            o.push(msg(id)).unwrap();
            assert_eq!(o.sequence_next(None).map(|s| s.seq), Some(id));
        }
        o.push(msg(3)).unwrap();
        assert!(o.sequence_next(None).is_none(), "window full");
        o.push(msg(4)).unwrap();
        assert_eq!(
            o.push(msg(5)),
            Err(SendError::QueueFull {
                messages: 2,
                bytes: 20
            })
        );
        assert_eq!(
            o.on_ack(1).unwrap().reported,
            Some((MessageId(1), MessageId(1)))
        );
        assert_eq!(o.sequence_next(None).map(|s| s.id), Some(MessageId(3)));
        assert_eq!(
            o.on_ack(3).unwrap().reported,
            Some((MessageId(2), MessageId(3)))
        );
        assert_eq!(
            o.on_ack(3).unwrap().through,
            None,
            "repeated ack releases nothing"
        );
        assert_eq!(
            o.on_ack(9),
            Err(AckBeyondSent {
                ack: 9,
                last_sent: 3
            })
        );
        assert_eq!(o.held().count(), 1);
    }

    #[test]
    fn reset_reports_in_flight_and_keeps_waiting() {
        let mut o = out(10, 1);
        o.push(msg(1)).unwrap();
        o.push(msg(2)).unwrap();
        let _ = o.sequence_next(None);
        assert_eq!(o.reset_session(), vec![MessageId(1)]);
        assert_eq!(o.waiting_len(), 1);
        assert_eq!(
            o.sequence_next(None).map(|s| (s.seq, s.id)),
            Some((1, MessageId(2)))
        );
    }

    #[test]
    fn receiver_orders_and_dedups() {
        let mut i = Inbound::default();
        assert_eq!(i.on_msg(1), Verdict::Deliver);
        assert_eq!(i.on_msg(1), Verdict::Duplicate);
        assert!(i.ack_pending());
        assert_eq!(
            i.on_msg(3),
            Verdict::Gap {
                from: 2,
                request: true
            }
        );
        assert_eq!(
            i.on_msg(4),
            Verdict::Gap {
                from: 2,
                request: false
            },
            "one request per gap"
        );
        assert_eq!(i.on_msg(2), Verdict::Deliver);
        assert_eq!(i.replay_requested, None);
        assert_eq!(i.on_msg(3), Verdict::Deliver);
        assert_eq!(i.acked_now(), 3);
        assert!(!i.ack_pending());
    }
}
