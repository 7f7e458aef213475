//! A monotonic clock for callers that do not keep their own (needs `std`).

/// Nanoseconds from the OS monotonic clock. On unix this is `CLOCK_MONOTONIC`, whose origin
/// every process on the host shares: workers sharing an engine (a file, an nginx zone) agree on
/// the time, and agree with Python's `time.monotonic_ns()`. Elsewhere it counts from the first
/// call in the process.
///
/// ```
/// let a = sluicegate_core::clock::now_ns();
/// assert!(sluicegate_core::clock::now_ns() >= a);
/// ```
#[cfg(unix)]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC exists on every unix we build
    // for, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let seconds = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    seconds.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Nanoseconds since the first call in this process, from the OS monotonic clock.
#[cfg(not(unix))]
pub fn now_ns() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
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
