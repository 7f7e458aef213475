//! Rate-limit headers in each provider's dialect (SPEC §9), formatted without allocating.

use core::fmt::Write;

use crate::decision::{Decision, Levels, Outcome};
use crate::metric::Metric;
use crate::response::{Dialect, Render, whole_millis, whole_seconds};
use crate::text::{BufferTooSmall, Sink};

/// Longest header value rendered (the IETF fields with four policies stay well below it).
const VALUE_MAX: usize = 512;

/// Calls `f(name, value)` for every header the gateway should send with `decision`, made at
/// `now_ns`, in a fixed order.
///
/// ```
/// use sluicegate_core::headers::for_each_header;
/// use sluicegate_core::response::{Dialect, Render};
/// use sluicegate_core::{Capacity, Engine, Policy, Request, ScopeKey};
/// let e = Engine::new(Policy::fireworks_2024(), Capacity::scopes(64))?;
/// let d = e.admit(ScopeKey::new(b"a", b"m"), &Request::new(1_000).max_tokens(100), 0)?;
/// let mut seen = Vec::new();
/// for_each_header(&d, &Render::new(Dialect::Fireworks), 0, |name, value| seen.push(format!("{name}: {value}")));
/// assert_eq!(seen[0], "x-ratelimit-limit-requests: 60");
/// assert!(seen.contains(&"x-ratelimit-over-limit: no".to_string()));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn for_each_header(decision: &Decision, render: &Render, now_ns: u64, mut f: impl FnMut(&str, &str)) {
    let mut emit = |name: &str, value: core::fmt::Arguments<'_>| {
        let mut buf = [0u8; VALUE_MAX];
        let mut sink = Sink::new(&mut buf);
        let _ = sink.write_fmt(value);
        f(name, sink.as_str());
    };
    let l = &decision.levels;
    match render.dialect {
        Dialect::Fireworks => fireworks(l, render, over_limit(decision), &mut emit),
        Dialect::Together => {
            if limited(l, Metric::Requests) {
                emit("x-ratelimit-limit", format_args!("{}", l.limit(Metric::Requests)));
                emit("x-ratelimit-remaining", format_args!("{}", l.remaining(Metric::Requests)));
                let reset = render.retry_after_ns(decision).unwrap_or(l.reset_ns(Metric::Requests));
                emit("x-ratelimit-reset", format_args!("{}", whole_seconds(reset)));
            }
            if let Some(m) = tighter_tokens(l) {
                emit("x-tokenlimit-limit", format_args!("{}", l.limit(m)));
                emit("x-tokenlimit-remaining", format_args!("{}", l.remaining(m)));
            }
        }
        Dialect::OpenAi => {
            let tokens = tighter_tokens(l);
            let pairs =
                [("requests", limited(l, Metric::Requests).then_some(Metric::Requests)), ("tokens", tokens)];
            let present = pairs.iter().filter_map(|(kind, m)| m.map(|m| (*kind, m)));
            for (kind, m) in present.clone() {
                emit(openai("limit", kind), format_args!("{}", l.limit(m)));
            }
            for (kind, m) in present.clone() {
                emit(openai("remaining", kind), format_args!("{}", l.remaining(m)));
            }
            for (kind, m) in present {
                emit(openai("reset", kind), format_args!("{}", GoDuration(l.reset_ns(m))));
            }
        }
        Dialect::Anthropic => {
            let kinds = [
                (Metric::Requests, "requests"),
                (Metric::UncachedPromptTokens, "input-tokens"),
                (Metric::GeneratedTokens, "output-tokens"),
            ];
            for (m, kind) in kinds.into_iter().filter(|(m, _)| limited(l, *m)) {
                emit(anthropic(kind, "limit"), format_args!("{}", l.limit(m)));
                emit(anthropic(kind, "remaining"), format_args!("{}", l.remaining(m)));
                let unix = render.unix_ns.saturating_add(now_ns.saturating_sub(render.monotonic_at));
                let at = unix.saturating_add(l.reset_ns(m));
                emit(anthropic(kind, "reset"), format_args!("{}", Rfc3339(whole_seconds(at))));
            }
        }
        Dialect::Ietf => ietf(l, &mut emit),
    }
    if let Some(ns) = render.retry_after_ns(decision) {
        emit("retry-after", format_args!("{}", whole_seconds(ns)));
        emit("retry-after-ms", format_args!("{}", whole_millis(ns)));
    }
    if let Some(retry) = should_retry(&decision.outcome) {
        emit("x-should-retry", format_args!("{retry}"));
    }
}

/// Whether a client's retry of a refused request can succeed, for the `x-should-retry` header the
/// providers' SDKs obey: not for a request larger than any bucket, a spend refusal or invalid
/// input; yes after a shed, an ordinary 429 or one for too many requests in flight. `None` for an admitted request.
pub fn should_retry(outcome: &Outcome) -> Option<bool> {
    match outcome {
        Outcome::Admit(_) | Outcome::AdmitOverLimit(_) => None,
        Outcome::RejectRateLimited(r) => Some(!r.too_large),
        Outcome::Shed(_) | Outcome::RejectConcurrency(_) => Some(true),
        Outcome::RejectSpend(_) | Outcome::RejectInvalid(_) => Some(false),
    }
}

/// Writes `name: value\r\n` for every header into `out`; returns the bytes written.
pub fn write_headers(
    decision: &Decision,
    render: &Render,
    now_ns: u64,
    out: &mut [u8],
) -> Result<usize, BufferTooSmall> {
    let mut sink = Sink::new(out);
    for_each_header(decision, render, now_ns, |name, value| {
        let _ = write!(sink, "{name}: {value}\r\n");
    });
    sink.finish()
}

fn openai(field: &str, kind: &str) -> &'static str {
    match (field, kind) {
        ("limit", "requests") => "x-ratelimit-limit-requests",
        ("limit", _) => "x-ratelimit-limit-tokens",
        ("remaining", "requests") => "x-ratelimit-remaining-requests",
        ("remaining", _) => "x-ratelimit-remaining-tokens",
        (_, "requests") => "x-ratelimit-reset-requests",
        _ => "x-ratelimit-reset-tokens",
    }
}

fn anthropic(kind: &str, field: &str) -> &'static str {
    match (kind, field) {
        ("requests", "limit") => "anthropic-ratelimit-requests-limit",
        ("requests", "remaining") => "anthropic-ratelimit-requests-remaining",
        ("requests", _) => "anthropic-ratelimit-requests-reset",
        ("input-tokens", "limit") => "anthropic-ratelimit-input-tokens-limit",
        ("input-tokens", "remaining") => "anthropic-ratelimit-input-tokens-remaining",
        ("input-tokens", _) => "anthropic-ratelimit-input-tokens-reset",
        (_, "limit") => "anthropic-ratelimit-output-tokens-limit",
        (_, "remaining") => "anthropic-ratelimit-output-tokens-remaining",
        _ => "anthropic-ratelimit-output-tokens-reset",
    }
}

fn limited(l: &Levels, m: Metric) -> bool {
    l.limit(m) != u64::MAX
}

/// Whether the request runs (or would run) over its limit.
fn over_limit(d: &Decision) -> bool {
    match &d.outcome {
        Outcome::Admit(p) | Outcome::AdmitOverLimit(p) => p.over_limit(),
        _ => d.levels.over_limit(),
    }
}

/// Of prompt and generated tokens, the one closest to exhaustion: dialects with a single token
/// limit report the one that will bind first.
fn tighter_tokens(l: &Levels) -> Option<Metric> {
    [Metric::PromptTokens, Metric::GeneratedTokens]
        .into_iter()
        .filter(|m| limited(l, *m))
        .min_by_key(|m| (u128::from(l.remaining(*m)) << 32) / u128::from(l.limit(*m).max(1)))
}

/// Fireworks' headers. Per minute by default; in the 2026 form (`per_second`) every limit and
/// remaining is per second (SPEC §9: a limit and its remaining share a unit): limits rounded up
/// (a small limit never reads 0), remaining rounded down (never more than is there). Only the
/// 2026 token limits carry a cache-adjusted prompt limit, and only a policy that limits
/// requests (`fireworks_2026` does not) sends a request limit in it.
fn fireworks(l: &Levels, render: &Render, over: bool, emit: &mut impl FnMut(&str, core::fmt::Arguments<'_>)) {
    let metrics = [
        (Metric::Requests, "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests"),
        (Metric::PromptTokens, "x-ratelimit-limit-tokens-prompt", "x-ratelimit-remaining-tokens-prompt"),
        (
            Metric::GeneratedTokens,
            "x-ratelimit-limit-tokens-generated",
            "x-ratelimit-remaining-tokens-generated",
        ),
    ];
    if render.per_second {
        // Fireworks' 2026 headers: effective limits per second.
        let per_second = [
            (Metric::Requests, "x-ratelimit-limit-requests"),
            (Metric::PromptTokens, "x-ratelimit-limit-tokens-prompt"),
            (Metric::UncachedPromptTokens, "x-ratelimit-limit-tokens-cache-adjusted-prompt"),
            (Metric::GeneratedTokens, "x-ratelimit-limit-tokens-generated"),
        ];
        for (m, name) in per_second.into_iter().filter(|(m, _)| limited(l, *m)) {
            emit(name, format_args!("{}", l.limit(m).div_ceil(60)));
        }
    } else {
        for (m, name, _) in metrics.into_iter().filter(|(m, ..)| limited(l, *m)) {
            emit(name, format_args!("{}", l.limit(m)));
        }
    }
    let unit = if render.per_second { 60 } else { 1 };
    for (m, _, name) in metrics.into_iter().filter(|(m, ..)| limited(l, *m)) {
        emit(name, format_args!("{}", l.remaining(m) / unit));
    }
    emit("x-ratelimit-over-limit", format_args!("{}", if over { "yes" } else { "no" }));
}

fn ietf(l: &Levels, emit: &mut impl FnMut(&str, core::fmt::Arguments<'_>)) {
    let names = [
        (Metric::Requests, "requests", "requests"),
        (Metric::PromptTokens, "prompt-tokens", "tokens"),
        (Metric::UncachedPromptTokens, "uncached-prompt-tokens", "tokens"),
        (Metric::GeneratedTokens, "generated-tokens", "tokens"),
    ];
    // No limited metric (a refusal decided before the scope was read, or nothing enforced):
    // an empty list is not a valid field, so there is none.
    if !names.iter().any(|(m, ..)| limited(l, *m)) {
        return;
    }
    let policies = IetfList(l, &names, true);
    emit("RateLimit-Policy", format_args!("{policies}"));
    let state = IetfList(l, &names, false);
    emit("RateLimit", format_args!("{state}"));
}

/// An SF list of one item per limited metric: its policy (`q`, `w`, `qu`) or its state (`r`, `t`).
struct IetfList<'a>(&'a Levels, &'a [(Metric, &'static str, &'static str); 4], bool);

impl core::fmt::Display for IetfList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let IetfList(l, names, policy) = self;
        let mut first = true;
        for (m, name, unit) in names.iter().filter(|(m, ..)| limited(l, *m)) {
            f.write_str(if first { "" } else { ", " })?;
            first = false;
            if *policy {
                write!(f, "\"{name}\";q={};w=60;qu=\"{unit}\"", l.limit(*m))?;
            } else {
                write!(f, "\"{name}\";r={};t={}", l.remaining(*m), whole_seconds(l.reset_ns(*m)))?;
            }
        }
        Ok(())
    }
}

/// A duration as Go prints it, to the millisecond: `0s`, `12ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`.
pub struct GoDuration(pub u64);

impl core::fmt::Display for GoDuration {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let ms = whole_millis(self.0);
        if ms == 0 {
            return f.write_str("0s");
        }
        if ms < 1_000 {
            return write!(f, "{ms}ms");
        }
        let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1_000 % 60, ms % 1_000);
        if h > 0 {
            write!(f, "{h}h{m}m")?;
        } else if m > 0 {
            write!(f, "{m}m")?;
        }
        write!(f, "{s}")?;
        if frac > 0 {
            let (mut digits, mut width) = (frac, 3);
            while digits % 10 == 0 {
                digits /= 10;
                width -= 1;
            }
            write!(f, ".{digits:0width$}")?;
        }
        f.write_str("s")
    }
}

/// Unix seconds as an RFC 3339 UTC timestamp, e.g. `2026-11-23T23:18:56Z`.
pub struct Rfc3339(pub u64);

impl core::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let days = self.0 / 86_400;
        let secs = self.0 % 86_400;
        // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + u64::from(month <= 2);
        write!(f, "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3_600, secs / 60 % 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::string::ToString;

    #[test]
    fn durations_read_like_go() {
        let ms = 1_000_000;
        let cases = [
            (0, "0s"),
            (1, "1ms"),
            (12 * ms, "12ms"),
            (1_000 * ms, "1s"),
            (1_500 * ms, "1.5s"),
            (1_082 * ms, "1.082s"),
        ];
        for (ns, text) in cases {
            assert_eq!(GoDuration(ns).to_string(), text);
        }
        assert_eq!(GoDuration(360_000 * ms).to_string(), "6m0s");
        assert_eq!(GoDuration(3_723_000 * ms).to_string(), "1h2m3s");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(Rfc3339(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(Rfc3339(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        assert_eq!(Rfc3339(1_795_475_936).to_string(), "2026-11-23T23:18:56Z");
    }

    /// Known dates far past the epoch's first day (from `date -u -d @SECONDS`): leap days,
    /// century years that are and are not leap years, year-end and month-end rollovers.
    #[test]
    fn timestamps_far_past_the_epoch_are_rfc3339_utc() {
        let goldens: [(u64, &str); 23] = [
            (2_678_399, "1970-01-31T23:59:59Z"),
            (31_535_999, "1970-12-31T23:59:59Z"),
            (31_536_000, "1971-01-01T00:00:00Z"),
            (68_169_600, "1972-02-29T00:00:00Z"),
            (946_684_799, "1999-12-31T23:59:59Z"),
            (946_684_800, "2000-01-01T00:00:00Z"),
            (951_868_800, "2000-03-01T00:00:00Z"),
            (1_704_067_199, "2023-12-31T23:59:59Z"),
            (1_704_067_200, "2024-01-01T00:00:00Z"),
            (1_709_251_199, "2024-02-29T23:59:59Z"),
            (1_709_251_200, "2024-03-01T00:00:00Z"),
            (1_714_480_496, "2024-04-30T12:34:56Z"),
            (1_719_792_000, "2024-07-01T00:00:00Z"),
            (1_735_689_599, "2024-12-31T23:59:59Z"),
            (1_735_689_600, "2025-01-01T00:00:00Z"),
            (1_749_974_950, "2025-06-15T08:09:10Z"),
            (2_147_483_648, "2038-01-19T03:14:08Z"),
            (4_107_542_399, "2100-02-28T23:59:59Z"),
            (4_107_542_400, "2100-03-01T00:00:00Z"),
            (4_133_980_799, "2100-12-31T23:59:59Z"),
            (13_574_606_400, "2400-02-29T12:00:00Z"),
            (13_601_087_999, "2400-12-31T23:59:59Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ];
        for (unix, text) in goldens {
            assert_eq!(Rfc3339(unix).to_string(), text, "{unix}");
        }
    }

    /// Every day from 1970 to 2500 against a naive calendar walk (a different algorithm from
    /// the closed form under test), at a time of day that moves with the date.
    #[test]
    fn every_day_to_2500_matches_a_calendar_walk() {
        let leap = |y: u64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_days = |y: u64, m: u64| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut year, mut month, mut day) = (1970u64, 1u64, 1u64);
        let mut days = 0u64;
        while year < 2500 {
            let secs = (days * 7_919) % 86_400;
            let expected = std::format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
                secs / 3_600,
                secs / 60 % 60,
                secs % 60
            );
            assert_eq!(Rfc3339(days * 86_400 + secs).to_string(), expected);
            days += 1;
            day += 1;
            if day > month_days(year, month) {
                day = 1;
                month += 1;
                if month > 12 {
                    month = 1;
                    year += 1;
                }
            }
        }
    }

    fn headers(d: &Decision, render: &Render) -> std::vec::Vec<std::string::String> {
        let mut all = std::vec::Vec::new();
        for_each_header(d, render, 0, |name, value| all.push(std::format!("{name}: {value}")));
        all
    }

    /// A request admitted after a smoothing wait runs within its limit: its levels are past the
    /// limit when it is admitted, but the permit's band, not the levels, says "over limit".
    #[test]
    fn a_smoothed_request_is_not_over_limit() {
        use crate::{Capacity, Engine, Outcome, Policy, Request, ScopeKey};
        let e = Engine::new(Policy::together(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        let key = ScopeKey::new(b"a", b"m");
        for _ in 0..60 {
            e.admit(key, &Request::new(0), 0).unwrap_or_else(|e| panic!("{e}"));
        }
        let d = e.admit(key, &Request::new(0), 0).unwrap_or_else(|e| panic!("{e}"));
        let Outcome::Admit(p) = d.outcome else { panic!("smoothed, not refused: {d:?}") };
        assert_eq!(p.wait_ns(), 1_000_000_000);
        assert!(d.levels.over_limit());
        assert!(headers(&d, &Render::new(Dialect::Fireworks)).contains(&"x-ratelimit-over-limit: no".into()));
    }

    /// Dialects with one token limit report the token metric nearest exhaustion, as a fraction
    /// of its limit (not in tokens).
    #[test]
    fn the_single_token_limit_is_the_one_nearest_exhaustion() {
        use crate::{Capacity, Engine, Policy, Request, ScopeKey};
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        let render = Render::new(Dialect::Together);
        // Half the generated tokens left (3,000 of 6,000), all of the prompt's.
        let d = e
            .admit(ScopeKey::new(b"a", b"m"), &Request::new(0).max_tokens(3_000), 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let all = headers(&d, &render);
        assert!(all.contains(&"x-tokenlimit-limit: 6000".into()), "{all:?}");
        assert!(all.contains(&"x-tokenlimit-remaining: 3000".into()), "{all:?}");
        // More prompt tokens left (10,000) than generated (5,000), but a smaller fraction.
        let d = e
            .admit(ScopeKey::new(b"b", b"m"), &Request::new(50_000).max_tokens(1_000), 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let all = headers(&d, &render);
        assert!(all.contains(&"x-tokenlimit-limit: 60000".into()), "{all:?}");
        assert!(all.contains(&"x-tokenlimit-remaining: 10000".into()), "{all:?}");
        // And in OpenAI's headers.
        let all = headers(&d, &Render::new(Dialect::OpenAi));
        assert!(all.contains(&"x-ratelimit-limit-tokens: 60000".into()), "{all:?}");
        assert!(all.contains(&"x-ratelimit-remaining-tokens: 10000".into()), "{all:?}");
    }

    /// Anthropic's reset headers name the wall-clock moment each bucket is full again: here a
    /// second before the leap day ends, so the requests bucket is full on the 1st of March.
    #[test]
    fn anthropic_resets_cross_a_leap_day_at_the_wall_clock() {
        use crate::{Capacity, Engine, Policy, Request, ScopeKey};
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        let now = 5_000_000_000;
        let d = e
            .admit(ScopeKey::new(b"a", b"m"), &Request::new(0).max_tokens(1_500), now)
            .unwrap_or_else(|e| panic!("{e}"));
        // At `now` the wall clock reads 2024-02-29T23:59:58.5Z.
        let render = Render::new(Dialect::Anthropic).wall_clock(1_709_251_198_500_000_000, now);
        let mut resets = std::vec::Vec::new();
        for_each_header(&d, &render, now, |name, value| {
            if name.ends_with("-reset") {
                resets.push(std::format!("{name}: {value}"));
            }
        });
        assert_eq!(
            resets,
            [
                // One request of 60 a minute: full again in 1 s, at 23:59:59.5, rounded up.
                "anthropic-ratelimit-requests-reset: 2024-03-01T00:00:00Z",
                // No prompt tokens: full now, rounded up to the next whole second.
                "anthropic-ratelimit-input-tokens-reset: 2024-02-29T23:59:59Z",
                // 1,500 of 6,000 generated tokens a minute: 15 s.
                "anthropic-ratelimit-output-tokens-reset: 2024-03-01T00:00:14Z",
            ]
        );
    }
}
