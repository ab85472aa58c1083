//! The concurrency and memory bound: at most `max_requests` API requests are handled at once,
//! and request bodies held in memory stay within `max_body_memory`. A request that cannot get
//! in within `queue_wait` is answered 429 with `Retry-After`, as the real API does when throttling.

use super::routes::ApiError;
use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Memory is counted in KiB, so that a `u32` count of permits covers any budget.
const UNIT: usize = 1024;

/// A body takes about twice its size while handled: its bytes, then their parsed form (JSON
/// values, SQLite's copy of a blob).
const BODY_FACTOR: usize = 2;

pub struct Admission {
    slots: Semaphore,
    memory: Semaphore,
    memory_units: u32,
    wait: Duration,
}

/// Memory reserved for one request's body; released when dropped.
pub struct Reservation<'a> {
    permit: Option<SemaphorePermit<'a>>,
}

impl Admission {
    pub fn new(max_requests: usize, max_body_memory: u64, wait: Duration) -> Admission {
        let units = (max_body_memory / UNIT as u64).clamp(1, u32::MAX as u64) as u32;
        Admission {
            slots: Semaphore::new(max_requests.clamp(1, Semaphore::MAX_PERMITS)),
            memory: Semaphore::new(units as usize),
            memory_units: units,
            wait,
        }
    }

    /// A slot to handle one request, waiting up to `wait` for one.
    pub async fn slot(&self) -> Result<SemaphorePermit<'_>, ApiError> {
        match tokio::time::timeout(self.wait, self.slots.acquire()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(ApiError::throttled()),
        }
    }

    /// Memory for a body of `declared` bytes, waiting up to `wait`. A body of unknown size
    /// starts with nothing and grows (without waiting) as it arrives. A body larger than the
    /// whole budget is given the whole budget, so that it can still be handled alone.
    pub async fn reserve(&self, declared: Option<u64>) -> Result<Reservation<'_>, ApiError> {
        let units = self.units(declared.unwrap_or(0) as usize);
        if units == 0 {
            return Ok(Reservation { permit: None });
        }
        match tokio::time::timeout(self.wait, self.memory.acquire_many(units)).await {
            Ok(Ok(p)) => Ok(Reservation { permit: Some(p) }),
            _ => Err(ApiError::throttled()),
        }
    }

    /// Makes `r` cover a body of `len` bytes so far, or answers 429 when the budget is spent.
    pub fn grow<'a>(&'a self, r: &mut Reservation<'a>, len: usize) -> Result<(), ApiError> {
        let want = self.units(len);
        let held = r.permit.as_ref().map_or(0, |p| p.num_permits() as u32);
        if want <= held {
            return Ok(());
        }
        let more = self
            .memory
            .try_acquire_many(want - held)
            .map_err(|_| ApiError::throttled())?;
        match &mut r.permit {
            Some(p) => p.merge(more),
            None => r.permit = Some(more),
        }
        Ok(())
    }

    fn units(&self, body_len: usize) -> u32 {
        let bytes = body_len.saturating_mul(BODY_FACTOR);
        (bytes.div_ceil(UNIT).min(self.memory_units as usize)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_count_twice_and_a_huge_one_gets_the_whole_budget() {
        let a = Admission::new(4, 64 * 1024, Duration::from_millis(10));
        // 40,000 bytes count as 80,000: more than the 64 KiB budget, so all of it.
        let big = a.reserve(Some(40_000)).await.unwrap();
        assert_eq!(a.memory.available_permits(), 0);
        assert!(a.reserve(Some(1)).await.is_err());
        let mut grown = a.reserve(None).await.unwrap();
        assert!(a.grow(&mut grown, 1).is_err());
        drop(big);
        a.grow(&mut grown, 10_000).unwrap();
        assert_eq!(a.memory.available_permits(), 64 - 20);
        a.grow(&mut grown, 5_000).unwrap();
        assert_eq!(a.memory.available_permits(), 64 - 20);
        drop(grown);
        assert_eq!(a.memory.available_permits(), 64);
    }
}
