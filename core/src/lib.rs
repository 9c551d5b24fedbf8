//! Kitestring's core: reliable, resumable WebSocket sessions as a
//! deterministic state machine.
//!
//! This crate never reads a clock, never does IO, never spawns a thread and
//! never touches OS randomness. Time comes in as an [`Instant`] on every
//! mutating call; jitter comes from a seed given at construction; session ids
//! come from the driver as bytes. The same inputs, times and seed give the
//! same outputs, byte for byte, which is what lets the conformance suite
//! simulate years of network faults in seconds.
//!
//! # The driver loop
//!
//! A driver (the tokio, async-std and smol adapters are drivers) owns the
//! sockets and the clock and runs this loop: feed an input, drain every
//! output, sleep until the next deadline or the next input.
//!
//! ```
//! use kitestring_core::client::{Client, Output};
//! use kitestring_core::config::ClientConfig;
//! use kitestring_core::wire::{ClientId, Incoming};
//! use kitestring_core::Instant;
//!
//! let mut client = Client::new(ClientConfig::default(), ClientId([7; 16]), 42).unwrap();
//! let now = Instant::ZERO; // from the driver's monotonic clock
//! client.connect(now).unwrap();
//! loop {
//!     // 1. Carry out every output, in order.
//!     while let Some(output) = client.poll_output() {
//!         match output {
//!             Output::Connect(transport) => { /* open a WebSocket; later call
//!                 client.handle_transport_opened(now, transport) */ }
//!             Output::Transmit(transport, frame) => { /* write frame.data() */ }
//!             Output::Disconnect(transport, code, reason) => { /* close it */ }
//!             Output::Event(event) => { /* hand to the application */ }
//!         }
//!     }
//!     // 2. Wait for whichever comes first: the deadline or an input.
//!     let deadline = client.poll_timeout();
//!     # break;
//!     // ... a frame arrives:    client.handle_message(now, transport, Incoming::Text(text));
//!     // ... the socket closes:  client.handle_transport_closed(now, transport, code, reason);
//!     // ... the deadline passes: client.handle_timeout(now);
//! }
//! ```
//!
//! The server side ([`server::Server`]) works the same way, with
//! connection ids instead of transport ids.
//!
//! # Map
//!
//! Where each behaviour lives. Modules marked *(private)* are internal; their
//! docs are in the source.
//!
//! The machines:
//! * [`client`]: the client machine. Its lifecycle (states and the table of
//!   allowed transitions, what each close or failure leads to, backoff and
//!   retries), the handshake, the heartbeat, requests, rooms as a member,
//!   and the events and outputs the driver carries out.
//! * [`server`]: the server machine. Connections (handshake deadline, idle
//!   and re-authentication checks), sessions (their lifecycle state and the
//!   one function that moves it, resume checks and keys, expiry), rate
//!   limits and refusals, rooms and broadcasts, and its events and outputs.
//!
//! What both machines use:
//! * `link` *(private)*: one session's delivery pipe, the same code on both
//!   sides: numbering into the send window, batching, detached payloads,
//!   acknowledgments and their timers, retransmission, and the counters
//!   ([`DeliveryStats`], [`TrafficStats`]).
//! * [`reliable`]: the numbers under the pipe: the waiting queue and send
//!   window (`Outbound`), delivery, duplicates and gaps (`Inbound`).
//! * [`wire`]: frames, the JSON and MessagePack codecs, the binary header,
//!   detached payloads, per-message compression (feature `compression`),
//!   typed decode errors; the encoder's buffers.
//! * [`ids`]: client, session and message identifiers.
//! * [`config`]: every setting of both machines, and their validation.
//! * [`close`]: close codes and what each one means.
//! * [`rooms`]: room membership, presence and the room policy.
//! * [`stream`]: a room's stream: offsets, epoch and bounded history,
//!   shared by the room's members.
//! * [`ratelimit`]: token buckets for per-connection rate limits.
//! * [`coalesce`]: latest-value coalescing for `send_latest`.
//! * [`backoff`]: retry delays with jitter.
//! * [`time`]: the caller's clock as an [`Instant`].
//! * `timer` *(private)*: the client's table of deadlines.
//! * `rng` *(private)*: the seeded generator behind jitter.
//! * `saved` *(private)*: a queued or unacknowledged message written down
//!   in a client's snapshot or a server's session image.
//! * `vecmap` *(private)*: small ordered maps and sets as sorted vectors.
//! * `base64` *(private)*: base64 for the JSON forms of binary payloads.
//!
//! For applications, used by no machine:
//! * [`crdt`]: a hybrid logical clock ([`hlc`]) and a last-writer-wins map
//!   ([`lww`]) for state synced over sessions.
//!
//! Behind the `fuzzing` feature, `fuzzing` (its source is in `core/fuzzing/`,
//! outside this tree) holds the bodies of the fuzz targets and their
//! regression tests.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
// Without the `server` feature, what only the server machine calls (the
// rooms' streams, the saved sessions' recovery, the server's buffers) is
// still compiled, unused.
#![cfg_attr(not(feature = "server"), allow(dead_code))]

pub mod backoff;
mod base64;
pub mod client;
pub mod close;
pub mod config;
pub mod ids;
mod link;
pub mod reliable;
mod rng;
pub mod rooms;
mod saved;
#[cfg(feature = "server")]
pub mod server;
pub mod stream;
pub mod time;
mod timer;
mod vecmap;
pub mod wire;

pub use link::{DeliveryStats, TrafficStats};
pub use time::Instant;

// Conflict-free shared state and per-connection flow control.
pub mod coalesce;
pub mod crdt;
pub mod ratelimit;

pub use coalesce::Coalescer;
pub use crdt::{hlc, lww};
pub use hlc::{Hlc, HlcTimestamp};
pub use lww::{LwwMap, LwwUpdate};
pub use ratelimit::{RateLimitConfig, RateLimiter};

// The unit tests compiled to wasm32 run in a browser page
// (adapters/web/test.sh), not in Node.js.
#[cfg(all(test, target_arch = "wasm32"))]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

// Bodies of the fuzz targets, compiled only for fuzzing and its tests; they
// live beside the crate's sources, in `core/fuzzing/`.
#[cfg(feature = "fuzzing")]
#[path = "../fuzzing/mod.rs"]
pub mod fuzzing;
