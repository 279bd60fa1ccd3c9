//! Hybrid logical clock: 48 bits of wall-clock milliseconds and 16 bits of logical counter in one `u64`.
//!
//! Why a hybrid clock: last-writer-wins needs a total order that is close to real time (so "last"
//! means what users expect) yet never runs backwards and always orders a write after everything it
//! supersedes, even when the machines' clocks disagree. The physical part follows the wall clock, the
//! counter breaks ties inside one millisecond and absorbs a clock that stepped back.
//!
//! Everything here is pure: the caller passes the physical time in, so tests can skew clocks freely.
//! On the wire an HLC is the decimal string of its `u64` (JSON numbers lose precision past 2^53).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const COUNTER_BITS: u32 = 16;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
const MAX_MILLIS: u64 = (1 << 48) - 1;

/// One HLC timestamp. Ordered as its `u64`, i.e. by milliseconds, then counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(u64);

impl Hlc {
    pub const ZERO: Hlc = Hlc(0);

    pub fn from_parts(millis: u64, counter: u16) -> Hlc {
        Hlc((millis.min(MAX_MILLIS) << COUNTER_BITS) | u64::from(counter))
    }

    pub fn from_u64(raw: u64) -> Hlc {
        Hlc(raw)
    }

    pub fn as_u64(self) -> u64 {
        self.0
    }

    pub fn millis(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    pub fn counter(self) -> u16 {
        (self.0 & COUNTER_MASK) as u16
    }

    /// The smallest timestamp greater than `self`. A full counter carries into the milliseconds,
    /// which keeps the order strict at the price of running a millisecond ahead.
    pub fn successor(self) -> Hlc {
        Hlc(self.0.saturating_add(1))
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("an HLC is the decimal string of an unsigned 64-bit integer")]
pub struct ParseHlcError;

impl FromStr for Hlc {
    type Err = ParseHlcError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseHlcError);
        }
        s.parse::<u64>().map(Hlc).map_err(|_| ParseHlcError)
    }
}

impl Serialize for Hlc {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hlc {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What observing a remote timestamp did to the local clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The remote timestamp was within the allowed drift; the clock now exceeds it.
    Advanced,
    /// The remote timestamp was further in the future than the allowed drift. The event is still
    /// applied by the caller, but the clock did not follow it; the skew is reported in milliseconds.
    TooFarAhead { skew_ms: u64 },
}

/// The clock of one region process. Not shared across processes: causality between writes to one
/// record is carried by [`HybridClock::stamp_write`], which always exceeds what the write supersedes.
#[derive(Debug, Clone)]
pub struct HybridClock {
    last: Hlc,
    max_drift_ms: u64,
}

impl HybridClock {
    pub fn new(max_drift_ms: u64) -> HybridClock {
        HybridClock {
            last: Hlc::ZERO,
            max_drift_ms,
        }
    }

    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A fresh timestamp, strictly greater than every timestamp this clock issued or observed.
    pub fn now(&mut self, physical_ms: u64) -> Hlc {
        let wall = Hlc::from_parts(physical_ms, 0);
        self.last = if wall > self.last {
            wall
        } else {
            self.last.successor()
        };
        self.last
    }

    /// The timestamp of a write that supersedes versions whose greatest HLC is `superseded_max`:
    /// `max(now, superseded_max + 1)`, so causality and HLC order agree even under clock skew.
    ///
    /// The clock itself follows that stamp only within the allowed drift: a version from a peer
    /// whose clock ran a day ahead must not put every later write of this region (to any record) a
    /// day ahead, where it would win last-writer-wins against writes that really came later.
    pub fn stamp_write(&mut self, physical_ms: u64, superseded_max: Option<Hlc>) -> Hlc {
        let now = self.now(physical_ms);
        match superseded_max {
            Some(max) if max >= now => {
                let stamp = max.successor();
                if stamp.millis() <= physical_ms.saturating_add(self.max_drift_ms) {
                    self.last = stamp;
                }
                stamp
            }
            _ => now,
        }
    }

    /// Fold a remote timestamp into the clock, unless it is further ahead of `physical_ms` than the
    /// allowed drift (a peer with a runaway clock must not drag every region's clock along).
    pub fn observe(&mut self, remote: Hlc, physical_ms: u64) -> Observation {
        let limit = physical_ms.saturating_add(self.max_drift_ms);
        if remote.millis() > limit {
            return Observation::TooFarAhead {
                skew_ms: remote.millis() - physical_ms,
            };
        }
        if remote > self.last {
            self.last = remote;
        }
        Observation::Advanced
    }
}

/// Milliseconds since the Unix epoch, from the system clock: the one impure helper, kept here so
/// callers do not each read the clock their own way.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parts_round_trip() {
        let h = Hlc::from_parts(1_700_000_000_000, 7);
        assert_eq!(h.millis(), 1_700_000_000_000);
        assert_eq!(h.counter(), 7);
        assert_eq!(h.to_string().parse::<Hlc>().unwrap(), h);
    }

    #[test]
    fn rejects_non_decimal_text() {
        for bad in ["", "-1", "1e3", "0x10", " 5", "18446744073709551616"] {
            assert_eq!(bad.parse::<Hlc>(), Err(ParseHlcError), "{bad:?}");
        }
    }

    #[test]
    fn serde_uses_decimal_strings() {
        let h = Hlc::from_parts(5, 1);
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            format!("\"{}\"", (5u64 << 16) | 1)
        );
        assert!(serde_json::from_str::<Hlc>("42").is_err());
    }

    #[test]
    fn a_far_future_timestamp_does_not_drag_the_clock() {
        let mut clock = HybridClock::new(1_000);
        clock.now(10_000);
        let remote = Hlc::from_parts(50_000, 0);
        assert_eq!(
            clock.observe(remote, 10_000),
            Observation::TooFarAhead { skew_ms: 40_000 }
        );
        assert!(clock.now(10_001) < remote);
        // Yet a write superseding that version still orders after it,
        assert!(clock.stamp_write(10_002, Some(remote)) > remote);
        // without dragging the clock: the next write to another record is stamped near now.
        assert!(clock.now(10_003) < Hlc::from_parts(10_003 + 1_000, 0));
    }

    proptest! {
        #[test]
        fn now_is_strictly_monotonic(times in proptest::collection::vec(0u64..1_000_000, 1..50)) {
            let mut clock = HybridClock::new(500);
            let mut previous = Hlc::ZERO;
            for t in times {
                let next = clock.now(t);
                prop_assert!(next > previous);
                previous = next;
            }
        }

        #[test]
        fn a_write_exceeds_what_it_supersedes(
            physical in 0u64..1_000_000,
            superseded in proptest::option::of(0u64..u64::MAX / 2),
        ) {
            let mut clock = HybridClock::new(500);
            let superseded = superseded.map(Hlc::from_u64);
            let stamp = clock.stamp_write(physical, superseded);
            if let Some(s) = superseded { prop_assert!(stamp > s); }
            prop_assert!(stamp >= Hlc::from_parts(physical, 0));
        }

        /// Whatever it observes or supersedes, the clock never runs past physical time plus the
        /// allowed drift (plus what a millisecond's counter can carry), while every write still
        /// exceeds what it supersedes.
        #[test]
        fn the_clock_never_runs_past_physical_time_plus_drift(
            steps in proptest::collection::vec(
                (0u64..1_000, any::<bool>(), 0u64..u64::MAX / 2), 1..60),
        ) {
            let drift = 500;
            let mut clock = HybridClock::new(drift);
            let mut physical = 1_000_000u64;
            for (tick, write, remote) in steps {
                physical += tick;
                let remote = Hlc::from_u64(remote);
                if write {
                    prop_assert!(clock.stamp_write(physical, Some(remote)) > remote);
                } else {
                    clock.observe(remote, physical);
                }
                prop_assert!(clock.last().millis() <= physical + drift + 1);
            }
        }

        #[test]
        fn observing_within_drift_orders_later_stamps_after_it(
            local in 0u64..1_000_000, ahead in 0u64..500, counter: u16,
        ) {
            let mut clock = HybridClock::new(500);
            let remote = Hlc::from_parts(local + ahead, counter);
            prop_assert_eq!(clock.observe(remote, local), Observation::Advanced);
            prop_assert!(clock.now(local) > remote);
        }
    }
}
