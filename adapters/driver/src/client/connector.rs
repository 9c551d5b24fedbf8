//! Opening one WebSocket for the driver task: TCP through the runtime, TLS
//! for `wss://`, and the upgrade request carrying the client's `hello` and a
//! fresh token; and tungstenite's errors as the core's transport errors.
//!
//! A connection attempt is a future the driver task polls. Nothing here
//! touches the shared state or the core machine.

use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::{HeaderValue, Uri};
use async_tungstenite::tungstenite::Error as WsError;
use bytes::Bytes;
use kitestring_core::client::TransportError;
use kitestring_core::wire;

use crate::runtime::{BoxFuture, BoxIo, Runtime};
use crate::util::Target;
use crate::ws::{ClientTls, Ws};

use super::TokenProvider;

/// An upgrade under way: the socket and the response's
/// [`wire::WELCOME_HEADER`], if any.
pub(super) type Opening = BoxFuture<'static, Result<(Ws, Option<String>), TransportError>>;

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
    /// Opens the WebSocket; `hello` goes in the upgrade request. Returns the
    /// socket and the server's answer to `hello`, if it gave one.
    pub(super) async fn open(
        self: Arc<Self>,
        hello: RequestHello,
    ) -> Result<(Ws, Option<String>), TransportError> {
        let uri = match &hello {
            RequestHello::Url(h) => {
                let sep = if self.uri.query().is_some() { '&' } else { '?' };
                let with = format!(
                    "{}{sep}{}={}",
                    self.uri,
                    wire::HELLO_PARAM,
                    percent_encode(h)
                );
                with.parse::<Uri>().map_err(|e| {
                    TransportError::WebSocket(format!("the URL with its hello: {e}"))
                })?
            }
            _ => self.uri.clone(),
        };
        let mut request = uri
            .into_client_request()
            .map_err(|e| TransportError::WebSocket(e.to_string()))?;
        // The header takes the string's buffer as it is.
        if let RequestHello::Header(h) = hello {
            if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(h)) {
                request.headers_mut().insert(wire::HELLO_HEADER, value);
            }
        }
        if let Some(provider) = &self.token {
            if let Some(token) = provider().await {
                let value = HeaderValue::from_str(&format!("{}{}", self.token_prefix, token))
                    .map_err(|e| TransportError::Io(format!("token is not a valid header: {e}")))?;
                let name = async_tungstenite::tungstenite::http::HeaderName::from_bytes(
                    self.token_header.as_bytes(),
                )
                .map_err(|e| TransportError::Io(format!("bad token header name: {e}")))?;
                request.headers_mut().insert(name, value);
            }
        }
        let tcp = self
            .runtime
            .connect_tcp(self.target.host.clone(), self.target.port)
            .await
            .map_err(|e| TransportError::Io(e.to_string()))?;
        let io: BoxIo = match (&self.tls, self.target.tls) {
            (Some(tls), true) => {
                let name = rustls_pki_types::ServerName::try_from(self.target.host.clone())
                    .map_err(|e| TransportError::Tls(e.to_string()))?;
                let stream = futures_rustls::TlsConnector::from(tls.config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| TransportError::Tls(e.to_string()))?;
                Box::new(stream)
            }
            _ => tcp,
        };
        let (ws, response) =
            async_tungstenite::client_async_with_config(request, io, Some(self.ws_config))
                .await
                .map_err(transport_error)?;
        let welcome = response
            .headers()
            .get(wire::WELCOME_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((ws, welcome))
    }
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
