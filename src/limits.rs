//! Keyed rate limits whose keys others choose (origins, user IDs, devices): checked through
//! [`check_key`], which forgets idle keys once the map grows past [`KEYED_LIMITER_MAX`] (H14), so
//! a stream of new names cannot grow it without bound.

use std::hash::Hash;

use governor::clock::QuantaInstant;
use governor::{DefaultKeyedRateLimiter, NotUntil};

/// Keys a limiter holds before idle ones (back to a full burst) are forgotten.
pub const KEYED_LIMITER_MAX: usize = 10_000;

/// `limiter.check_key(key)`, pruning idle keys first when there are many.
pub fn check_key<K: Hash + Eq + Clone>(
    limiter: &DefaultKeyedRateLimiter<K>,
    key: &K,
) -> Result<(), NotUntil<QuantaInstant>> {
    if limiter.len() >= KEYED_LIMITER_MAX {
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }
    limiter.check_key(key)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use governor::{Quota, RateLimiter};

    use super::*;

    #[test]
    fn h14_idle_keys_are_forgotten_when_the_map_is_full() {
        let quota = Quota::with_period(Duration::from_millis(1)).unwrap().allow_burst(NonZeroU32::new(1).unwrap());
        let limiter: DefaultKeyedRateLimiter<u32> = RateLimiter::keyed(quota);
        for key in 0..KEYED_LIMITER_MAX as u32 {
            check_key(&limiter, &key).unwrap();
        }
        assert_eq!(limiter.len(), KEYED_LIMITER_MAX);
        std::thread::sleep(Duration::from_millis(20));
        check_key(&limiter, &u32::MAX).unwrap();
        assert!(limiter.len() < 10, "idle keys were forgotten: {} left", limiter.len());
        // A key that is still limited is kept, and still limited.
        assert!(check_key(&limiter, &u32::MAX).is_err());
    }
}
