//! What replication is doing, per peer: the status `/v1/regions` shows and the Prometheus metrics.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use serde::Serialize;

use super::consumer::Applied;

/// Window over which `events_applied_per_second` is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct PeerStatus {
    /// `connecting`, `running`, `waiting for the first copy` (a new region: see
    /// [`crate::membership`]), `retrying`, `repairing` (a gap) or `needs upgrade`.
    pub state: String,
    /// Why the consumer is retrying or stopped.
    pub error: Option<String>,
    /// Highest stream sequence of this peer's stream applied here.
    pub stream_sequence: u64,
    pub events_applied: u64,
    pub conflicts: u64,
    /// Milliseconds from the newest applied event's HLC to its apply (the replication delay of
    /// writes; the region's `lag_ms`, from heartbeats, is how far behind it is now).
    pub event_lag_ms: Option<u64>,
    #[schema(value_type = Option<String>)]
    pub last_applied_at: Option<String>,
    pub events_applied_per_second: f64,
    pub skewed_events: u64,
    /// Holes in this peer's stream (events gone unapplied) that repair has covered.
    pub gaps_repaired: u64,
    pub events_covered_by_repair: u64,
    /// Events from this peer set aside since start because they could not be applied.
    pub dead_letters: u64,
    /// Anti-entropy against this peer.
    pub repair: RepairStatus,
    /// Whether this region's durable consumer on the peer's stream exists.
    #[serde(skip)]
    pub attached: bool,
}

#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct RepairStatus {
    /// `idle`, `running` or `failed`.
    pub state: String,
    pub rounds: u64,
    pub records_repaired: u64,
    /// When the last complete round ended.
    pub last_complete_at: Option<String>,
    pub last_round: Option<super::repair::RepairReport>,
    pub error: Option<String>,
    /// How far the running round is (the last round's final figures once it ended).
    pub progress: Option<RepairProgress>,
}

/// How far a repair round is: the records of the peer's differing buckets compared here, and
/// those copied because they differed. For a new region's first round every record differs, so
/// this is the copy's progress bar.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RepairProgress {
    /// Records the peer holds in the buckets that differ (all of them, for a new region).
    pub records_to_compare: u64,
    pub records_compared: u64,
    /// Records fetched from the peer and merged here.
    pub records_copied: u64,
    pub seconds: f64,
    /// Records compared per second, since the round began.
    pub per_second: f64,
    /// At that rate; null before the first page.
    pub seconds_left: Option<f64>,
}

impl RepairProgress {
    pub fn new(records_to_compare: u64, compared: u64, copied: u64, seconds: f64) -> Self {
        let per_second = if seconds > 0.0 {
            compared as f64 / seconds
        } else {
            0.0
        };
        let seconds_left = (per_second > 0.0)
            .then(|| records_to_compare.saturating_sub(compared) as f64 / per_second);
        RepairProgress {
            records_to_compare,
            records_compared: compared,
            records_copied: copied,
            seconds,
            per_second,
            seconds_left,
        }
    }
}

#[derive(Default)]
struct Inner {
    peers: BTreeMap<String, PeerStatus>,
    recent: BTreeMap<String, VecDeque<(Instant, usize)>>,
    events_published: u64,
    heartbeat_promised_ms: Option<u64>,
    /// Each peer's view from its last heartbeat: how far it has applied each origin.
    peer_views: BTreeMap<String, BTreeMap<String, u64>>,
    /// This region's tombstone reclamation horizon (milliseconds), once it has one.
    reclaimed_through_ms: Option<u64>,
    publisher_error: Option<String>,
    nats_version: Option<String>,
    /// Per origin, the stream sequence through which this process's first copy holds every
    /// event: the consumer acknowledges those without merging them.
    copied_through: BTreeMap<String, u64>,
}

struct Metrics {
    lag_ms: IntGaugeVec,
    lag_seconds: HistogramVec,
    applied: IntCounterVec,
    held_by_copy: IntCounterVec,
    conflicts: IntCounterVec,
    stopped: IntGaugeVec,
    skewed: IntCounterVec,
    published: IntCounter,
    gaps: IntCounterVec,
    integrity: IntCounter,
    incarnation_rotations: IntCounter,
    purged_rows: IntCounter,
    tombstones_reclaimed: IntCounter,
    nats_version: IntGaugeVec,
    dead_letters: IntCounterVec,
    repair_rounds: IntCounterVec,
    repair_buckets: IntCounterVec,
    repair_records: IntCounterVec,
    pub(crate) outbox_backlog: IntGauge,
    dead_letters_held: IntGauge,
    pub(crate) publish_batch: Histogram,
}

pub struct ReplicationStatus {
    inner: Mutex<Inner>,
    metrics: Metrics,
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

impl ReplicationStatus {
    pub fn new(registry: &Registry) -> ReplicationStatus {
        let origin = &["origin"];
        let metrics = Metrics {
            lag_ms: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "locus_replication_lag_ms",
                        "Milliseconds this region is behind the origin: now minus the newest heartbeat promise applied here (grows while nothing arrives)",
                    ),
                    origin,
                )
                .unwrap(),
            ),
            lag_seconds: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "locus_replication_lag_seconds",
                        "Replication lag of applied batches, event HLC to apply",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0, 60.0,
                    ]),
                    origin,
                )
                .unwrap(),
            ),
            applied: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "locus_replication_events_applied_total",
                        "Events applied from each origin",
                    ),
                    origin,
                )
                .unwrap(),
            ),
            held_by_copy: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "locus_replication_events_held_by_copy_total",
                        "Events of each origin acknowledged without a merge: this region's first copy already held them (counted in the applied events too)",
                    ),
                    origin,
                )
                .unwrap(),
            ),
            conflicts: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "locus_conflicts_total",
                        "Conflicts detected on apply, by strategy",
                    ),
                    &["strategy"],
                )
                .unwrap(),
            ),
            stopped: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "locus_replication_consumer_stopped",
                        "1 while replication from an origin waits for this region's upgrade",
                    ),
                    origin,
                )
                .unwrap(),
            ),
            skewed: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "locus_clock_skewed_events_total",
                        "Events whose HLC was further ahead than the allowed drift",
                    ),
                    origin,
                )
                .unwrap(),
            ),
            integrity: register(
                registry,
                IntCounter::new(
                    "locus_integrity_violations_total",
                    "Two different versions found under one version vector",
                )
                .unwrap(),
            ),
            purged_rows: register(
                registry,
                IntCounter::new(
                    "locus_deleted_rows_purged_total",
                    "Rows of deleted collections removed or rewritten by the purge worker",
                )
                .unwrap(),
            ),
            tombstones_reclaimed: register(
                registry,
                IntCounter::new(
                    "locus_tombstones_reclaimed_total",
                    "Tombstones removed once every region had applied them",
                )
                .unwrap(),
            ),
            incarnation_rotations: register(
                registry,
                IntCounter::new(
                    "locus_incarnation_rotations_total",
                    "Times this process started on a database its peers showed was restored, or that no peer could vouch for",
                )
                .unwrap(),
            ),
            nats_version: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "locus_nats_server_info",
                        "1 for the version of the NATS server this region connected to",
                    ),
                    &["version"],
                )
                .unwrap(),
            ),
            gaps: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "locus_replication_gaps_repaired_total",
                        "Holes in an origin's stream (events gone unapplied) covered by repair",
                    ),
                    origin,
                )
                .unwrap(),
            ),
            dead_letters: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "locus_replication_dead_letters_total",
                        "Events from an origin set aside because they could not be applied",
                    ),
                    origin,
                )
                .unwrap(),
            ),
            repair_rounds: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "locus_repair_rounds_total",
                        "Anti-entropy rounds against each peer, by result",
                    ),
                    &["peer", "result"],
                )
                .unwrap(),
            ),
            repair_buckets: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "locus_repair_buckets_compared_total",
                        "Bucket digests compared with each peer",
                    ),
                    &["peer"],
                )
                .unwrap(),
            ),
            repair_records: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "locus_repair_records_repaired_total",
                        "Records whose state changed by repair from each peer",
                    ),
                    &["peer"],
                )
                .unwrap(),
            ),
            published: register(
                registry,
                IntCounter::new(
                    "locus_replication_events_published_total",
                    "Outbox events acknowledged by JetStream",
                )
                .unwrap(),
            ),
            dead_letters_held: register(
                registry,
                IntGauge::new(
                    "locus_dead_letters",
                    "Dead letters held for an operator (events and records set aside)",
                )
                .unwrap(),
            ),
            outbox_backlog: register(
                registry,
                IntGauge::new(
                    "locus_outbox_backlog",
                    "Outbox events waiting to be published",
                )
                .unwrap(),
            ),
            publish_batch: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new("locus_publish_batch_events", "Events per publisher pass")
                        .buckets(vec![1.0, 4.0, 16.0, 64.0, 256.0, 1024.0]),
                )
                .unwrap(),
            ),
        };
        ReplicationStatus {
            inner: Mutex::new(Inner::default()),
            metrics,
        }
    }

    pub fn set_outbox_backlog(&self, backlog: i64) {
        self.metrics.outbox_backlog.set(backlog);
    }

    pub fn set_dead_letters_held(&self, held: i64) {
        self.metrics.dead_letters_held.set(held);
    }

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
        self.metrics.stopped.with_label_values(&[origin]).set(0);
        self.with_peer(origin, |p| {
            p.state = "running".into();
            p.error = None;
        });
    }

    /// A new region's consumer leaves the stream's events for its first copy.
    pub fn peer_waiting_for_copy(&self, origin: &str) {
        self.with_peer(origin, |p| {
            p.state = "waiting for the first copy".into();
            p.error = None;
        });
    }

    pub fn peer_error(&self, origin: &str, error: &str) {
        self.with_peer(origin, |p| {
            p.state = "retrying".into();
            p.error = Some(error.to_owned());
        });
    }

    /// An event of a newer wire version: the consumer waits for this region's upgrade.
    pub fn peer_needs_upgrade(&self, origin: &str, reason: &str) {
        self.metrics.stopped.with_label_values(&[origin]).set(1);
        self.with_peer(origin, |p| {
            p.state = "needs upgrade".into();
            p.error = Some(reason.to_owned());
        });
    }

    /// Events of the origin's stream are gone unapplied: a repair round is bringing them over.
    pub fn peer_repairing(&self, origin: &str, missing: u64) {
        self.with_peer(origin, |p| {
            p.state = "repairing".into();
            p.error = Some(format!(
                "{missing} events of the stream are gone unapplied; repairing from {origin}"
            ));
        });
    }

    pub fn gap_repaired(&self, origin: &str, events: u64) {
        self.metrics.gaps.with_label_values(&[origin]).inc();
        self.with_peer(origin, |p| {
            p.gaps_repaired += 1;
            p.events_covered_by_repair += events;
        });
    }

    pub fn set_nats_version(&self, version: &str) {
        self.metrics.nats_version.reset();
        self.metrics
            .nats_version
            .with_label_values(&[version])
            .set(1);
        self.inner.lock().expect("status lock").nats_version = Some(version.to_owned());
    }

    pub fn nats_version(&self) -> Option<String> {
        self.inner.lock().expect("status lock").nats_version.clone()
    }

    pub fn integrity_violation(&self) {
        self.metrics.integrity.inc();
    }

    pub fn purged(&self, rows: u64) {
        self.metrics.purged_rows.inc_by(rows);
    }

    pub fn tombstones_reclaimed(&self, through_ms: u64, rows: u64) {
        self.metrics.tombstones_reclaimed.inc_by(rows);
        self.inner.lock().expect("status lock").reclaimed_through_ms = Some(through_ms);
    }

    pub fn reclaimed_through_ms(&self) -> Option<u64> {
        self.inner.lock().expect("status lock").reclaimed_through_ms
    }

    /// Remember `peer`'s view, as its heartbeat carried it (a viewless beat changes nothing).
    pub fn peer_view(&self, peer: &str, view: &BTreeMap<String, u64>) {
        if view.is_empty() {
            return;
        }
        self.inner
            .lock()
            .expect("status lock")
            .peer_views
            .insert(peer.to_owned(), view.clone());
    }

    pub fn peer_views(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.inner.lock().expect("status lock").peer_views.clone()
    }

    pub fn incarnation_rotated(&self) {
        self.metrics.incarnation_rotations.inc();
    }

    pub fn dead_lettered(&self, origin: &str, count: u64) {
        self.metrics
            .dead_letters
            .with_label_values(&[origin])
            .inc_by(count);
        self.with_peer(origin, |p| p.dead_letters += count);
    }

    /// Set the heartbeat lag gauges from what the database says each origin is applied through
    /// (refreshed per scrape, so a stalled consumer's lag grows).
    pub fn set_lag(&self, now_ms: u64, applied_through: &BTreeMap<String, u64>) {
        for (origin, through) in applied_through {
            self.metrics
                .lag_ms
                .with_label_values(&[origin])
                .set(now_ms.saturating_sub(*through) as i64);
        }
    }

    /// The first copy holds every event of `origin`'s stream through `sequence`.
    pub fn copy_holds(&self, origin: &str, sequence: u64) {
        let mut inner = self.inner.lock().expect("status lock");
        let through = inner.copied_through.entry(origin.to_owned()).or_default();
        *through = (*through).max(sequence);
    }

    /// `events` of `origin`'s stream were acknowledged as held by the first copy.
    pub fn held_by_copy(&self, origin: &str, events: usize) {
        self.metrics
            .held_by_copy
            .with_label_values(&[origin])
            .inc_by(events as u64);
    }

    /// How many events of `origin` were acknowledged as held by the first copy.
    pub fn events_held_by_copy(&self, origin: &str) -> u64 {
        self.metrics.held_by_copy.with_label_values(&[origin]).get()
    }

    /// The stream sequence of `origin` through which the first copy holds every event (0: none).
    pub fn copied_through(&self, origin: &str) -> u64 {
        let inner = self.inner.lock().expect("status lock");
        inner.copied_through.get(origin).copied().unwrap_or(0)
    }

    pub fn applied(&self, origin: &str, applied: &Applied) {
        let m = &self.metrics;
        m.applied
            .with_label_values(&[origin])
            .inc_by(applied.events as u64);
        if let Some(lag_ms) = applied.lag_ms {
            m.lag_seconds
                .with_label_values(&[origin])
                .observe(lag_ms as f64 / 1000.0);
        }
        for (strategy, count) in &applied.conflicts_by_strategy {
            m.conflicts
                .with_label_values(&[strategy])
                .inc_by(*count as u64);
        }
        let rate = {
            let mut inner = self.inner.lock().expect("status lock");
            let recent = inner.recent.entry(origin.to_owned()).or_default();
            let now = Instant::now();
            recent.push_back((now, applied.events));
            while recent
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
            {
                recent.pop_front();
            }
            recent.iter().map(|(_, n)| *n).sum::<usize>() as f64 / RATE_WINDOW.as_secs_f64()
        };
        self.with_peer(origin, |p| {
            p.events_applied_per_second = rate;
            p.stream_sequence = p.stream_sequence.max(applied.stream_sequence);
            p.events_applied += applied.events as u64;
            p.conflicts += applied.conflicts as u64;
            p.event_lag_ms = applied.lag_ms.or(p.event_lag_ms);
            p.last_applied_at = Some(humantime_utc(SystemTime::now()));
        });
    }

    pub fn repair_started(&self, peer: &str) {
        self.with_peer(peer, |p| {
            p.repair.state = "running".into();
            p.repair.progress = None;
        });
    }

    pub fn repair_progress(&self, peer: &str, progress: RepairProgress) {
        self.with_peer(peer, |p| p.repair.progress = Some(progress));
    }

    /// The progress of the round running against `peer`, if one runs.
    pub fn repair_progress_now(&self, peer: &str) -> Option<RepairProgress> {
        let inner = self.inner.lock().expect("status lock");
        let repair = &inner.peers.get(peer)?.repair;
        (repair.state == "running")
            .then(|| repair.progress.clone())
            .flatten()
    }

    /// This region's durable consumer on `origin`'s stream exists: from now on no event of that
    /// stream can be removed before this region has applied it.
    pub fn consumer_attached(&self, origin: &str) {
        self.with_peer(origin, |p| p.attached = true);
    }

    pub fn is_consumer_attached(&self, origin: &str) -> bool {
        let inner = self.inner.lock().expect("status lock");
        inner.peers.get(origin).is_some_and(|p| p.attached)
    }

    pub fn repair_finished(&self, peer: &str, report: &super::repair::RepairReport) {
        let m = &self.metrics;
        m.repair_rounds.with_label_values(&[peer, "complete"]).inc();
        m.repair_buckets
            .with_label_values(&[peer])
            .inc_by(report.buckets_compared);
        m.repair_records
            .with_label_values(&[peer])
            .inc_by(report.records_repaired);
        self.with_peer(peer, |p| {
            let repair = &mut p.repair;
            repair.state = "idle".into();
            repair.rounds += 1;
            repair.records_repaired += report.records_repaired;
            repair.last_complete_at = Some(humantime_utc(SystemTime::now()));
            repair.last_round = Some(report.clone());
            repair.error = None;
        });
    }

    pub fn repair_failed(&self, peer: &str, error: &str) {
        self.metrics
            .repair_rounds
            .with_label_values(&[peer, "failed"])
            .inc();
        self.with_peer(peer, |p| {
            p.repair.state = "failed".into();
            p.repair.error = Some(error.to_owned());
        });
    }

    pub fn skewed(&self, origin: &str) {
        self.metrics.skewed.with_label_values(&[origin]).inc();
        self.with_peer(origin, |p| p.skewed_events += 1);
    }

    pub fn published(&self, count: usize) {
        self.metrics.published.inc_by(count as u64);
        self.metrics.publish_batch.observe(count as f64);
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

    pub fn heartbeat_sent(&self, through_ms: u64) {
        self.inner
            .lock()
            .expect("status lock")
            .heartbeat_promised_ms = Some(through_ms);
    }

    /// The promise of the last heartbeat this process sent (as the region's publisher).
    pub fn heartbeat_promised_ms(&self) -> Option<u64> {
        self.inner
            .lock()
            .expect("status lock")
            .heartbeat_promised_ms
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
