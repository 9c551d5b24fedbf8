//! Every `tracing` span Kitestring opens, printed as it opens and closes:
//! a server (`kitestring_server`), an upgrade (`kitestring_upgrade`), its
//! connection (`kitestring_connection`) and a client (`kitestring_client`,
//! which records its session id once it has one), with the debug events
//! logged inside them. README.md, section "Tracing", lists the spans and
//! their fields. Run with `cargo run -p kitestring-tokio --example tracing`.

use std::time::Duration;

use futures_util::StreamExt;
use kitestring::{ClientOptions, Event, ServerEvent, ServerOptions};
use tracing_subscriber::fmt::format::FmtSpan;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
        .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
        .with_target(false)
        .init();

    let rt = kitestring_tokio::runtime();
    let (server, mut server_events) =
        kitestring::bind(rt.clone(), "127.0.0.1:0".parse()?, ServerOptions::default())?;
    let url = format!("ws://{}/ws", server.local_addr().ok_or("no address")?);
    let echo = server.clone();
    tokio::spawn(async move {
        while let Some(event) = server_events.next().await {
            if let ServerEvent::Message { session, message } = event {
                let _ = echo.send_payload(session, message.payload).await;
            }
        }
    });

    let (client, mut events) = kitestring::connect(rt, &url, ClientOptions::default())?;
    client.send(&"hello").await?;
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.next().await {
            if let Event::Message(_) = event {
                break;
            }
        }
    })
    .await?;
    client.close().await?;
    server.shutdown().await?;
    // Let the connection's task finish, so its span closes in the output.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
