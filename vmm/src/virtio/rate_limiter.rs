//! Token buckets on what a device does for its guest (bytes and
//! operations per second, each with a burst), and the timer that wakes a
//! device's worker when the buckets have refilled enough for the request
//! that had to wait.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use capsa_vmm_config::RateLimit;
use vmm_sys_util::timerfd::TimerFd;

/// `rate` tokens a second, at most `capacity` saved up.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(rate: u64, burst_ms: u32, now: Instant) -> Self {
        let capacity = (rate as f64 * f64::from(burst_ms) / 1000.0).max(1.0);
        Bucket {
            rate: rate as f64,
            capacity,
            tokens: capacity,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.refilled = now;
    }

    /// How long until `n` may pass (zero: now). A request larger than the
    /// whole bucket passes once the bucket is full, and leaves it in debt.
    fn wait_for(&self, n: u64) -> Duration {
        let needed = (n as f64).min(self.capacity);
        if self.tokens >= needed {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((needed - self.tokens) / self.rate)
        }
    }

    fn take(&mut self, n: u64) {
        self.tokens -= n as f64;
    }
}

/// A device's limits, with the timer its worker watches while a request
/// waits.
pub struct RateLimiter {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    timer: TimerFd,
    armed: bool,
    throttled: u64,
}

impl RateLimiter {
    /// None when `limit` limits nothing.
    pub fn new(limit: Option<&RateLimit>) -> std::io::Result<Option<Self>> {
        let Some(limit) = limit.filter(|l| l.is_set()) else {
            return Ok(None);
        };
        let now = Instant::now();
        Ok(Some(RateLimiter {
            bytes: limit
                .bytes_per_sec
                .map(|rate| Bucket::new(rate, limit.burst_ms, now)),
            ops: limit
                .ops_per_sec
                .map(|rate| Bucket::new(rate, limit.burst_ms, now)),
            timer: TimerFd::new()?,
            armed: false,
            throttled: 0,
        }))
    }

    /// Whether a request of `bytes` may go now; if not, nothing is taken
    /// and the timer is set for when it may.
    pub fn admit(&mut self, bytes: u64) -> bool {
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bytes, bytes), (&mut self.ops, 1)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                wait = wait.max(bucket.wait_for(n));
            }
        }
        if wait.is_zero() {
            for (bucket, n) in [(&mut self.bytes, bytes), (&mut self.ops, 1)] {
                if let Some(bucket) = bucket {
                    bucket.take(n);
                }
            }
            return true;
        }
        self.throttled += 1;
        if !self.armed {
            // At least a millisecond: a zero would disarm the timer.
            let wait = wait.max(Duration::from_millis(1));
            self.armed = self.timer.reset(wait, None).is_ok();
        }
        false
    }

    /// The timer fired: the worker may try the waiting request again.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.armed = false;
    }

    /// How many times a request had to wait.
    pub fn throttled(&self) -> u64 {
        self.throttled
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_passes_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(1000, 100, start);
        assert_eq!(bucket.wait_for(100), Duration::ZERO, "a full burst");
        bucket.take(100);
        assert_eq!(bucket.wait_for(50), Duration::from_millis(50));
        bucket.refill(start + Duration::from_millis(50));
        assert_eq!(bucket.wait_for(50), Duration::ZERO);
        // Larger than the bucket: passes when it is full, leaving a debt.
        bucket.refill(start + Duration::from_secs(10));
        assert_eq!(bucket.wait_for(5000), Duration::ZERO);
        bucket.take(5000);
        assert_eq!(bucket.wait_for(1), Duration::from_millis(4901));
    }

    #[test]
    fn a_limiter_takes_from_both_buckets_or_from_neither() {
        let limit = RateLimit {
            bytes_per_sec: Some(1 << 20),
            ops_per_sec: Some(10),
            burst_ms: 100,
        };
        let mut limiter = RateLimiter::new(Some(&limit)).unwrap().unwrap();
        // One op's worth of burst (10/s for 100 ms).
        assert!(limiter.admit(4096));
        assert!(!limiter.admit(4096), "the ops bucket is empty");
        assert_eq!(limiter.throttled(), 1);
        let bytes = limiter.bytes.as_ref().unwrap().tokens;
        assert!(bytes < 104858.0 && bytes > 100000.0, "{bytes}");
        assert!(RateLimiter::new(Some(&RateLimit::default()))
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_timer_fires_when_the_bucket_allows_again() {
        let limit = RateLimit {
            ops_per_sec: Some(100),
            burst_ms: 10,
            ..RateLimit::default()
        };
        let mut limiter = RateLimiter::new(Some(&limit)).unwrap().unwrap();
        assert!(limiter.admit(0));
        let began = Instant::now();
        assert!(!limiter.admit(0));
        limiter.timer_fired();
        let waited = began.elapsed();
        assert!(
            waited >= Duration::from_millis(5) && waited < Duration::from_millis(500),
            "{waited:?}"
        );
        assert!(limiter.admit(0));
    }
}
