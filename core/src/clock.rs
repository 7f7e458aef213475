//! A monotonic clock for callers that do not keep their own (needs `std`).

use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the first call in this process, from the OS monotonic clock.
///
/// ```
/// let a = sluicegate_core::clock::now_ns();
/// assert!(sluicegate_core::clock::now_ns() >= a);
/// ```
pub fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    /// The clock moves: a read after a sleep is later, by at least the sleep.
    #[test]
    fn the_clock_advances_with_time() {
        let before = super::now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let after = super::now_ns();
        assert!(after >= before + 2_000_000, "{before} then {after}");
    }
}
