//! Small runtime-agnostic helpers: timeouts, random ids, URL parsing and
//! typed payload encoding.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use kitestring_core::wire::{Codec, Payload, PayloadKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CodecError, ConnectError};
use crate::runtime::{AsyncTimer, Runtime};

/// Runs `fut` for at most `limit` on `runtime`'s clock; `None` on timeout.
/// The limit runs from this call.
///
/// A plain function returning [`Timeout`] rather than an `async fn`: an
/// `async fn`'s future keeps its argument and the local it is pinned in,
/// so it would be twice the size of `fut` (a connection's handshake future
/// was 5.3 KB that way, 2.6 KB of it twice).
pub fn timeout<F: Future>(runtime: &dyn Runtime, limit: Duration, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        timer: runtime.new_timer(runtime.now() + limit),
    }
}

pin_project_lite::pin_project! {
    /// [`timeout`]'s future: `Some` with `F`'s output, or `None` once the
    /// timer fired first.
    #[must_use = "futures do nothing unless polled"]
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        timer: Pin<Box<dyn AsyncTimer>>,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Some(out));
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Sleeps until `runtime`'s clock reaches `now + d`.
pub async fn sleep(runtime: &dyn Runtime, d: Duration) {
    let mut timer = runtime.new_timer(runtime.now() + d);
    futures_util::future::poll_fn(|cx| timer.as_mut().poll(cx)).await;
}

/// The process's generator for ids and seeds: ChaCha12, seeded once from
/// the operating system's cryptographic source. Ids (client instances,
/// sessions) come from it without a system call each: one `getrandom` per
/// id was the largest system-call difference to a bare WebSocket when
/// connections come and go quickly.
fn generator() -> Result<&'static Mutex<StdRng>, getrandom::Error> {
    static GENERATOR: OnceLock<Mutex<StdRng>> = OnceLock::new();
    if let Some(g) = GENERATOR.get() {
        return Ok(g);
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    Ok(GENERATOR.get_or_init(|| Mutex::new(StdRng::from_seed(seed))))
}

/// 16 unpredictable bytes, for ids. Fails only if the operating system's
/// source cannot seed the generator.
pub(crate) fn random16() -> Result<[u8; 16], getrandom::Error> {
    let mut b = [0u8; 16];
    generator()?
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .fill_bytes(&mut b);
    Ok(b)
}

/// The wall-clock time in milliseconds since the Unix epoch (0 before it),
/// for the machines' synced-map stamps.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random u64 seed for jitter.
pub(crate) fn random_seed() -> u64 {
    match generator() {
        Ok(g) => g.lock().unwrap_or_else(PoisonError::into_inner).next_u64(),
        // Jitter quality only; ids never come from here.
        Err(_) => 0x9E37_79B9_7F4A_7C15,
    }
}

/// A parsed `ws://` or `wss://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The URL as given (tungstenite builds the request from it).
    pub(crate) url: Arc<str>,
}

pub(crate) fn parse_url(url: &str) -> Result<Target, ConnectError> {
    let bad = |why: &str| ConnectError::InvalidUrl(format!("{url}: {why}"));
    let (tls, rest) = if let Some(r) = url.strip_prefix("ws://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("wss://") {
        (true, r)
    } else {
        return Err(bad("scheme must be ws or wss"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("missing host (or unsupported user info)"));
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad("invalid port"))?,
            None if after.is_empty() => default_port,
            None => return Err(bad("junk after host")),
        };
        (h.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad("invalid port"))?),
            None => (authority.to_owned(), default_port),
        }
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    Ok(Target {
        tls,
        host,
        port,
        url: Arc::from(url),
    })
}

/// Encodes `value` with `codec`: MessagePack (named fields) or JSON.
pub fn encode<T: Serialize + ?Sized>(value: &T, codec: Codec) -> Result<Payload, CodecError> {
    match codec {
        Codec::MsgPack => {
            let bytes =
                rmp_serde::to_vec_named(value).map_err(|e| CodecError::Encode(e.to_string()))?;
            Payload::msgpack(bytes).map_err(|e| CodecError::Encode(e.to_string()))
        }
        _ => {
            let bytes = serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))?;
            Payload::json(bytes).map_err(|e| CodecError::Encode(e.to_string()))
        }
    }
}

/// Decodes a payload by its kind: JSON or MessagePack. Binary payloads are
/// opaque and refused with [`CodecError::Binary`].
pub fn decode<T: DeserializeOwned>(payload: &Payload) -> Result<T, CodecError> {
    match payload.kind() {
        PayloadKind::Json => {
            serde_json::from_slice(payload.data()).map_err(|e| CodecError::Decode(e.to_string()))
        }
        PayloadKind::MsgPack => {
            rmp_serde::from_slice(payload.data()).map_err(|e| CodecError::Decode(e.to_string()))
        }
        _ => Err(CodecError::Binary),
    }
}

/// `decode::<T>()` on payloads and on received messages.
pub trait DecodeExt {
    /// Decodes the payload by its kind (JSON or MessagePack).
    fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError>;
}

impl DecodeExt for Payload {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        decode(self)
    }
}

impl DecodeExt for kitestring_core::client::Received {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        decode(&self.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_across_threads() {
        let ids: Vec<[u8; 16]> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..2500).map(|_| random16().unwrap()).collect::<Vec<_>>()))
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "an id came out twice");
        // Every byte position takes many values (not a counter, not zeros).
        for i in 0..16 {
            let values: std::collections::HashSet<u8> = ids.iter().map(|b| b[i]).collect();
            assert!(values.len() > 200, "byte {i} took {} values", values.len());
        }
        assert_ne!(random_seed(), random_seed());
    }

    #[test]
    fn urls() {
        let t = parse_url("ws://127.0.0.1:9000/ws?x=1").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port), (false, "127.0.0.1", 9000));
        let t = parse_url("wss://example.com/a").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port), (true, "example.com", 443));
        let t = parse_url("ws://[::1]:8/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8));
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("ws://:80").is_err());
        assert!(parse_url("ws://h:port").is_err());
    }

    #[test]
    fn codecs_round_trip() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct M {
            a: u32,
            b: String,
        }
        let m = M {
            a: 7,
            b: "x".into(),
        };
        for codec in [Codec::Json, Codec::MsgPack] {
            let p = encode(&m, codec).unwrap();
            assert_eq!(p.decode::<M>().unwrap(), m);
        }
        assert!(Payload::binary(vec![1u8]).decode::<M>().is_err());
    }
}
