//! [`AtomicHistogram`]: a histogram whose observation is a handful of relaxed atomic adds
//! (prometheus-client's takes a lock per observation).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// A histogram whose observation is a handful of relaxed atomic adds.
#[derive(Debug, Clone)]
pub struct AtomicHistogram {
    inner: Arc<HistInner>,
}

#[derive(Debug)]
struct HistInner {
    /// Upper bounds in seconds; the last bucket (+Inf) is implicit.
    bounds: Vec<f64>,
    /// Same bounds in nanoseconds, for the comparison on the hot path.
    bounds_ns: Vec<u64>,
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &[f64]) -> Self {
        let bounds = bounds.to_vec();
        let bounds_ns = bounds.iter().map(|b| (b * 1e9) as u64).collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        AtomicHistogram {
            inner: Arc::new(HistInner {
                bounds,
                bounds_ns,
                counts,
                sum_ns: AtomicU64::new(0),
                count: AtomicU64::new(0),
            }),
        }
    }

    /// Latency buckets from 100 µs to 60 s.
    pub fn latency() -> Self {
        Self::new(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0, 60.0,
        ])
    }

    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.inner.bounds_ns.partition_point(|&b| b < ns);
        self.inner.counts[i].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.inner.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.inner.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations, in microseconds (the console's STATS times).
    pub fn sum_micros(&self) -> u64 {
        self.inner.sum_ns.load(Ordering::Relaxed) / 1000
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = Vec::with_capacity(self.inner.counts.len());
        let mut total = 0;
        for (i, c) in self.inner.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            total += n;
            let bound = self.inner.bounds.get(i).copied().unwrap_or(f64::MAX);
            buckets.push((bound, n));
        }
        let sum = self.inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, total, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}
