//! Who may upgrade: what an authenticator sees of the upgrade request
//! ([`AuthRequest`]), the [`Authenticator`] and its verdict ([`AuthReject`]),
//! the [`TokenValidator`] of fresh tokens, and the [`OriginPolicy`] that
//! refuses cross-site upgrades.
//!
//! Nothing here touches a socket, the server's state or its lock. The
//! callbacks may be synchronous (run inline) or asynchronous (awaited by the
//! one connection's upgrade task, bounded by `ServerOptions::auth_timeout`):
//! this module only wraps them; it never runs one under the server's lock
//! and never awaits one itself.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use async_tungstenite::tungstenite::http::{Extensions, HeaderMap};

use crate::runtime::BoxFuture;

/// What the upgrade authenticator sees of the HTTP request.
///
/// Built only when an [`Authenticator`] is configured. Requests upgraded
/// through a hyper-based server (`ServerHandle::upgrade`) carry that
/// server's request extensions, so what a middleware or an extractor put
/// there (the user a login layer found, say) is at hand in
/// [`extensions`](Self::extensions).
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct AuthRequest {
    /// The request path, e.g. `/ws`.
    pub path: String,
    /// The query string without `?`, if any.
    pub query: Option<String>,
    /// Every request header.
    pub headers: HeaderMap,
    /// The request's extensions: empty for connections accepted by the
    /// built-in listener, the HTTP framework's own for requests it handed
    /// over.
    pub extensions: Extensions,
    /// The peer's address, when known.
    pub peer: Option<SocketAddr>,
}

impl AuthRequest {
    /// A request for `path` with `headers` (for testing authenticators, and
    /// for re-authentication, which has no request of its own).
    pub fn new(path: impl Into<String>, query: Option<String>, headers: HeaderMap) -> Self {
        AuthRequest {
            path: path.into(),
            query,
            headers,
            extensions: Extensions::new(),
            peer: None,
        }
    }

    /// Cookies from the `Cookie` headers, as `(name, value)` pairs.
    pub fn cookies(&self) -> Vec<(String, String)> {
        self.headers
            .get_all("cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim().to_owned(), v.trim().to_owned()))
            })
            .collect()
    }

    /// The value of cookie `name`, if present.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.cookies()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// The token of an `Authorization: Bearer <token>` header, if present.
    pub fn bearer_token(&self) -> Option<&str> {
        let v = self.headers.get("authorization")?.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }

    /// The value of query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .as_deref()?
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// A value a middleware or extractor of the HTTP framework put in the
    /// request's extensions.
    pub fn extension<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.extensions.get::<T>()
    }
}

/// Why an upgrade is refused; the peer gets the HTTP status and no
/// WebSocket frame ever flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthReject {
    /// 401: credentials missing, invalid or expired (the client retries
    /// once with a fresh token, then fails).
    Unauthorized,
    /// 403: authenticated but not allowed (the client fails at once).
    Forbidden,
    /// 503: the check could not be made now (the user database is down,
    /// say); the client retries later. Also the answer when an asynchronous
    /// check outlives `ServerOptions::auth_timeout`.
    Unavailable,
}

/// Which web pages may open a connection, judged by the upgrade request's
/// `Origin` header: the defence against cross-site WebSocket hijacking, where
/// a page on another site opens a WebSocket to this server and the browser
/// sends the user's cookies along. Browsers always send `Origin` on a
/// WebSocket upgrade; other clients (Kitestring's own, command-line tools,
/// servers) usually send none, and a request without `Origin` passes every
/// policy. A refused origin gets HTTP 403 before
/// [`ServerOptions::auth`] runs.
///
/// [`ServerOptions::auth`]: super::ServerOptions::auth
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OriginPolicy {
    /// The default: an `Origin` whose host and port equal the request's
    /// `Host` header (a missing port counts as the default port of the
    /// origin's scheme: 80 for `http`/`ws`, 443 for `https`/`wss`), as when
    /// the page and the WebSocket are served by the same host. Any other
    /// origin, `null` included, is refused.
    #[default]
    SameHost,
    /// Exactly these origins, as browsers send them (`scheme://host[:port]`,
    /// no path; compared without regard to case, a trailing `/` ignored),
    /// e.g. `https://app.example.com`. Same-host requests are not let in
    /// unless their origin is listed.
    AllowList(Vec<String>),
    /// Every origin: for servers whose authentication does not rely on
    /// anything a browser sends by itself (cookies, HTTP authentication,
    /// client certificates).
    Any,
}

impl OriginPolicy {
    /// Whether a request with these `Origin` and `Host` header values (as
    /// received, `None` when absent) may upgrade. Applications that upgrade
    /// in their own HTTP server before [`ServerHandle::accept_websocket`]
    /// can apply the same rule.
    ///
    /// [`ServerHandle::accept_websocket`]: super::ServerHandle::accept_websocket
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin.map(str::trim) else {
            return true;
        };
        match self {
            OriginPolicy::Any => true,
            OriginPolicy::AllowList(list) => list.iter().any(|allowed| {
                let allowed = allowed.trim();
                let allowed = allowed.strip_suffix('/').unwrap_or(allowed);
                allowed.eq_ignore_ascii_case(origin)
            }),
            OriginPolicy::SameHost => host.is_some_and(|host| same_host(origin, host.trim())),
        }
    }
}

/// Whether `origin` (`scheme://host[:port]`) names the host and port of a
/// `Host` header.
fn same_host(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // `null`, or not an origin
    };
    let default_port = if ["http", "ws"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
    {
        Some(80)
    } else if ["https", "wss"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
    {
        Some(443)
    } else {
        None
    };
    let (Some((o_host, o_port)), Some((h_host, h_port))) =
        (split_authority(authority), split_authority(host))
    else {
        return false;
    };
    o_host.eq_ignore_ascii_case(h_host)
        && o_port.or(default_port).is_some()
        && o_port.or(default_port) == h_port.or(default_port)
}

/// `host[:port]` (or `[v6]:port`) as the host and the port, if any; `None`
/// if malformed (a path, user info, a port that is not a number).
fn split_authority(a: &str) -> Option<(&str, Option<u16>)> {
    if a.is_empty() || a.contains(['/', '@', '?', '#', ' ']) {
        return None;
    }
    let (host, port) = if a.starts_with('[') {
        let end = a.find(']')?;
        let (host, rest) = a.split_at(end + 1);
        match rest {
            "" => (host, None),
            _ => (host, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match a.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (a, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    (!host.is_empty()).then_some((host, port))
}

/// What an authenticator or a token validator decides: `Ok(Some(identity))`,
/// `Ok(None)` for anonymous, or a rejection.
pub type AuthResult = Result<Option<String>, AuthReject>;

/// Decides, from the upgrade request, who the peer is.
///
/// Either synchronous ([`Authenticator::sync`], run inline in the
/// connection's upgrade task) or asynchronous ([`Authenticator::new`]: a
/// database or an identity provider may be asked). An asynchronous check
/// runs in the upgrade task of its own connection, so a slow one holds up
/// no other connection's upgrade; it is bounded by
/// [`ServerOptions::auth_timeout`], past which the peer gets 503. Neither
/// kind runs under the server's lock.
///
/// [`ServerOptions::auth_timeout`]: super::ServerOptions::auth_timeout
#[derive(Clone)]
pub struct Authenticator(Check<AuthRequest>);

/// A token validator or authenticator, either kind.
enum Check<T> {
    Sync(Arc<dyn Fn(&T) -> AuthResult + Send + Sync>),
    Async(Arc<dyn Fn(T) -> BoxFuture<'static, AuthResult> + Send + Sync>),
}

impl<T> Clone for Check<T> {
    fn clone(&self) -> Self {
        match self {
            Check::Sync(f) => Check::Sync(f.clone()),
            Check::Async(f) => Check::Async(f.clone()),
        }
    }
}

/// A verdict at once, or one to wait for.
pub(crate) enum Verdict {
    Ready(AuthResult),
    Pending(BoxFuture<'static, AuthResult>),
}

impl<T> Check<T> {
    fn check(&self, input: T) -> Verdict {
        match self {
            Check::Sync(f) => Verdict::Ready(f(&input)),
            Check::Async(f) => Verdict::Pending(f(input)),
        }
    }

    fn is_sync(&self) -> bool {
        matches!(self, Check::Sync(_))
    }
}

impl Authenticator {
    /// An asynchronous authenticator: `f` gets the request by value and its
    /// future may await (a database lookup, a call to an identity
    /// provider).
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = AuthResult> + Send + 'static,
    {
        Authenticator(Check::Async(Arc::new(move |req| Box::pin(f(req)))))
    }

    /// A synchronous authenticator, run inline: for checks that need
    /// nothing but the request (a signed token, a fixed list).
    pub fn sync<F>(f: F) -> Self
    where
        F: Fn(&AuthRequest) -> AuthResult + Send + Sync + 'static,
    {
        Authenticator(Check::Sync(Arc::new(f)))
    }

    pub(crate) fn check(&self, req: AuthRequest) -> Verdict {
        self.0.check(req)
    }

    pub(crate) fn is_sync(&self) -> bool {
        self.0.is_sync()
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_sync() {
            "Authenticator(sync)"
        } else {
            "Authenticator(async)"
        })
    }
}

/// Validates a token a client sent in answer to
/// [`ServerHandle::request_reauth`]: `Ok(identity)` keeps the connection
/// (the identity, if given, must match the session's), an error closes it
/// with 4401 (unauthorized), 4403 (forbidden) or 1013 (unavailable, also
/// past [`ServerOptions::auth_timeout`]: the client comes back later).
///
/// A synchronous validator runs under the server's lock, as the frame
/// carrying the token is handled; an asynchronous one runs in a task of its
/// own, and the connection carries on meanwhile.
///
/// [`ServerHandle::request_reauth`]: super::ServerHandle::request_reauth
/// [`ServerOptions::auth_timeout`]: super::ServerOptions::auth_timeout
#[derive(Clone)]
pub struct TokenValidator(Check<String>);

impl TokenValidator {
    /// An asynchronous validator.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = AuthResult> + Send + 'static,
    {
        TokenValidator(Check::Async(Arc::new(move |token| Box::pin(f(token)))))
    }

    /// A synchronous validator. It runs under the server's lock: it must
    /// be quick and must not call back into the server.
    pub fn sync<F>(f: F) -> Self
    where
        F: Fn(&str) -> AuthResult + Send + Sync + 'static,
    {
        TokenValidator(Check::Sync(Arc::new(move |token: &String| f(token))))
    }

    pub(crate) fn check(&self, token: String) -> Verdict {
        self.0.check(token)
    }

    pub(crate) fn is_sync(&self) -> bool {
        self.0.is_sync()
    }
}

impl std::fmt::Debug for TokenValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_sync() {
            "TokenValidator(sync)"
        } else {
            "TokenValidator(async)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::ServerOptions;

    #[test]
    fn origins() {
        let same = OriginPolicy::SameHost;
        let host = Some("app.example.com");
        assert!(same.allows(None, host), "no Origin: not a browser");
        assert!(same.allows(None, None));
        assert!(same.allows(Some("https://app.example.com"), host));
        assert!(same.allows(Some("https://APP.example.com"), Some("app.example.com:443")));
        assert!(same.allows(Some("http://app.example.com:80"), host));
        assert!(same.allows(Some("http://127.0.0.1:9000"), Some("127.0.0.1:9000")));
        assert!(same.allows(Some("http://[::1]:9000"), Some("[::1]:9000")));
        assert!(!same.allows(Some("https://evil.example"), host));
        assert!(!same.allows(Some("https://app.example.com:8443"), host));
        assert!(!same.allows(Some("http://app.example.com"), Some("app.example.com:443")));
        assert!(!same.allows(Some("http://127.0.0.1:9001"), Some("127.0.0.1:9000")));
        assert!(!same.allows(Some("null"), host));
        assert!(!same.allows(Some("https://app.example.com/path"), host));
        assert!(!same.allows(Some("https://app.example.com"), None));
        let list = OriginPolicy::AllowList(vec![
            "https://app.example.com".into(),
            "http://localhost:3000/".into(),
        ]);
        assert!(list.allows(None, host));
        assert!(list.allows(Some("https://app.example.com"), Some("api.example.com")));
        assert!(list.allows(Some("http://localhost:3000"), Some("api.example.com")));
        assert!(!list.allows(Some("http://localhost:3001"), Some("localhost:3001")));
        assert!(!list.allows(Some("https://evil.example"), host));
        assert!(OriginPolicy::Any.allows(Some("https://evil.example"), host));
        assert_eq!(ServerOptions::default().origins, OriginPolicy::SameHost);
    }
}
