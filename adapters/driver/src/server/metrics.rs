//! The server's metrics through the `metrics` facade (Prometheus,
//! OpenTelemetry, statsd: whatever recorder the application installed).
//!
//! It owns one task that, every [`ServerOptions::metrics_interval`], takes a
//! snapshot of the core's gauges and counters ([`Server::metrics`]) under
//! the state's lock and publishes it: the counters as absolute values, the
//! gauges as they stand. That is the only work it adds, and it must never
//! add any per message: nothing here is called from a connection task or
//! a handle call, and the per-message counters are the core's own plain
//! integers, read here once per interval. (Two events the driver sees
//! anyway are counted where they happen: refused upgrades, by status, and
//! the authenticator's duration; neither is per message.) Names and types
//! are listed in README.md, section "Metrics".
//!
//! [`ServerOptions::metrics_interval`]: super::ServerOptions::metrics_interval
//! [`Server::metrics`]: kitestring_core::server::Server::metrics

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kitestring_core::server::ServerMetrics;
use metrics::{counter, gauge};

use crate::util;

use super::shared::ServerShared;

/// Publishes the server's metrics every `interval` until the server stops.
pub(super) async fn export(shared: Arc<ServerShared>, interval: Duration) {
    loop {
        let snapshot = {
            let st = shared.lock();
            let stopped = st.stopped;
            let events = shared.event_backlog.load(Ordering::Relaxed);
            (st.metrics(&shared), st.acked, events, stopped)
        };
        let (metrics, acked, events, stopped) = snapshot;
        publish(&metrics, acked, events);
        if stopped {
            return;
        }
        util::sleep(&*shared.runtime, interval).await;
    }
}

/// Sets every metric from a snapshot.
fn publish(m: &ServerMetrics, acked: u64, events_waiting: usize) {
    let c = &m.counters;
    gauge!("kitestring_connections").set(m.connections as f64);
    gauge!("kitestring_sessions").set(m.sessions as f64);
    gauge!("kitestring_sessions_detached").set(m.detached_sessions as f64);
    gauge!("kitestring_rooms").set(m.rooms as f64);
    gauge!("kitestring_room_memberships").set(m.memberships as f64);
    gauge!("kitestring_messages_in_flight").set(m.messages_in_flight as f64);
    gauge!("kitestring_messages_queued").set(m.messages_queued as f64);
    gauge!("kitestring_history_entries").set(m.history_entries as f64);
    gauge!("kitestring_history_bytes").set(m.history_bytes as f64);
    gauge!("kitestring_events_waiting").set(events_waiting as f64);

    counter!("kitestring_connections_opened_total").absolute(c.connections_opened);
    counter!("kitestring_connections_closed_total").absolute(c.connections_closed);
    for (code, n) in &c.close_codes {
        counter!("kitestring_close_codes_total", "code" => code.to_string()).absolute(*n);
    }
    counter!("kitestring_sessions_created_total").absolute(c.sessions_created);
    counter!("kitestring_sessions_resumed_total").absolute(c.sessions_resumed);
    counter!("kitestring_resumes_failed_total").absolute(c.resumes_failed);
    counter!("kitestring_sessions_expired_total").absolute(c.sessions_expired);
    counter!("kitestring_slow_consumers_total").absolute(c.slow_consumers);
    counter!("kitestring_lag_evictions_total").absolute(c.lag_evictions);
    counter!("kitestring_lag_probes_total").absolute(c.lag_probes);
    counter!("kitestring_hellos_rejected_total").absolute(c.rejected);
    counter!("kitestring_messages_sent_total").absolute(c.delivery.messages_sent);
    counter!("kitestring_messages_retransmitted_total").absolute(c.delivery.retransmitted);
    counter!("kitestring_messages_received_total").absolute(c.delivery.messages_received);
    counter!("kitestring_messages_duplicate_total").absolute(c.delivery.duplicates);
    counter!("kitestring_messages_out_of_order_total").absolute(c.delivery.gaps);
    counter!("kitestring_acks_received_total").absolute(acked);
    counter!("kitestring_frames_in_total").absolute(c.traffic.frames_in);
    counter!("kitestring_frames_out_total").absolute(c.traffic.frames_out);
    counter!("kitestring_bytes_in_total").absolute(c.traffic.bytes_in);
    counter!("kitestring_bytes_out_total").absolute(c.traffic.bytes_out);
    counter!("kitestring_decode_failures_total").absolute(c.traffic.decode_failures);
    counter!("kitestring_heartbeat_timeouts_total").absolute(c.heartbeat_timeouts);
    counter!("kitestring_broadcasts_total").absolute(c.broadcasts);
    counter!("kitestring_rotations_total").absolute(c.rotations);
    counter!("kitestring_rate_limited_total").absolute(c.rate_limited);
    counter!("kitestring_refused_total").absolute(c.refused);
}
