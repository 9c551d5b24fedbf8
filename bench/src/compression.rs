//! Scenario `compression`: what per-message compression (PROTOCOL.md,
//! section 2.2) saves on the wire and costs in CPU, for JSON an
//! application sends: a chat message of about 100 B, a 1 KiB event, a
//! 16 KiB page of history.
//!
//! Ours: a client and a server machine joined in memory (as in
//! `core-cost`) that agreed on compression; baseline: the same pair
//! without it. Both send the same payloads; a figure is the bytes one
//! message takes on the wire (its envelope included), and the time per
//! message at both ends together (encode and compress, decode and inflate,
//! delivery, acknowledgments), a single thread's. Repetitions alternate
//! the two sides; medians and ranges over them. The rows show the
//! defaults (deflate level 1 from 1 KiB), compression forced below the
//! threshold, and level 6.

use kitestring_core::config::{ClientConfig, CompressionConfig, ServerConfig};
use kitestring_core::wire::{Codec, Payload};

use crate::core_cost::CorePair;
use crate::{net, Figure, Kind, Options, Range};

/// Words of the generated text: varied enough that deflate finds what it
/// finds in real chat, not one phrase repeated.
const WORDS: &[&str] = &[
    "the",
    "deploy",
    "is",
    "green",
    "again",
    "after",
    "we",
    "fixed",
    "that",
    "flaky",
    "test",
    "in",
    "checkout",
    "service",
    "could",
    "you",
    "review",
    "my",
    "branch",
    "before",
    "lunch",
    "latency",
    "looks",
    "fine",
    "on",
    "dashboards",
    "but",
    "p99",
    "went",
    "up",
    "yesterday",
    "evening",
    "when",
    "traffic",
    "doubled",
    "from",
    "europe",
    "I",
    "think",
    "cache",
    "misses",
    "explain",
    "most",
    "of",
    "it",
    "let's",
    "pair",
    "tomorrow",
    "morning",
    "sounds",
    "good",
    "thanks",
    "for",
    "quick",
    "turnaround",
    "release",
    "notes",
    "are",
    "ready",
    "ship",
    "friday",
    "meeting",
    "moved",
    "to",
    "room",
    "four",
    "bring",
    "coffee",
    "invoice",
    "customer",
    "asked",
    "about",
    "refund",
    "policy",
    "new",
    "pricing",
    "page",
    "copy",
    "needs",
    "another",
    "pass",
];

const NAMES: &[&str] = &[
    "Alice Martin",
    "Bob Okafor",
    "Chen Wei",
    "Dana Kowalski",
    "Emeka Obi",
    "Fatima Zahra",
    "Gustavo Lima",
    "Hana Sato",
    "Ivan Petrov",
    "Jade Laurent",
];

/// A deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One chat message as an application would send it: ids that do not
/// repeat, a timestamp, a user, free text. About 200 to 300 bytes.
fn chat_message(rng: &mut Rng, i: u64) -> String {
    let user = rng.below(NAMES.len());
    let words = 4 + rng.below(14);
    let text: Vec<&str> = (0..words).map(|_| WORDS[rng.below(WORDS.len())]).collect();
    format!(
        r#"{{"id":"{:016x}","seq":{},"ts":{},"user":{{"id":{},"name":"{}"}},"text":"{}","reactions":{{"+1":{},"eyes":{}}},"edited":{}}}"#,
        rng.next(),
        1000 + i,
        1_765_000_000_000 + i * 1_337 + rng.below(1000) as u64,
        1000 + user,
        NAMES[user],
        text.join(" "),
        rng.below(5),
        rng.below(3),
        rng.below(4) == 0
    )
}

/// JSON of exactly `size` bytes: one short message for 100 B, a few
/// messages for 1 KiB, a page of history for 16 KiB; a pagination cursor
/// (random hex) makes up the difference.
pub(crate) fn json_payload(size: usize) -> Payload {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ size as u64);
    if size <= 128 {
        let words: Vec<&str> = (0..6).map(|_| WORDS[rng.below(WORDS.len())]).collect();
        let mut text = format!(
            r#"{{"type":"typing","room":"general","user":{},"text":"{}"}}"#,
            1000 + rng.below(NAMES.len()),
            words.join(" ")
        );
        while text.len() > size {
            let cut = text.rfind(' ').unwrap_or(0);
            text = format!("{}\"}}", &text[..cut]);
        }
        while text.len() < size {
            text.insert(text.len() - 2, '.');
        }
        return Payload::json(text).expect("valid JSON");
    }
    let mut items: Vec<String> = Vec::new();
    let wrap = |items: &[String], cursor: &str| {
        format!(
            r#"{{"type":"history","room":"general","cursor":"{cursor}","items":[{}]}}"#,
            items.join(",")
        )
    };
    loop {
        let next = chat_message(&mut rng, items.len() as u64);
        let mut with = items.clone();
        with.push(next);
        if wrap(&with, "").len() > size {
            break;
        }
        items = with;
    }
    let room = size - wrap(&items, "").len();
    let cursor: String = (0..room)
        .map(|_| char::from(b"0123456789abcdef"[rng.below(16)]))
        .collect();
    let text = wrap(&items, &cursor);
    debug_assert_eq!(text.len(), size);
    Payload::json(text).expect("valid JSON")
}

/// One row's settings: the payload size, and compression's settings.
struct Case {
    size: usize,
    name: &'static str,
    config: CompressionConfig,
}

fn pair(codec: Codec, compression: Option<CompressionConfig>, payload: Payload) -> CorePair {
    CorePair::with(
        ClientConfig {
            codecs: vec![codec, Codec::Json],
            compression,
            ..ClientConfig::default()
        },
        ServerConfig {
            codecs: vec![codec, Codec::Json],
            compression,
            rate_limit: None,
            ..ServerConfig::default()
        },
        payload,
    )
}

/// The CPU time this thread has used, in seconds: what a busy machine's
/// other work does not inflate, unlike the wall clock.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Bytes and microseconds of CPU per message, sending `n` messages.
fn measure(pair: &mut CorePair, n: u64) -> (f64, f64) {
    let before = pair.bytes_sent();
    let t = thread_cpu();
    let done = pair.run(n);
    let us = (thread_cpu() - t) * 1e6 / n as f64;
    assert_eq!(done, n, "every message delivered");
    ((pair.bytes_sent() - before) as f64 / n as f64, us)
}

pub(crate) fn scenario(opts: &Options) -> Vec<Figure> {
    let default = CompressionConfig::default();
    let cases = [
        Case {
            size: 100,
            name: "defaults",
            config: default,
        },
        Case {
            size: 100,
            name: "forced, threshold 0",
            config: CompressionConfig {
                threshold: 0,
                ..default
            },
        },
        Case {
            size: 1024,
            name: "defaults",
            config: default,
        },
        Case {
            size: 1024,
            name: "level 6",
            config: CompressionConfig {
                level: 6,
                ..default
            },
        },
        Case {
            size: 16 * 1024,
            name: "defaults",
            config: default,
        },
        Case {
            size: 16 * 1024,
            name: "level 6",
            config: CompressionConfig {
                level: 6,
                ..default
            },
        },
    ];
    let reps = if opts.quick { 3 } else { 9 };
    let mut figures = Vec::new();
    for codec in [Codec::MsgPack, Codec::Json] {
        for case in &cases {
            let payload = json_payload(case.size);
            let n: u64 = match (opts.quick, case.size) {
                (true, _) => 200,
                (false, s) if s <= 128 => 20_000,
                (false, s) if s <= 1024 => 10_000,
                _ => 2_000,
            };
            let mut ours = pair(codec, Some(case.config), payload.clone());
            let mut base = pair(codec, None, payload.clone());
            // Warm both up: buffers, the compressor's tables.
            measure(&mut ours, n / 10 + 1);
            measure(&mut base, n / 10 + 1);
            let (mut bytes, mut us) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
            for rep in 0..reps {
                // Alternate which side goes first.
                let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
                for side in order {
                    let p = if side == 0 { &mut ours } else { &mut base };
                    let (b, t) = measure(p, n);
                    bytes[side].push(b);
                    us[side].push(t);
                }
            }
            let codec_name = match codec {
                Codec::Json => "json",
                _ => "msgpack",
            };
            let scenario = format!(
                "compression, {} B JSON, {codec_name}, {}",
                payload.len(),
                case.name
            );
            eprintln!(
                "  {scenario}: {:.0} vs {:.0} bytes, {:.2} vs {:.2} us",
                net::median(&mut bytes[0].clone()),
                net::median(&mut bytes[1].clone()),
                net::median(&mut us[0].clone()),
                net::median(&mut us[1].clone()),
            );
            figures.push(figure(
                scenario.clone(),
                "bytes/message on the wire",
                &bytes,
                reps,
            ));
            figures.push(figure(scenario, "us/message, both ends (CPU)", &us, reps));
        }
    }
    figures
}

fn figure(scenario: String, metric: &'static str, v: &[Vec<f64>; 2], runs: usize) -> Figure {
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    Figure {
        scenario,
        metric,
        ours: net::median(&mut v[0].clone()),
        baseline: net::median(&mut v[1].clone()),
        higher_is_better: false,
        target: None,
        kind: Kind::Ratio,
        range: Some(Range {
            ours: spread(&v[0]),
            baseline: spread(&v[1]),
            runs,
        }),
        failed: None,
    }
}
