//! Seeded fault injection (`--fail-rate`, `--seed`): the same seed and request order give the
//! same faults, so a failing run can be repeated.

use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Internal,
    Unavailable,
    RateLimited,
    Drop,
}

pub struct Faults {
    rate: f64,
    state: Mutex<u64>,
}

impl Faults {
    pub fn new(rate: f64, seed: u64) -> Faults {
        Faults {
            rate: if rate.is_finite() {
                rate.clamp(0.0, 1.0)
            } else {
                0.0
            },
            state: Mutex::new(seed),
        }
    }

    /// Decides the fate of the next API request.
    pub fn next(&self) -> Option<Fault> {
        if self.rate <= 0.0 {
            return None;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let draw = splitmix64(&mut s);
        // Top 53 bits as a uniform float in [0, 1).
        let u = (draw >> 11) as f64 / (1u64 << 53) as f64;
        if u >= self.rate {
            return None;
        }
        Some(match splitmix64(&mut s) % 4 {
            0 => Fault::Internal,
            1 => Fault::Unavailable,
            2 => Fault::RateLimited,
            _ => Fault::Drop,
        })
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_covers_every_kind() {
        let a: Vec<_> = (0..64)
            .map({
                let f = Faults::new(1.0, 7);
                move |_| f.next()
            })
            .collect();
        let b: Vec<_> = (0..64)
            .map({
                let f = Faults::new(1.0, 7);
                move |_| f.next()
            })
            .collect();
        assert_eq!(a, b);
        for kind in [
            Fault::Internal,
            Fault::Unavailable,
            Fault::RateLimited,
            Fault::Drop,
        ] {
            assert!(a.contains(&Some(kind)));
        }
        let none = Faults::new(0.0, 7);
        assert!((0..100).all(|_| none.next().is_none()));
    }
}
