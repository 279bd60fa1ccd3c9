//! The client's load-balancing rules, pure: latency EWMAs, the power of two random choices, passive
//! ejection with backoff, and the retry budget. Kept apart from I/O so their laws are
//! property-tested.

use std::time::{Duration, Instant};

/// Weight of a new latency sample in the moving average.
const ALPHA: f64 = 0.3;
/// First ejection; each further failure in a row doubles it, up to [`MAX_EJECTION`].
const FIRST_EJECTION: Duration = Duration::from_millis(500);
const MAX_EJECTION: Duration = Duration::from_secs(30);

/// What the client knows of one region's health and speed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionHealth {
    /// Exponentially weighted moving average of answer latency, in milliseconds; `None` before
    /// the first answer (such a region is tried first, to measure it).
    pub latency_ms: Option<f64>,
    /// Failures in a row (errors, timeouts, failed probes).
    pub failures: u32,
    /// Out of rotation until then.
    pub ejected_until: Option<Instant>,
    /// The last `/readyz` probe failed: out of rotation until the region answers again, however
    /// long that takes (passive ejections end with their time).
    pub probe_failed: bool,
}

impl RegionHealth {
    pub fn available(&self, now: Instant) -> bool {
        !self.probe_failed && self.ejected_until.is_none_or(|until| now >= until)
    }

    /// An answer (any status the region itself gave) after `latency`.
    pub fn answered(&mut self, latency: Duration) {
        let sample = latency.as_secs_f64() * 1000.0;
        self.latency_ms = Some(match self.latency_ms {
            None => sample,
            Some(average) => average + ALPHA * (sample - average),
        });
        self.failures = 0;
        self.ejected_until = None;
        self.probe_failed = false;
    }

    /// A connection error, a timeout or a failed probe: out of rotation for a while that grows
    /// with each failure in a row.
    pub fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.ejected_until = Some(now + ejection(self.failures));
    }

    /// A failed `/readyz` probe: out until an answer.
    pub fn failed_probe(&mut self, now: Instant) {
        self.failed(now);
        self.probe_failed = true;
    }
}

/// How long the `failures`-th failure in a row keeps a region out.
pub fn ejection(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_EJECTION * 2u32.pow(doublings)).min(MAX_EJECTION)
}

/// The power of two random choices: of two distinct available regions drawn with `draw` (which
/// returns an index below its argument), the one with the lower latency average (an unmeasured
/// one first). One available region is the answer; none gives `None`.
pub fn pick(
    regions: &[RegionHealth],
    now: Instant,
    mut draw: impl FnMut(usize) -> usize,
) -> Option<usize> {
    let available: Vec<usize> = (0..regions.len())
        .filter(|&i| regions[i].available(now))
        .collect();
    match available.len() {
        0 => None,
        1 => Some(available[0]),
        n => {
            let first = draw(n);
            let mut second = draw(n - 1);
            if second >= first {
                second += 1;
            }
            let (a, b) = (available[first], available[second]);
            let cost = |i: usize| regions[i].latency_ms.unwrap_or(-1.0);
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

/// Retries may add at most `ratio` of the requests made, plus a small reserve, so a failing
/// deployment is not hit with a storm of retries.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryBudget {
    tokens: f64,
    ratio: f64,
    cap: f64,
}

impl RetryBudget {
    pub fn new(ratio: f64, reserve: f64) -> RetryBudget {
        RetryBudget {
            tokens: reserve,
            ratio,
            cap: reserve.max(1.0) * 10.0,
        }
    }

    /// A first attempt was made: it earns a share of a retry.
    pub fn requested(&mut self) {
        self.tokens = (self.tokens + self.ratio).min(self.cap);
    }

    /// Whether a retry may go out now (spending a token if so).
    pub fn try_retry(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn health() -> impl Strategy<Value = (Option<u32>, bool)> {
        (proptest::option::of(0u32..500), any::<bool>())
    }

    fn regions(spec: &[(Option<u32>, bool)], now: Instant) -> Vec<RegionHealth> {
        spec.iter()
            .map(|&(latency, ejected)| RegionHealth {
                latency_ms: latency.map(f64::from),
                failures: ejected as u32,
                ejected_until: ejected.then(|| now + Duration::from_secs(5)),
                probe_failed: false,
            })
            .collect()
    }

    proptest! {
        /// The pick is available, and no worse than the other region drawn.
        #[test]
        fn the_pick_is_available_and_the_faster_of_the_two_drawn(
            spec in proptest::collection::vec(health(), 0..6), seed in any::<u64>(),
        ) {
            let now = Instant::now();
            let regions = regions(&spec, now);
            let mut rng = seed;
            let mut drawn = Vec::new();
            let picked = pick(&regions, now, |n| {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let i = (rng >> 33) as usize % n;
                drawn.push(i);
                i
            });
            let available: Vec<usize> = (0..regions.len()).filter(|&i| regions[i].available(now)).collect();
            match picked {
                None => prop_assert!(available.is_empty()),
                Some(i) => {
                    prop_assert!(available.contains(&i));
                    if available.len() >= 2 {
                        let cost = |i: usize| regions[i].latency_ms.unwrap_or(-1.0);
                        let first = available[drawn[0]];
                        let second_slot = if drawn[1] >= drawn[0] { drawn[1] + 1 } else { drawn[1] };
                        let second = available[second_slot];
                        prop_assert_ne!(first, second);
                        prop_assert!(i == first || i == second);
                        prop_assert!(cost(i) <= cost(first).min(cost(second)) + f64::EPSILON);
                    }
                }
            }
        }

        /// Retries never exceed the reserve plus the ratio of requests made.
        #[test]
        fn retries_stay_within_the_budget(
            ratio in 0.0f64..1.0, reserve in 0.0f64..20.0,
            steps in proptest::collection::vec(any::<bool>(), 0..400),
        ) {
            let mut budget = RetryBudget::new(ratio, reserve);
            let (mut requests, mut retries) = (0u32, 0u32);
            for is_request in steps {
                if is_request {
                    budget.requested();
                    requests += 1;
                } else if budget.try_retry() {
                    retries += 1;
                }
            }
            prop_assert!(f64::from(retries) <= reserve + ratio * f64::from(requests) + 1e-9);
        }

        /// Ejection grows with failures in a row, stays within its bounds, and an answer ends it.
        #[test]
        fn ejection_grows_is_capped_and_ends_with_an_answer(failures in 1u32..40) {
            prop_assert!(ejection(failures) <= ejection(failures + 1));
            prop_assert!(ejection(failures) >= FIRST_EJECTION && ejection(failures) <= MAX_EJECTION);
            let now = Instant::now();
            let mut health = RegionHealth::default();
            for _ in 0..failures {
                health.failed(now);
            }
            prop_assert!(!health.available(now));
            prop_assert!(health.available(now + MAX_EJECTION));
            health.answered(Duration::from_millis(3));
            prop_assert!(health.available(now));
            prop_assert_eq!(health.failures, 0);
        }

        /// A failed probe keeps a region out until it answers, however long that takes.
        #[test]
        fn a_failed_probe_keeps_a_region_out_until_it_answers(later_secs in 0u64..100_000) {
            let now = Instant::now();
            let mut health = RegionHealth::default();
            health.failed_probe(now);
            prop_assert!(!health.available(now + Duration::from_secs(later_secs)));
            health.answered(Duration::from_millis(3));
            prop_assert!(health.available(now));
        }
    }

    #[test]
    fn the_average_moves_toward_new_samples() {
        let mut health = RegionHealth::default();
        health.answered(Duration::from_millis(100));
        assert_eq!(health.latency_ms, Some(100.0));
        health.answered(Duration::from_millis(0));
        assert_eq!(health.latency_ms, Some(70.0));
    }
}
