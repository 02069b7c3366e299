//! The retry schedule and the verdict for one recipient after an attempt: delivered, deferred
//! (with the next attempt time), failed, or expired.
//!
//! Pure. The wait after the n-th failed attempt is `retry_first * 2^(n-1)`, capped at
//! `retry_max_interval`, stretched by up to [`JITTER`] so that messages deferred together do
//! not all come back in the same instant (the cap still holds after jitter; the scheduler
//! gives all recipients of one message the same stretch, so they come back together). The last attempt
//! is pulled in to the expiry time, so a message gets one try at its deadline; a temporary
//! failure at or after `received_at + max_queue_lifetime` expires the recipient.

use std::time::Duration;

use crate::store::RecipientStatus;

/// Largest relative stretch added to a wait (10 %).
pub const JITTER: f64 = 0.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub first: Duration,
    pub max_interval: Duration,
    pub max_queue_lifetime: Duration,
}

impl RetryPolicy {
    pub fn from_config(c: &crate::config::DeliveryConfig) -> Self {
        Self {
            first: c.retry_first,
            max_interval: c.retry_max_interval,
            max_queue_lifetime: c.max_queue_lifetime,
        }
    }

    /// The wait before the next attempt after `failed_attempts` (≥ 1) temporary failures,
    /// without jitter.
    pub fn base_interval(&self, failed_attempts: u32) -> Duration {
        let doublings = failed_attempts.saturating_sub(1).min(40);
        let factor = 1u64 << doublings;
        let ms = (self.first.as_millis() as u64).saturating_mul(factor);
        Duration::from_millis(ms).min(self.max_interval)
    }

    /// The wait with jitter; `unit` is a uniform random number in `[0, 1)`.
    pub fn interval(&self, failed_attempts: u32, unit: f64) -> Duration {
        let base = self.base_interval(failed_attempts);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        base.mul_f64(1.0 + JITTER * unit).min(self.max_interval)
    }

    pub fn expires_at_ms(&self, received_at_ms: i64) -> i64 {
        received_at_ms.saturating_add(self.max_queue_lifetime.as_millis() as i64)
    }
}

/// How an attempt ended for one recipient, as far as the schedule cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// The remote reply code for this recipient (RCPT reply if not 2xx, else DATA reply).
    Reply(u16),
    /// No usable reply: connection refused or dropped, timeout, TLS failure, temporary DNS
    /// failure, `tls = required` not met.
    Temporary,
    /// Decided locally as permanent without a reply (null MX, NXDOMAIN).
    Permanent,
}

/// The recipient's new status and, when deferred, its next attempt time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub status: RecipientStatus,
    pub next_attempt_at_ms: Option<i64>,
}

/// Decides the outcome of one attempt. `failed_attempts` counts temporary failures including
/// this one (≥ 1); `unit` in `[0, 1)` picks the jitter.
pub fn verdict(
    policy: &RetryPolicy,
    result: AttemptResult,
    received_at_ms: i64,
    now_ms: i64,
    failed_attempts: u32,
    unit: f64,
) -> Verdict {
    let temporary = match result {
        AttemptResult::Reply(code) if (200..300).contains(&code) => {
            return Verdict {
                status: RecipientStatus::Delivered,
                next_attempt_at_ms: None,
            };
        }
        AttemptResult::Reply(code) if (500..600).contains(&code) => false,
        AttemptResult::Permanent => false,
        // 4xx, and anything out of protocol (1xx, 3xx where 2xx was due), retries.
        AttemptResult::Reply(_) | AttemptResult::Temporary => true,
    };
    if !temporary {
        return Verdict {
            status: RecipientStatus::Failed,
            next_attempt_at_ms: None,
        };
    }
    let expires_at = policy.expires_at_ms(received_at_ms);
    if now_ms >= expires_at {
        return Verdict {
            status: RecipientStatus::Expired,
            next_attempt_at_ms: None,
        };
    }
    let wait = policy.interval(failed_attempts.max(1), unit);
    let next = now_ms
        .saturating_add(wait.as_millis() as i64)
        .min(expires_at);
    Verdict {
        status: RecipientStatus::Deferred,
        next_attempt_at_ms: Some(next),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn default_policy() -> RetryPolicy {
        RetryPolicy::from_config(&crate::config::DeliveryConfig::default())
    }

    #[test]
    fn schedule_doubles_from_first_and_caps_at_max_interval() {
        let p = default_policy();
        let expected_min = [5, 10, 20, 40, 80, 160, 240, 240, 240];
        for (i, m) in expected_min.iter().enumerate() {
            assert_eq!(
                p.base_interval(i as u32 + 1),
                Duration::from_millis(m * MIN),
                "attempt {}",
                i + 1
            );
        }
        // Huge attempt counts neither overflow nor exceed the cap.
        assert_eq!(p.base_interval(u32::MAX), Duration::from_secs(4 * 3600));
        // Attempt 0 is treated as the first.
        assert_eq!(p.base_interval(0), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_under_the_cap() {
        let p = default_policy();
        for attempt in 1..=12u32 {
            let base = p.base_interval(attempt);
            for step in 0..=100 {
                let unit = step as f64 / 100.0;
                let i = p.interval(attempt, unit);
                assert!(i >= base, "attempt {attempt} unit {unit}");
                assert!(i <= base.mul_f64(1.0 + JITTER));
                assert!(i <= p.max_interval);
            }
        }
        // Out-of-range randomness is clamped, not trusted.
        assert_eq!(p.interval(1, f64::NAN), p.base_interval(1));
        assert_eq!(p.interval(1, -3.0), p.base_interval(1));
        assert_eq!(p.interval(1, 7.0), p.base_interval(1).mul_f64(1.1));
    }

    #[test]
    fn replies_map_to_statuses() {
        let p = default_policy();
        let v = |r| verdict(&p, r, 0, 1000, 1, 0.0);
        assert_eq!(
            v(AttemptResult::Reply(250)).status,
            RecipientStatus::Delivered
        );
        assert_eq!(
            v(AttemptResult::Reply(251)).status,
            RecipientStatus::Delivered
        );
        assert_eq!(v(AttemptResult::Reply(550)).status, RecipientStatus::Failed);
        assert_eq!(v(AttemptResult::Reply(554)).status, RecipientStatus::Failed);
        assert_eq!(v(AttemptResult::Permanent).status, RecipientStatus::Failed);
        for r in [
            AttemptResult::Reply(421),
            AttemptResult::Reply(450),
            AttemptResult::Reply(452),
            AttemptResult::Reply(354),
            AttemptResult::Temporary,
        ] {
            let d = v(r);
            assert_eq!(d.status, RecipientStatus::Deferred, "{r:?}");
            assert_eq!(d.next_attempt_at_ms, Some(1000 + 5 * MIN as i64));
        }
        assert_eq!(v(AttemptResult::Reply(250)).next_attempt_at_ms, None);
    }

    #[test]
    fn expiry_boundary_is_inclusive() {
        let p = default_policy();
        let received = 1_000_000i64;
        let deadline = received + 5 * 86_400_000;
        let at = |now| verdict(&p, AttemptResult::Reply(450), received, now, 30, 0.5);
        assert_eq!(at(deadline - 1).status, RecipientStatus::Deferred);
        assert_eq!(at(deadline).status, RecipientStatus::Expired);
        assert_eq!(at(deadline + 1).status, RecipientStatus::Expired);
        assert_eq!(at(deadline).next_attempt_at_ms, None);
        // A 5xx past the deadline is still a plain failure, and 2xx still delivers.
        assert_eq!(
            verdict(
                &p,
                AttemptResult::Reply(550),
                received,
                deadline + 5,
                3,
                0.0
            )
            .status,
            RecipientStatus::Failed
        );
        assert_eq!(
            verdict(
                &p,
                AttemptResult::Reply(250),
                received,
                deadline + 5,
                3,
                0.0
            )
            .status,
            RecipientStatus::Delivered
        );
    }

    #[test]
    fn last_retry_is_pulled_in_to_the_deadline() {
        let p = default_policy();
        let received = 0i64;
        let deadline = 5 * 86_400_000i64;
        let now = deadline - 60_000;
        let d = verdict(&p, AttemptResult::Temporary, received, now, 20, 0.99);
        assert_eq!(d.status, RecipientStatus::Deferred);
        assert_eq!(d.next_attempt_at_ms, Some(deadline));
    }

    #[test]
    fn whole_queue_lifetime_walk_expires_after_bounded_attempts() {
        // Simulate a recipient that is always deferred: attempts stay 5 min .. 4 h apart and
        // the walk ends in `expired` right at the deadline.
        let p = default_policy();
        let received = 0i64;
        let mut now = 0i64;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let d = verdict(&p, AttemptResult::Reply(421), received, now, attempts, 0.7);
            match d.status {
                RecipientStatus::Deferred => {
                    let next = d.next_attempt_at_ms.unwrap();
                    let gap = next - now;
                    assert!(gap > 0 && gap <= 4 * 3_600_000, "gap {gap}");
                    now = next;
                }
                RecipientStatus::Expired => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(now, p.expires_at_ms(received));
        // 5+10+...+160 min ≈ 5.25 h for 6 attempts, then every 4 h (+jitter capped) to 120 h.
        assert!((30..=40).contains(&attempts), "{attempts}");
    }
}
