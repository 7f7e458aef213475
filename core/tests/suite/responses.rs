//! SPEC.md §9: what the gateway tells the client, per dialect and outcome.

use proptest::prelude::*;
use serde_json::Value;
use sluicegate_core::error_body::write_error_body;
use sluicegate_core::headers::{for_each_header, write_headers};
use sluicegate_core::response::{Dialect, Render, shed_retry_max_ns};
use sluicegate_core::text::BufferTooSmall;
use sluicegate_core::{
    Capacity, Decision, Engine, Heap, Metric, Outcome, Policy, Request, ScopeKey, Suspension, Variant,
};

const SECOND: u64 = 1_000_000_000;
/// 2026-11-23T23:18:56Z.
const UNIX_NS: u64 = 1_795_475_936 * SECOND;

fn engine(policy: Policy) -> Engine<Heap> {
    Engine::new(policy, Capacity::scopes(64)).unwrap()
}

fn key(account: &str) -> ScopeKey<'_> {
    ScopeKey::new(account.as_bytes(), b"m")
}

fn headers(d: &Decision, render: &Render) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for_each_header(d, render, 0, |n, v| out.push((n.to_string(), v.to_string())));
    out
}

fn text(d: &Decision, render: &Render) -> String {
    let mut buf = [0u8; 2048];
    let n = write_headers(d, render, 0, &mut buf).unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn body(d: &Decision, render: &Render) -> Option<Value> {
    let mut buf = [0u8; 2048];
    let n = write_error_body(d, render, &mut buf).unwrap();
    (n > 0).then(|| serde_json::from_slice(&buf[..n]).unwrap())
}

/// A 429 on the request metric: 120 requests already in the hard band of a 60 RPM limit.
fn rate_limited() -> Decision {
    let e = engine(Policy::fireworks_2024());
    for _ in 0..120 {
        e.admit(key("a"), &Request::new(0), 0).unwrap();
    }
    e.admit(key("a"), &Request::new(0), 0).unwrap()
}

#[test]
fn fireworks_headers_for_an_admitted_request() {
    let e = engine(Policy::fireworks_2024());
    let d = e.admit(key("a"), &Request::new(1_000).max_tokens(100), 0).unwrap();
    assert_eq!(
        text(&d, &e.render(Dialect::Fireworks)),
        "x-ratelimit-limit-requests: 60\r\nx-ratelimit-limit-tokens-prompt: 60000\r\n\
         x-ratelimit-limit-tokens-generated: 6000\r\nx-ratelimit-remaining-requests: 59\r\n\
         x-ratelimit-remaining-tokens-prompt: 59000\r\nx-ratelimit-remaining-tokens-generated: 5900\r\n\
         x-ratelimit-over-limit: no\r\n"
    );
}

#[test]
fn fireworks_2026_headers_give_token_limits_per_second() {
    let e = engine(Policy::fireworks_2026());
    let d = e.admit(key("a"), &Request::new(1_000).max_tokens(100), 0).unwrap();
    assert_eq!(
        text(&d, &e.render(Dialect::Fireworks)),
        "x-ratelimit-limit-tokens-prompt: 60000\r\nx-ratelimit-limit-tokens-cache-adjusted-prompt: 15000\r\n\
         x-ratelimit-limit-tokens-generated: 600\r\nx-ratelimit-remaining-tokens-prompt: 59983\r\n\
         x-ratelimit-remaining-tokens-generated: 598\r\nx-ratelimit-over-limit: no\r\n"
    );
    let h = headers(&d, &e.render(Dialect::Fireworks));
    let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(get("x-ratelimit-limit-requests"), None, "2026 has no request limit");
}

#[test]
fn in_the_2026_form_a_limit_and_its_remaining_are_both_per_second() {
    let e = engine(Policy::fireworks_2026());
    let render = e.render(Dialect::Fireworks);
    let pairs = [
        (Metric::PromptTokens, "tokens-prompt"),
        (Metric::GeneratedTokens, "tokens-generated"),
        (Metric::Requests, "requests"),
    ];
    // A fresh scope: nothing used, so remaining equals the limit, both per minute / 60.
    let fresh = e.limits(key("fresh"), 0).unwrap();
    let d = e.admit(key("a"), &Request::new(0), 0).unwrap();
    let h = headers(&d, &render);
    let num = |n: String| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.parse::<u64>().unwrap());
    for (m, s) in pairs {
        let (limit, remaining) =
            (num(format!("x-ratelimit-limit-{s}")), num(format!("x-ratelimit-remaining-{s}")));
        if m == Metric::Requests {
            assert_eq!((limit, remaining), (None, None), "2026 has no request limit");
            continue;
        }
        let (limit, remaining) = (limit.unwrap(), remaining.unwrap());
        assert_eq!(limit, fresh.limit(m) / 60, "{m:?}");
        assert_eq!(remaining, fresh.remaining(m) / 60, "{m:?}");
        assert!(remaining <= limit, "{m:?}: {remaining} > {limit}");
    }
    // After use, remaining per second is what is left per minute / 60, rounded down.
    let mut d = d;
    for _ in 0..5 {
        d = e.admit(key("a"), &Request::new(100_000).max_tokens(1_000), 0).unwrap();
    }
    let h = headers(&d, &render);
    let num = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.parse::<u64>().unwrap()).unwrap();
    assert_eq!(num("x-ratelimit-remaining-tokens-prompt"), d.levels.remaining(Metric::PromptTokens) / 60);
    assert_eq!(
        num("x-ratelimit-remaining-tokens-generated"),
        d.levels.remaining(Metric::GeneratedTokens) / 60
    );
    // A policy that limits requests pairs them per second too.
    let mut policy = Policy::fireworks_2026();
    policy.limits = Policy::fireworks_2024().limits;
    let e = engine(policy);
    let d = e.admit(key("a"), &Request::new(0), 0).unwrap();
    let h = headers(&d, &e.render(Dialect::Fireworks));
    let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(
        (get("x-ratelimit-limit-requests"), get("x-ratelimit-remaining-requests")),
        (Some("1"), Some("0"))
    );
}

#[test]
fn over_limit_requests_say_yes() {
    let e = engine(Policy::fireworks_2024());
    for _ in 0..60 {
        e.admit(key("a"), &Request::new(0), 0).unwrap();
    }
    let d = e.admit(key("a"), &Request::new(0), 0).unwrap();
    assert!(matches!(d.outcome, Outcome::AdmitOverLimit(_)));
    assert!(text(&d, &Render::new(Dialect::Fireworks)).contains("x-ratelimit-over-limit: yes\r\n"));
}

#[test]
fn golden_429_in_every_dialect() {
    let d = rate_limited();
    let render = |dialect| Render::new(dialect).wall_clock(UNIX_NS, 0);
    assert_eq!(
        text(&d, &render(Dialect::Together)),
        "x-ratelimit-limit: 60\r\nx-ratelimit-remaining: 0\r\nx-ratelimit-reset: 1\r\n\
         x-tokenlimit-limit: 60000\r\nx-tokenlimit-remaining: 60000\r\nretry-after: 1\r\nretry-after-ms: 1000\r\nx-should-retry: true\r\n"
    );
    assert_eq!(
        text(&d, &render(Dialect::OpenAi)),
        "x-ratelimit-limit-requests: 60\r\nx-ratelimit-limit-tokens: 60000\r\n\
         x-ratelimit-remaining-requests: 0\r\nx-ratelimit-remaining-tokens: 60000\r\n\
         x-ratelimit-reset-requests: 2m0s\r\nx-ratelimit-reset-tokens: 0s\r\nretry-after: 1\r\nretry-after-ms: 1000\r\nx-should-retry: true\r\n"
    );
    assert_eq!(
        text(&d, &render(Dialect::Anthropic)),
        "anthropic-ratelimit-requests-limit: 60\r\nanthropic-ratelimit-requests-remaining: 0\r\n\
         anthropic-ratelimit-requests-reset: 2026-11-23T23:20:56Z\r\n\
         anthropic-ratelimit-input-tokens-limit: 60000\r\nanthropic-ratelimit-input-tokens-remaining: 60000\r\n\
         anthropic-ratelimit-input-tokens-reset: 2026-11-23T23:18:56Z\r\n\
         anthropic-ratelimit-output-tokens-limit: 6000\r\nanthropic-ratelimit-output-tokens-remaining: 6000\r\n\
         anthropic-ratelimit-output-tokens-reset: 2026-11-23T23:18:56Z\r\nretry-after: 1\r\nretry-after-ms: 1000\r\nx-should-retry: true\r\n"
    );
    assert_eq!(
        text(&d, &render(Dialect::Ietf)),
        "RateLimit-Policy: \"requests\";q=60;w=60;qu=\"requests\", \"prompt-tokens\";q=60000;w=60;qu=\"tokens\", \
         \"uncached-prompt-tokens\";q=60000;w=60;qu=\"tokens\", \"generated-tokens\";q=6000;w=60;qu=\"tokens\"\r\n\
         RateLimit: \"requests\";r=0;t=120, \"prompt-tokens\";r=60000;t=0, \
         \"uncached-prompt-tokens\";r=60000;t=0, \"generated-tokens\";r=6000;t=0\r\nretry-after: 1\r\nretry-after-ms: 1000\r\nx-should-retry: true\r\n"
    );
}

#[test]
fn golden_429_error_body() {
    let d = rate_limited();
    let mut buf = [0u8; 1024];
    let n = write_error_body(&d, &Render::new(Dialect::OpenAi), &mut buf).unwrap();
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        r#"{"error":{"message":"Rate limit exceeded on requests: 120 of 60 per minute in use and this request needs 1; retry in 1 s.","type":"dynamic_request_limited","code":"dynamic_request_limited","param":null,"metric":"requests","limit":60,"current_usage":120,"cost":1,"too_large":false,"retry_after":1,"retry_after_ms":1000}}"#
    );
}

#[test]
fn every_outcome_has_its_status_and_error_type() {
    let e = engine(Policy::fireworks_2024());
    let ok = e.admit(key("ok"), &Request::new(1), 0).unwrap();
    let tokens = e.admit(key("t"), &Request::new(100_000), 0).unwrap();
    let tokens =
        if tokens.admitted() { e.admit(key("t"), &Request::new(30_000), 0).unwrap() } else { tokens };
    let too_large = e.admit(key("big"), &Request::new(120_001), 0).unwrap();
    let invalid = e.admit(key("bad"), &Request::new(1).n(0), 0).unwrap();
    e.set_suspended(b"sus", Suspension::Operator, true).unwrap();
    let suspended = e.admit(key("sus"), &Request::new(1), 0).unwrap();
    e.set_spend_limit(b"broke", 0).unwrap();
    let broke = e.admit(key("broke"), &Request::new(1), 0).unwrap();
    e.set_load(b"m", Variant::Regular, 5_000).unwrap();
    let shed = e.admit(key("shed"), &Request::new(1), 0).unwrap();
    // The SDKs retry unless `x-should-retry: false`: only where a retry can succeed.
    let cases = [
        (&ok, 200, 200, None, None),
        (&tokens, 429, 429, Some("dynamic_token_limited"), Some("true")),
        (&too_large, 429, 429, Some("dynamic_token_limited"), Some("false")),
        (&invalid, 400, 400, Some("invalid_request"), Some("false")),
        (&suspended, 402, 429, Some("account_suspended"), Some("false")),
        (&broke, 402, 429, Some("spend_limit_exceeded"), Some("false")),
        (&shed, 503, 503, Some("service_overloaded"), Some("true")),
    ];
    for (d, fireworks_status, openai_status, kind, should_retry) in cases {
        for dialect in
            [Dialect::Fireworks, Dialect::Together, Dialect::OpenAi, Dialect::Anthropic, Dialect::Ietf]
        {
            let h = headers(d, &Render::new(dialect));
            let retry: Vec<&str> =
                h.iter().filter(|(n, _)| n == "x-should-retry").map(|(_, v)| v.as_str()).collect();
            assert_eq!(retry, should_retry.into_iter().collect::<Vec<_>>(), "{dialect:?} {:?}", d.outcome);
        }
        assert_eq!(Render::new(Dialect::Fireworks).status(d), fireworks_status, "{:?}", d.outcome);
        assert_eq!(Render::new(Dialect::OpenAi).status(d), openai_status, "{:?}", d.outcome);
        let b = body(d, &Render::new(Dialect::OpenAi));
        assert_eq!(
            b.as_ref().map(|b| b["error"]["type"].as_str().unwrap().to_string()),
            kind.map(String::from)
        );
    }
    let tl = body(&too_large, &Render::new(Dialect::OpenAi)).unwrap();
    assert_eq!(tl["error"]["too_large"], Value::Bool(true));
    assert!(tl["error"]["message"].as_str().unwrap().contains("can never admit it"));
    assert!(tl["error"].get("retry_after").is_none(), "a request that can never fit gets no retry time");
}

/// A 503 from `e`, whose model is overloaded.
fn shed(e: &Engine<Heap>) -> Decision {
    e.set_load(b"m", Variant::Regular, 5_000).unwrap();
    let d = e.admit(key("a"), &Request::new(1), 0).unwrap();
    assert!(matches!(d.outcome, Outcome::Shed(_)));
    d
}

#[test]
fn shed_retry_after_has_bounded_seeded_jitter() {
    let e = engine(Policy::fireworks_2024());
    let d = shed(&e);
    let base = e.policy().shed_retry_after_ns;
    let max = shed_retry_max_ns(base);
    assert_eq!(max, 2 * SECOND, "1 s shed delay: 1 or 2 s");
    let retries: Vec<u64> = (0..200)
        .map(|seed| Render::new(Dialect::OpenAi).jitter_seed(seed).retry_after_ns(&d).unwrap())
        .collect();
    assert!(retries.iter().all(|r| (base..=max).contains(r) && r % SECOND == 0), "{retries:?}");
    let again = Render::new(Dialect::OpenAi).jitter_seed(17);
    assert_eq!(again.retry_after_ns(&d), again.retry_after_ns(&d));
}

#[test]
fn a_503s_retry_after_jitter_survives_rounding_to_whole_seconds() {
    for delay in [SECOND, 1_500_000_000, 10 * SECOND] {
        let mut policy = Policy::fireworks_2024();
        policy.shed_retry_after_ns = delay;
        let e = engine(policy);
        let d = shed(&e);
        let max = shed_retry_max_ns(delay);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..1_000 {
            let h = headers(&d, &Render::new(Dialect::Fireworks).jitter_seed(seed));
            let num =
                |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.parse::<u64>().unwrap()).unwrap();
            let (secs, ms) = (num("retry-after"), num("retry-after-ms"));
            assert_eq!(secs, ms.div_ceil(1_000), "retry-after and retry-after-ms agree");
            assert!(ms * 1_000_000 >= delay, "{ms} ms is shorter than the shed delay {delay} ns");
            assert!(secs * SECOND <= max, "{secs} s is past the stated maximum {max} ns");
            seen.insert(secs);
        }
        // Every whole second from the delay rounded up to the maximum is used.
        let expected: Vec<u64> = (delay.div_ceil(SECOND)..=max / SECOND).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), expected, "shed delay {delay} ns");
    }
}

#[test]
fn a_too_small_buffer_reports_the_size_needed() {
    let d = rate_limited();
    let r = Render::new(Dialect::Ietf);
    let mut big = [0u8; 4096];
    let n = write_headers(&d, &r, 0, &mut big).unwrap();
    let mut small = vec![0u8; n - 1];
    assert_eq!(write_headers(&d, &r, 0, &mut small), Err(BufferTooSmall { needed: n }));
    let m = write_error_body(&d, &r, &mut big).unwrap();
    assert_eq!(write_error_body(&d, &r, &mut small[..m - 1]), Err(BufferTooSmall { needed: m }));
}

#[test]
fn ietf_fields_are_valid_structured_field_lists() {
    let d = rate_limited();
    for (name, value) in headers(&d, &Render::new(Dialect::Ietf)) {
        if !name.starts_with("RateLimit") {
            continue;
        }
        // sf-list of sf-string items with key=integer / key=sf-string parameters.
        for item in value.split(", ") {
            let mut parts = item.split(';');
            let label = parts.next().unwrap();
            assert!(label.starts_with('"') && label.ends_with('"') && label.len() > 2, "{label}");
            for param in parts {
                let (k, v) = param.split_once('=').unwrap();
                assert!(k.chars().all(|c| c.is_ascii_lowercase()), "{k}");
                let integer = v.parse::<u64>().is_ok() && v.len() <= 15;
                let string = v.starts_with('"') && v.ends_with('"');
                assert!(integer || string, "{v}");
            }
        }
    }
}

/// Parses rendered headers back into numbers per metric, for the dialects that name metrics.
fn parsed(d: &Decision) -> Vec<(Metric, u64, u64)> {
    let h = headers(d, &Render::new(Dialect::Fireworks));
    let num = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.parse::<u64>().unwrap());
    [
        (Metric::Requests, "requests"),
        (Metric::PromptTokens, "tokens-prompt"),
        (Metric::GeneratedTokens, "tokens-generated"),
    ]
    .into_iter()
    .filter_map(|(m, s)| {
        Some((m, num(&format!("x-ratelimit-limit-{s}"))?, num(&format!("x-ratelimit-remaining-{s}"))?))
    })
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn remaining_never_exceeds_limit_and_headers_round_trip(
        requests in prop::collection::vec((0u64..20_000, 0u64..3_000, 1u64..4, 0u64..30), 1..40)
    ) {
        let e = engine(Policy::fireworks_2024());
        let mut now = 0;
        for (prompt, max_tokens, n, step) in requests {
            now += step * SECOND / 10;
            let d = e.admit(key("a"), &Request::new(prompt).max_tokens(max_tokens).n(n), now).unwrap();
            for (m, limit, remaining) in parsed(&d) {
                prop_assert!(remaining <= limit);
                prop_assert_eq!(limit, d.levels.limit(m));
                prop_assert_eq!(remaining, d.levels.remaining(m));
            }
            if let Some(b) = body(&d, &Render::new(Dialect::OpenAi)) {
                if let Outcome::RejectRateLimited(r) = d.outcome {
                    prop_assert_eq!(b["error"]["metric"].as_str().unwrap(), r.metric.name());
                    prop_assert_eq!(b["error"]["cost"].as_u64().unwrap(), *d.cost.get(r.metric));
                    prop_assert_eq!(b["error"]["limit"].as_u64().unwrap(), d.levels.limit(r.metric));
                    if !r.too_large {
                        prop_assert_eq!(b["error"]["retry_after_ms"].as_u64().unwrap(), r.retry_after_ns.div_ceil(1_000_000));
                    }
                }
            }
        }
    }

    #[test]
    fn retry_after_is_exactly_when_the_request_first_fits(
        used in 1u64..6_000, wanted in 1u64..6_000, at in 0u64..100
    ) {
        let e = engine(Policy::fixed());
        let now = at * SECOND;
        e.admit(key("a"), &Request::new(0).max_tokens(used), now).unwrap();
        let request = Request::new(0).max_tokens(wanted);
        let d = e.admit(key("a"), &request, now).unwrap();
        if let Outcome::RejectRateLimited(r) = d.outcome {
            let mut headers = headers(&d, &Render::new(Dialect::OpenAi));
            headers.retain(|(k, _)| k == "retry-after");
            let secs: u64 = headers[0].1.parse().unwrap();
            prop_assert!(secs >= 1);
            prop_assert_eq!(secs, r.retry_after_ns.div_ceil(SECOND));
            let probe = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap();
            probe.admit(key("a"), &Request::new(0).max_tokens(used), now).unwrap();
            prop_assert!(!probe.admit(key("a"), &request, now + (secs - 1) * SECOND).unwrap().admitted());
            prop_assert!(probe.admit(key("a"), &request, now + secs * SECOND).unwrap().admitted());
        }
    }
}

#[test]
fn a_huge_shed_retry_saturates_instead_of_overflowing() {
    let d = Decision {
        outcome: Outcome::Shed(sluicegate_core::Shed {
            band: sluicegate_core::Band::Normal,
            load: 1_500,
            retry_after_ns: u64::MAX - 1_000,
        }),
        levels: sluicegate_core::Levels::default(),
        cost: sluicegate_core::PerMetric::default(),
    };
    assert_eq!(Render::new(Dialect::Fireworks).jitter_seed(1).retry_after_ns(&d), Some(u64::MAX));
}

/// The 429 message reports the levels the headers do: a part-used request is in use, so the
/// usage it gives plus what the request needs is always past the limit.
#[test]
fn a_429_message_never_contradicts_itself() {
    let e = engine(Policy::fixed().with_fixed_limit(Metric::Requests, 5.0));
    let render = Render::new(Dialect::Together);
    for _ in 0..5 {
        e.admit(key("a"), &Request::new(0), 0).unwrap();
    }
    let mut refused = 0;
    for ms in (0..12_000).step_by(250) {
        let d = e.admit(key("a"), &Request::new(0), ms * 1_000_000).unwrap();
        let Outcome::RejectRateLimited(r) = d.outcome else { continue };
        refused += 1;
        let l = &d.levels;
        let (used, limit, cost) = (l.used(r.metric), l.limit(r.metric), d.cost.get(r.metric));
        assert!(used + cost > limit, "at {ms} ms: {used} of {limit} in use and this request needs {cost}");
        assert_eq!(used + l.remaining(r.metric), limit, "at {ms} ms");
        let b = body(&d, &render).unwrap();
        let message = b["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(&format!("{used} of {limit} per minute in use")), "{message}");
        assert_eq!(b["error"]["current_usage"], used);
        let remaining = headers(&d, &render).into_iter().find(|(n, _)| n == "x-ratelimit-remaining");
        assert_eq!(remaining.map(|(_, v)| v), Some((limit - used).to_string()));
    }
    assert!(refused >= 40, "{refused}");
}

/// A refusal decided before any limit was read (spend, suspension, a malformed request) carries
/// no IETF fields rather than empty ones, which are not valid structured fields.
#[test]
fn ietf_fields_are_omitted_rather_than_empty() {
    let e = engine(Policy::fireworks_2024());
    e.set_suspended(b"sus", Suspension::Operator, true).unwrap();
    e.set_spend_limit(b"broke", 0).unwrap();
    let refusals = [
        e.admit(key("sus"), &Request::new(1), 0).unwrap(),
        e.admit(key("broke"), &Request::new(1), 0).unwrap(),
        e.admit(key("bad"), &Request::new(1).n(0), 0).unwrap(),
    ];
    for d in refusals {
        let h = headers(&d, &Render::new(Dialect::Ietf));
        assert!(h.iter().all(|(_, v)| !v.is_empty()), "{:?}: {h:?}", d.outcome);
        assert!(h.iter().all(|(n, _)| !n.starts_with("RateLimit")), "{:?}: {h:?}", d.outcome);
    }
    let admitted = e.admit(key("ok"), &Request::new(1), 0).unwrap();
    let h = headers(&admitted, &Render::new(Dialect::Ietf));
    assert_eq!(h.iter().filter(|(n, v)| n.starts_with("RateLimit") && !v.is_empty()).count(), 2, "{h:?}");
}

/// The dialects' names are what the CLI, the C API and Python accept, and each reads back as
/// its dialect; any other name is none.
#[test]
fn each_dialect_is_named_and_found_by_its_name() {
    let names = Dialect::ALL.map(Dialect::name);
    assert_eq!(names, ["fireworks", "together", "openai", "anthropic", "ietf"]);
    for d in Dialect::ALL {
        assert_eq!(Dialect::from_name(d.name()), Some(d));
    }
    for unknown in ["", "OpenAI", "xyzzy", "openai "] {
        assert_eq!(Dialect::from_name(unknown), None, "{unknown:?}");
    }
}
