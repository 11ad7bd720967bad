//! Token-bucket rate limiting with Firecracker's semantics.
//!
//! A [`TokenBucket`] holds up to `size` tokens and refills `size` tokens every
//! `refill_time_ms`, continuously. An optional `one_time_burst` is spent
//! first and never refills. A [`RateLimiter`] pairs a bandwidth bucket
//! (bytes) with an operations bucket (requests or packets); a device keeps one
//! per direction. Instead of a timer file descriptor the limiter reports the
//! instant at which a refused request may be retried, and the device's worker
//! uses it as its epoll timeout.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Errors in a rate-limiter configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("token bucket {what}: size must be non-zero")]
    ZeroSize { what: &'static str },
    #[error("token bucket {what}: refill_time_ms must be non-zero")]
    ZeroRefillTime { what: &'static str },
}

/// A refill window near [`PER_SECOND_REFILL_MS`] in which `rate` tokens
/// per second are a whole number, so the bucket's rate is exactly `rate`
/// (125 ms for the power-of-two rates users write as 1M).
fn exact_window(rate: u64, burst: u64) -> Option<BucketConfig> {
    std::iter::once(PER_SECOND_REFILL_MS)
        .chain(PER_SECOND_REFILL_MS / 2..=PER_SECOND_REFILL_MS * 2)
        .find(|ms| rate.checked_mul(*ms).is_some_and(|t| t % 1000 == 0))
        .map(|ms| BucketConfig {
            size: rate * ms / 1000,
            one_time_burst: burst,
            refill_time_ms: ms,
        })
}

/// The refill window [`BucketConfig::per_second`] uses: short, so that a
/// limit holds from the first second on (a bucket starts full).
const PER_SECOND_REFILL_MS: u64 = 100;

/// One bucket's parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    /// Tokens the bucket holds when full, and refills per `refill_time_ms`.
    pub size: u64,
    /// Extra tokens spent before the bucket's own, once.
    pub one_time_burst: u64,
    /// Time to refill `size` tokens from empty.
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// `rate` tokens per second with a one-time `burst` on top: what
    /// `docker run --device-write-bps` or `--disk write_bps=` mean. The
    /// bucket holds about 100 ms worth (at least one token), so that a limit
    /// holds from the first second on. The rate is exact where a window of
    /// 50 to 200 ms holds a whole number of tokens; otherwise the refill
    /// time is rounded to the millisecond (an error below 0.4 %). A zero rate gives an
    /// invalid (zero-size) bucket that the limiter refuses.
    pub fn per_second(rate: u64, burst: u64) -> Self {
        if rate == 0 {
            return BucketConfig {
                size: 0,
                one_time_burst: burst,
                refill_time_ms: PER_SECOND_REFILL_MS,
            };
        }
        if let Some(exact) = exact_window(rate, burst) {
            return exact;
        }
        let size = rate.div_ceil(1000 / PER_SECOND_REFILL_MS);
        let refill_time_ms =
            ((u128::from(size) * 1000 + u128::from(rate) / 2) / u128::from(rate)).max(1);
        BucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: u64::try_from(refill_time_ms).unwrap_or(u64::MAX),
        }
    }

    /// Tokens per second this bucket sustains.
    pub fn rate_per_second(&self) -> u64 {
        self.size.saturating_mul(1000) / self.refill_time_ms.max(1)
    }

    fn validate(&self, what: &'static str) -> Result<(), Error> {
        if self.size == 0 {
            return Err(Error::ZeroSize { what });
        }
        if self.refill_time_ms == 0 {
            return Err(Error::ZeroRefillTime { what });
        }
        Ok(())
    }
}

/// A token bucket. A request larger than the bucket waits until the bucket
/// has refilled as many tokens as it needs (the bucket may fill beyond its
/// size for it), so every request, the last included, pays before it runs:
/// 8 MiB written at 1 MiB/s take 8 s less the bucket that starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: BucketConfig,
    budget: f64,
    one_time_burst: u64,
    last_update: Instant,
}

impl TokenBucket {
    pub fn new(config: BucketConfig) -> Result<Self, Error> {
        config.validate("bucket")?;
        Ok(TokenBucket {
            config,
            budget: config.size as f64,
            one_time_burst: config.one_time_burst,
            last_update: Instant::now(),
        })
    }

    pub fn config(&self) -> BucketConfig {
        self.config
    }

    /// Tokens available now, not counting the one-time burst.
    pub fn budget(&self) -> f64 {
        self.budget
    }

    /// Adds the tokens earned since the last update, up to `cap` (at least
    /// the bucket size; more for a request larger than the bucket).
    fn refill(&mut self, now: Instant, cap: u64) {
        let elapsed = now.saturating_duration_since(self.last_update);
        let refill_ns = self.config.refill_time_ms as f64 * 1e6;
        let size = self.config.size as f64;
        let cap = cap.max(self.config.size) as f64;
        self.budget =
            (self.budget + elapsed.as_nanos() as f64 * size / refill_ns).min(cap.max(self.budget));
        self.last_update = now;
    }

    /// Takes `tokens` if the bucket can give them now.
    pub fn consume(&mut self, tokens: u64) -> bool {
        self.consume_at(tokens, Instant::now())
    }

    fn consume_at(&mut self, tokens: u64, now: Instant) -> bool {
        let from_burst = tokens.min(self.one_time_burst);
        let rest = tokens - from_burst;
        self.refill(now, rest);
        if self.budget < rest as f64 {
            return false;
        }
        self.one_time_burst -= from_burst;
        self.budget -= rest as f64;
        true
    }

    /// Gives back tokens taken for a request that was not carried out.
    pub fn refund(&mut self, tokens: u64) {
        self.budget = (self.budget + tokens as f64).min(self.config.size as f64);
    }

    /// How long until `tokens` could be consumed.
    fn wait_for(&mut self, tokens: u64, now: Instant) -> Duration {
        let rest = tokens.saturating_sub(self.one_time_burst);
        self.refill(now, rest);
        let needed = rest as f64 - self.budget;
        if needed <= 0.0 {
            return Duration::ZERO;
        }
        let refill_ns = self.config.refill_time_ms as f64 * 1e6;
        Duration::from_nanos((needed * refill_ns / self.config.size as f64).ceil() as u64)
    }
}

/// Limits for one direction of one device; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimiterConfig {
    /// Bytes.
    pub bandwidth: Option<BucketConfig>,
    /// Requests (block) or packets (net).
    pub ops: Option<BucketConfig>,
}

impl LimiterConfig {
    /// Limits in the units of `--disk bps=,iops=,burst=` and Docker's
    /// `--device-*-bps/iops`: bytes and operations per second (`None`:
    /// unlimited), with a one-time burst of `burst_bytes` on the bandwidth.
    pub fn per_second(bytes_per_s: Option<u64>, ops_per_s: Option<u64>, burst_bytes: u64) -> Self {
        LimiterConfig {
            bandwidth: bytes_per_s.map(|rate| BucketConfig::per_second(rate, burst_bytes)),
            ops: ops_per_s.map(|rate| BucketConfig::per_second(rate, 0)),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// A bandwidth bucket and an operations bucket, admitted together.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    config: LimiterConfig,
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    retry_at: Option<Instant>,
}

impl RateLimiter {
    pub fn new(config: LimiterConfig) -> Result<Self, Error> {
        let mut limiter = RateLimiter::default();
        limiter.update(config)?;
        Ok(limiter)
    }

    pub fn config(&self) -> LimiterConfig {
        self.config
    }

    /// Replaces the limits at run time; the buckets start full, and a
    /// request waiting under the old limits may be retried at once.
    pub fn update(&mut self, config: LimiterConfig) -> Result<(), Error> {
        if let Some(b) = &config.bandwidth {
            b.validate("bandwidth")?;
        }
        if let Some(o) = &config.ops {
            o.validate("ops")?;
        }
        self.bandwidth = config.bandwidth.map(TokenBucket::new).transpose()?;
        self.ops = config.ops.map(TokenBucket::new).transpose()?;
        self.config = config;
        self.retry_at = self.retry_at.map(|_| Instant::now());
        Ok(())
    }

    /// Admits one operation of `bytes` bytes, or refuses it and records
    /// when to retry (see [`RateLimiter::retry_at`]).
    pub fn consume(&mut self, bytes: u64) -> bool {
        let now = Instant::now();
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.consume_at(1, now));
        let bytes_ok = ops_ok
            && self
                .bandwidth
                .as_mut()
                .is_none_or(|b| b.consume_at(bytes, now));
        if bytes_ok {
            self.retry_at = None;
            return true;
        }
        if ops_ok {
            if let Some(b) = self.ops.as_mut() {
                b.refund(1);
            }
        }
        let wait_ops = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1, now));
        let wait_bytes = self
            .bandwidth
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(bytes, now));
        // At least a millisecond: epoll timeouts have millisecond resolution.
        let wait = wait_ops.max(wait_bytes).max(Duration::from_millis(1));
        self.retry_at = Some(now + wait);
        false
    }

    /// Gives back what [`RateLimiter::consume`] took for `bytes`.
    pub fn refund(&mut self, bytes: u64) {
        if let Some(b) = self.ops.as_mut() {
            b.refund(1);
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.refund(bytes);
        }
    }

    /// When a refused operation may be retried; `None` when nothing waits.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Forgets a pending retry (the request went away, e.g. on reset).
    pub fn clear_retry(&mut self) {
        self.retry_at = None;
    }
}

/// The epoll timeout (milliseconds, rounded up; -1 for none) until the
/// earliest of `deadlines`.
pub fn epoll_timeout(deadlines: impl IntoIterator<Item = Option<Instant>>) -> i32 {
    let Some(earliest) = deadlines.into_iter().flatten().min() else {
        return -1;
    };
    let wait = earliest.saturating_duration_since(Instant::now());
    wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucket {
        TokenBucket::new(BucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: refill_ms,
        })
        .unwrap()
    }

    #[test]
    fn bucket_starts_full_and_refills_linearly() {
        let mut b = bucket(1000, 0, 1000);
        let t0 = Instant::now();
        assert!(b.consume_at(1000, t0));
        assert!(!b.consume_at(1, t0));
        assert!(!b.consume_at(600, t0 + Duration::from_millis(500)));
        assert!(b.consume_at(500, t0 + Duration::from_millis(500)));
        assert!(b.consume_at(250, t0 + Duration::from_millis(750)));
    }

    #[test]
    fn one_time_burst_is_spent_first_and_not_refilled() {
        let mut b = bucket(100, 300, 1000);
        let t0 = Instant::now();
        assert!(b.consume_at(350, t0)); // 300 burst + 50 budget
        assert_eq!(b.budget(), 50.0);
        assert!(b.consume_at(50, t0));
        assert!(!b.consume_at(1, t0));
        // After a full refill only the size comes back, never the burst.
        let later = t0 + Duration::from_secs(10);
        assert!(b.consume_at(100, later));
        assert!(!b.consume_at(1, later));
    }

    #[test]
    fn request_larger_than_bucket_waits_until_it_is_paid_for() {
        let mut b = bucket(100, 0, 100);
        let t0 = Instant::now();
        assert!(!b.consume_at(1000, t0));
        // 900 more tokens at 1000/s.
        let wait = b.wait_for(1000, t0).as_secs_f64();
        assert!((0.899..=0.9).contains(&wait), "{wait}");
        assert!(!b.consume_at(1000, t0 + Duration::from_millis(890)));
        assert!(b.consume_at(1000, t0 + Duration::from_millis(900)));
        assert!(b.budget().abs() < 1e-6);
        // A small request afterwards finds the bucket refilling from empty.
        assert!(!b.consume_at(50, t0 + Duration::from_millis(940)));
        assert!(b.consume_at(50, t0 + Duration::from_millis(950)));
    }

    #[test]
    fn refund_restores_budget_up_to_size() {
        let mut b = bucket(100, 0, 1000);
        let t0 = Instant::now();
        assert!(b.consume_at(80, t0));
        b.refund(500);
        assert_eq!(b.budget(), 100.0);
    }

    #[test]
    fn limiter_refuses_when_either_bucket_is_empty_and_refunds_the_other() {
        let mut l = RateLimiter::new(LimiterConfig {
            bandwidth: Some(BucketConfig::per_second(10_000, 0)),
            ops: Some(BucketConfig::per_second(100, 0)),
        })
        .unwrap();
        assert!(l.consume(1000)); // bandwidth bucket holds 1000 (100 ms)
        assert!(!l.consume(1000));
        assert!(l.retry_at().is_some());
        // The ops bucket (10 ops) lost only the one op that went through.
        assert_eq!(l.ops.as_ref().unwrap().budget().floor(), 9.0);
    }

    #[test]
    fn limiter_holds_its_rate_over_time() {
        let mut l = RateLimiter::new(LimiterConfig {
            bandwidth: None,
            ops: Some(BucketConfig::per_second(200, 0)),
        })
        .unwrap();
        let start = Instant::now();
        let mut done = 0;
        while done < 60 {
            if l.consume(0) {
                done += 1;
            } else {
                let until = l.retry_at().unwrap();
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
            }
        }
        // 20 start in the full bucket, 40 more at 200/s: 0.2 s.
        let took = start.elapsed().as_secs_f64();
        assert!((0.18..0.35).contains(&took), "took {took} s");
    }

    #[test]
    fn runtime_update_takes_effect_at_once() {
        let mut l = RateLimiter::new(LimiterConfig {
            bandwidth: Some(BucketConfig::per_second(1000, 0)),
            ops: None,
        })
        .unwrap();
        assert!(l.consume(100));
        assert!(!l.consume(100));
        l.update(LimiterConfig::default()).unwrap();
        assert!(l.retry_at().unwrap() <= Instant::now());
        assert!(l.consume(1 << 30));
        assert!(l.config().is_unlimited());
    }

    #[test]
    fn invalid_config_is_rejected_with_the_field() {
        let err = RateLimiter::new(LimiterConfig {
            bandwidth: Some(BucketConfig {
                size: 0,
                one_time_burst: 0,
                refill_time_ms: 100,
            }),
            ops: None,
        })
        .unwrap_err();
        assert_eq!(err, Error::ZeroSize { what: "bandwidth" });
        assert!(err.to_string().contains("bandwidth"));
    }

    #[test]
    fn per_second_maps_rates_onto_short_buckets_accurately() {
        let c = BucketConfig::per_second(1 << 20, 4096);
        assert_eq!(
            (c.size, c.refill_time_ms, c.one_time_burst),
            (131_072, 125, 4096)
        );
        assert_eq!(c.rate_per_second(), 1 << 20);
        assert_eq!(BucketConfig::per_second(200, 0).rate_per_second(), 200);
        for rate in [1u64, 5, 7, 15, 99, 1000, 12_345, 1 << 20, 10 << 30] {
            let c = BucketConfig::per_second(rate, 0);
            let actual = c.size as f64 * 1000.0 / c.refill_time_ms as f64;
            let error = (actual - rate as f64).abs() / rate as f64;
            assert!(error < 0.004, "rate {rate}: {actual} ({c:?})");
            assert!(c.refill_time_ms <= 1000 && c.size >= 1);
        }
        assert!(RateLimiter::new(LimiterConfig::per_second(Some(0), None, 0)).is_err());
    }

    #[test]
    fn limiter_config_from_rates() {
        let c = LimiterConfig::per_second(Some(1 << 20), None, 4096);
        assert_eq!(c.bandwidth.map(|b| b.size), Some(131_072));
        assert_eq!(c.bandwidth.map(|b| b.one_time_burst), Some(4096));
        assert!(c.ops.is_none() && !c.is_unlimited());
        let c = LimiterConfig::per_second(None, Some(100), 0);
        assert_eq!(c.ops.map(|b| b.rate_per_second()), Some(100));
        assert!(LimiterConfig::per_second(None, None, 0).is_unlimited());
    }

    #[test]
    fn epoll_timeout_rounds_up_and_picks_the_earliest() {
        assert_eq!(epoll_timeout([None, None]), -1);
        let now = Instant::now();
        let t = epoll_timeout([
            Some(now + Duration::from_millis(50)),
            None,
            Some(now + Duration::from_secs(9)),
        ]);
        assert!((49..=50).contains(&t), "{t}");
        assert_eq!(epoll_timeout([Some(now - Duration::from_secs(1))]), 0);
    }
}
