//! What replication is doing, per peer, for `/v1/regions`, the metrics and the logs.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use super::consumer::Applied;

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct PeerStatus {
    /// `connecting`, `running`, `retrying` or `stopped`.
    pub state: String,
    /// Why the consumer is retrying or stopped.
    pub error: Option<String>,
    /// Highest stream sequence of this peer's stream applied here.
    pub stream_sequence: u64,
    pub events_applied: u64,
    pub conflicts: u64,
    /// Milliseconds from the newest applied event's HLC to its apply.
    pub lag_ms: Option<u64>,
    #[schema(value_type = Option<String>)]
    pub last_applied_at: Option<String>,
    pub skewed_events: u64,
}

#[derive(Default)]
struct Inner {
    peers: BTreeMap<String, PeerStatus>,
    events_published: u64,
    publisher_error: Option<String>,
}

#[derive(Default)]
pub struct ReplicationStatus {
    inner: Mutex<Inner>,
}

impl ReplicationStatus {
    fn with_peer(&self, origin: &str, f: impl FnOnce(&mut PeerStatus)) {
        let mut inner = self.inner.lock().expect("status lock");
        f(inner
            .peers
            .entry(origin.to_owned())
            .or_insert_with(|| PeerStatus {
                state: "connecting".into(),
                ..Default::default()
            }));
    }

    pub fn peer_running(&self, origin: &str) {
        self.with_peer(origin, |p| {
            p.state = "running".into();
            p.error = None;
        });
    }

    pub fn peer_error(&self, origin: &str, error: &str) {
        self.with_peer(origin, |p| {
            p.state = "retrying".into();
            p.error = Some(error.to_owned());
        });
    }

    pub fn peer_stopped(&self, origin: &str, reason: &str) {
        self.with_peer(origin, |p| {
            p.state = "stopped".into();
            p.error = Some(reason.to_owned());
        });
    }

    pub fn applied(&self, origin: &str, applied: &Applied) {
        self.with_peer(origin, |p| {
            p.stream_sequence = p.stream_sequence.max(applied.stream_sequence);
            p.events_applied += applied.events as u64;
            p.conflicts += applied.conflicts as u64;
            p.lag_ms = Some(applied.lag_ms);
            p.last_applied_at = Some(humantime_utc(SystemTime::now()));
        });
    }

    pub fn skewed(&self, origin: &str) {
        self.with_peer(origin, |p| p.skewed_events += 1);
    }

    pub fn published(&self, count: usize) {
        let mut inner = self.inner.lock().expect("status lock");
        inner.events_published += count as u64;
        inner.publisher_error = None;
    }

    pub fn publisher_error(&self, error: &str) {
        self.inner.lock().expect("status lock").publisher_error = Some(error.to_owned());
    }

    pub fn peer(&self, origin: &str) -> Option<PeerStatus> {
        self.inner
            .lock()
            .expect("status lock")
            .peers
            .get(origin)
            .cloned()
    }

    pub fn events_published(&self) -> u64 {
        self.inner.lock().expect("status lock").events_published
    }

    pub fn publisher_error_now(&self) -> Option<String> {
        self.inner
            .lock()
            .expect("status lock")
            .publisher_error
            .clone()
    }
}

/// RFC 3339 in UTC, to the second, without a date crate.
fn humantime_utc(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_timestamps() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_996_800 + 3_723);
        assert_eq!(super::humantime_utc(at), "2026-11-30T01:02:03Z");
    }
}
