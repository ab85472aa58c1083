//! Client-side request budget: at most `n` requests in any sliding window.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

pub struct RateLimiter {
    max: usize,
    window: Duration,
    /// Start times of the requests in the current window, oldest first. A tokio Mutex: waiters
    /// queue in FIFO order while the holder sleeps for the window to slide.
    sent: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    /// `max` 0 is taken as 1, so the limiter can never block forever.
    pub fn new(max: u32, window: Duration) -> Self {
        let max = max.max(1) as usize;
        RateLimiter {
            max,
            window,
            sent: Mutex::new(VecDeque::with_capacity(max.min(4096))),
        }
    }

    /// Waits until one more request fits in the window, and records it.
    pub async fn acquire(&self) {
        let mut sent = self.sent.lock().await;
        loop {
            let now = Instant::now();
            while sent
                .front()
                .is_some_and(|&t| now.duration_since(t) >= self.window)
            {
                sent.pop_front();
            }
            if sent.len() < self.max {
                sent.push_back(now);
                return;
            }
            if let Some(&oldest) = sent.front() {
                tokio::time::sleep_until(oldest + self.window).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn sliding_window() {
        let rl = RateLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        rl.acquire().await;
        tokio::time::advance(Duration::from_secs(4)).await;
        rl.acquire().await;
        rl.acquire().await;
        assert_eq!(Instant::now(), at(4));
        // Window [0, 4, 4]: the 4th waits for the request of t=0 to leave it.
        rl.acquire().await;
        assert_eq!(Instant::now(), at(10));
        // Window [4, 4, 10]: the 5th waits for t=4, which frees room for the 6th too.
        rl.acquire().await;
        assert_eq!(Instant::now(), at(14));
        rl.acquire().await;
        assert_eq!(Instant::now(), at(14));
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_n_in_any_window() {
        let rl = Arc::new(RateLimiter::new(5, Duration::from_secs(60)));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..23)
            .map(|_| {
                let rl = rl.clone();
                tokio::spawn(async move {
                    rl.acquire().await;
                    Instant::now()
                })
            })
            .collect();
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .filter(|u| u.duration_since(*t) < Duration::from_secs(60))
                .count();
            assert!(
                in_window <= 5,
                "{in_window} requests within 60 s of request {i}"
            );
        }
        // 23 requests at 5 per minute: the last one starts in the fifth window.
        assert_eq!(
            times.last().unwrap().duration_since(t0),
            Duration::from_secs(240)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_is_one() {
        let rl = RateLimiter::new(0, Duration::from_secs(1));
        let t0 = Instant::now();
        rl.acquire().await;
        rl.acquire().await;
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
    }
}
