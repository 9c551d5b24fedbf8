//! The page's options as the core's [`ClientConfig`].
//!
//! Owns the translation of the JSON the JavaScript package hands over
//! (camelCase names, durations in milliseconds) into the core's settings,
//! starting from the core's defaults, so a page that sets nothing gets what
//! every Rust client gets, but for one setting: batching is on, for what a
//! page sends within one turn of its event loop ([`page_batch`]). It never validates beyond what the JSON's shape
//! requires: `ClientConfig::validate` (run by `Client::new`) says what cannot
//! work. Settings that only make sense for a driver with sockets of its own
//! (the `hello` in an upgrade header, TLS) are not offered.

use core::time::Duration;

use kitestring_core::backoff::Jitter;
use kitestring_core::config::{BatchConfig, ClientConfig, OverflowPolicy};
use kitestring_core::wire::{Codec, JsonReader, CAP_PING};

/// The page's options, every field optional.
#[derive(Debug, Default)]
pub(crate) struct Options {
    codecs: Option<Vec<String>>,
    heartbeat: Option<Heartbeat>,
    backoff: Option<Backoff>,
    connect_timeout: Option<f64>,
    stability_window: Option<f64>,
    try_later_delay: Option<f64>,
    max_retry_after: Option<f64>,
    close_timeout: Option<f64>,
    queue: Option<Queue>,
    reliability: Option<Reliability>,
    max_message_size: Option<usize>,
    max_decode_failures: Option<u32>,
    capabilities: Option<Vec<String>>,
    room_streams: Option<bool>,
    /// Absent or `true`: [`page_batch`]; `false`: every message in a frame
    /// of its own; an object: its settings over [`page_batch`]'s.
    batch: Option<BatchOption>,
    coalesce_interval: Option<f64>,
    coalesce_keys: Option<usize>,
    max_pending_requests: Option<usize>,
    can_refresh_token: Option<bool>,
    /// Ask the server to ping this client (default true): a hidden tab's
    /// timers may run once a minute, its message handler at once.
    server_pings: Option<bool>,
}

#[derive(Debug, Default)]
struct Heartbeat {
    interval: Option<f64>,
    timeout: Option<f64>,
    grace: Option<f64>,
}

#[derive(Debug, Default)]
struct Backoff {
    base: Option<f64>,
    factor: Option<u32>,
    max: Option<f64>,
    /// `"none"`, `"full"`, or a fraction (0.5: 0 to 50 % on top).
    jitter: Option<Jitter>,
    /// `null` retries for ever.
    max_attempts: Option<Option<u32>>,
}

#[derive(Debug, Default)]
struct Queue {
    max_messages: Option<usize>,
    max_bytes: Option<usize>,
}

#[derive(Debug, Default)]
struct Reliability {
    window_messages: Option<usize>,
    window_bytes: Option<usize>,
    ack_delay: Option<f64>,
    ack_every: Option<u32>,
    ack_timeout: Option<f64>,
    /// `"refuse"` or `"failSession"`.
    overflow: Option<String>,
}

#[derive(Debug)]
enum BatchOption {
    On(bool),
    With(Batch),
}

#[derive(Debug, Default)]
struct Batch {
    window: Option<f64>,
    max_messages: Option<usize>,
    max_bytes: Option<usize>,
}

/// Reads the options' JSON (`JSON.stringify` of the page's object) without
/// serde: every value the type its option needs (an unknown option, or one
/// of the wrong type, is an error naming it); `null` is an option left
/// out (but for `backoff.maxAttempts`, where it means no limit).
struct Reader<'a> {
    rd: JsonReader<'a>,
    /// The option being read, for the error.
    name: String,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> String {
        format!(
            "options: `{}` {what} (at byte {})",
            self.name,
            self.rd.position()
        )
    }

    /// Reads an object, `entry` taking each of its options by name.
    fn object(
        &mut self,
        group: &str,
        mut entry: impl FnMut(&mut Self, &str) -> Result<(), String>,
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
            match entry(&mut inner, key) {
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

    fn unknown(&self) -> Result<(), String> {
        Err(format!("options: unknown option `{}`", self.name))
    }

    fn num(&mut self) -> Result<Option<f64>, String> {
        if self.rd.null() {
            return Ok(None);
        }
        match self.rd.number() {
            Some(v) => Ok(Some(v)),
            None => Err(self.err("is not a number")),
        }
    }

    fn uint<T: TryFrom<u64>>(&mut self) -> Result<Option<T>, String> {
        if self.rd.null() {
            return Ok(None);
        }
        match self.rd.uint().and_then(|v| T::try_from(v).ok()) {
            Some(v) => Ok(Some(v)),
            None => Err(self.err("is not a whole number in range")),
        }
    }

    fn bool(&mut self) -> Result<Option<bool>, String> {
        if self.rd.null() {
            return Ok(None);
        }
        match self.rd.bool() {
            Some(v) => Ok(Some(v)),
            None => Err(self.err("is not true or false")),
        }
    }

    fn str(&mut self) -> Result<String, String> {
        match self.rd.str() {
            Some(s) => Ok(s.into_owned()),
            None => Err(self.err("is not a string")),
        }
    }

    fn strs(&mut self) -> Result<Option<Vec<String>>, String> {
        if self.rd.null() {
            return Ok(None);
        }
        let mut list = Vec::new();
        let ok = self
            .rd
            .array(|rd| rd.str().map(|s| list.push(s.into_owned())));
        match ok {
            Some(()) => Ok(Some(list)),
            None => Err(self.err("is not a list of strings")),
        }
    }
}

/// Milliseconds as a duration; negative, NaN and infinite values are an
/// error rather than a surprise.
fn ms(name: &str, value: f64) -> Result<Duration, String> {
    if !value.is_finite() || value < 0.0 {
        return Err(format!(
            "`{name}` must be a finite number of milliseconds ≥ 0"
        ));
    }
    // Nanoseconds, saturating beyond 584 years (`from_secs_f64` would
    // panic there, and brings its messages into the module).
    Ok(Duration::from_nanos((value * 1e6) as u64))
}

impl Options {
    /// Parses the page's options (`"{}"` or `""` for the defaults).
    pub(crate) fn parse(json: &str) -> Result<Options, String> {
        if json.trim().is_empty() {
            return Ok(Options::default());
        }
        let mut o = Options::default();
        let mut r = Reader {
            rd: JsonReader::new(json),
            name: String::new(),
        };
        r.object("", |r, key| {
            match key {
                "codecs" => o.codecs = r.strs()?,
                "heartbeat" => {
                    if r.rd.null() {
                        return Ok(());
                    }
                    let h = o.heartbeat.insert(Heartbeat::default());
                    r.object(&r.name.clone(), |r, key| {
                        match key {
                            "interval" => h.interval = r.num()?,
                            "timeout" => h.timeout = r.num()?,
                            "grace" => h.grace = r.num()?,
                            _ => return r.unknown(),
                        }
                        Ok(())
                    })?;
                }
                "backoff" => {
                    if r.rd.null() {
                        return Ok(());
                    }
                    let b = o.backoff.insert(Backoff::default());
                    r.object(&r.name.clone(), |r, key| {
                        match key {
                            "base" => b.base = r.num()?,
                            "factor" => b.factor = r.uint()?,
                            "max" => b.max = r.num()?,
                            "jitter" if r.rd.null() => {}
                            "jitter" => {
                                b.jitter = Some(match r.rd.peek() {
                                    Some(b'"') => match r.str()?.as_str() {
                                        "none" => Jitter::None,
                                        "full" => Jitter::Full,
                                        _ => {
                                            return Err(
                                                r.err("is not \"none\", \"full\" or a fraction")
                                            )
                                        }
                                    },
                                    _ => Jitter::Proportional(r.num()?.unwrap_or(0.5)),
                                })
                            }
                            "maxAttempts" => {
                                b.max_attempts = Some(if r.rd.null() { None } else { r.uint()? })
                            }
                            _ => return r.unknown(),
                        }
                        Ok(())
                    })?;
                }
                "connectTimeout" => o.connect_timeout = r.num()?,
                "stabilityWindow" => o.stability_window = r.num()?,
                "tryLaterDelay" => o.try_later_delay = r.num()?,
                "maxRetryAfter" => o.max_retry_after = r.num()?,
                "closeTimeout" => o.close_timeout = r.num()?,
                "queue" => {
                    if r.rd.null() {
                        return Ok(());
                    }
                    let q = o.queue.insert(Queue::default());
                    r.object(&r.name.clone(), |r, key| {
                        match key {
                            "maxMessages" => q.max_messages = r.uint()?,
                            "maxBytes" => q.max_bytes = r.uint()?,
                            _ => return r.unknown(),
                        }
                        Ok(())
                    })?;
                }
                "reliability" => {
                    if r.rd.null() {
                        return Ok(());
                    }
                    let rel = o.reliability.insert(Reliability::default());
                    r.object(&r.name.clone(), |r, key| {
                        match key {
                            "windowMessages" => rel.window_messages = r.uint()?,
                            "windowBytes" => rel.window_bytes = r.uint()?,
                            "ackDelay" => rel.ack_delay = r.num()?,
                            "ackEvery" => rel.ack_every = r.uint()?,
                            "ackTimeout" => rel.ack_timeout = r.num()?,
                            "overflow" if r.rd.null() => {}
                            "overflow" => rel.overflow = Some(r.str()?),
                            _ => return r.unknown(),
                        }
                        Ok(())
                    })?;
                }
                "maxMessageSize" => o.max_message_size = r.uint()?,
                "maxDecodeFailures" => o.max_decode_failures = r.uint()?,
                "capabilities" => o.capabilities = r.strs()?,
                "roomStreams" => o.room_streams = r.bool()?,
                "batch" if r.rd.null() => {}
                "batch" => {
                    o.batch = Some(match r.rd.peek() {
                        Some(b'{') => {
                            let mut b = Batch::default();
                            r.object(&r.name.clone(), |r, key| {
                                match key {
                                    "window" => b.window = r.num()?,
                                    "maxMessages" => b.max_messages = r.uint()?,
                                    "maxBytes" => b.max_bytes = r.uint()?,
                                    _ => return r.unknown(),
                                }
                                Ok(())
                            })?;
                            BatchOption::With(b)
                        }
                        _ => BatchOption::On(r.bool()?.unwrap_or(true)),
                    })
                }
                "coalesceInterval" => o.coalesce_interval = r.num()?,
                "coalesceKeys" => o.coalesce_keys = r.uint()?,
                "maxPendingRequests" => o.max_pending_requests = r.uint()?,
                "canRefreshToken" => o.can_refresh_token = r.bool()?,
                "serverPings" => o.server_pings = r.bool()?,
                _ => return r.unknown(),
            }
            Ok(())
        })?;
        if !r.rd.at_end() {
            return Err("options: text after the object".into());
        }
        Ok(o)
    }

    /// The core's settings: its defaults, with what the page set.
    pub(crate) fn config(&self) -> Result<ClientConfig, String> {
        let mut c = ClientConfig {
            // A page cannot set request headers or read the response's.
            hello_in_upgrade: false,
            ..ClientConfig::default()
        };
        if let Some(codecs) = &self.codecs {
            c.codecs = codecs
                .iter()
                .map(|n| Codec::from_name(n).ok_or_else(|| format!("unknown codec `{n}`")))
                .collect::<Result<_, _>>()?;
        }
        if let Some(h) = &self.heartbeat {
            set_ms(&mut c.heartbeat.interval, "heartbeat.interval", h.interval)?;
            set_ms(&mut c.heartbeat.timeout, "heartbeat.timeout", h.timeout)?;
            set_ms(&mut c.heartbeat.grace, "heartbeat.grace", h.grace)?;
        }
        if let Some(b) = &self.backoff {
            set_ms(&mut c.backoff.base, "backoff.base", b.base)?;
            set_ms(&mut c.backoff.max, "backoff.max", b.max)?;
            if let Some(f) = b.factor {
                c.backoff.factor = f;
            }
            if let Some(j) = b.jitter {
                c.backoff.jitter = j;
            }
            if let Some(m) = b.max_attempts {
                c.backoff.max_attempts = m;
            }
        }
        set_ms(
            &mut c.connect_timeout,
            "connectTimeout",
            self.connect_timeout,
        )?;
        set_ms(
            &mut c.stability_window,
            "stabilityWindow",
            self.stability_window,
        )?;
        set_ms(
            &mut c.try_later_delay,
            "tryLaterDelay",
            self.try_later_delay,
        )?;
        set_ms(
            &mut c.max_retry_after,
            "maxRetryAfter",
            self.max_retry_after,
        )?;
        set_ms(&mut c.close_timeout, "closeTimeout", self.close_timeout)?;
        if let Some(q) = &self.queue {
            set(&mut c.queue.max_messages, q.max_messages);
            set(&mut c.queue.max_bytes, q.max_bytes);
        }
        if let Some(r) = &self.reliability {
            let rel = &mut c.reliability;
            set(&mut rel.window_messages, r.window_messages);
            set(&mut rel.window_bytes, r.window_bytes);
            set_ms(&mut rel.ack_delay, "reliability.ackDelay", r.ack_delay)?;
            set(&mut rel.ack_every, r.ack_every);
            set_ms(
                &mut rel.ack_timeout,
                "reliability.ackTimeout",
                r.ack_timeout,
            )?;
            if let Some(o) = &r.overflow {
                rel.overflow = match o.as_str() {
                    "refuse" => OverflowPolicy::Refuse,
                    "failSession" => OverflowPolicy::FailSession,
                    other => {
                        return Err(format!(
                            "reliability.overflow: `{other}` is not \"refuse\" or \"failSession\""
                        ))
                    }
                };
            }
        }
        set(&mut c.max_message_size, self.max_message_size);
        set(&mut c.max_decode_failures, self.max_decode_failures);
        if let Some(caps) = &self.capabilities {
            c.capabilities.clone_from(caps);
        }
        if self.server_pings.unwrap_or(true) && !c.capabilities.iter().any(|c| c == CAP_PING) {
            c.capabilities.push(CAP_PING.into());
        }
        set(&mut c.room_streams, self.room_streams);
        match &self.batch {
            Some(BatchOption::On(false)) => c.batch = None,
            None | Some(BatchOption::On(true)) => c.batch = Some(page_batch()),
            Some(BatchOption::With(b)) => {
                let mut batch = page_batch();
                set_ms(&mut batch.window, "batch.window", b.window)?;
                set(&mut batch.max_messages, b.max_messages);
                set(&mut batch.max_bytes, b.max_bytes);
                c.batch = Some(batch);
            }
        }
        set_ms(
            &mut c.coalesce_interval,
            "coalesceInterval",
            self.coalesce_interval,
        )?;
        set(&mut c.coalesce_keys, self.coalesce_keys);
        set(&mut c.max_pending_requests, self.max_pending_requests);
        set(&mut c.can_refresh_token, self.can_refresh_token);
        Ok(c)
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

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn set_ms(slot: &mut Duration, name: &str, value: Option<f64>) -> Result<(), String> {
    if let Some(v) = value {
        *slot = ms(name, v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_options_are_the_core_defaults_for_a_page() {
        let c = Options::parse("{}").unwrap().config().unwrap();
        let d = ClientConfig::default();
        assert_eq!(c.heartbeat, d.heartbeat);
        assert_eq!(c.codecs, d.codecs);
        assert!(!c.hello_in_upgrade);
        assert_eq!(
            c.capabilities,
            vec![CAP_PING.to_owned()],
            "a page asks to be pinged"
        );
        let c = Options::parse(r#"{"serverPings":false}"#)
            .unwrap()
            .config()
            .unwrap();
        assert!(c.capabilities.is_empty());
    }

    #[test]
    fn a_page_batches_what_it_sends_in_one_turn_unless_it_says_not_to() {
        let turn = |json: &str| Options::parse(json).unwrap().config().unwrap().batch;
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
        let c = Options::parse(json).unwrap().config().unwrap();
        assert_eq!(c.codecs, vec![Codec::Json]);
        assert_eq!(c.heartbeat.interval, Duration::from_secs(1));
        assert_eq!(c.backoff.max_attempts, None);
        assert_eq!(c.backoff.jitter, Jitter::None);
        assert_eq!(c.queue.max_messages, 7);
        assert_eq!(c.reliability.overflow, OverflowPolicy::FailSession);
        assert_eq!(c.batch.unwrap().window, Duration::from_millis(2));
        assert_eq!(c.connect_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn null_is_an_option_left_out() {
        let c = Options::parse(
            r#"{"heartbeat":null,"connectTimeout":null,"batch":null,"backoff":{"jitter":null}}"#,
        )
        .unwrap()
        .config()
        .unwrap();
        let d = ClientConfig::default();
        assert_eq!(c.heartbeat, d.heartbeat);
        assert_eq!(c.connect_timeout, d.connect_timeout);
        assert_eq!(c.batch, Some(page_batch()));
        assert_eq!(c.backoff.jitter, d.backoff.jitter);
        let c = Options::parse(r#"{"backoff":{"jitter":0.25,"maxAttempts":3}}"#)
            .unwrap()
            .config()
            .unwrap();
        assert_eq!(c.backoff.jitter, Jitter::Proportional(0.25));
        assert_eq!(c.backoff.max_attempts, Some(3));
    }

    #[test]
    fn mistakes_are_named() {
        let e = Options::parse(r#"{"heartbeat":{"intervall":1}}"#).unwrap_err();
        assert!(e.contains("intervall"), "{e}");
        let e = Options::parse(r#"{"connectTimeout":-1}"#)
            .unwrap()
            .config()
            .unwrap_err();
        assert!(e.contains("connectTimeout"), "{e}");
        let e = Options::parse(r#"{"heartbeat":{"interval":"1s"}}"#).unwrap_err();
        assert!(e.contains("heartbeat.interval"), "{e}");
        let e = Options::parse(r#"{"queue":{"maxBytes":-1}}"#).unwrap_err();
        assert!(e.contains("queue.maxBytes"), "{e}");
        let e = Options::parse(r#"{"roomStreams":1}"#).unwrap_err();
        assert!(e.contains("roomStreams"), "{e}");
        assert!(Options::parse(r#"{"batch":true} x"#).is_err());
        assert!(Options::parse(r#"{"batch":true"#).is_err());
        let e = Options::parse(r#"{"codecs":["xml"]}"#)
            .unwrap()
            .config()
            .unwrap_err();
        assert!(e.contains("xml"), "{e}");
    }
}
