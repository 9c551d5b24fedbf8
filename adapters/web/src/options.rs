//! The page's options as the core's [`ClientConfig`] and the transport
//! choice ([`TransportChoice`]).
//!
//! Owns the translation of the JSON the JavaScript package hands over
//! (camelCase names, durations in milliseconds) into the core's settings,
//! starting from the core's defaults, so a page that sets nothing gets what
//! every Rust client gets, but for one setting: batching is on, for what a
//! page sends within one turn of its event loop ([`page_batch`]). It never
//! validates beyond what the JSON's shape requires: `ClientConfig::validate`
//! (run by `Client::new`) says what cannot work. Settings that only make
//! sense for a driver with sockets of its own (the `hello` in an upgrade
//! header, TLS) are not offered.
//!
//! One reader walks the options, groups (`heartbeat`, `backoff`, ...)
//! included, and one `match` on each option's dotted name says where it
//! goes: options of the same type are read by the same code, which keeps
//! the module small.

use core::time::Duration;

use kitestring_core::backoff::Jitter;
use kitestring_core::client::transport::{TransportChoice, Transports};
use kitestring_core::config::{BatchConfig, ClientConfig, OverflowPolicy};
use kitestring_core::wire::{Codec, JsonReader, CAP_PING};

/// What the page's options make.
pub(crate) struct Settings {
    /// The core's settings.
    pub(crate) config: ClientConfig,
    /// Which transports connections take (PROTOCOL.md, section 1.1):
    /// `transports` (`"auto"`, the default, `"websocket"` or `"http"`), a
    /// block remembered for `fallbackMemory` (two minutes by default).
    pub(crate) choice: TransportChoice,
}

/// The options that hold options (`heartbeat.interval`); `batch` may also
/// be `true` or `false`.
const GROUPS: [&str; 5] = ["heartbeat", "backoff", "queue", "reliability", "batch"];

/// Reads the page's options (`"{}"` or `""` for the defaults) without
/// serde: every value the type its option needs (an unknown option, or one
/// of the wrong type, is an error naming it); `null` is an option left out
/// (but for `backoff.maxAttempts`, where it means no limit).
pub(crate) fn settings(json: &str) -> Result<Settings, String> {
    let mut c = ClientConfig {
        // A page cannot set request headers or read the response's.
        hello_in_upgrade: false,
        batch: Some(page_batch()),
        ..ClientConfig::default()
    };
    let mut pings = true;
    let mut transports = Transports::Auto;
    let mut memory = Duration::from_secs(120);
    if !json.trim().is_empty() {
        let mut r = Reader {
            rd: JsonReader::new(json),
            name: String::new(),
        };
        r.options("", &mut |r| {
            let slot = match r.name.as_str() {
                "codecs" => {
                    c.codecs = r
                        .strs()?
                        .iter()
                        .map(|n| Codec::from_name(n).ok_or_else(|| format!("unknown codec `{n}`")))
                        .collect::<Result<_, _>>()?;
                    return Ok(());
                }
                "heartbeat.interval" => Slot::Ms(&mut c.heartbeat.interval),
                "heartbeat.timeout" => Slot::Ms(&mut c.heartbeat.timeout),
                "heartbeat.grace" => Slot::Ms(&mut c.heartbeat.grace),
                "backoff.base" => Slot::Ms(&mut c.backoff.base),
                "backoff.factor" => Slot::U32(&mut c.backoff.factor),
                "backoff.max" => Slot::Ms(&mut c.backoff.max),
                "backoff.jitter" => {
                    c.backoff.jitter = match r.rd.peek() {
                        Some(b'"') => match r.str()?.as_str() {
                            "none" => Jitter::None,
                            "full" => Jitter::Full,
                            _ => return Err(r.err("is not \"none\", \"full\" or a fraction")),
                        },
                        _ => Jitter::Proportional(r.num()?),
                    };
                    return Ok(());
                }
                "backoff.maxAttempts" => {
                    c.backoff.max_attempts = if r.rd.null() { None } else { Some(r.uint()?) };
                    return Ok(());
                }
                "connectTimeout" => Slot::Ms(&mut c.connect_timeout),
                "stabilityWindow" => Slot::Ms(&mut c.stability_window),
                "tryLaterDelay" => Slot::Ms(&mut c.try_later_delay),
                "maxRetryAfter" => Slot::Ms(&mut c.max_retry_after),
                "closeTimeout" => Slot::Ms(&mut c.close_timeout),
                "queue.maxMessages" => Slot::Usize(&mut c.queue.max_messages),
                "queue.maxBytes" => Slot::Usize(&mut c.queue.max_bytes),
                "reliability.windowMessages" => Slot::Usize(&mut c.reliability.window_messages),
                "reliability.windowBytes" => Slot::Usize(&mut c.reliability.window_bytes),
                "reliability.ackDelay" => Slot::Ms(&mut c.reliability.ack_delay),
                "reliability.ackEvery" => Slot::U32(&mut c.reliability.ack_every),
                "reliability.ackTimeout" => Slot::Ms(&mut c.reliability.ack_timeout),
                "reliability.overflow" => {
                    c.reliability.overflow = match r.str()?.as_str() {
                        "refuse" => OverflowPolicy::Refuse,
                        "failSession" => OverflowPolicy::FailSession,
                        _ => return Err(r.err("is not \"refuse\" or \"failSession\"")),
                    };
                    return Ok(());
                }
                "maxMessageSize" => Slot::Usize(&mut c.max_message_size),
                "maxDecodeFailures" => Slot::U32(&mut c.max_decode_failures),
                "capabilities" => {
                    c.capabilities = r.strs()?;
                    return Ok(());
                }
                "roomStreams" => Slot::Bool(&mut c.room_streams),
                // `true`: [`page_batch`]; `false`: every message in a frame
                // of its own; an object: its settings over [`page_batch`]'s.
                "batch" => {
                    c.batch = r.bool()?.then(page_batch);
                    return Ok(());
                }
                "batch.window" => Slot::Ms(&mut c.batch.get_or_insert_with(page_batch).window),
                "batch.maxMessages" => {
                    Slot::Usize(&mut c.batch.get_or_insert_with(page_batch).max_messages)
                }
                "batch.maxBytes" => {
                    Slot::Usize(&mut c.batch.get_or_insert_with(page_batch).max_bytes)
                }
                "coalesceInterval" => Slot::Ms(&mut c.coalesce_interval),
                "coalesceKeys" => Slot::Usize(&mut c.coalesce_keys),
                "maxPendingRequests" => Slot::Usize(&mut c.max_pending_requests),
                "canRefreshToken" => Slot::Bool(&mut c.can_refresh_token),
                // Ask the server to ping this client (default true): a hidden
                // tab's timers may run once a minute, its message handler at
                // once.
                "serverPings" => Slot::Bool(&mut pings),
                "transports" => {
                    transports = match r.str()?.as_str() {
                        "auto" => Transports::Auto,
                        "websocket" => Transports::WebSocket,
                        "http" => Transports::Http,
                        _ => return Err(r.err("is not \"auto\", \"websocket\" or \"http\"")),
                    };
                    return Ok(());
                }
                "fallbackMemory" => Slot::Ms(&mut memory),
                name if GROUPS.contains(&name) => return Err(r.err("is not an object")),
                _ => return Err(format!("options: unknown option `{}`", r.name)),
            };
            // One read for each type, whichever option it is.
            match slot {
                Slot::Ms(d) => *d = r.ms()?,
                Slot::Usize(n) => *n = r.uint()?,
                Slot::U32(n) => *n = r.uint()?,
                Slot::Bool(b) => *b = r.bool()?,
            }
            Ok(())
        })?;
        if !r.rd.at_end() {
            return Err("options: text after the object".into());
        }
    }
    if pings && !c.capabilities.iter().any(|c| c == CAP_PING) {
        c.capabilities.push(CAP_PING.into());
    }
    Ok(Settings {
        config: c,
        choice: TransportChoice::new(transports, memory),
    })
}

/// Where an option of one of the common types goes.
enum Slot<'c> {
    Ms(&'c mut Duration),
    Usize(&'c mut usize),
    U32(&'c mut u32),
    Bool(&'c mut bool),
}

/// The options' JSON being read, at the value of the option `name`.
struct Reader<'a> {
    rd: JsonReader<'a>,
    /// The option being read (`heartbeat.interval`), for the error.
    name: String,
}

impl Reader<'_> {
    fn err(&self, what: &str) -> String {
        format!(
            "options: `{}` {what} (at byte {})",
            self.name,
            self.rd.position()
        )
    }

    /// Reads the object of `group` (`""`: the options), handing each option
    /// in it to `option` with the reader at its value, and the options of a
    /// group (an object under one of [`GROUPS`]) likewise, by dotted name.
    /// A `null` is an option left out, but for `backoff.maxAttempts`.
    fn options(
        &mut self,
        group: &str,
        option: &mut dyn FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        self.name = group.into();
        if self.rd.peek() != Some(b'{') {
            return Err(self.err("is not an object"));
        }
        let mut failed = None;
        let mut rd = self.rd.clone();
        let read = rd.object(|rd, key| {
            let key = core::str::from_utf8(key).ok()?;
            let mut inner = Reader {
                rd: rd.clone(),
                name: if group.is_empty() {
                    key.into()
                } else {
                    format!("{group}.{key}")
                },
            };
            let r = if group.is_empty() && GROUPS.contains(&key) && inner.rd.peek() == Some(b'{') {
                inner.options(key, &mut *option)
            } else if inner.name != "backoff.maxAttempts" && inner.rd.null() {
                Ok(())
            } else {
                option(&mut inner)
            };
            match r {
                Ok(()) => {
                    *rd = inner.rd;
                    Some(())
                }
                Err(e) => {
                    failed = Some(e);
                    None
                }
            }
        });
        self.rd = rd;
        match (read, failed) {
            (_, Some(e)) => Err(e),
            (None, None) => Err(self.err("is not valid JSON")),
            (Some(()), None) => Ok(()),
        }
    }

    fn num(&mut self) -> Result<f64, String> {
        self.rd.number().ok_or_else(|| self.err("is not a number"))
    }

    /// Milliseconds as a duration; negative, NaN and infinite values are an
    /// error rather than a surprise.
    fn ms(&mut self) -> Result<Duration, String> {
        match self.rd.number() {
            // Nanoseconds, saturating beyond 584 years (`from_secs_f64`
            // would panic there, and brings its messages into the module).
            Some(v) if v.is_finite() && v >= 0.0 => Ok(Duration::from_nanos((v * 1e6) as u64)),
            _ => Err(self.err("must be a finite number of milliseconds ≥ 0")),
        }
    }

    fn uint<T: TryFrom<u64>>(&mut self) -> Result<T, String> {
        self.rd
            .uint()
            .and_then(|v| T::try_from(v).ok())
            .ok_or_else(|| self.err("is not a whole number in range"))
    }

    fn bool(&mut self) -> Result<bool, String> {
        self.rd
            .bool()
            .ok_or_else(|| self.err("is not true or false"))
    }

    fn str(&mut self) -> Result<String, String> {
        match self.rd.str() {
            Some(s) => Ok(s.into_owned()),
            None => Err(self.err("is not a string")),
        }
    }

    fn strs(&mut self) -> Result<Vec<String>, String> {
        let mut list = Vec::new();
        match self
            .rd
            .array(|rd| rd.str().map(|s| list.push(s.into_owned())))
        {
            Some(()) => Ok(list),
            None => Err(self.err("is not a list of strings")),
        }
    }
}

/// A page's batching unless it says otherwise: the core's limits, with a
/// window of zero. A message that finds nothing else unacknowledged goes
/// out at once (a lone request waits for nothing); those sent behind
/// messages still in flight are batched until the machine's next timeout,
/// which the JavaScript driver gives it at the end of the event loop's
/// turn (a `MessageChannel` task, not a clamped timer): what the page sends
/// and acknowledges while handling one burst of incoming messages leaves
/// in one frame.
fn page_batch() -> BatchConfig {
    BatchConfig {
        window: Duration::ZERO,
        ..BatchConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ClientConfig {
        settings(json).unwrap_or_else(|e| panic!("{e}")).config
    }

    fn error(json: &str) -> String {
        match settings(json) {
            Ok(_) => panic!("{json} was taken"),
            Err(e) => e,
        }
    }

    #[test]
    fn empty_options_are_the_core_defaults_for_a_page() {
        let d = ClientConfig::default();
        for json in ["", "{}", " { } "] {
            let c = config(json);
            assert_eq!(c.heartbeat, d.heartbeat);
            assert_eq!(c.codecs, d.codecs);
            assert_eq!(c.backoff, d.backoff);
            assert_eq!(c.reliability, d.reliability);
            assert!(!c.hello_in_upgrade);
            assert_eq!(
                c.capabilities,
                vec![CAP_PING.to_owned()],
                "a page asks to be pinged"
            );
        }
        let c = config(r#"{"serverPings":false}"#);
        assert!(c.capabilities.is_empty());
        let c = config(r#"{"capabilities":["x"]}"#);
        assert_eq!(c.capabilities, vec!["x".to_owned(), CAP_PING.to_owned()]);
    }

    #[test]
    fn a_page_batches_what_it_sends_in_one_turn_unless_it_says_not_to() {
        let turn = |json: &str| config(json).batch;
        assert_eq!(turn("{}"), Some(page_batch()));
        assert_eq!(turn(r#"{"batch":true}"#), Some(page_batch()));
        assert_eq!(page_batch().window, Duration::ZERO);
        assert_eq!(turn(r#"{"batch":false}"#), None);
        let b = turn(r#"{"batch":{"maxMessages":8}}"#).unwrap();
        assert_eq!((b.window, b.max_messages), (Duration::ZERO, 8));
    }

    #[test]
    fn every_group_is_read() {
        let json = r#"{"codecs":["json"],"heartbeat":{"interval":1000,"timeout":500},
            "backoff":{"base":10,"max":100,"jitter":"none","maxAttempts":null},
            "queue":{"maxMessages":7},"reliability":{"ackDelay":5,"overflow":"failSession"},
            "batch":{"window":2},"connectTimeout":2500}"#;
        let c = config(json);
        assert_eq!(c.codecs, vec![Codec::Json]);
        assert_eq!(c.heartbeat.interval, Duration::from_secs(1));
        assert_eq!(c.heartbeat.timeout, Duration::from_millis(500));
        assert_eq!(c.backoff.base, Duration::from_millis(10));
        assert_eq!(c.backoff.max_attempts, None);
        assert_eq!(c.backoff.jitter, Jitter::None);
        assert_eq!(c.queue.max_messages, 7);
        assert_eq!(c.reliability.ack_delay, Duration::from_millis(5));
        assert_eq!(c.reliability.overflow, OverflowPolicy::FailSession);
        assert_eq!(c.batch.unwrap().window, Duration::from_millis(2));
        assert_eq!(c.connect_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn every_option_is_read() {
        let json = r#"{"heartbeat":{"grace":3},"backoff":{"factor":3,"jitter":"full"},
            "stabilityWindow":1,"tryLaterDelay":2,"maxRetryAfter":3,"closeTimeout":4,
            "queue":{"maxBytes":5},"reliability":{"windowMessages":6,"windowBytes":7,
            "ackEvery":8,"ackTimeout":9,"overflow":"refuse"},"maxMessageSize":10,
            "maxDecodeFailures":11,"roomStreams":false,"batch":{"maxBytes":12},
            "coalesceInterval":13,"coalesceKeys":14,"maxPendingRequests":15,
            "canRefreshToken":true}"#;
        let c = config(json);
        let ms = Duration::from_millis;
        assert_eq!(c.heartbeat.grace, ms(3));
        assert_eq!((c.backoff.factor, c.backoff.jitter), (3, Jitter::Full));
        assert_eq!(
            (
                c.stability_window,
                c.try_later_delay,
                c.max_retry_after,
                c.close_timeout
            ),
            (ms(1), ms(2), ms(3), ms(4))
        );
        assert_eq!(c.queue.max_bytes, 5);
        let r = &c.reliability;
        assert_eq!((r.window_messages, r.window_bytes, r.ack_every), (6, 7, 8));
        assert_eq!((r.ack_timeout, r.overflow), (ms(9), OverflowPolicy::Refuse));
        assert_eq!((c.max_message_size, c.max_decode_failures), (10, 11));
        assert!(!c.room_streams);
        assert_eq!(c.batch.unwrap().max_bytes, 12);
        assert_eq!(c.coalesce_interval, ms(13));
        assert_eq!((c.coalesce_keys, c.max_pending_requests), (14, 15));
        assert!(c.can_refresh_token);
    }

    #[test]
    fn null_is_an_option_left_out() {
        let c = config(
            r#"{"heartbeat":null,"connectTimeout":null,"batch":null,"backoff":{"jitter":null}}"#,
        );
        let d = ClientConfig::default();
        assert_eq!(c.heartbeat, d.heartbeat);
        assert_eq!(c.connect_timeout, d.connect_timeout);
        assert_eq!(c.batch, Some(page_batch()));
        assert_eq!(c.backoff.jitter, d.backoff.jitter);
        assert_eq!(c.backoff.max_attempts, d.backoff.max_attempts);
        let c = config(r#"{"backoff":{"jitter":0.25,"maxAttempts":3}}"#);
        assert_eq!(c.backoff.jitter, Jitter::Proportional(0.25));
        assert_eq!(c.backoff.max_attempts, Some(3));
    }

    #[test]
    fn transports_default_to_auto_with_two_minutes_of_memory() {
        use kitestring_core::client::transport::TransportKind;
        use kitestring_core::Instant;
        let choice = |json: &str| settings(json).unwrap_or_else(|e| panic!("{e}")).choice;
        let at = |ms: u64| Instant::ZERO + Duration::from_millis(ms);
        let mut auto = choice("{}");
        assert!(auto.may_fall_back(true));
        auto.blocked(at(0));
        assert_eq!(auto.first(at(119_999)), TransportKind::Http);
        assert_eq!(auto.probe_at(TransportKind::Http), Some(at(120_000)));
        let mut short = choice(r#"{"transports":"auto","fallbackMemory":250}"#);
        short.blocked(at(0));
        assert_eq!(short.probe_at(TransportKind::Http), Some(at(250)));
        let ws = choice(r#"{"transports":"websocket"}"#);
        assert!(!ws.may_fall_back(true));
        let http = choice(r#"{"transports":"http","fallbackMemory":null}"#);
        assert_eq!(http.first(at(0)), TransportKind::Http);
        assert_eq!(http.probe_at(TransportKind::Http), None);
        let e = error(r#"{"transports":"smoke"}"#);
        assert!(e.contains("transports"), "{e}");
        let e = error(r#"{"fallbackMemory":-1}"#);
        assert!(e.contains("fallbackMemory"), "{e}");
        let e = error(r#"{"transports":1}"#);
        assert!(e.contains("transports"), "{e}");
    }

    #[test]
    fn mistakes_are_named() {
        let e = error(r#"{"heartbeat":{"intervall":1}}"#);
        assert!(e.contains("heartbeat.intervall"), "{e}");
        let e = error(r#"{"connectTimeout":-1}"#);
        assert!(e.contains("connectTimeout"), "{e}");
        let e = error(r#"{"heartbeat":{"interval":"1s"}}"#);
        assert!(e.contains("heartbeat.interval"), "{e}");
        let e = error(r#"{"queue":{"maxBytes":-1}}"#);
        assert!(e.contains("queue.maxBytes"), "{e}");
        let e = error(r#"{"roomStreams":1}"#);
        assert!(e.contains("roomStreams"), "{e}");
        let e = error(r#"{"heartbeat":5}"#);
        assert!(e.contains("`heartbeat` is not an object"), "{e}");
        let e = error(r#"{"reliability":{"overflow":"drop"}}"#);
        assert!(e.contains("reliability.overflow"), "{e}");
        let e = error(r#"{"backoff":{"jitter":"some"}}"#);
        assert!(e.contains("backoff.jitter"), "{e}");
        let e = error(r#"{"reliability":{"ackEvery":4294967296}}"#);
        assert!(e.contains("reliability.ackEvery"), "{e}");
        let e = error("[]");
        assert!(e.contains("is not an object"), "{e}");
        assert!(settings(r#"{"batch":true} x"#).is_err());
        assert!(settings(r#"{"batch":true"#).is_err());
        assert!(settings(r#"{"heartbeat":{"interval":1}"#).is_err());
        let e = error(r#"{"codecs":["xml"]}"#);
        assert!(e.contains("xml"), "{e}");
    }
}
