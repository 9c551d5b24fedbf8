//! The server's side of the HTTP upgrade, read and answered by hand: the
//! request head is read into one buffer (bounded), parsed by `httparse`
//! without copying, checked, and answered with `101` or a plain HTTP error
//! status. The bytes a client sent behind its request (a `hello` frame
//! written in the same packet) stay in the buffer and are handed to
//! tungstenite as the start of the WebSocket stream.
//!
//! tungstenite's own server handshake refuses such bytes
//! (`JunkAfterRequest`) and answers nothing at all to a request it refuses
//! by itself (not an upgrade, headers over its limit): the peer saw the
//! connection drop. Here every refusal gets a status and a short reason.

use async_tungstenite::tungstenite::http::{HeaderMap, HeaderName, HeaderValue};

use crate::head::{has_token, is_visible_ascii};
pub(crate) use crate::head::{read_head, write_all, HeadError, MAX_HEAD, MAX_HEADERS};

/// An HTTP refusal: the status, the reason (logged, and the response
/// body), and header lines the status calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HttpRefusal {
    pub(crate) status: u16,
    pub(crate) reason: &'static str,
    /// Extra headers, as (lower-case name, value).
    pub(crate) headers: &'static [(&'static str, &'static str)],
    /// `Retry-After`, in seconds: when a client may try again (a 503).
    pub(crate) retry_after: Option<u64>,
}

impl HttpRefusal {
    pub(crate) const fn new(status: u16, reason: &'static str) -> Self {
        HttpRefusal {
            status,
            reason,
            headers: &[],
            retry_after: None,
        }
    }

    /// The refusal with `Retry-After: after` (whole seconds, rounded up,
    /// at least 1).
    pub(crate) fn retry_after(self, after: std::time::Duration) -> Self {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        HttpRefusal {
            retry_after: Some(secs.max(1)),
            ..self
        }
    }

    /// Every extra header, `Retry-After` included, as (lower-case name,
    /// value): what each HTTP stack writes besides its own.
    pub(crate) fn extra_headers(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        self.headers
            .iter()
            .map(|&(name, value)| (name, value.to_owned()))
            .chain(self.retry_after.map(|s| ("retry-after", s.to_string())))
    }

    /// 400 Bad Request.
    pub(crate) const fn bad(reason: &'static str) -> Self {
        Self::new(400, reason)
    }

    /// 426 Upgrade Required: not a WebSocket upgrade.
    pub(crate) const NOT_AN_UPGRADE: HttpRefusal = HttpRefusal {
        status: 426,
        reason: "this is a WebSocket endpoint: upgrade to websocket",
        headers: &[("upgrade", "websocket")],
        retry_after: None,
    };

    /// 426 Upgrade Required with the version this server speaks (RFC 6455,
    /// section 4.4).
    pub(crate) const WRONG_VERSION: HttpRefusal = HttpRefusal {
        status: 426,
        reason: "unsupported Sec-WebSocket-Version",
        headers: &[("sec-websocket-version", "13")],
        retry_after: None,
    };

    /// 431 Request Header Fields Too Large.
    pub(crate) const TOO_LARGE: HttpRefusal =
        HttpRefusal::new(431, "request header fields too large");

    /// The status's reason phrase, and the same as a metrics label.
    pub(crate) fn phrase(&self) -> &'static str {
        match self.status {
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            413 => "Content Too Large",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Error",
        }
    }

    /// The status as a label value (`"401"`), without allocating.
    pub(crate) fn status_label(&self) -> &'static str {
        match self.status {
            400 => "400",
            401 => "401",
            403 => "403",
            404 => "404",
            405 => "405",
            409 => "409",
            413 => "413",
            426 => "426",
            431 => "431",
            500 => "500",
            503 => "503",
            _ => "other",
        }
    }

    /// The `connection` header: a 426 names the protocol to upgrade to,
    /// and then must say `upgrade` in `connection` too (RFC 9110, section
    /// 7.8).
    pub(crate) fn connection(&self) -> &'static str {
        if self.headers.iter().any(|(name, _)| *name == "upgrade") {
            "upgrade, close"
        } else {
            "close"
        }
    }

    /// The body: the reason and a newline.
    pub(crate) fn body(&self) -> String {
        format!("{}\n", self.reason)
    }

    /// The whole response: status line, headers, the reason as a text body.
    pub(crate) fn response(&self) -> Vec<u8> {
        let mut r = format!("HTTP/1.1 {} {}\r\n", self.status, self.phrase());
        for (name, value) in self.extra_headers() {
            r.push_str(name);
            r.push_str(": ");
            r.push_str(&value);
            r.push_str("\r\n");
        }
        let body = self.body();
        r.push_str(&format!(
            "connection: {}\r\ncontent-type: text/plain; charset=utf-8\r\n\
             {}: {}\r\ncontent-length: {}\r\n\r\n{body}",
            self.connection(),
            kitestring_core::wire::records::REFUSAL_HEADER,
            self.status,
            body.len(),
        ));
        r.into_bytes()
    }
}

/// The parts of an upgrade request the server looks at, borrowed from the
/// buffer it was read into.
#[derive(Debug)]
pub(crate) struct Upgrade<'b> {
    pub(crate) path: &'b str,
    pub(crate) query: Option<&'b str>,
    pub(crate) key: &'b [u8],
    pub(crate) host: &'b str,
    pub(crate) origin: Option<&'b str>,
    pub(crate) hello: Option<&'b [u8]>,
}

/// Parses and checks an upgrade request head. `headers` receives the header
/// lines (for [`header_map`]).
pub(crate) fn parse<'h, 'b>(
    head: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
) -> Result<(Upgrade<'b>, &'h [httparse::Header<'b>]), HttpRefusal> {
    let mut req = httparse::Request::new(headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HttpRefusal::bad("incomplete request")),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpRefusal::TOO_LARGE),
        Err(_) => return Err(HttpRefusal::bad("malformed HTTP request")),
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HttpRefusal::bad("malformed HTTP request"));
    };
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let upgrade = check(
        method,
        target,
        version >= 1,
        headers.iter().map(|h| (h.name, h.value)),
    )?;
    Ok((upgrade, headers))
}

/// Checks an upgrade request, whichever HTTP stack read it: this server's
/// own reader ([`parse`]) or a hyper-based server's (`ServerHandle::upgrade`).
/// `http11`: the request is HTTP/1.1 (or a later 1.x). `headers` are the
/// header lines in order, as (name, value).
pub(crate) fn check<'b>(
    method: &str,
    target: &'b str,
    http11: bool,
    headers: impl Iterator<Item = (&'b str, &'b [u8])>,
) -> Result<Upgrade<'b>, HttpRefusal> {
    if method != "GET" {
        return Err(HttpRefusal {
            status: 405,
            reason: "a WebSocket upgrade is a GET request",
            headers: &[("allow", "GET")],
            retry_after: None,
        });
    }
    if !http11 {
        return Err(HttpRefusal::bad("a WebSocket upgrade needs HTTP/1.1"));
    }
    let h = scan(headers)?;
    if !h.upgrade || !h.connection_upgrade {
        return Err(HttpRefusal::NOT_AN_UPGRADE);
    }
    if h.version.map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(HttpRefusal::WRONG_VERSION);
    }
    let key = match h.key.map(<[u8]>::trim_ascii) {
        Some(k) if valid_key(k) => k,
        Some(_) => return Err(HttpRefusal::bad("invalid Sec-WebSocket-Key")),
        None => return Err(HttpRefusal::bad("missing Sec-WebSocket-Key")),
    };
    let (host, origin) = h.host_origin()?;
    let hello = h.hello;
    let (path, query) = split_target(target)?;
    Ok(Upgrade {
        path,
        query,
        key,
        host,
        origin,
        hello,
    })
}

/// The header lines an upgrade or a fallback `open` is checked by.
#[derive(Default)]
struct Scanned<'b> {
    upgrade: bool,
    connection_upgrade: bool,
    version: Option<&'b [u8]>,
    key: Option<&'b [u8]>,
    host: Option<&'b [u8]>,
    origin: Option<&'b [u8]>,
    hello: Option<&'b [u8]>,
}

/// Reads the header lines a request is checked by; a line that may appear
/// once and appears twice is a 400.
fn scan<'b>(
    headers: impl Iterator<Item = (&'b str, &'b [u8])>,
) -> Result<Scanned<'b>, HttpRefusal> {
    let mut h = Scanned::default();
    for (name, value) in headers {
        let once = |slot: &mut Option<&'b [u8]>, why: &'static str| {
            if slot.replace(value).is_some() {
                Err(HttpRefusal::bad(why))
            } else {
                Ok(())
            }
        };
        if name.eq_ignore_ascii_case("upgrade") {
            h.upgrade |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            h.connection_upgrade |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            once(&mut h.version, "more than one Sec-WebSocket-Version")?;
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            once(&mut h.key, "more than one Sec-WebSocket-Key")?;
        } else if name.eq_ignore_ascii_case("host") {
            once(&mut h.host, "more than one Host")?;
        } else if name.eq_ignore_ascii_case("origin") {
            once(&mut h.origin, "more than one Origin")?;
        } else if name.eq_ignore_ascii_case(kitestring_core::wire::HELLO_HEADER)
            && h.hello.is_none()
        {
            h.hello = Some(value);
        }
    }
    Ok(h)
}

impl<'b> Scanned<'b> {
    /// The `Host` (required) and `Origin` (if any), as text.
    fn host_origin(&self) -> Result<(&'b str, Option<&'b str>), HttpRefusal> {
        let host = match self.host.map(|h| std::str::from_utf8(h.trim_ascii())) {
            Some(Ok(h)) if !h.is_empty() => h,
            _ => return Err(HttpRefusal::bad("missing or invalid Host")),
        };
        let origin = match self.origin.map(|o| std::str::from_utf8(o.trim_ascii())) {
            None => None,
            Some(Ok(o)) => Some(o),
            Some(Err(_)) => return Err(HttpRefusal::bad("invalid Origin")),
        };
        Ok((host, origin))
    }
}

/// What a request of the HTTP fallback asks for (PROTOCOL.md, section 1.1).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FallbackAsk {
    /// `POST ?kitestring-http=open`: a new connection.
    Open,
    /// `GET ?kitestring-http=ID&kitestring-n=N`: the connection's next frames.
    Poll { id: String, n: u64 },
    /// `POST ?kitestring-http=ID&kitestring-n=N`: frames for the server.
    Send { id: String, n: u64 },
    /// `OPTIONS`: a browser's CORS preflight.
    Preflight,
}

/// The fallback request a method and query make, `None` if the query has
/// no [`HTTP_PARAM`](kitestring_core::wire::records::HTTP_PARAM) (an
/// upgrade, or a stray request), or the refusal of a malformed one.
pub(crate) fn fallback_ask(
    method: &str,
    query: Option<&str>,
) -> Option<Result<FallbackAsk, HttpRefusal>> {
    use kitestring_core::wire::records::{HTTP_PARAM, HTTP_SEQ_PARAM};
    let which = query_value(query?, HTTP_PARAM)?;
    let which = match String::from_utf8(which) {
        Ok(w) => w,
        Err(_) => return Some(Err(HttpRefusal::bad("invalid kitestring-http"))),
    };
    if method == "OPTIONS" {
        return Some(Ok(FallbackAsk::Preflight));
    }
    if which == "open" {
        return Some(match method {
            "POST" => Ok(FallbackAsk::Open),
            _ => Err(HttpRefusal {
                status: 405,
                reason: "a fallback connection is opened with POST",
                headers: &[("allow", "POST, OPTIONS")],
                retry_after: None,
            }),
        });
    }
    let n = query
        .and_then(|q| query_value(q, HTTP_SEQ_PARAM))
        .and_then(|n| std::str::from_utf8(&n).ok()?.parse::<u64>().ok());
    let Some(n) = n else {
        return Some(Err(HttpRefusal::bad("missing or invalid kitestring-n")));
    };
    Some(match method {
        "GET" => Ok(FallbackAsk::Poll { id: which, n }),
        "POST" => Ok(FallbackAsk::Send { id: which, n }),
        _ => Err(HttpRefusal {
            status: 405,
            reason: "a fallback connection is polled with GET and written with POST",
            headers: &[("allow", "GET, POST, OPTIONS")],
            retry_after: None,
        }),
    })
}

/// Checks a fallback `open`: the same `Host`, `Origin` and `hello` header
/// rules as an upgrade's; there is no key.
pub(crate) fn check_open<'b>(
    target: &'b str,
    headers: impl Iterator<Item = (&'b str, &'b [u8])>,
) -> Result<Upgrade<'b>, HttpRefusal> {
    let h = scan(headers)?;
    let (host, origin) = h.host_origin()?;
    let (path, query) = split_target(target)?;
    Ok(Upgrade {
        path,
        query,
        key: b"",
        host,
        origin,
        hello: h.hello,
    })
}

/// The value of query parameter `name` in `query` (without the `?`),
/// percent-decoded (`+` as a space), if present: the first one.
pub(crate) fn query_value(query: &str, name: &str) -> Option<Vec<u8>> {
    let raw = query
        .split('&')
        .find_map(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if kv == name => Some(""),
            _ => None,
        })?
        .as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' if i + 2 < raw.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(raw[i + 1]), hex(raw[i + 2])) {
                    (Some(h), Some(l)) => {
                        // Two hex digits: below 256.
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'%'));
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    Some(out)
}

/// The path and query of a request target: origin form (`/ws?x=1`), or
/// absolute form (`http://host/ws?x=1`).
fn split_target(target: &str) -> Result<(&str, Option<&str>), HttpRefusal> {
    let rest = if target.starts_with('/') {
        target
    } else if let Some((_, after)) = target.split_once("://") {
        match after.find('/') {
            Some(i) => &after[i..],
            None => "/",
        }
    } else {
        return Err(HttpRefusal::bad("invalid request target"));
    };
    let rest = rest.split('#').next().unwrap_or(rest);
    Ok(match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    })
}

/// A `Sec-WebSocket-Key`: the base64 of 16 bytes, so 22 characters, the
/// last carrying no trailing bits, and `==`.
fn valid_key(key: &[u8]) -> bool {
    let b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    key.len() == 24
        && key[..21].iter().all(|&b| b64(b))
        && matches!(key[21], b'A' | b'Q' | b'g' | b'w')
        && &key[22..] == b"=="
}

/// The request's headers as an `http::HeaderMap`, for the authentication
/// callback. Built only when there is one.
pub(crate) fn header_map(headers: &[httparse::Header<'_>]) -> Result<HeaderMap, HttpRefusal> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for h in headers {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| HttpRefusal::bad("invalid header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| HttpRefusal::bad("invalid header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// The headers of the `101` response, as (name, value): the accept key
/// derived from `key`, and the `Kitestring-Welcome` header if given (and a
/// valid header value). Both HTTP stacks answer with exactly these.
pub(crate) fn upgrade_headers<'a>(
    accept: &'a str,
    welcome: Option<&'a str>,
) -> impl Iterator<Item = (&'static str, &'a str)> {
    let welcome = welcome.filter(|w| is_visible_ascii(w.as_bytes()));
    [
        Some(("connection", "Upgrade")),
        Some(("upgrade", "websocket")),
        Some(("sec-websocket-accept", accept)),
        welcome.map(|w| (kitestring_core::wire::WELCOME_HEADER, w)),
    ]
    .into_iter()
    .flatten()
}

/// `Sec-WebSocket-Accept` for a request's key.
pub(crate) fn accept_key(key: &[u8]) -> String {
    async_tungstenite::tungstenite::handshake::derive_accept_key(key)
}

/// The `101` response, with the `Kitestring-Welcome` header if given (and
/// a valid header value).
pub(crate) fn switching_protocols(key: &[u8], welcome: Option<&str>) -> Vec<u8> {
    let accept = accept_key(key);
    let mut r = Vec::with_capacity(160 + welcome.map_or(0, |w| w.len() + 24));
    r.extend_from_slice(b"HTTP/1.1 101 Switching Protocols");
    for (name, value) in upgrade_headers(&accept, welcome) {
        r.extend_from_slice(b"\r\n");
        r.extend_from_slice(name.as_bytes());
        r.extend_from_slice(b": ");
        r.extend_from_slice(value.as_bytes());
    }
    r.extend_from_slice(b"\r\n\r\n");
    r
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn fallback_requests_are_told_apart() {
        assert_eq!(fallback_ask("GET", Some("a=1")), None);
        assert_eq!(fallback_ask("GET", None), None);
        assert_eq!(
            fallback_ask("POST", Some("t=x&kitestring-http=open")),
            Some(Ok(FallbackAsk::Open))
        );
        assert_eq!(
            fallback_ask("GET", Some("kitestring-http=ab12&kitestring-n=7")),
            Some(Ok(FallbackAsk::Poll {
                id: "ab12".into(),
                n: 7
            }))
        );
        assert_eq!(
            fallback_ask("POST", Some("kitestring-http=ab12&kitestring-n=0")),
            Some(Ok(FallbackAsk::Send {
                id: "ab12".into(),
                n: 0
            }))
        );
        assert_eq!(
            fallback_ask("OPTIONS", Some("kitestring-http=open")),
            Some(Ok(FallbackAsk::Preflight))
        );
        let status = |r: Option<Result<FallbackAsk, HttpRefusal>>| r.unwrap().unwrap_err().status;
        assert_eq!(
            status(fallback_ask("GET", Some("kitestring-http=open"))),
            405
        );
        assert_eq!(
            status(fallback_ask(
                "PUT",
                Some("kitestring-http=ab&kitestring-n=1")
            )),
            405
        );
        assert_eq!(status(fallback_ask("GET", Some("kitestring-http=ab"))), 400);
        assert_eq!(
            status(fallback_ask(
                "GET",
                Some("kitestring-http=ab&kitestring-n=-1")
            )),
            400
        );
        assert_eq!(
            status(fallback_ask(
                "GET",
                Some("kitestring-http=%ff&kitestring-n=1")
            )),
            400
        );
    }

    #[test]
    fn an_open_is_checked_as_an_upgrade_without_its_key() {
        let headers = [("Host", &b"h:1"[..]), ("Origin", b"http://h:1")];
        let req = check_open("/ws?x=1", headers.into_iter()).unwrap();
        assert_eq!((req.path, req.query, req.host), ("/ws", Some("x=1"), "h:1"));
        assert_eq!(req.origin, Some("http://h:1"));
        let twice = [("Host", &b"h"[..]), ("host", b"h")];
        assert_eq!(check_open("/", twice.into_iter()).unwrap_err().status, 400);
        assert_eq!(check_open("/", std::iter::empty()).unwrap_err().status, 400);
    }

    #[test]
    fn refusals_carry_the_servers_mark() {
        let r = String::from_utf8(HttpRefusal::new(401, "unauthorized").response()).unwrap();
        assert!(r.contains("kitestring-refusal: 401\r\n"), "{r}");
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let q = "a=1&kitestring-hello=%7B%22t%22%3A%22hello%22%7D&b=x+y%zz";
        assert_eq!(
            query_value(q, "kitestring-hello").as_deref(),
            Some(&b"{\"t\":\"hello\"}"[..])
        );
        assert_eq!(query_value(q, "b").as_deref(), Some(&b"x y%zz"[..]));
        assert_eq!(query_value(q, "c"), None);
        assert_eq!(query_value("x=%4", "x").as_deref(), Some(&b"%4"[..]));
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(extra: &str) -> String {
        format!(
            "GET /ws?x=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn check(req: &str) -> Result<(), HttpRefusal> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        parse(req.as_bytes(), &mut headers).map(|_| ())
    }

    #[test]
    fn a_good_request_parses() {
        let req = request("Origin: https://example.com\r\nKitestring-Hello: {}\r\n");
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (u, all) = parse(req.as_bytes(), &mut headers).unwrap();
        assert_eq!((u.path, u.query), ("/ws", Some("x=1")));
        assert_eq!(u.key, KEY.as_bytes());
        assert_eq!(u.host, "example.com");
        assert_eq!(u.origin, Some("https://example.com"));
        assert_eq!(u.hello, Some(&b"{}"[..]));
        assert_eq!(all.len(), 7);
        assert_eq!(header_map(all).unwrap().len(), 7);
        let r = String::from_utf8(switching_protocols(u.key, Some("{\"t\":1}"))).unwrap();
        assert!(r.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(r.ends_with("kitestring-welcome: {\"t\":1}\r\n\r\n"));
    }

    #[test]
    fn a_retry_after_is_whole_seconds_rounded_up() {
        let r = |ms| {
            let r = HttpRefusal::new(503, "later").retry_after(Duration::from_millis(ms));
            let text = String::from_utf8(r.response()).unwrap();
            (r.retry_after, text)
        };
        assert_eq!(r(10_000).0, Some(10));
        assert_eq!(r(1_500).0, Some(2));
        assert_eq!(r(0).0, Some(1));
        assert!(
            r(2_000).1.contains("\r\nretry-after: 2\r\n"),
            "{}",
            r(2_000).1
        );
        let plain = String::from_utf8(HttpRefusal::new(503, "later").response()).unwrap();
        assert!(!plain.contains("retry-after"), "{plain}");
    }

    #[test]
    fn a_welcome_goes_in_the_101_only_as_a_valid_header_value() {
        let long = format!("{{\"t\":\"welcome\",\"pad\":\"{}\"}}", "x".repeat(300));
        for ok in ["{\"t\":1}", "{\"a\":\"b\tc ~\"}", long.as_str()] {
            assert!(is_visible_ascii(ok.as_bytes()), "{ok}");
            assert_eq!(upgrade_headers("k", Some(ok)).count(), 4, "{ok}");
        }
        // The bad byte at the end of a long value too: the check has no
        // early exit, so every byte must count.
        for bad in ["a\r\nb", "caf\u{e9}", "\u{7f}", "\0", &format!("{long}\n")] {
            assert!(!is_visible_ascii(bad.as_bytes()), "{bad:?}");
            assert_eq!(upgrade_headers("k", Some(bad)).count(), 3, "{bad:?}");
        }
    }

    #[test]
    fn bad_requests_are_refused_with_their_status() {
        let status = |req: &str| check(req).unwrap_err().status;
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 426);
        assert_eq!(
            status(&request("").replace("Version: 13", "Version: 8")),
            426
        );
        assert_eq!(
            status(&request("").replace("Sec-WebSocket-Version: 13\r\n", "")),
            426
        );
        assert_eq!(status(&request("").replace(KEY, "AAAA")), 400);
        assert_eq!(
            status(&request("").replace(KEY, "dGhlIHNhbXBsZSBub25jZR==")),
            400
        );
        assert_eq!(
            status(&request("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "")),
            400
        );
        assert_eq!(
            status(&request("").replace("Host: example.com\r\n", "")),
            400
        );
        assert_eq!(status(&request("Host: other\r\n")), 400);
        assert_eq!(status(&request("").replace("GET", "POST")), 405);
        assert_eq!(status(&request("").replace("HTTP/1.1", "HTTP/1.0")), 400);
        assert_eq!(status("GET /\0 HTTP/1.1\r\n\r\n"), 400);
        let many: String = (0..MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(status(&request(&many)), 431);
    }

    #[test]
    fn keys() {
        assert!(valid_key(KEY.as_bytes()));
        assert!(!valid_key(b"dGhlIHNhbXBsZSBub25jZQ="));
        assert!(!valid_key(b"dGhlIHNhbXBsZSBub25jZQ!="));
        assert!(!valid_key(b"AAAAAAAAAAAAAAAAAAAAAAAA"));
    }
}
