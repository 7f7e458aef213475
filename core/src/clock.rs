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
