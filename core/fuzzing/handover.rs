//! Body of the `session_image` target: arbitrary bytes read as a
//! [`SessionImage`] (MessagePack or JSON, as a backplane stores them) and
//! imported into a server.
//!
//! An image from storage is hostile input: importing one must never panic,
//! must leave the server unchanged when it is refused, and a session it
//! made must export again into an image that any other server imports,
//! holding the same messages.

use crate::config::ServerConfig;
use crate::server::{Server, SessionImage};
use crate::time::Instant;

/// A server small enough that the image checks' bounds are reached.
fn server() -> Server {
    let mut config = ServerConfig {
        max_sessions: 4,
        max_rooms_per_session: 4,
        ..ServerConfig::default()
    };
    config.queue.max_messages = 16;
    config.reliability.window_messages = 16;
    Server::new(config).unwrap_or_else(|e| panic!("the target's config is invalid: {e}"))
}

/// The target: `data` as an image, imported.
pub fn session_image(data: &[u8]) {
    let image = rmp_serde::from_slice::<SessionImage>(data)
        .ok()
        .or_else(|| serde_json::from_slice::<SessionImage>(data).ok());
    let Some(image) = image else {
        return;
    };
    let now = Instant::from_secs(1);
    let mut a = server();
    let Ok(id) = a.import_session(now, &image) else {
        assert_eq!(a.session_count(), 0, "a refused image left a session");
        assert!(a.poll_output().is_none(), "a refused image made output");
        return;
    };
    assert_eq!(image.session(), Some(id));
    assert!(a.session(id).is_some(), "an imported session is not there");
    let again = a
        .export_session(now, id)
        .unwrap_or_else(|| panic!("an imported session does not export"));
    assert_eq!(again.unconfirmed(), image.unconfirmed());
    assert_eq!(a.session_count(), 0);
    let mut b = server();
    if let Err(e) = b.import_session(now, &again) {
        panic!("a re-exported image does not import: {e}\n{again:?}");
    }
}
