//! Chaos: seeded random delays at points, reproducible per vCPU.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{lock, Hooks};

/// Seeded random delays, reproducible per vCPU.
#[derive(Debug)]
pub(super) struct Chaos {
    pub(super) seed: u64,
    pub(super) max_delay: Duration,
    pub(super) rngs: Mutex<BTreeMap<usize, u64>>,
}

impl Hooks {
    /// Turns chaos on with `seed` (delays up to `max_delay`).
    pub fn set_chaos(&self, seed: u64, max_delay: Duration) {
        *lock(&self.chaos) = Some(std::sync::Arc::new(Chaos {
            seed,
            max_delay,
            rngs: Mutex::new(BTreeMap::new()),
        }));
        self.refresh_active();
    }

    pub(super) fn chaos_delay(&self, cpu: usize) {
        let Some(chaos) = lock(&self.chaos).clone() else {
            return;
        };
        let r = {
            let mut rngs = lock(&chaos.rngs);
            let s = rngs
                .entry(cpu)
                .or_insert(chaos.seed ^ (cpu as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            *s ^= *s << 13;
            *s ^= *s >> 7;
            *s ^= *s << 17;
            *s
        };
        // One hit in four waits a random while: windows widen, reproducibly.
        if r % 4 == 0 {
            let us = (r >> 8) % (chaos.max_delay.as_micros() as u64 + 1);
            self.delay(Duration::from_micros(us));
        }
    }
}
