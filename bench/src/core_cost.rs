//! Scenario 1: what the session layer costs per message, in memory.
//!
//! Ours: a client machine sends a 32-byte payload; the frame is decoded and
//! delivered by a server machine, whose acknowledgments (every 32 messages)
//! are decoded by the client: sequencing, acknowledgment, envelope encode
//! and decode, de-duplication checks, event queues. Baseline: tungstenite
//! writing the same payload as a binary message into an in-memory pipe and
//! reading it back out on the other side (masking, framing, parsing).
//! Both run the same number of messages in one process; the figure is
//! instructions per message (callgrind) or nanoseconds where valgrind is
//! missing.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::rc::Rc;

use bytes::Bytes;
use kitestring_core::client::{Client, Output};
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::server::{ConnectionId, Server, ServerOutput};
use kitestring_core::wire::{ClientId, Codec, Payload, SessionId, Transmit};
use kitestring_core::Instant;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::Message;

/// The payload every scenario sends: 32 bytes.
pub(crate) const PAYLOAD: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

/// A client and a server machine joined in memory, handshake done.
pub(crate) struct CorePair {
    client: Client,
    server: Server,
    conn: ConnectionId,
    transport: kitestring_core::client::TransportId,
    now: Instant,
    payload: Payload,
    to_server: VecDeque<Transmit>,
    to_client: VecDeque<Transmit>,
    delivered: u64,
}

impl CorePair {
    pub(crate) fn new(codec: Codec) -> CorePair {
        let client_cfg = ClientConfig {
            codecs: vec![codec, Codec::Json],
            ..ClientConfig::default()
        };
        let server_cfg = ServerConfig {
            codecs: vec![codec, Codec::Json],
            // The protocol's own cost: the loop sends far past any rate
            // limit in a single instant.
            rate_limit: None,
            ..ServerConfig::default()
        };
        let payload = match codec {
            Codec::Json => Payload::json(Bytes::from_static(b"\"0123456789abcdef0123456789abcd\"")),
            _ => Payload::msgpack(Bytes::from_static(b"\xbe0123456789abcdef0123456789abcd")),
        }
        .expect("valid payload");
        CorePair::with(client_cfg, server_cfg, payload)
    }

    /// A pair with these settings, sending `payload`.
    pub(crate) fn with(
        client_cfg: ClientConfig,
        server_cfg: ServerConfig,
        payload: Payload,
    ) -> CorePair {
        let mut client = Client::new(client_cfg, ClientId([1; 16]), 1).expect("valid config");
        let mut server = Server::new(server_cfg).expect("valid config");
        let now = Instant::ZERO;
        client.connect(now).expect("fresh client");
        let mut transport = None;
        while let Some(o) = client.poll_output() {
            if let Output::Connect(t) = o {
                transport = Some(t);
            }
        }
        let transport = transport.expect("asked to connect");
        let conn = server.handle_connection(now, None, SessionId([2; 16]));
        client.handle_transport_opened(now, transport);
        let mut pair = CorePair {
            client,
            server,
            conn,
            transport,
            now,
            payload,
            to_server: VecDeque::with_capacity(64),
            to_client: VecDeque::with_capacity(64),
            delivered: 0,
        };
        pair.pump();
        pair
    }

    /// Moves every pending output to the other side until both are quiet.
    fn pump(&mut self) {
        loop {
            while let Some(o) = self.client.poll_output() {
                if let Output::Transmit(_, t) = o {
                    self.to_server.push_back(t);
                }
            }
            while let Some(o) = self.server.poll_output() {
                match o {
                    ServerOutput::Transmit(_, t) => self.to_client.push_back(t),
                    ServerOutput::Event(kitestring_core::server::ServerEvent::Message {
                        ..
                    }) => self.delivered += 1,
                    _ => {}
                }
            }
            if self.to_server.is_empty() && self.to_client.is_empty() {
                break;
            }
            while let Some(t) = self.to_server.pop_front() {
                self.server
                    .handle_message(self.now, self.conn, t.as_incoming());
            }
            while let Some(t) = self.to_client.pop_front() {
                self.client
                    .handle_message(self.now, self.transport, t.as_incoming());
            }
        }
    }

    /// Bytes the client has written: its messages, on the wire.
    pub(crate) fn bytes_sent(&self) -> u64 {
        self.client.stats().traffic.bytes_out
    }

    /// Sends `n` messages and runs the exchange to completion.
    pub(crate) fn run(&mut self, n: u64) -> u64 {
        let start = self.delivered;
        for _ in 0..n {
            // Time moves so that delayed acknowledgments fire as they would.
            self.now += core::time::Duration::from_micros(10);
            if self.client.send(self.now, self.payload.clone()).is_err() {
                break;
            }
            self.pump();
            if self.client.poll_timeout().is_some_and(|d| d.at <= self.now) {
                self.client.handle_timeout(self.now);
            }
            if self.server.poll_timeout().is_some_and(|d| d.at <= self.now) {
                self.server.handle_timeout(self.now);
            }
            self.pump();
        }
        self.delivered - start
    }
}

/// One end of an in-memory byte pipe.
#[derive(Clone)]
pub(crate) struct Pipe {
    read: Rc<RefCell<VecDeque<u8>>>,
    write: Rc<RefCell<VecDeque<u8>>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut q = self.read.borrow_mut();
        if q.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(q.len());
        for (b, v) in buf.iter_mut().zip(q.drain(..n)) {
            *b = v;
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write.borrow_mut().extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// tungstenite on both ends of an in-memory pipe, with the buffer settings
/// Kitestring uses (4 KiB read buffer, no write buffering).
pub(crate) struct TungPair {
    client: WebSocket<Pipe>,
    server: WebSocket<Pipe>,
    payload: Bytes,
}

impl TungPair {
    pub(crate) fn new() -> TungPair {
        let a = Rc::new(RefCell::new(VecDeque::with_capacity(8192)));
        let b = Rc::new(RefCell::new(VecDeque::with_capacity(8192)));
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let client = WebSocket::from_raw_socket(
            Pipe {
                read: a.clone(),
                write: b.clone(),
            },
            Role::Client,
            Some(config),
        );
        let server =
            WebSocket::from_raw_socket(Pipe { read: b, write: a }, Role::Server, Some(config));
        TungPair {
            client,
            server,
            payload: Bytes::from_static(PAYLOAD),
        }
    }

    pub(crate) fn run(&mut self, n: u64) -> u64 {
        let mut got = 0;
        for _ in 0..n {
            if self
                .client
                .send(Message::Binary(self.payload.clone()))
                .is_err()
            {
                break;
            }
            if let Ok(Message::Binary(_)) = self.server.read() {
                got += 1;
            }
        }
        got
    }
}
