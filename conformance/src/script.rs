//! A client machine driven by hand, for golden transcripts: the test plays
//! the server frame by frame, and every output the client produces is
//! recorded as one readable line.

use core::time::Duration;

use kitestring_core::client::{Client, Event, Output, TransportError, TransportId};
use kitestring_core::close::CloseCode;
use kitestring_core::config::ClientConfig;
use kitestring_core::time::Instant;
use kitestring_core::wire::{self, ClientId, Codec, Frame, SessionId, Transmit, Welcome};

use crate::sim::describe;

/// A client and the transcript of its outputs.
pub struct Script {
    /// The machine.
    pub client: Client,
    /// Current virtual time.
    pub now: Instant,
    /// One line per output.
    pub lines: Vec<String>,
    /// The transport the client last asked for.
    pub transport: Option<TransportId>,
    /// Every event, in order.
    pub events: Vec<Event>,
    /// Every frame the client transmitted, decoded.
    pub sent: Vec<Frame>,
}

impl Script {
    /// A client with `config` and seed 1.
    pub fn new(config: ClientConfig) -> Script {
        let client = match Client::new(config, ClientId([0xc1; 16]), 1) {
            Ok(c) => c,
            Err(e) => panic!("invalid client config: {e}"),
        };
        Script {
            client,
            now: Instant::ZERO,
            lines: Vec::new(),
            transport: None,
            events: Vec::new(),
            sent: Vec::new(),
        }
    }

    /// Records every pending output.
    pub fn drain(&mut self) {
        while let Some(o) = self.client.poll_output() {
            self.lines.push(describe(self.now, &o));
            match o {
                Output::Connect(t) => self.transport = Some(t),
                Output::Transmit(_, t) => {
                    let limits = wire::Limits {
                        max_message: usize::MAX,
                        version: 1,
                    };
                    if let Ok(f) = wire::decode(t.as_incoming(), &limits) {
                        self.sent.push(f);
                    }
                }
                Output::Disconnect(t, _, _) => {
                    if self.transport == Some(t) {
                        self.transport = None;
                    }
                }
                Output::Event(e) => self.events.push(e),
            }
        }
    }

    /// Advances time by `d`, firing every timer due on the way.
    pub fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        while let Some(deadline) = self.client.poll_timeout() {
            if deadline.at > until {
                break;
            }
            self.now = self.now.max(deadline.at);
            self.client.handle_timeout(self.now);
            self.drain();
        }
        self.now = until;
    }

    /// Jumps to the next deadline and handles it.
    pub fn next_timeout(&mut self) -> Option<Instant> {
        let d = self.client.poll_timeout()?;
        self.now = self.now.max(d.at);
        self.client.handle_timeout(self.now);
        self.drain();
        Some(d.at)
    }

    /// The transport the client asked for opens.
    pub fn open(&mut self) {
        let t = self.current();
        self.client.handle_transport_opened(self.now, t);
        self.drain();
    }

    /// The server sends `frame` (encoded with `codec`).
    pub fn recv(&mut self, frame: &Frame, codec: Codec) {
        let t = self.current();
        let wire = match wire::encode(frame, codec, 1) {
            Ok(w) => w,
            Err(e) => panic!("encode: {e}"),
        };
        self.client.handle_message(self.now, t, wire.as_incoming());
        self.drain();
    }

    /// The server sends raw bytes or text.
    pub fn recv_raw(&mut self, t: &Transmit) {
        let id = self.current();
        self.client.handle_message(self.now, id, t.as_incoming());
        self.drain();
    }

    /// The server welcomes the client into `session`; `delivered` is the
    /// last client message the server delivered.
    pub fn welcome(&mut self, session: SessionId, resumed: bool, delivered: u64) {
        self.recv(
            &welcome_frame(session, resumed, None, delivered),
            Codec::Json,
        );
    }

    /// The server could not resume and opens `session` instead.
    pub fn welcome_lost(&mut self, session: SessionId, lost: &str) {
        self.recv(
            &welcome_frame(session, false, Some(lost.into()), 0),
            Codec::Json,
        );
    }

    /// The transport closes with `code` (`None`: abnormally).
    pub fn closed(&mut self, code: Option<CloseCode>) {
        let t = self.current();
        self.client.handle_transport_closed(self.now, t, code, "");
        self.drain();
    }

    /// Opening or using the transport failed.
    pub fn error(&mut self, e: TransportError) {
        let t = self.current();
        self.client.handle_transport_error(self.now, t, e);
        self.drain();
    }

    fn current(&self) -> TransportId {
        match self.transport {
            Some(t) => t,
            None => panic!("no transport: the client did not ask to connect"),
        }
    }

    /// The transcript as one string.
    pub fn transcript(&self) -> String {
        let mut s = self.lines.join("\n");
        s.push('\n');
        s
    }
}

fn welcome_frame(session: SessionId, resumed: bool, lost: Option<String>, delivered: u64) -> Frame {
    Frame::Welcome(Welcome {
        version: 1,
        codec: Codec::Json,
        session,
        resumed,
        lost,
        delivered,
        features: Vec::new().into(),
        ping_interval_ms: 30_000,
        pong_timeout_ms: 10_000,
        max_message: 1 << 20,
        key: None,
        recovered: false,
    })
}

/// Compares `actual` with the golden file `tests/golden/{name}.txt`. With
/// `KITESTRING_BLESS=1` the file is (re)written instead. A missing file is a
/// failure otherwise, so CI never blesses by accident.
pub fn assert_golden(name: &str, actual: &str) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");
    let path = format!("{dir}/{name}.txt");
    if std::env::var_os("KITESTRING_BLESS").is_some() {
        if let Err(e) = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, actual)) {
            panic!("writing {path}: {e}");
        }
        return;
    }
    let expected = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) => panic!(
            "golden transcript {path} unreadable ({e}); run with KITESTRING_BLESS=1 to create it"
        ),
    };
    if expected != actual {
        let mut diff = String::new();
        let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
        for i in 0..e.len().max(a.len()) {
            match (e.get(i), a.get(i)) {
                (Some(x), Some(y)) if x == y => {}
                (x, y) => {
                    diff.push_str(&format!(
                        "line {}:\n  - {}\n  + {}\n",
                        i + 1,
                        x.unwrap_or(&"<none>"),
                        y.unwrap_or(&"<none>")
                    ));
                }
            }
        }
        panic!("transcript {name} changed (rerun with KITESTRING_BLESS=1 if intended):\n{diff}");
    }
}
