//! The retry schedule of deferred messages, as pure functions of the attempt number.
//!
//! Whether to retry is decided by `worker::decide`; this module only computes when.

use std::time::Duration;

use crate::configuration::RetrySettings;

/// Share of the delay that jitter may remove, so that messages deferred together by one
/// relay outage do not all come back in the same second.
pub const JITTER_SHARE: f64 = 0.2;

/// Computes the delay after failed attempt `attempt` (1 for the first send), before jitter:
/// `initial_delay * 2^(attempt - 1)`, capped at `max_delay`.
pub fn base_delay(attempt: u32, settings: &RetrySettings) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let delay = settings.initial_delay.saturating_mul(1u32 << exponent);
    delay.min(settings.max_delay)
}

/// Shortens the base delay by up to [`JITTER_SHARE`], with `random` uniform in `[0, 1)`.
pub fn jittered_delay(attempt: u32, settings: &RetrySettings, random: f64) -> Duration {
    let random = random.clamp(0.0, 1.0);
    base_delay(attempt, settings).mul_f64(1.0 - JITTER_SHARE * random)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RetrySettings {
        RetrySettings {
            initial_delay: Duration::from_secs(60),
            max_delay: Duration::from_secs(3600),
            window: Duration::from_secs(24 * 3600),
        }
    }

    #[test]
    fn schedule_doubles_then_caps() {
        let minutes: Vec<u64> = (1..=9).map(|attempt| base_delay(attempt, &settings()).as_secs() / 60).collect();
        assert_eq!(minutes, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn huge_attempt_does_not_overflow() {
        assert_eq!(base_delay(u32::MAX, &settings()), Duration::from_secs(3600));
    }

    #[test]
    fn jitter_stays_within_share() {
        assert_eq!(jittered_delay(1, &settings(), 0.0), Duration::from_secs(60));
        assert_eq!(jittered_delay(1, &settings(), 0.5), Duration::from_secs(54));
        assert_eq!(jittered_delay(3, &settings(), 0.999_999).as_secs(), 192);
    }
}
