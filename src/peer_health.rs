//! Whether each peer's API is up, from what forwards meet (passive) and from a probe every
//! `forwarding.probe_interval_ms` (active), so a forward to a peer that drops packets fails at once
//! with the policy's answer instead of waiting out the connect timeout on every request.
//!
//! The rules are pure ([`PeerHealth::after`]): a connection that could not be made marks the peer
//! down; any answer marks it up. Only connects that *timed out*, [`SLOW_CONNECTS_BEFORE_FAIL_FAST`]
//! in a row (one slow handshake on a busy host is no outage), make forwards fail at once while the
//! peer is down: nothing is delivered either way, so failing fast changes no outcome, and a
//! refused connection costs nothing to try again (so a restarted peer is forwarded to at once,
//! before the next probe). A request that went out and got no answer in time says nothing of
//! whether the peer is down (it may be slow, and may have applied the request): it is counted and
//! shown, never a reason to fail fast. The probe is what brings a dropping peer back, since no
//! forward is tried while it is down.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::service::Region;

/// Connects in a row that timed out (forwards' or probes') before forwards fail at once.
pub const SLOW_CONNECTS_BEFORE_FAIL_FAST: u32 = 2;

/// What happened on one call to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// It answered (any status: it is up).
    Answered,
    /// No connection could be made: refused, no route, TLS refused; `slow` when the connect timed
    /// out (a host that drops packets), which every later attempt would wait out again.
    Unreachable { cause: String, slow: bool },
    /// The request went out and no answer came in time.
    TimedOut,
}

/// One peer's health as shown in `/v1/regions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PeerHealth {
    pub up: bool,
    /// Down, and forwards to it fail at once (its connects timed out) instead of trying.
    pub fail_fast: bool,
    /// Connects in a row that timed out.
    pub slow_connects: u32,
    /// Why it is down: the last failure.
    pub reason: Option<String>,
    /// Milliseconds since the Unix epoch at which it went down.
    pub down_since_ms: Option<u64>,
    /// Requests in a row that went out and got no answer in time.
    pub consecutive_timeouts: u32,
}

impl Default for PeerHealth {
    fn default() -> PeerHealth {
        PeerHealth {
            up: true,
            fail_fast: false,
            slow_connects: 0,
            reason: None,
            down_since_ms: None,
            consecutive_timeouts: 0,
        }
    }
}

impl PeerHealth {
    /// The health after `signal` at wall time `now_ms`.
    pub fn after(&self, signal: &Signal, now_ms: u64) -> PeerHealth {
        match signal {
            Signal::Answered => PeerHealth::default(),
            Signal::Unreachable { cause, slow } => {
                let slow_connects = if *slow { self.slow_connects + 1 } else { 0 };
                PeerHealth {
                    up: false,
                    fail_fast: slow_connects >= SLOW_CONNECTS_BEFORE_FAIL_FAST,
                    slow_connects,
                    reason: Some(cause.clone()),
                    down_since_ms: Some(self.down_since_ms.unwrap_or(now_ms)),
                    consecutive_timeouts: 0,
                }
            }
            Signal::TimedOut => PeerHealth {
                consecutive_timeouts: self.consecutive_timeouts + 1,
                ..self.clone()
            },
        }
    }
}

/// The health of every peer this region has called or probed.
#[derive(Debug, Default)]
pub struct HealthBook {
    peers: Mutex<BTreeMap<String, PeerHealth>>,
}

impl HealthBook {
    pub fn record(&self, peer: &str, signal: Signal) {
        let now = crate::clock::hlc::wall_clock_ms();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let next = peers
            .get(peer)
            .cloned()
            .unwrap_or_default()
            .after(&signal, now);
        if next.up != peers.get(peer).is_none_or(|h| h.up) {
            if next.up {
                tracing::info!(%peer, "peer is up again");
            } else {
                tracing::warn!(%peer, reason = next.reason.as_deref().unwrap_or(""), fail_fast = next.fail_fast, "peer is down");
            }
        }
        peers.insert(peer.to_owned(), next);
    }

    /// Why forwards to `peer` fail at once now, or `None` when they are to be tried.
    pub fn fail_fast(&self, peer: &str) -> Option<String> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .get(peer)
            .filter(|h| h.fail_fast)
            .map(|h| h.reason.clone().unwrap_or_default())
    }

    pub fn of(&self, peer: &str) -> PeerHealth {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(peer).cloned().unwrap_or_default()
    }
}

/// The probe worker: every `forwarding.probe_interval_ms`, each peer's `/healthz`.
pub async fn run(region: Arc<Region>) {
    let every = Duration::from_millis(region.config.forwarding.probe_interval_ms);
    if every.is_zero() {
        return std::future::pending().await;
    }
    let client = region
        .peer_trust
        .client(&region.config)
        // Longer than the connect timeout, so a connect that times out says so.
        .timeout(region.config.connect_timeout() + Duration::from_millis(800))
        .build()
        .expect("an HTTP client with plain settings builds");
    loop {
        for peer in region.members.peers() {
            let signal = match client.get(format!("{}/healthz", peer.api_url)).send().await {
                Ok(_) => Signal::Answered,
                Err(error) if error.is_connect() => Signal::Unreachable {
                    slow: error.is_timeout(),
                    cause: crate::logging::chain(&error),
                },
                Err(_) => Signal::TimedOut,
            };
            region.peer_health.record(&peer.id, signal);
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signal() -> impl Strategy<Value = Signal> {
        prop_oneof![
            Just(Signal::Answered),
            any::<bool>().prop_map(|slow| Signal::Unreachable {
                cause: "refused".into(),
                slow
            }),
            Just(Signal::TimedOut),
        ]
    }

    proptest! {
        /// After any history: down exactly when an unreachable call came after the last answer;
        /// failing fast exactly when the latest unreachable calls since then were slow, enough of
        /// them in a row; timeouts
        /// counted since the last answer or unreachable call; the outage dated from its first
        /// failure.
        #[test]
        fn health_follows_the_rules(history in proptest::collection::vec(signal(), 0..40)) {
            let mut health = PeerHealth::default();
            for (at, s) in history.iter().enumerate() {
                health = health.after(s, at as u64);
            }
            let since_answer: Vec<(usize, &Signal)> = history
                .iter()
                .enumerate()
                .rev()
                .take_while(|(_, s)| **s != Signal::Answered)
                .collect();
            let unreachable: Vec<&(usize, &Signal)> = since_answer
                .iter()
                .filter(|(_, s)| matches!(s, Signal::Unreachable { .. }))
                .collect();
            prop_assert_eq!(health.up, unreachable.is_empty(), "{:?}", history);
            let slow_in_a_row = unreachable
                .iter()
                .take_while(|(_, s)| matches!(s, Signal::Unreachable { slow: true, .. }))
                .count();
            prop_assert_eq!(health.fail_fast, slow_in_a_row >= SLOW_CONNECTS_BEFORE_FAIL_FAST as usize);
            let trailing_timeouts = history.iter().rev().take_while(|s| **s == Signal::TimedOut).count();
            prop_assert_eq!(health.consecutive_timeouts as usize, trailing_timeouts);
            if let Some((first, _)) = unreachable.last() {
                prop_assert_eq!(health.down_since_ms, Some(*first as u64));
            }
        }
    }

    #[test]
    fn one_answer_brings_a_peer_back() {
        let slow = Signal::Unreachable {
            cause: "connect timed out".into(),
            slow: true,
        };
        let once = PeerHealth::default().after(&slow, 5);
        assert!(
            !once.up && !once.fail_fast,
            "one slow connect is not enough"
        );
        let down = once.after(&slow, 6);
        assert!(!down.up && down.fail_fast);
        assert_eq!(down.down_since_ms, Some(5));
        let still = down.after(&Signal::TimedOut, 9);
        assert_eq!(
            still.down_since_ms,
            Some(5),
            "the outage started at the first failure"
        );
        assert!(still.fail_fast);
        assert_eq!(still.after(&Signal::Answered, 10), PeerHealth::default());
    }
}
