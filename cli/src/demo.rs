//! `sluicegate demo`: the stories of the providers' rate-limit pages, told by the engine.

use std::io::Write;

use sluicegate_core::response::{Dialect, Render};
use sluicegate_core::{
    Capacity, Completion, Engine, Heap, Metric, Outcome, Policy, Request, ScopeKey, ServiceTier, Usage,
    Variant,
};

const SECOND: u64 = 1_000_000_000;
const MINUTE: u64 = 60 * SECOND;
const MODEL: &[u8] = b"llama-v3p1-70b-instruct";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn engine(policy: Policy) -> Result<Engine<Heap>> {
    Ok(Engine::new(policy, Capacity::scopes(1_024))?)
}

/// Tells every story to `out`.
pub fn run(out: &mut impl Write) -> Result<()> {
    ramp(out)?;
    burst(out)?;
    overload(out)?;
    together(out)?;
    Ok(())
}

fn ramp(out: &mut impl Write) -> Result<()> {
    writeln!(out, "1. Limits grow with sustained use (fireworks_2024)")?;
    writeln!(out, "   A client sends exactly its limit, every minute, for two hours: 1,000 prompt and 100")?;
    writeln!(out, "   generated tokens a request. Fireworks publishes 60 -> 120 -> 720 -> 1440 RPM.\n")?;
    let e = engine(Policy::fireworks_2024())?;
    let key = ScopeKey::new(b"acct-ramp", MODEL);
    writeln!(
        out,
        "   {:>8}  {:>8}  {:>12}  {:>14}  {:>10}",
        "time", "RPM", "prompt TPM", "generated TPM", "published"
    )?;
    for minute in 0..=120u64 {
        let l = e.limits(key, minute * MINUTE)?;
        let rpm = l.limit(Metric::Requests);
        if let Some(published) =
            [(0, 60), (10, 120), (60, 720), (120, 1_440)].iter().find(|(m, _)| *m == minute).map(|(_, p)| p)
        {
            let label = if minute < 60 { format!("{minute} min") } else { format!("{} h", minute / 60) };
            writeln!(
                out,
                "   {label:>8}  {rpm:>8}  {:>12}  {:>14}  {published:>10}",
                l.limit(Metric::PromptTokens),
                l.limit(Metric::GeneratedTokens)
            )?;
        }
        for i in 0..rpm {
            let now = minute * MINUTE + i * MINUTE / rpm;
            if let Some(p) = e.admit(key, &Request::new(1_000).max_tokens(100), now)?.permit() {
                e.settle(p, &Usage::new(1_000, 100), Completion::Success, now)?;
            }
        }
    }
    writeln!(
        out,
        "\n   Then it goes quiet: limits hold for an hour (twice the last hour's peak), then halve hourly."
    )?;
    for hours in [3u64, 4, 6, 10] {
        writeln!(
            out,
            "   {:>2} h idle: {:>5} RPM",
            hours - 2,
            e.limits(key, hours * 60 * MINUTE)?.limit(Metric::Requests)
        )?;
    }
    writeln!(out)?;
    Ok(())
}

fn burst(out: &mut impl Write) -> Result<()> {
    writeln!(out, "2. A burst: over-limit first, then 429 (fireworks_2024)")?;
    writeln!(out, "   A new account fires 150 requests within one second at its 60 RPM floor.\n")?;
    let e = engine(Policy::fireworks_2024())?;
    let key = ScopeKey::new(b"acct-burst", MODEL);
    let mut counts = [0u32; 3];
    let mut first_429 = None;
    for i in 0..150u64 {
        let d = e.admit(key, &Request::new(500).max_tokens(50), i * SECOND / 150)?;
        match d.outcome {
            Outcome::Admit(_) => counts[0] += 1,
            Outcome::AdmitOverLimit(_) => counts[1] += 1,
            _ => {
                counts[2] += 1;
                first_429.get_or_insert(d);
            }
        }
    }
    writeln!(
        out,
        "   {} admitted in limit, {} over limit (admitted at lower priority), {} refused with 429.",
        counts[0], counts[1], counts[2]
    )?;
    if let Some(d) = first_429 {
        let render = Render::new(Dialect::Fireworks);
        writeln!(out, "   The first 429 carries:")?;
        let mut lines = Vec::new();
        sluicegate_core::headers::for_each_header(&d, &render, 0, |n, v| {
            lines.push(format!("     {n}: {v}"))
        });
        for line in lines {
            writeln!(out, "{line}")?;
        }
    }
    writeln!(out)?;
    Ok(())
}

fn overload(out: &mut impl Write) -> Result<()> {
    writeln!(out, "3. An overloaded model sheds flex traffic first and in-limit priority last (503)")?;
    writeln!(out, "   Load on the model rises; each of six classes is shed past its threshold.")?;
    writeln!(out, "   (Accounts granted priority; each request asks for its column's service tier.)\n")?;
    let tiers = [ServiceTier::Flex, ServiceTier::Default, ServiceTier::Priority];
    // (over its limit?, tier), in the order they are shed.
    let classes = [(true, 0), (false, 0), (true, 1), (true, 2), (false, 1), (false, 2)];
    print!("   {:>6}", "load");
    for (over, tier) in classes {
        let band = if over { "over-limit" } else { "in-limit" };
        print!("  {:>19}", format!("{band} {}", tiers[tier].name()));
    }
    writeln!(out)?;
    for load in [500u32, 600, 700, 800, 900, 1_000, 1_200] {
        let e = engine(Policy::fireworks_2024())?;
        let (hot, fresh) = (ScopeKey::new(b"acct-hot", MODEL), ScopeKey::new(b"acct-fresh", MODEL));
        for key in [hot, fresh] {
            e.set_service_tier_grant(key.account, ServiceTier::Priority)?;
        }
        for _ in 0..60 {
            e.admit(hot, &Request::new(1), 0)?;
        }
        e.set_load(MODEL, Variant::Regular, load)?;
        print!("   {:>5.1}x", f64::from(load) / 1000.0);
        for (over, tier) in classes {
            let key = if over { hot } else { fresh };
            let verdict = match e.admit(key, &Request::new(1).service_tier(tiers[tier]), 0)?.outcome {
                Outcome::Shed(_) => "503 shed",
                Outcome::Admit(_) | Outcome::AdmitOverLimit(_) => "runs",
                _ => "429",
            };
            print!("  {verdict:>19}");
        }
        writeln!(out)?;
    }
    writeln!(out)?;
    Ok(())
}

fn together(out: &mut impl Write) -> Result<()> {
    writeln!(out, "4. Together: 503 at or below your dynamic rate, 429 above it")?;
    let e = engine(Policy::together())?;
    let key = ScopeKey::new(b"acct-together", MODEL);
    e.set_load(MODEL, Variant::Regular, 1_000)?;
    let below = e.admit(key, &Request::new(1), 0)?;
    e.set_load(MODEL, Variant::Regular, 0)?;
    let mut smoothed = 0;
    for _ in 0..62 {
        if e.admit(key, &Request::new(1), 0)?.permit().is_some_and(|p| p.wait_ns() > 0) {
            smoothed += 1;
        }
    }
    e.set_load(MODEL, Variant::Regular, 1_000)?;
    let above = e.admit(key, &Request::new(1), 0)?;
    let status = |d: &sluicegate_core::Decision| Render::new(Dialect::Together).status(d);
    writeln!(out, "   The model at capacity, the client within its rate: HTTP {}.", status(&below))?;
    writeln!(
        out,
        "   A burst of 62 at a 60 RPM rate: smoothing delays {smoothed} of them by up to 2 s instead of failing."
    )?;
    writeln!(out, "   The model at capacity, the client above its rate: HTTP {}.", status(&above))?;
    Ok(())
}
