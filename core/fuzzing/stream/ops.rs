//! The ops of the `server_stream` harness, and its quiet phase: no more
//! faults, the client model reconnecting, reading, retransmitting and
//! acknowledging until everything settled, then every message's outcome
//! checked.
//!
//! An op never injects a fault other than the one it names, and the quiet
//! phase injects none.

use std::fmt::Write as _;

use core::time::Duration;

use crate::close::CloseCode;
use crate::fuzzing::decode_own;
use crate::reliable::SendError;
use crate::wire::{Frame, Incoming, Payload, SessionId, KIND_MSGPACK, PROTOCOL_VERSION};

use super::{
    BadHello, DropKind, ServerSent, StreamHarness, StreamMsg, StreamOp, Wire, WrongDelivered,
    QUIET_STEP, QUIET_STEPS, STREAM_ACK_TIMEOUT, STREAM_PING_EVERY,
};

impl StreamHarness {
    pub(super) fn true_resume(&self) -> Option<(SessionId, u64)> {
        self.session.map(|s| (s, self.delivered))
    }

    /// Lets `d` pass: in heartbeat-sized steps, the client reading,
    /// pinging and acknowledging as it goes (`reading`), or not at all.
    /// While the client has no connection, time stops short of the
    /// session's grace period, so no session is lost to it.
    fn pass(&mut self, d: Duration, reading: bool) {
        let mut left = d;
        while !left.is_zero() {
            let step = left.min(STREAM_PING_EVERY);
            left -= step;
            if reading {
                while self.deliver_one() {}
                self.flush();
                self.send_ack(false);
                if self.now.saturating_duration_since(self.last_ping) >= STREAM_PING_EVERY {
                    self.ping();
                }
            }
            let mut to = self.now + step;
            let grace = self.server.config().session_grace;
            if let Some(since) = self.detached_since {
                to = to.min((since + grace / 2).max(self.now));
            }
            let expires = self
                .session
                .and_then(|s| self.server.session(s))
                .and_then(|i| i.expires_at);
            if let Some(at) = expires {
                to = to.min((at - grace / 2).max(self.now));
            }
            self.now = to;
            self.server.handle_timeout(self.now);
            self.drain();
        }
    }

    /// Applies one op.
    pub fn op(&mut self, op: StreamOp) {
        let _ = writeln!(self.log, "{:?} {op:?}", self.now);
        match op {
            StreamOp::Send | StreamOp::Poison(_) => {
                let id = self.next_id;
                self.next_id += 1;
                let poison = match op {
                    StreamOp::Poison(p) => Some(p),
                    _ => None,
                };
                self.msgs.insert(
                    id,
                    StreamMsg {
                        poison,
                        ..StreamMsg::default()
                    },
                );
                self.waiting.push_back(id);
                self.flush();
            }
            StreamOp::ServerSend(n) => {
                let Some(session) = self.session else { return };
                for _ in 0..=(n % 4) {
                    let Ok(payload) = Payload::json(b"1".to_vec()) else {
                        return;
                    };
                    match self.server.send(self.now, session, payload) {
                        Ok(id) => {
                            self.server_msgs.insert(
                                id.0,
                                ServerSent {
                                    session,
                                    delivered: 0,
                                    acked: false,
                                    lost: false,
                                },
                            );
                        }
                        Err(SendError::UnknownSession) if self.ended.contains(&session) => {}
                        Err(e) => self.fail(format_args!("server send refused: {e}")),
                    }
                }
                self.drain();
            }
            StreamOp::Deliver(n) => {
                for _ in 0..=(n % 8) {
                    if !self.deliver_one() {
                        break;
                    }
                }
            }
            StreamOp::Ack => self.send_ack(false),
            StreamOp::Connect(upgrade) => {
                let resume = self.true_resume();
                self.connect(upgrade, false, resume);
            }
            StreamOp::WrongResume(wrong) => {
                let Some((session, delivered)) = self.true_resume() else {
                    return;
                };
                let resume = match wrong {
                    WrongDelivered::BelowAcked(n) => {
                        let Some(d) = self.acked_sent.checked_sub(1 + u64::from(n % 4)) else {
                            return;
                        };
                        (session, d)
                    }
                    WrongDelivered::AboveSent(n) => {
                        let window = self.server.config().reliability.window_messages as u64;
                        (session, delivered + window + 1 + u64::from(n))
                    }
                    WrongDelivered::Behind(n) => {
                        let span = delivered - self.acked_sent;
                        (session, delivered - u64::from(n) % (span + 1))
                    }
                    WrongDelivered::UnknownSession => (SessionId([0xee; 16]), delivered),
                };
                self.drop_conn(DropKind::Closed);
                self.connect(self.setup.upgrade, false, Some(resume));
            }
            StreamOp::BadHello(bad) => self.bad_hello(bad),
            StreamOp::Drop(kind) => self.drop_conn(kind),
            StreamOp::Advance(ms) => self.pass(Duration::from_millis(u64::from(ms)), true),
            StreamOp::Wait(ms) => self.pass(Duration::from_millis(u64::from(ms)), false),
        }
    }

    fn drop_conn(&mut self, kind: DropKind) {
        let Some(conn) = self.conn else { return };
        match kind {
            DropKind::Closed => {
                self.abandon();
                self.server.handle_connection_closed(self.now, conn, None);
                self.closed.insert(conn);
                self.drain();
            }
            DropKind::HalfOpen => self.abandon(),
            DropKind::ServerClosed => {
                self.server
                    .disconnect_connection(self.now, conn, CloseCode::RETRY);
                self.drain();
            }
            DropKind::GoAway(rotate) => {
                let code = if rotate {
                    CloseCode::ROTATE
                } else {
                    CloseCode::GOING_AWAY
                };
                self.server.go_away(self.now, conn, code, None);
                self.drain();
            }
        }
    }

    fn bad_hello(&mut self, bad: BadHello) {
        if let BadHello::UpgradeGarbage = bad {
            let resume = self.true_resume();
            self.connect(false, true, resume);
            return;
        }
        let session = self.session.unwrap_or(SessionId([0x11; 16]));
        let client = "c5".repeat(16);
        let text = match bad {
            BadHello::NotJson => "hello?".to_string(),
            BadHello::NotAHello(n) => match n % 4 {
                0 => r#"{"t":"ping","nonce":1}"#.to_string(),
                1 => r#"{"t":"ack","ack":0}"#.to_string(),
                2 => r#"{"t":"msg","seq":1,"id":1,"j":1}"#.to_string(),
                _ => r#"{"t":"hullo"}"#.to_string(),
            },
            BadHello::MissingClient => r#"{"t":"hello","versions":[1],"codecs":["json"]}"#.into(),
            BadHello::BadClient => {
                r#"{"t":"hello","versions":[1],"client":"xyz","codecs":["json"]}"#.into()
            }
            BadHello::TooManyVersions => format!(
                r#"{{"t":"hello","versions":[{}],"client":"{client}"}}"#,
                vec!["1"; 33].join(",")
            ),
            BadHello::SessionWithoutDelivered => format!(
                r#"{{"t":"hello","versions":[1],"client":"{client}","session":"{}"}}"#,
                session.to_hex()
            ),
            BadHello::MsgPack | BadHello::Empty | BadHello::UpgradeGarbage => String::new(),
        };
        let fresh = self.fresh_session();
        let conn = self.server.handle_connection(self.now, None, fresh);
        self.side = Some(conn);
        self.side_out.clear();
        self.drain();
        if let BadHello::MsgPack = bad {
            // Handshake frames only encode as JSON: pack the fields by hand.
            let body = rmp_serde::to_vec(&serde_json::json!({
                "t": "hello", "versions": [1], "client": client,
            }))
            .unwrap_or_default();
            let mut msg = vec![KIND_MSGPACK, PROTOCOL_VERSION];
            msg.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
            msg.extend_from_slice(&body);
            self.server
                .handle_message(self.now, conn, Incoming::Binary(&msg));
        } else {
            self.server
                .handle_message(self.now, conn, Incoming::Text(&text));
        }
        self.drain();
        self.side = None;
        let out = std::mem::take(&mut self.side_out);
        // (c) Answered at once: a reject `bad_hello` 4002, then the close.
        let ok = match out.as_slice() {
            [Wire::Frame(t), Wire::Close(code)] => matches!(
                decode_own(t, "server"),
                Some(Frame::Reject(r)) if r.code == CloseCode::BAD_HANDSHAKE.0
                    && r.reason == "bad_hello"
                    && *code == CloseCode::BAD_HANDSHAKE
            ),
            _ => false,
        };
        if !ok {
            self.fail(format_args!(
                "(c) the first frame {bad:?} was answered with {out:?}"
            ));
        }
    }

    /// Whether everything settled: the client's messages all acknowledged,
    /// the server's all delivered and acknowledged, nothing on the wire.
    fn settled(&self) -> bool {
        let Some(session) = self.session else {
            return self.waiting.is_empty();
        };
        self.open
            && self.wire.is_empty()
            && self.waiting.is_empty()
            && self.window.is_empty()
            && self.acked_sent == self.delivered
            && self
                .server_msgs
                .values()
                .filter(|m| m.session == session)
                .all(|m| m.acked)
            && self
                .server
                .session(session)
                .is_some_and(|i| i.in_flight == 0 && i.queued == 0)
    }

    /// No more faults: the client reconnects, reads, retransmits and
    /// acknowledges as a real client would, with time passing, until
    /// everything settled; then every message must have its outcome.
    pub fn quiet(&mut self) {
        let _ = writeln!(self.log, "{:?} quiet", self.now);
        if self.session.is_none() && self.waiting.is_empty() {
            return;
        }
        let mut steps = 0;
        loop {
            steps += 1;
            if steps > QUIET_STEPS {
                self.fail(format_args!(
                    "(a) the stream stalled: waiting {:?}, unacknowledged {:?}, delivered {}, server {:?}",
                    self.waiting,
                    self.window,
                    self.delivered,
                    self.session.and_then(|s| self.server.session(s))
                ));
            }
            if self.conn.is_none() {
                let resume = self.true_resume();
                self.connect(self.setup.upgrade, false, resume);
            }
            while self.deliver_one() {}
            self.flush();
            self.send_ack(false);
            while self.deliver_one() {}
            if self.settled() {
                break;
            }
            if self.open
                && !self.window.is_empty()
                && self.now.saturating_duration_since(self.progress_at) >= STREAM_ACK_TIMEOUT
            {
                // The client's acknowledgment timeout: resume elsewhere.
                let _ = writeln!(self.log, "{:?} client ack timeout", self.now);
                self.drop_conn(DropKind::Closed);
                continue;
            }
            if self.now.saturating_duration_since(self.last_ping) >= STREAM_PING_EVERY {
                self.ping();
            }
            self.now += QUIET_STEP;
            self.server.handle_timeout(self.now);
            self.drain();
        }
        self.check_outcomes();
    }

    /// (a) Every client message delivered exactly once or refused exactly
    /// once (at most one of them if its session was lost), every server
    /// message of the live session delivered once.
    fn check_outcomes(&self) {
        for (id, m) in &self.msgs {
            let ok = if m.lost && !m.acked {
                m.delivered + m.refused <= 1
            } else {
                m.acked
                    && match m.poison {
                        Some(_) => m.refused == 1 && m.delivered == 0,
                        None => m.delivered == 1 && m.refused == 0,
                    }
            };
            if !ok {
                self.fail(format_args!("(a) message {id} ended as {m:?}"));
            }
        }
        if let Some(session) = self.session {
            let want = self.next_seq - 1;
            let got = self.server.session(session).map(|i| i.delivered);
            if got != Some(want) {
                self.fail(format_args!(
                    "(a) the server delivered {got:?} of the client's {want}"
                ));
            }
        }
        for (id, m) in &self.server_msgs {
            let live = Some(m.session) == self.session;
            if m.delivered > 1 || (live && (m.delivered != 1 || !m.acked)) {
                self.fail(format_args!("server message {id} ended as {m:?}"));
            }
        }
    }
}
