//! Opening one connection for the driver task: TCP through the runtime, TLS
//! for `wss://`, and the upgrade request carrying the client's `hello` and a
//! fresh token; when the upgrade is blocked on the way and the choice
//! allows it, the HTTP fallback's `open` instead (`http.rs`); probes that
//! test whether upgrades go through again; and tungstenite's errors as the
//! core's transport errors.
//!
//! A connection attempt is a future the driver task polls. Nothing here
//! touches the shared state or the core machine, and nothing here decides
//! which transport to try: the driver task's `TransportChoice` does.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use async_tungstenite::tungstenite::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use async_tungstenite::tungstenite::{Error as WsError, Message};
use futures_util::{Sink, Stream};
use kitestring_core::client::transport::{upgrade_blocked, TransportKind};
use kitestring_core::client::TransportError;
use kitestring_core::wire;
use smallvec::SmallVec;
use tracing::debug;

use crate::runtime::{BoxFuture, BoxIo, Runtime};
use crate::util::Target;
use crate::ws::{ClientTls, Ws};

use super::http::{self, Endpoint, HttpClient, HttpLink};
use super::upgrade::{self, UpgradeError};
use super::TokenProvider;

/// An attempt under way: what it opened, or why not.
pub(super) type Opening = BoxFuture<'static, Result<Opened, TransportError>>;

/// An open connection: its carrier, the [`wire::WELCOME_HEADER`] of the
/// answer, if any, and whether the upgrade was blocked and the fallback
/// carries it instead.
pub(super) struct Opened {
    pub(super) link: Link,
    pub(super) welcome: Option<String>,
    pub(super) fell_back: bool,
}

/// What carries a connection: a WebSocket or the HTTP fallback; read and
/// written the same way.
pub(crate) enum Link {
    /// A WebSocket.
    Ws(Box<Ws>),
    /// The HTTP fallback.
    Http(HttpLink),
}

impl Link {
    pub(super) fn kind(&self) -> TransportKind {
        match self {
            Link::Ws(_) => TransportKind::WebSocket,
            Link::Http(_) => TransportKind::Http,
        }
    }
}

impl Stream for Link {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Link::Ws(ws) => Pin::new(&mut **ws).poll_next(cx),
            Link::Http(h) => Pin::new(h).poll_next(cx),
        }
    }
}

impl Sink<Message> for Link {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        match self.get_mut() {
            Link::Ws(ws) => Pin::new(&mut **ws).poll_ready(cx),
            Link::Http(h) => Pin::new(h).poll_ready(cx),
        }
    }

    fn start_send(self: Pin<&mut Self>, m: Message) -> Result<(), WsError> {
        match self.get_mut() {
            Link::Ws(ws) => Pin::new(&mut **ws).start_send(m),
            Link::Http(h) => Pin::new(h).start_send(m),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        match self.get_mut() {
            Link::Ws(ws) => Pin::new(&mut **ws).poll_flush(cx),
            Link::Http(h) => Pin::new(h).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        match self.get_mut() {
            Link::Ws(ws) => Pin::new(&mut **ws).poll_close(cx),
            Link::Http(h) => Pin::new(h).poll_close(cx),
        }
    }
}

/// How a probe of WebSocket went.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Probe {
    /// The upgrade went through.
    Passed,
    /// Blocked on the way, as before.
    Blocked,
    /// Failed otherwise (the server is down, say): no news.
    Failed,
}

/// Everything needed to open one WebSocket.
pub(super) struct Connector {
    pub(super) runtime: Arc<dyn Runtime>,
    pub(super) target: Target,
    pub(super) uri: Uri,
    pub(super) tls: Option<ClientTls>,
    pub(super) token: Option<TokenProvider>,
    pub(super) token_header: String,
    pub(super) token_prefix: String,
    pub(super) ws_config: async_tungstenite::tungstenite::protocol::WebSocketConfig,
    /// The `hello` goes in the URL, not in a header.
    pub(super) hello_in_url: bool,
}

/// The `hello` for one connection: where it goes in the request.
pub(super) enum RequestHello {
    /// Not in the request: it goes as the first frame.
    None,
    /// In the `Kitestring-Hello` header; the answer in the `101`'s.
    Header(String),
    /// In the URL's query; the answer is the first frame.
    Url(String),
}

/// `value` percent-encoded for a URL's query: everything but the
/// unreserved characters of RFC 3986.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Connector {
    /// Opens a connection, `hello` in its request: a WebSocket if `first`
    /// says so, falling back to HTTP when the upgrade is blocked on the way
    /// and `may_fall_back`; the fallback at once if `first` is HTTP.
    pub(super) async fn open(
        self: Arc<Self>,
        hello: RequestHello,
        first: TransportKind,
        may_fall_back: bool,
    ) -> Result<Opened, TransportError> {
        let token = self.token().await?;
        if first == TransportKind::Http {
            let (link, welcome) = self.open_http(&hello, token.as_ref()).await?;
            return Ok(Opened {
                link: Link::Http(link),
                welcome,
                fell_back: false,
            });
        }
        match self.open_ws(&hello, token.clone()).await {
            Ok((ws, welcome)) => Ok(Opened {
                link: Link::Ws(Box::new(ws)),
                welcome,
                fell_back: false,
            }),
            Err((e, true)) if may_fall_back => {
                debug!(error = ?e, "the WebSocket upgrade was blocked on the way; trying the HTTP fallback");
                match self.open_http(&hello, token.as_ref()).await {
                    Ok((link, welcome)) => Ok(Opened {
                        link: Link::Http(link),
                        welcome,
                        fell_back: true,
                    }),
                    // The server's own admission decision says more;
                    // any other answer (a server without the fallback,
                    // 404, 405, 426) leaves the upgrade's failure.
                    Err(
                        http_e @ TransportError::Http {
                            status: 401 | 403 | 429 | 503,
                            ..
                        },
                    ) => Err(http_e),
                    Err(http_e) => {
                        debug!(error = ?http_e, "the HTTP fallback failed too");
                        Err(e)
                    }
                }
            }
            Err((e, _)) => Err(e),
        }
    }

    /// Tests whether WebSocket upgrades go through: a bare upgrade (no
    /// `hello`), closed at once with 1000.
    pub(super) async fn probe(self: Arc<Self>) -> Probe {
        let token = match self.token().await {
            Ok(t) => t,
            Err(_) => return Probe::Failed,
        };
        match self.open_ws(&RequestHello::None, token).await {
            Ok((mut ws, _)) => {
                let _ = ws
                    .close(Some(crate::ws::close_frame(
                        kitestring_core::close::CloseCode::NORMAL,
                        "probe",
                    )))
                    .await;
                Probe::Passed
            }
            Err((_, true)) => Probe::Blocked,
            Err(_) => Probe::Failed,
        }
    }

    /// A fresh credential for one attempt, as the header value.
    async fn token(&self) -> Result<Option<(HeaderName, HeaderValue)>, TransportError> {
        let Some(provider) = &self.token else {
            return Ok(None);
        };
        let Some(token) = provider().await else {
            return Ok(None);
        };
        let value = HeaderValue::from_str(&format!("{}{}", self.token_prefix, token))
            .map_err(|e| TransportError::Io(format!("token is not a valid header: {e}")))?;
        let name = HeaderName::from_bytes(self.token_header.as_bytes())
            .map_err(|e| TransportError::Io(format!("bad token header name: {e}")))?;
        Ok(Some((name, value)))
    }

    /// TCP, and TLS for `wss://`.
    async fn open_io(self: Arc<Self>) -> Result<BoxIo, TransportError> {
        let tcp = self
            .runtime
            .connect_tcp(self.target.host.clone(), self.target.port)
            .await
            .map_err(|e| TransportError::Io(e.to_string()))?;
        match (&self.tls, self.target.tls) {
            (Some(tls), true) => {
                let name = rustls_pki_types::ServerName::try_from(self.target.host.clone())
                    .map_err(|e| TransportError::Tls(e.to_string()))?;
                let stream = futures_rustls::TlsConnector::from(tls.config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| TransportError::Tls(e.to_string()))?;
                Ok(Box::new(stream))
            }
            _ => Ok(tcp),
        }
    }

    /// Opens the WebSocket; `hello` goes in the upgrade request. Returns the
    /// socket and the server's answer to `hello`, if it gave one; or the
    /// error, and whether the upgrade was blocked on the way.
    async fn open_ws(
        self: &Arc<Self>,
        hello: &RequestHello,
        token: Option<(HeaderName, HeaderValue)>,
    ) -> Result<(Ws, Option<String>), (TransportError, bool)> {
        let no = |e: TransportError| (e, false);
        let target = match hello {
            RequestHello::Url(h) => {
                let sep = if self.uri.query().is_some() { '&' } else { '?' };
                Cow::Owned(format!(
                    "{}{sep}{}={}",
                    self.path_and_query(),
                    wire::HELLO_PARAM,
                    percent_encode(h)
                ))
            }
            _ => self.path_and_query(),
        };
        let mut headers: SmallVec<[(&str, &[u8]); 2]> = SmallVec::new();
        if let RequestHello::Header(h) = hello {
            headers.push((wire::HELLO_HEADER, h.as_bytes()));
        }
        if let Some((name, value)) = &token {
            headers.push((name.as_str(), value.as_bytes()));
        }
        let request = upgrade::Request::new(&target, self.host(), &headers);
        let io = self.clone().open_io().await.map_err(no)?;
        upgrade::upgrade(io, request, self.ws_config)
            .await
            .map_err(|e| match e {
                UpgradeError::Status {
                    status,
                    retry_after,
                    refusal,
                } => (
                    TransportError::Http {
                        status,
                        retry_after,
                    },
                    upgrade_blocked(status, refusal),
                ),
                UpgradeError::Io(e) => no(TransportError::Io(e.to_string())),
                UpgradeError::Invalid(why) => no(TransportError::WebSocket(why.into())),
            })
    }

    /// The URL's path and query, as the request's target.
    fn path_and_query(&self) -> Cow<'_, str> {
        request_target(&self.uri)
    }

    /// The URL's authority without user information: the `Host` header.
    fn host(&self) -> &str {
        host_of(&self.uri)
    }

    /// Opens a connection over the HTTP fallback.
    async fn open_http(
        self: &Arc<Self>,
        hello: &RequestHello,
        token: Option<&(HeaderName, HeaderValue)>,
    ) -> Result<(HttpLink, Option<String>), TransportError> {
        let mut headers = HeaderMap::new();
        let host = match self.uri.port_u16() {
            Some(p) => format!("{}:{p}", self.target.host),
            None => self.target.host.clone(),
        };
        if let Ok(v) = HeaderValue::from_str(&host) {
            headers.insert("host", v);
        }
        if let Some((name, value)) = token {
            headers.insert(name.clone(), value.clone());
        }
        let endpoint = Endpoint {
            uri: self.uri.clone(),
            headers,
        };
        let opener = self.clone();
        let open_io: Arc<
            dyn Fn() -> BoxFuture<'static, Result<BoxIo, TransportError>> + Send + Sync,
        > = Arc::new(move || Box::pin(opener.clone().open_io()));
        let (query, header) = match hello {
            RequestHello::Url(h) => (Some(percent_encode(h)), None),
            RequestHello::Header(h) => (None, Some(h.clone())),
            RequestHello::None => (None, None),
        };
        http::open(
            self.runtime.clone(),
            HttpClient::new(self.runtime.clone(), open_io.clone()),
            HttpClient::new(self.runtime.clone(), open_io),
            endpoint,
            query,
            header,
        )
        .await
    }
}

/// The request target for `uri`: its path and query, the path `/` when
/// the URL has none (`ws://host`, `ws://host?a=1`).
fn request_target(uri: &Uri) -> Cow<'_, str> {
    match uri.path_and_query().map(|p| p.as_str()) {
        Some(p) if p.starts_with('/') => Cow::Borrowed(p),
        Some(p) => Cow::Owned(format!("/{p}")),
        None => Cow::Borrowed("/"),
    }
}

/// The URL's authority without user information: the `Host` header.
fn host_of(uri: &Uri) -> &str {
    let authority = uri.authority().map_or("", |a| a.as_str());
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
}

/// A tungstenite error as the core's transport error.
pub(crate) fn transport_error(e: WsError) -> TransportError {
    match e {
        WsError::Http(response) => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            TransportError::Http {
                status: response.status().as_u16(),
                retry_after,
            }
        }
        WsError::Io(e) => TransportError::Io(e.to_string()),
        WsError::Tls(e) => TransportError::Tls(e.to_string()),
        other => TransportError::WebSocket(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_target_and_host_come_from_the_url() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        for (url, target, host) in [
            ("ws://h:1", "/", "h:1"),
            ("ws://h:1/", "/", "h:1"),
            ("ws://h?a=1", "/?a=1", "h"),
            ("wss://user:pw@h.example/p/q?x=y", "/p/q?x=y", "h.example"),
            ("ws://[::1]:9/ws", "/ws", "[::1]:9"),
        ] {
            assert_eq!(request_target(&uri(url)), target, "{url}");
            assert_eq!(host_of(&uri(url)), host, "{url}");
        }
    }

    #[test]
    fn a_hello_survives_the_url() {
        let hello = r#"{"t":"hello","client":"ab","caps":["a b"],"x":"é&="}"#;
        let enc = percent_encode(hello);
        assert!(enc
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"%-_.~".contains(&b)));
        assert!(format!("ws://h/ws?{}={enc}", wire::HELLO_PARAM)
            .parse::<Uri>()
            .is_ok());
    }
}
