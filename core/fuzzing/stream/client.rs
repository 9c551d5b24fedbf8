//! The client model of the `server_stream` harness: a client that speaks
//! the wire protocol to the server as a well-behaved one would (its
//! handshakes and resumes, numbering its messages, retransmitting on
//! `replay` and after a resume, acknowledging cumulatively), checking what
//! it receives as it arrives: the server's answers, acknowledgments and
//! stream.
//!
//! It never misbehaves on its own: every fault comes from an op
//! (`stream/ops.rs`), and a poison message goes out only because an op
//! queued one.

use std::fmt::Write as _;

use crate::fuzzing::{decode_own, header_frame};
use crate::wire::{
    self, ClientId, Codec, Frame, Hello, Msg, MsgKind, Payload, Resume, SessionId, Welcome,
    PROTOCOL_VERSION,
};

use super::{poison_messages, Claim, StreamHarness, Wire};

impl StreamHarness {
    fn hello(&self, resume: Option<Resume>) -> Frame {
        Frame::Hello(Hello {
            versions: vec![PROTOCOL_VERSION],
            client: ClientId([0xc5; 16]),
            resume,
            caps: if self.setup.batch {
                vec![crate::client::CAP_BATCH.into()]
            } else {
                Vec::new()
            },
            codecs: if self.setup.msgpack {
                vec![Codec::MsgPack, Codec::Json]
            } else {
                vec![Codec::Json]
            },
            join: Vec::new(),
        })
    }

    /// Where a resume claiming `delivered` stands.
    fn claim(&self, session: SessionId, delivered: u64) -> Claim {
        if self.ended.contains(&session) || Some(session) != self.session {
            Claim::Unknown
        } else if delivered < self.acked_sent || delivered > self.delivered {
            // Above what the client delivered is only ever claimed above
            // what the server can have sent (see `WrongDelivered`).
            Claim::Inconsistent
        } else {
            Claim::Consistent
        }
    }

    /// The client gives up its connection without telling the server.
    pub(super) fn abandon(&mut self) {
        self.conn = None;
        self.open = false;
        self.wire.clear();
        if self.detached_since.is_none() {
            self.detached_since = Some(self.now);
        }
    }

    /// A new connection (the old one, if any, left half-open) and its
    /// handshake, resuming `resume` (a session and the `delivered` to
    /// claim). `upgrade`: the `hello` goes in the upgrade request;
    /// `garbage`: an undecodable upgrade header, then the `hello` as the
    /// first frame. The answer must come at once (c).
    pub(in crate::fuzzing) fn connect(
        &mut self,
        upgrade: bool,
        garbage: bool,
        resume: Option<(SessionId, u64)>,
    ) {
        self.abandon();
        let fresh = self.fresh_session();
        // A well-behaved client holds its session's key from the welcome.
        let resume_frame = resume.map(|(session, delivered)| Resume {
            session,
            delivered,
            key: Some(self.server.resume_key(session)),
            acked: None,
        });
        let expect = resume.map(|(s, d)| self.claim(s, d));
        let _ = writeln!(
            self.log,
            "{:?} connect upgrade={upgrade} garbage={garbage} {resume:?} {expect:?}",
            self.now
        );
        let hello = self.hello(resume_frame);
        let welcome = if upgrade || garbage {
            let text = if garbage {
                "{\"t\":\"hello\",".to_string()
            } else {
                match wire::handshake_header(&hello) {
                    Ok(h) => h,
                    Err(e) => self.fail(format_args!("a hello does not encode: {e}")),
                }
            };
            let (conn, answer) = self.server.handle_upgrade(self.now, None, fresh, &text);
            self.conn = Some(conn);
            self.drain();
            if garbage {
                if answer.is_some() || !self.wire.is_empty() {
                    self.fail(format_args!(
                        "an undecodable upgrade hello answered: {answer:?} {:?}",
                        self.wire
                    ));
                }
                self.send_hello_frame(&hello);
                self.first_welcome()
            } else {
                // (c) Answered in the response.
                match answer.as_deref().map(header_frame) {
                    Some(Ok(Frame::Welcome(w))) => w,
                    other => self.fail(format_args!("an upgrade hello answered with {other:?}")),
                }
            }
        } else {
            let conn = self.server.handle_connection(self.now, None, fresh);
            self.conn = Some(conn);
            self.drain();
            self.send_hello_frame(&hello);
            self.first_welcome()
        };
        self.on_welcome(welcome, resume, expect);
    }

    /// (c) The answer to a `hello` frame came at once: a welcome, first
    /// on the wire.
    fn first_welcome(&mut self) -> Welcome {
        match self.wire.pop_front() {
            Some(Wire::Frame(t)) => match decode_own(&t, "server") {
                Some(Frame::Welcome(w)) => w,
                other => self.fail(format_args!("a hello answered with {other:?}")),
            },
            other => self.fail(format_args!("a hello left unanswered: {other:?}")),
        }
    }

    fn send_hello_frame(&mut self, hello: &Frame) {
        let Some(conn) = self.conn else { return };
        match wire::encode(hello, Codec::Json, PROTOCOL_VERSION) {
            Ok(t) => self.server.handle_message(self.now, conn, t.as_incoming()),
            Err(e) => self.fail(format_args!("a hello does not encode: {e}")),
        }
        self.drain();
    }

    fn on_welcome(&mut self, w: Welcome, resume: Option<(SessionId, u64)>, expect: Option<Claim>) {
        if w.codec != self.codec {
            self.fail(format_args!("welcomed with {:?}", w.codec));
        }
        self.open = true;
        self.detached_since = None;
        self.progress_at = self.now;
        match (resume, expect) {
            (Some((session, _)), Some(claim)) if w.resumed => {
                if claim != Claim::Consistent {
                    self.fail(format_args!("a resume claiming {claim:?} was resumed"));
                }
                if w.session != session {
                    self.fail("resumed another session");
                }
                // The claim acknowledged the server's messages up to it.
                if let Some((_, claimed)) = resume {
                    self.acked_sent = self.acked_sent.max(claimed);
                }
                // The welcome's `delivered` acknowledges; the rest goes again.
                self.on_ack(w.delivered, "welcome");
                self.retransmit(w.delivered + 1);
                return;
            }
            (Some(_), Some(claim)) => {
                let want = match claim {
                    Claim::Consistent => self.fail(format_args!(
                        "(d) a consistent resume of a live session was refused: {w:?}"
                    )),
                    Claim::Inconsistent => "inconsistent",
                    Claim::Unknown => "unknown_session",
                };
                if w.lost.as_deref() != Some(want) {
                    self.fail(format_args!(
                        "a resume refused with {:?}, not {want}",
                        w.lost
                    ));
                }
            }
            _ => {
                if w.resumed || w.lost.is_some() {
                    self.fail(format_args!("a new session welcomed as {w:?}"));
                }
            }
        }
        // A new session: what was numbered is unconfirmed, what waits goes
        // out in the new one, numbered from 1.
        if w.delivered != 0 {
            self.fail("a new session has delivered something");
        }
        for (_, id) in std::mem::take(&mut self.window) {
            if let Some(m) = self.msgs.get_mut(&id) {
                m.lost = true;
            }
        }
        self.session = Some(w.session);
        self.next_seq = 1;
        self.acked = 0;
        self.delivered = 0;
        self.acked_sent = 0;
        self.unacked_in = 0;
        self.last_in_id = 0;
        self.flush();
    }

    /// A cumulative acknowledgment of the client's messages up to `ack`.
    fn on_ack(&mut self, ack: u64, what: &str) {
        if ack >= self.next_seq {
            self.fail(format_args!(
                "{what} acknowledges {ack}, beyond {} sent",
                self.next_seq - 1
            ));
        }
        if ack < self.acked {
            // A piggybacked ack written when the message was numbered (a
            // batch collecting, a retransmission) may be older than a
            // standalone one sent since: not news. The server's own
            // account of what it delivered never goes back, though.
            if what == "welcome" {
                self.fail(format_args!(
                    "{what} acknowledges {ack}, below the earlier {}",
                    self.acked
                ));
            }
            return;
        }
        self.acked = ack;
        let mut moved = false;
        while let Some(&(seq, id)) = self.window.front() {
            if seq > ack {
                break;
            }
            self.window.pop_front();
            moved = true;
            let Some(m) = self.msgs.get_mut(&id) else {
                continue;
            };
            m.acked = true;
            let (poison, delivered, refused) = (m.poison, m.delivered, m.refused);
            match poison {
                Some(p) if refused != 1 => self.fail(format_args!(
                    "(b) {what} {ack} covers refused message {id} (seq {seq}, {p:?}) before its refusal reached the client"
                )),
                None if delivered != 1 => self.fail(format_args!(
                    "{what} {ack} covers message {id} (seq {seq}), delivered {delivered} times"
                )),
                _ => {}
            }
        }
        if moved {
            self.progress_at = self.now;
        }
    }

    /// Sends again every numbered message from `from` on.
    fn retransmit(&mut self, from: u64) {
        let again: Vec<(u64, u64)> = self
            .window
            .iter()
            .copied()
            .filter(|(seq, _)| *seq >= from)
            .collect();
        for (seq, id) in again {
            self.transmit_msg(seq, id);
        }
        self.flush();
    }

    /// Numbers waiting messages into the window and sends them.
    pub(in crate::fuzzing) fn flush(&mut self) {
        if !self.open {
            return;
        }
        while self.window.len() < self.setup.client_window() {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            self.window.push_back((seq, id));
            if let Some(m) = self.msgs.get_mut(&id) {
                m.seq = seq;
            }
            self.transmit_msg(seq, id);
        }
    }

    fn transmit_msg(&mut self, seq: u64, id: u64) {
        if !self.open {
            return;
        }
        let poison = self.msgs.get(&id).and_then(|m| m.poison);
        let ack = self.delivered;
        let reached = match poison {
            None => {
                let payload = match Payload::json(id.to_string().into_bytes()) {
                    Ok(p) => p,
                    Err(e) => self.fail(format_args!("payload: {e}")),
                };
                self.send_frame(&Frame::Msg(Msg {
                    kind: MsgKind::Plain,
                    room: None,
                    seq,
                    id,
                    ack: Some(ack),
                    ts: None,
                    payload,
                }))
            }
            Some(p) => {
                let msgs = poison_messages(p, self.codec, seq, id, ack);
                let mut reached = false;
                for m in &msgs {
                    reached = self.send_to_server(m.as_incoming());
                }
                reached
            }
        };
        if reached {
            self.acked_sent = self.acked_sent.max(ack);
            self.unacked_in = 0;
        }
    }

    pub(super) fn send_ack(&mut self, force: bool) {
        if !self.open || (!force && self.delivered == self.acked_sent) {
            return;
        }
        let ack = self.delivered;
        if self.send_frame(&Frame::Ack { ack }) {
            self.acked_sent = self.acked_sent.max(ack);
            self.unacked_in = 0;
        }
    }

    pub(super) fn ping(&mut self) {
        if !self.open {
            return;
        }
        let nonce = self.nonce;
        self.nonce += 1;
        self.send_frame(&Frame::Ping { nonce });
        self.last_ping = self.now;
    }

    /// The next thing on the wire reaches the client; false if none.
    pub(super) fn deliver_one(&mut self) -> bool {
        let Some(item) = self.wire.pop_front() else {
            return false;
        };
        match item {
            Wire::Close(code) => {
                let _ = writeln!(self.log, "{:?} client sees close {code:?}", self.now);
                self.abandon();
            }
            Wire::Frame(t) => {
                let Some(frame) = decode_own(&t, "server") else {
                    return true;
                };
                self.client_frame(frame);
            }
        }
        true
    }

    fn client_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Msg(m) => self.client_msg(m),
            Frame::Batch(ms) => {
                for m in ms {
                    self.client_msg(m);
                }
            }
            Frame::Ack { ack } => self.on_ack(ack, "ack"),
            Frame::Replay { from } => {
                self.on_ack(from - 1, "replay");
                self.retransmit(from);
            }
            Frame::Ping { nonce } => {
                self.send_frame(&Frame::Pong { nonce });
            }
            Frame::Pong { .. } | Frame::GoAway { .. } | Frame::Raw(_) | Frame::Unknown(_) => {}
            Frame::Reauth { .. } => {}
            other => self.fail(format_args!("the server sent {other:?} on an open session")),
        }
    }

    fn client_msg(&mut self, m: Msg) {
        if let Some(ack) = m.ack {
            self.on_ack(ack, "msg.ack");
        }
        if m.seq <= self.delivered {
            // A duplicate (after a resume that claimed less): drop it and
            // acknowledge at once.
            self.send_ack(true);
            return;
        }
        if m.seq > self.delivered + 1 {
            self.fail(format_args!(
                "(d) a gap in the server's stream: seq {} after {}",
                m.seq, self.delivered
            ));
        }
        self.delivered = m.seq;
        self.unacked_in += 1;
        match m.kind {
            MsgKind::RefusedMessage(id) => {
                let code = serde_json::from_slice::<serde_json::Value>(m.payload.data())
                    .ok()
                    .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(String::from));
                let Some(r) = self.msgs.get_mut(&id) else {
                    self.fail(format_args!("a refusal of unknown message {id}"));
                };
                r.refused += 1;
                let (poison, refused, delivered) = (r.poison, r.refused, r.delivered);
                if poison.is_none() || refused > 1 || delivered > 0 {
                    self.fail(format_args!(
                        "message {id} refused (poison {poison:?}, refused {refused}, delivered {delivered})"
                    ));
                }
                if code.as_deref() != Some("invalid") {
                    self.fail(format_args!("message {id} refused with code {code:?}"));
                }
            }
            MsgKind::Plain => {
                let Some(s) = self.server_msgs.get_mut(&m.id) else {
                    self.fail(format_args!(
                        "the client got unknown server message {}",
                        m.id
                    ));
                };
                s.delivered += 1;
                let (delivered, session) = (s.delivered, s.session);
                if delivered > 1 || Some(session) != self.session {
                    self.fail(format_args!(
                        "server message {} delivered {delivered} times, in {:?} for {session:?}",
                        m.id, self.session
                    ));
                }
                if m.id <= self.last_in_id {
                    self.fail(format_args!(
                        "server message {} after {}: out of order",
                        m.id, self.last_in_id
                    ));
                }
                self.last_in_id = m.id;
            }
            other => self.fail(format_args!("the server sent a {other:?} message")),
        }
        if self.unacked_in >= self.setup.client_ack_every() {
            self.send_ack(false);
        }
    }
}
