//! Latency samples and their summary (nearest-rank percentiles over every sample: no histogram
//! buckets, no averaging of percentiles across runs).

use serde_json::{json, Value};

/// A summary of latencies, in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub n: usize,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub min: u64,
    pub max: u64,
    pub mean: u64,
}

/// The `q`-quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    pub fn of(samples: &mut [u64]) -> Summary {
        samples.sort_unstable();
        let n = samples.len();
        if n == 0 {
            return Summary::default();
        }
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Summary {
            n,
            p50: quantile(samples, 0.50),
            p90: quantile(samples, 0.90),
            p99: quantile(samples, 0.99),
            p999: quantile(samples, 0.999),
            min: samples[0],
            max: samples[n - 1],
            mean: (sum / n as u128) as u64,
        }
    }

    /// Microseconds, for JSON.
    pub fn to_json(&self) -> Value {
        let us = |ns: u64| (ns as f64 / 1000.0 * 100.0).round() / 100.0;
        json!({
            "n": self.n,
            "p50_us": us(self.p50),
            "p90_us": us(self.p90),
            "p99_us": us(self.p99),
            "p999_us": us(self.p999),
            "min_us": us(self.min),
            "max_us": us(self.max),
            "mean_us": us(self.mean),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut v: Vec<u64> = (1..=100).collect();
        let s = Summary::of(&mut v);
        assert_eq!((s.p50, s.p90, s.p99, s.min, s.max), (50, 90, 99, 1, 100));
        assert_eq!(quantile(&[7], 0.99), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
