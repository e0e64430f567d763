//! When each request is meant to be sent: an open-loop schedule, fixed before the run and
//! independent of how fast the mesh answers.
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How arrivals are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArrivalProcess {
    /// Exactly `1/rate` apart.
    Constant,
    /// Exponential gaps with mean `1/rate` (a Poisson process): bursts happen, as with real users.
    Poisson,
}

/// The intended send offsets (from the start of the phase) of a phase's requests, in order.
pub struct Arrivals {
    process: ArrivalProcess,
    rate: f64,
    duration: Duration,
    rng: StdRng,
    /// Offset of the next arrival, in seconds.
    next_s: f64,
    sent: u64,
}

impl Arrivals {
    /// Arrivals at `rate` per second for `duration`. `rate` must be positive.
    pub fn new(process: ArrivalProcess, rate: f64, duration: Duration, seed: u64) -> Self {
        assert!(rate > 0.0 && rate.is_finite(), "arrival rate must be positive, got {rate}");
        let mut arrivals = Self { process, rate, duration, rng: StdRng::seed_from_u64(seed), next_s: 0.0, sent: 0 };
        // A Poisson process has no arrival pinned at t = 0; its first one is one gap in.
        if process == ArrivalProcess::Poisson {
            arrivals.next_s = arrivals.gap_s();
        }
        arrivals
    }

    fn gap_s(&mut self) -> f64 {
        match self.process {
            ArrivalProcess::Constant => 1.0 / self.rate,
            // Inverse CDF of the exponential distribution; 1 - U lies in (0, 1], so ln is finite.
            ArrivalProcess::Poisson => -(1.0 - self.rng.random::<f64>()).ln() / self.rate,
        }
    }
}

impl Iterator for Arrivals {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let offset = match self.process {
            // Computed from the index rather than summed, so rounding does not drift over long runs.
            ArrivalProcess::Constant => self.sent as f64 / self.rate,
            ArrivalProcess::Poisson => self.next_s,
        };
        if offset >= self.duration.as_secs_f64() {
            return None;
        }
        self.sent += 1;
        if self.process == ArrivalProcess::Poisson {
            self.next_s += self.gap_s();
        }
        Some(Duration::from_secs_f64(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(process: ArrivalProcess, rate: f64, secs: u64, seed: u64) -> Vec<f64> {
        Arrivals::new(process, rate, Duration::from_secs(secs), seed).map(|d| d.as_secs_f64()).collect()
    }

    fn gaps(offsets: &[f64]) -> Vec<f64> {
        offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn mean(xs: &[f64]) -> f64 {
        xs.iter().sum::<f64>() / xs.len() as f64
    }

    #[test]
    fn constant_arrivals_are_evenly_spaced_and_fill_the_duration_exactly() {
        let at = offsets(ArrivalProcess::Constant, 4.0, 10, 1);
        assert_eq!(at.len(), 40);
        assert_eq!(at[0], 0.0);
        assert!(gaps(&at).iter().all(|g| (g - 0.25).abs() < 1e-9));
        assert!(*at.last().unwrap() < 10.0);
    }

    #[test]
    fn poisson_arrivals_have_the_rate_and_exponential_gaps() {
        let rate = 200.0;
        let at = offsets(ArrivalProcess::Poisson, rate, 100, 7);
        // 20 000 expected; the count of a Poisson process has sd sqrt(20 000) ≈ 141.
        assert!((at.len() as f64 - 20_000.0).abs() < 600.0, "count {}", at.len());
        let gaps = gaps(&at);
        let mean_gap = mean(&gaps);
        assert!((mean_gap * rate - 1.0).abs() < 0.03, "mean gap {mean_gap}");
        // Exponential gaps: standard deviation equals the mean (coefficient of variation 1) …
        let sd = (gaps.iter().map(|g| (g - mean_gap).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
        assert!((sd / mean_gap - 1.0).abs() < 0.05, "cv {}", sd / mean_gap);
        // … and P(gap > mean) = e^-1.
        let longer = gaps.iter().filter(|g| **g > 1.0 / rate).count() as f64 / gaps.len() as f64;
        assert!((longer - (-1.0f64).exp()).abs() < 0.02, "P(gap > mean) {longer}");
        assert!(at.windows(2).all(|w| w[0] <= w[1]) && *at.last().unwrap() < 100.0);
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = offsets(ArrivalProcess::Poisson, 50.0, 5, 42);
        assert_eq!(a, offsets(ArrivalProcess::Poisson, 50.0, 5, 42));
        assert_ne!(a, offsets(ArrivalProcess::Poisson, 50.0, 5, 43));
    }
}
