//! SPEC §12: the counters equal what was done to the engine, exactly — per model, variant,
//! service tier and outcome, across threads, and across two handles of one shared region.

use std::ptr::NonNull;

use sluicegate_core::metrics::{Event, ModelMetrics, write_prometheus};
use sluicegate_core::region::{Opening, region_size};
use sluicegate_core::{
    Capacity, Completion, Engine, Error, Heap, Policy, Price, Request, ScopeKey, ServiceTier, Suspension,
    Usage, Variant,
};

const SECOND: u64 = 1_000_000_000;
const M: &[u8] = b"llama";

fn counts(m: &ModelMetrics, tier: ServiceTier) -> Vec<(Event, u64)> {
    Event::ALL.into_iter().map(|e| (e, m.count(tier, e))).filter(|(_, n)| *n != 0).collect()
}

fn engine() -> Engine<Heap> {
    let mut policy = Policy::fixed();
    policy.hard_factor = 2.0;
    Engine::new(policy, Capacity { permits: 1024, ..Capacity::scopes(64) }).unwrap()
}

/// Every outcome once or more, on known tiers; each counter is exactly what was done.
#[test]
fn a_known_mix_of_outcomes_is_counted_exactly() {
    let e = engine();
    let key = |a: &'static [u8]| ScopeKey::new(a, M);
    e.set_service_tier_grant(b"prio", ServiceTier::Priority).unwrap();
    e.set_price(
        M,
        Variant::Regular,
        Price { uncached_prompt: 1_000_000, cached_prompt: 0, generated: 2_000_000 },
    )
    .unwrap();

    // 60 in limit and 60 over (ρ = 2) on `a`, then a 429 on requests.
    let mut permits = Vec::new();
    for _ in 0..121 {
        let d = e.admit(key(b"a"), &Request::new(10), 0).unwrap();
        permits.extend(d.permit().copied());
    }
    assert_eq!(permits.len(), 120);
    // A 429 on each token metric: costs above what one minute allows.
    let huge = Request::new(10_000_000).max_tokens(0);
    assert!(!e.admit(key(b"b"), &huge, 0).unwrap().admitted());
    assert!(!e.admit(key(b"b"), &Request::new(0).max_tokens(10_000_000), 0).unwrap().admitted());
    // Priority asked and granted: served at priority; flex asked: flex.
    let p = *e
        .admit(key(b"prio"), &Request::new(10).service_tier(ServiceTier::Priority), 0)
        .unwrap()
        .permit()
        .unwrap();
    let f =
        *e.admit(key(b"c"), &Request::new(10).service_tier(ServiceTier::Flex), 0).unwrap().permit().unwrap();
    // Shed: load 0.7 sheds in-limit flex (and default still runs).
    e.set_load(M, Variant::Regular, 700).unwrap();
    let shed = e.admit(key(b"s"), &Request::new(10).service_tier(ServiceTier::Flex), 0).unwrap();
    assert!(matches!(shed.outcome, sluicegate_core::Outcome::Shed(_)), "{shed:?}");
    e.set_load(M, Variant::Regular, 0).unwrap();
    // Spend refusal, concurrency, invalid.
    e.set_suspended(b"bad", Suspension::Operator, true).unwrap();
    assert!(!e.admit(key(b"bad"), &Request::new(1), 0).unwrap().admitted());
    e.set_max_in_flight(b"one", Some(1)).unwrap();
    let one = *e.admit(key(b"one"), &Request::new(1), 0).unwrap().permit().unwrap();
    assert!(!e.admit(key(b"one"), &Request::new(1), 0).unwrap().admitted());
    assert!(!e.admit(key(b"a"), &Request::new(1).n(0), 0).unwrap().admitted());

    // Settles: 100 successes, 10 upstream failures, 5 cancelled; the rest of `a`'s left to expire.
    for p in &permits[..100] {
        e.settle(p, &Usage::new(10, 5), Completion::Success, SECOND).unwrap();
    }
    for p in &permits[100..110] {
        e.settle(p, &Usage::new(10, 5), Completion::UpstreamFailure, SECOND).unwrap();
    }
    for p in &permits[110..115] {
        e.cancel(p, &Usage::new(10, 0), SECOND).unwrap();
    }
    e.settle(&p, &Usage::new(10, 5), Completion::Success, SECOND).unwrap();
    e.settle(&f, &Usage::new(10, 5), Completion::Success, SECOND).unwrap();
    e.settle(&one, &Usage::new(1, 0), Completion::Success, SECOND).unwrap();
    let before_expiry = e.metrics();
    let llama = before_expiry.model(M, Variant::Regular).unwrap();
    assert_eq!(llama.in_flight, 5, "a's last five permits are outstanding");
    // Past the TTL every unsettled permit expires (met by a settle of one of them).
    let late = e.policy().permit_ttl_ns + 2 * SECOND;
    assert!(e.settle(&permits[115], &Usage::new(10, 5), Completion::Success, late).is_err());
    e.admit(key(b"z"), &Request::new(1), late).unwrap(); // a tick: the sweep meets the others

    let metrics = e.metrics();
    let llama = metrics.model(M, Variant::Regular).unwrap();
    assert_eq!(
        counts(llama, ServiceTier::Default),
        vec![
            (Event::Admitted, 60 + 1 + 1),
            (Event::AdmittedOverLimit, 60),
            (Event::RateLimitedRequests, 1),
            (Event::RateLimitedPromptTokens, 1),
            (Event::RateLimitedGeneratedTokens, 1),
            (Event::SpendRefused, 1),
            (Event::ConcurrencyLimited, 1),
            (Event::Expired, 5),
            (Event::Succeeded, 101),
            (Event::UpstreamFailed, 10),
            (Event::Cancelled, 5),
        ]
    );
    assert_eq!(counts(llama, ServiceTier::Priority), vec![(Event::Admitted, 1), (Event::Succeeded, 1)]);
    assert_eq!(
        counts(llama, ServiceTier::Flex),
        vec![(Event::Admitted, 1), (Event::Shed, 1), (Event::Succeeded, 1)]
    );
    assert_eq!(llama.in_flight, 1, "z's permit");
    // Billed: successes and cancels at 1 µ$ per prompt token and 2 per generated token (per
    // million: ×1e-6 µ$ each, so in n$); upstream failures free; expiries their reservation.
    let success = 10 * 1_000 + 5 * 2_000; // n$
    let cancelled = 10 * 1_000;
    let one_success = 1_000;
    let expired = 5 * 10 * 1_000; // max_tokens 0: the reservation is the prompt
    let default_nanos = 100 * success + 5 * cancelled + one_success + expired;
    assert_eq!(llama.spend_micros(ServiceTier::Default), default_nanos / 1_000);
    assert_eq!(llama.spend_micros(ServiceTier::Priority), success / 1_000);
    // The invalid request was refused before any model: counted without one.
    let none = metrics.model(b"", Variant::Regular).unwrap();
    assert_eq!(counts(none, ServiceTier::Default), vec![(Event::Invalid, 1)]);
}

/// A full scope table: each refusal is counted, without a model.
#[test]
fn table_full_refusals_are_counted() {
    let e = Engine::new(Policy::fixed(), Capacity::scopes(4)).unwrap();
    let mut full = 0;
    for i in 0..64u32 {
        let account = format!("acct-{i}");
        if let Err(Error::TableFull(_)) = e.admit(ScopeKey::new(account.as_bytes(), M), &Request::new(1), 0) {
            full += 1;
        }
    }
    assert!(full > 0);
    let metrics = e.metrics();
    let counted: u64 = metrics.models.iter().map(|m| m.count(ServiceTier::Default, Event::TableFull)).sum();
    assert_eq!(counted, full);
}

/// Four threads admit and settle on their own scopes and on one shared scope: every counter
/// equals the outcomes the threads saw, and nothing is left in flight.
#[test]
fn counters_are_exact_under_four_threads() {
    let e = Engine::new(Policy::fixed(), Capacity { permits: 4096, ..Capacity::scopes(256) }).unwrap();
    let seen: Vec<[u64; 3]> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let e = &e;
                s.spawn(move || {
                    let mut seen = [0u64; 3]; // admitted, over limit, 429
                    let own = format!("own-{t}");
                    for i in 0..2_000u64 {
                        let account: &[u8] = if i % 2 == 0 { own.as_bytes() } else { b"shared" };
                        let d = e.admit(ScopeKey::new(account, M), &Request::new(1), i * 1_000_000).unwrap();
                        match d.outcome {
                            sluicegate_core::Outcome::Admit(_) => seen[0] += 1,
                            sluicegate_core::Outcome::AdmitOverLimit(_) => seen[1] += 1,
                            _ => seen[2] += 1,
                        }
                        if let Some(p) = d.permit() {
                            e.settle(p, &Usage::new(1, 0), Completion::Success, i * 1_000_000).unwrap();
                        }
                    }
                    seen
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total = |k: usize| seen.iter().map(|s| s[k]).sum::<u64>();
    let metrics = e.metrics();
    let llama = metrics.model(M, Variant::Regular).unwrap();
    let tier = ServiceTier::Default;
    assert_eq!(llama.count(tier, Event::Admitted), total(0));
    assert_eq!(llama.count(tier, Event::AdmittedOverLimit), total(1));
    assert_eq!(llama.count(tier, Event::RateLimitedRequests), total(2));
    assert_eq!(llama.count(tier, Event::Succeeded), total(0) + total(1));
    assert_eq!(llama.in_flight, 0);
    assert_eq!(total(0) + total(1) + total(2), 8_000);
}

#[derive(Clone)]
#[repr(C, align(128))]
struct Line([u8; 128]);

/// Two handles of one shared region (as two processes) count into the same counters, and a
/// reader that only reads sees both.
#[test]
fn handles_of_one_region_share_the_counters() {
    let capacity = Capacity::scopes(64);
    let mut memory: Vec<Line> = (0..region_size(capacity).unwrap() / 128).map(|_| Line([0; 128])).collect();
    let base = NonNull::new(memory.as_mut_ptr().cast::<u8>()).unwrap();
    let len = memory.len() * 128;
    // SAFETY: `memory` outlives the engines and holds nothing else.
    let open =
        |seed, opening| unsafe { Engine::in_region(base, len, Policy::fixed(), capacity, seed, opening) };
    let first = open(7, Opening::InitialiseIfEmpty).unwrap();
    let second = open(8, Opening::Attach).unwrap();
    for e in [&first, &second] {
        for _ in 0..40 {
            e.admit(ScopeKey::new(b"acct", M), &Request::new(1), 0).unwrap();
        }
    }
    let reader = open(9, Opening::Attach).unwrap();
    let llama = reader.metrics().model(M, Variant::Regular).cloned().unwrap();
    assert_eq!(llama.count(ServiceTier::Default, Event::Admitted), 60);
    assert_eq!(llama.count(ServiceTier::Default, Event::RateLimitedRequests), 20);
    assert_eq!(llama.in_flight, 60);
}

/// The exposition names every family, and escapes model ids so that none breaks a line or
/// shares a label with another.
#[test]
fn the_exposition_is_prometheus_text_with_escaped_labels() {
    let e = engine();
    let odd: &[u8] = b"we\"ird\\model\nname\xff";
    e.admit(ScopeKey::new(b"acct", odd), &Request::new(1), 0).unwrap();
    e.set_load(M, Variant::Fast, 1_250).unwrap();
    let mut text = String::new();
    write_prometheus(&e.metrics(), &mut text).unwrap();
    let line = r#"sluicegate_requests_total{model="we\"ird\\\\model\nname\\xff",variant="regular",service_tier="default",outcome="admitted"} 1"#;
    assert!(text.lines().any(|l| l == line), "{text}");
    assert!(text.lines().any(|l| l == r#"sluicegate_load{model="llama",variant="fast"} 1.250"#), "{text}");
    for family in [
        "sluicegate_requests_total",
        "sluicegate_rate_limited_total",
        "sluicegate_permits_ended_total",
        "sluicegate_spend_microdollars_total",
    ] {
        assert!(text.contains(&format!("# TYPE {family} counter\n")), "{family}");
    }
    assert!(text.contains("# TYPE sluicegate_in_flight gauge\n"));
    // Every sample line is `name{labels} value`, with the value a number.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = l.rsplit_once("} ").unwrap_or_else(|| panic!("{l}"));
        value.parse::<f64>().unwrap_or_else(|_| panic!("{l}"));
    }
}

/// Rendering into a caller's buffer writes what `write_prometheus` writes, without allocating;
/// a buffer one byte short is refused with the size needed and nothing claimed written.
#[test]
fn rendering_into_a_buffer_matches_and_sizes() {
    let e = engine();
    for i in 0..70u64 {
        let account = format!("acct-{}", i % 3);
        e.admit(ScopeKey::new(account.as_bytes(), M), &Request::new(1), 0).unwrap();
    }
    let mut text = String::new();
    write_prometheus(&e.metrics(), &mut text).unwrap();
    let mut buf = vec![0u8; text.len()];
    assert_eq!(e.render_prometheus(&mut buf), Ok(text.len()));
    assert_eq!(std::str::from_utf8(&buf).unwrap(), text);
    let short = e.render_prometheus(&mut buf[..text.len() - 1]).unwrap_err();
    assert_eq!(short.needed, text.len());
    assert_eq!(e.render_prometheus(&mut []).unwrap_err().needed, text.len());
}

/// An inspector reads a region as it is, with no policy: each scope's keys, limits and levels
/// equal what the engine reports, and the models' counters equal the engine's.
#[test]
fn an_inspector_reads_scopes_and_counters_without_the_policy() {
    use sluicegate_core::Metric;
    use sluicegate_core::inspect::Inspector;
    let capacity = Capacity::scopes(64);
    let mut memory: Vec<Line> = (0..region_size(capacity).unwrap() / 128).map(|_| Line([0; 128])).collect();
    let base = NonNull::new(memory.as_mut_ptr().cast::<u8>()).unwrap();
    let len = memory.len() * 128;
    // SAFETY: `memory` outlives the engine and the inspector and holds nothing else.
    let e = unsafe {
        Engine::in_region(base, len, Policy::fireworks_2024(), capacity, 3, Opening::InitialiseIfEmpty)
    }
    .unwrap();
    let now = 5 * SECOND;
    for (account, n) in [(&b"busy"[..], 45), (b"quiet", 3)] {
        for _ in 0..n {
            e.admit(ScopeKey::new(account, M).fast(), &Request::new(100).max_tokens(10), now).unwrap();
        }
    }
    // SAFETY: as above; the inspector only reads.
    let inspector = unsafe { Inspector::open(base, len) }.unwrap();
    assert_eq!(inspector.capacity(), e.capacity());
    let mut seen = Vec::new();
    inspector.for_each_scope(now, |s| seen.push(*s));
    seen.sort_by_key(|s| s.account().to_vec());
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!((s.model(), s.variant), (M, Variant::Fast));
        let want = e.limits(ScopeKey::new(s.account(), M).fast(), now).unwrap();
        for metric in Metric::ALL {
            assert_eq!(s.levels.limit(metric), want.limit(metric), "{metric:?}");
            assert_eq!(s.levels.remaining(metric), want.remaining(metric), "{metric:?}");
        }
        assert_eq!(s.in_flight, if s.account() == b"busy" { 45 } else { 3 });
    }
    assert_eq!(seen[0].levels.remaining(Metric::Requests), 60 - 45);
    let mut models = Vec::new();
    inspector.for_each_model_metrics(|m| models.push(m.clone()));
    assert_eq!(models, e.metrics().models);
    assert_eq!(models[0].count(ServiceTier::Default, Event::Admitted), 48);
    // Not a region, or one cut short: typed errors.
    let mut zeros = vec![Line([0; 128]); 4];
    let zbase = NonNull::new(zeros.as_mut_ptr().cast::<u8>()).unwrap();
    // SAFETY: `zeros` is readable and outlives the call.
    assert!(matches!(unsafe { Inspector::open(zbase, 512) }, Err(sluicegate_core::RegionError::NotARegion)));
    // SAFETY: as for the first inspector, with a shorter length.
    assert!(matches!(
        unsafe { Inspector::open(base, 4096) },
        Err(sluicegate_core::RegionError::TooSmall { .. })
    ));
}

/// A restore starts the counters again: permits from before it are stale, so counts kept from
/// before would leave them in flight forever.
#[test]
fn a_restore_starts_the_counters_again() {
    let mut e = engine();
    for _ in 0..5 {
        e.admit(ScopeKey::new(b"acct", M), &Request::new(1), 0).unwrap();
    }
    assert_eq!(e.metrics().model(M, Variant::Regular).unwrap().in_flight, 5);
    let mut buf = vec![0; e.snapshot_size()];
    let n = e.snapshot(&mut buf, 0).unwrap();
    e.restore(&buf[..n], 0).unwrap();
    assert_eq!(e.metrics().model(M, Variant::Regular), None, "{:?}", e.metrics());
    e.admit(ScopeKey::new(b"acct", M), &Request::new(1), 0).unwrap();
    let llama = e.metrics().model(M, Variant::Regular).cloned().unwrap();
    assert_eq!((llama.count(ServiceTier::Default, Event::Admitted), llama.in_flight), (1, 1));
}

/// Spend is written for the tiers that were billed and no other; a permit that expires is
/// counted under the tier it was served at (kept in its ledger entry), with its reservation billed.
#[test]
fn spend_and_expiries_are_counted_under_their_tier() {
    let e = engine();
    e.set_price(M, Variant::Regular, Price { uncached_prompt: 1_000_000, cached_prompt: 0, generated: 0 })
        .unwrap();
    e.set_service_tier_grant(b"vip", ServiceTier::Priority).unwrap();
    let ask = |account: &'static [u8], tier, prompt| {
        let request = Request::new(prompt).service_tier(tier);
        *e.admit(ScopeKey::new(account, M), &request, 0).unwrap().permit().unwrap()
    };
    // Reservations of different sizes, so that a mix-up of the two tiers shows in their spend.
    let (vip, batch) = (ask(b"vip", ServiceTier::Priority, 1_000), ask(b"batch", ServiceTier::Flex, 5_000));
    let settled = ask(b"vip", ServiceTier::Priority, 1_000);
    e.settle(&settled, &Usage::new(2_000, 0), Completion::Success, SECOND).unwrap();
    let mut text = String::new();
    write_prometheus(&e.metrics(), &mut text).unwrap();
    let spend = |tier: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("sluicegate_spend_microdollars_total{") && l.contains(&format!("\"{tier}\""))
            })
            .map(|l| l.rsplit_once(' ').unwrap().1.to_string())
    };
    assert_eq!(spend("priority").as_deref(), Some("2000"), "{text}");
    assert_eq!((spend("flex"), spend("default")), (None, None), "{text}");

    // Past the TTL both unsettled permits expire, each under its own tier, billed its reservation.
    let late = e.policy().permit_ttl_ns + 2 * SECOND;
    assert!(e.settle(&vip, &Usage::new(1, 0), Completion::Success, late).is_err());
    assert!(e.settle(&batch, &Usage::new(1, 0), Completion::Success, late).is_err());
    let metrics = e.metrics();
    let llama = metrics.model(M, Variant::Regular).unwrap();
    assert_eq!(llama.count(ServiceTier::Priority, Event::Expired), 1);
    assert_eq!(llama.count(ServiceTier::Flex, Event::Expired), 1);
    assert_eq!(llama.count(ServiceTier::Default, Event::Expired), 0);
    assert_eq!(
        (llama.spend_micros(ServiceTier::Priority), llama.spend_micros(ServiceTier::Flex)),
        (3_000, 5_000)
    );
    assert_eq!(llama.in_flight, 0);
}

/// A week of hourly traffic, some of it abandoned: the counters stay exact, every abandoned
/// permit is counted expired once, and nothing is left in flight.
#[test]
fn a_week_of_uptime_keeps_every_count_exact() {
    let e = engine();
    let hour = 3_600 * SECOND;
    let (mut admitted, mut settled, mut abandoned, mut refused) = (0u64, 0u64, 0u64, 0u64);
    for h in 0..7 * 24u64 {
        let now = h * hour;
        for i in 0..30u64 {
            let account = format!("acct-{}", (h + i) % 5);
            let d = e.admit(ScopeKey::new(account.as_bytes(), M), &Request::new(10), now).unwrap();
            match d.permit() {
                Some(p) if i % 10 == 9 => abandoned += p.reserved().requests,
                Some(p) => {
                    e.settle(p, &Usage::new(10, 0), Completion::Success, now + SECOND).unwrap();
                    settled += 1;
                }
                None => refused += 1,
            }
            admitted += u64::from(d.admitted());
        }
    }
    // Past the last abandoned permit's TTL, a tick sweeps the ledger.
    e.admit(ScopeKey::new(b"late", M), &Request::new(10), 8 * 24 * hour).unwrap();
    let metrics = e.metrics();
    let llama = metrics.model(M, Variant::Regular).unwrap();
    let tier = ServiceTier::Default;
    assert!(abandoned > 400, "{abandoned}");
    assert_eq!(admitted, settled + abandoned);
    assert_eq!(
        llama.count(tier, Event::Admitted) + llama.count(tier, Event::AdmittedOverLimit),
        admitted + 1
    );
    assert_eq!(llama.count(tier, Event::Succeeded), settled);
    assert_eq!(llama.count(tier, Event::Expired), abandoned);
    assert_eq!(llama.count(tier, Event::RateLimitedRequests), refused);
    assert_eq!(llama.in_flight, 1, "only the late permit");
}
