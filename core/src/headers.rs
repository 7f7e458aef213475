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
}
