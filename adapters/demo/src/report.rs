//! The status line and the final report.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::ledger::{Direction, IncidentKind, Ledger, Percentiles, Totals, Verdict};

/// Everything the final report says.
#[derive(Clone, Debug)]
pub struct Report {
    /// Running totals at the end.
    pub totals: Totals,
    /// Client to server.
    pub up: Verdict,
    /// Server to client.
    pub down: Verdict,
    /// Latency client to server.
    pub latency_up: Percentiles,
    /// Latency server to client.
    pub latency_down: Percentiles,
    /// `(cuts, black holes)` injected.
    pub faults: (u64, u64),
    /// Why client connections dropped, and how often.
    pub causes: BTreeMap<String, u64>,
    /// Server-side detach codes and how often each happened.
    pub detaches: BTreeMap<u16, u64>,
    /// Each lost session, as the library reported it.
    pub lost_sessions: Vec<(usize, String)>,
    /// Whether everything drained before the deadline.
    pub drained: bool,
    /// How long the drain took.
    pub drain_time: Duration,
}

impl Report {
    /// Reads the ledger.
    pub fn collect(
        ledger: &Ledger,
        faults: (u64, u64),
        drained: bool,
        drain_time: Duration,
    ) -> Report {
        let mut causes = BTreeMap::new();
        let mut detaches = BTreeMap::new();
        let mut lost_sessions = Vec::new();
        for i in ledger.incidents() {
            match i.kind {
                IncidentKind::Reconnecting(c) => *causes.entry(c).or_insert(0) += 1,
                IncidentKind::Detached(code) => *detaches.entry(code.0).or_insert(0) += 1,
                IncidentKind::SessionLost(why) => lost_sessions.push((i.client, why)),
                _ => {}
            }
        }
        Report {
            totals: ledger.totals(),
            up: ledger.verdict(Direction::Up, None),
            down: ledger.verdict(Direction::Down, None),
            latency_up: ledger.latency(Direction::Up),
            latency_down: ledger.latency(Direction::Down),
            faults,
            causes,
            detaches,
            lost_sessions,
            drained,
            drain_time,
        }
    }

    /// Messages lost, both directions.
    pub fn lost(&self) -> u64 {
        self.up.lost + self.down.lost
    }

    /// Extra deliveries, both directions.
    pub fn duplicated(&self) -> u64 {
        self.up.duplicated + self.down.duplicated
    }

    /// Whether the run kept every promise: nothing lost, duplicated,
    /// reordered or delivered out of nowhere.
    pub fn ok(&self) -> bool {
        self.lost() == 0
            && self.duplicated() == 0
            && self.up.out_of_order + self.down.out_of_order == 0
            && self.up.unexpected + self.down.unexpected == 0
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        writeln!(
            f,
            "faults injected: {} cuts, {} black holes",
            self.faults.0, self.faults.1
        )?;
        let drops: u64 = self.causes.values().sum();
        let causes: Vec<String> = self
            .causes
            .iter()
            .map(|(c, n)| format!("{c}: {n}"))
            .collect();
        writeln!(
            f,
            "connection drops seen by clients: {drops}{}",
            if causes.is_empty() {
                String::new()
            } else {
                format!(" ({})", causes.join(", "))
            }
        )?;
        writeln!(f, "reconnects: {}", t.reconnects)?;
        writeln!(f, "resumes: {}", t.resumes)?;
        if !self.detaches.is_empty() {
            let d: Vec<String> = self
                .detaches
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            writeln!(f, "server-side detaches by close code: {}", d.join(", "))?;
        }
        if t.refused_full > 0 {
            writeln!(
                f,
                "sends refused while a queue was full (retried, not lost): {}",
                t.refused_full
            )?;
        }
        if t.failed > 0 {
            writeln!(f, "clients that entered Failed: {}", t.failed)?;
        }
        writeln!(f, "sessions lost: {}", t.sessions_lost)?;
        for (client, why) in &self.lost_sessions {
            writeln!(f, "  client {client}: {why}")?;
        }
        for (dir, v, p) in [
            (Direction::Up, &self.up, &self.latency_up),
            (Direction::Down, &self.down, &self.latency_down),
        ] {
            writeln!(
                f,
                "{}: sent {}, delivered {}, latency p50 {}, p90 {}, p99 {}, max {}",
                dir.label(),
                v.accepted,
                v.delivered,
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.max)
            )?;
            if v.named > 0 {
                writeln!(
                    f,
                    "  reported unconfirmed by the library (not counted as lost): {} ({} of them arrived anyway)",
                    v.named, v.named_but_delivered
                )?;
            }
            if v.out_of_order > 0 || v.unexpected > 0 {
                writeln!(
                    f,
                    "  OUT OF ORDER: {}, DELIVERED BUT NEVER SENT: {}",
                    v.out_of_order, v.unexpected
                )?;
            }
            if !v.clients_with_loss.is_empty() {
                writeln!(f, "  clients with losses: {:?}", v.clients_with_loss)?;
            }
        }
        if self.drained {
            writeln!(f, "drained in {}", ms(self.drain_time))?;
        } else {
            writeln!(
                f,
                "NOT DRAINED after {}: undelivered messages count as lost",
                ms(self.drain_time)
            )?;
        }
        writeln!(f, "messages sent: {}", t.sent_up + t.sent_down)?;
        writeln!(
            f,
            "messages delivered: {}",
            self.up.delivered + self.down.delivered
        )?;
        writeln!(f, "lost: {}", self.lost())?;
        write!(f, "duplicated: {}", self.duplicated())
    }
}

/// One status line: elapsed time, traffic, reconnects, faults.
pub fn status_line(elapsed: Duration, t: &Totals, faults: (u64, u64), outstanding: u64) -> String {
    format!(
        "[{:>5.1}s] sent {} / delivered {}   in flight {}   reconnects {}   resumes {}   faults {} cut, {} black hole",
        elapsed.as_secs_f64(),
        t.sent_up + t.sent_down,
        t.delivered_up + t.delivered_down,
        outstanding,
        t.reconnects,
        t.resumes,
        faults.0,
        faults.1
    )
}
