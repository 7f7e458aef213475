//! A client that keeps demanding more than its limit, for two hours, under `fireworks_2024`.
//!
//! Prints, minute by minute, what the client asked for, what sluicegate decided, and the limits
//! it adapted to — then compares the limits with the ramp Fireworks publishes
//! (60 → 120 → 720 → 1440 RPM at 0, 10 min, 1 h, 2 h). Demand outruns the limit, so the client
//! goes over-limit (run at lower priority) and then gets 429s, as the seeds describe.
//!
//! Run: `cargo run --release --example ramp`

use sluicegate_core::{Capacity, Completion, Engine, Metric, Outcome, Policy, Request, ScopeKey, Usage};

const MINUTE_NS: u64 = 60_000_000_000;
const PROMPT: u64 = 1_000;
const GENERATED: u64 = 100;
/// The client always asks for a quarter more than its current limit.
const DEMAND_FACTOR: f64 = 1.25;

#[derive(Default)]
struct Minute {
    demanded: u64,
    admitted: u64,
    over_limit: u64,
    rate_limited: u64,
    shed: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::new(Policy::fireworks_2024(), Capacity::scopes(64))?;
    let key = ScopeKey::new(b"acct-ramp", b"llama-v3p1-70b-instruct");
    let request = Request::new(PROMPT).max_tokens(GENERATED);
    let mut checkpoints = Vec::new();

    println!(
        "minute  demanded  admitted  over_limit   429   503   limit_rpm  limit_prompt_tpm  limit_generated_tpm"
    );
    for minute in 0..=120u64 {
        let start = minute * MINUTE_NS;
        let limits = engine.limits(key, start)?;
        let (rpm, prompt_tpm, generated_tpm) = (
            limits.limit(Metric::Requests),
            limits.limit(Metric::PromptTokens),
            limits.limit(Metric::GeneratedTokens),
        );
        if [0, 10, 60, 120].contains(&minute) {
            checkpoints.push((minute, rpm, prompt_tpm, generated_tpm));
        }
        let demand = (rpm as f64 * DEMAND_FACTOR).ceil() as u64;
        let mut m = Minute { demanded: demand, ..Minute::default() };
        for i in 0..demand {
            let now = start + i * MINUTE_NS / demand;
            // `admitted` counts requests within their limits, as the replay's table does.
            match engine.admit(key, &request, now)?.outcome {
                Outcome::Admit(p) | Outcome::AdmitOverLimit(p) => {
                    if p.over_limit() {
                        m.over_limit += 1;
                    } else {
                        m.admitted += 1;
                    }
                    engine.settle(&p, &Usage::new(PROMPT, GENERATED), Completion::Success, now)?;
                }
                Outcome::RejectRateLimited(_) => m.rate_limited += 1,
                Outcome::Shed(_) => m.shed += 1,
                Outcome::RejectSpend(_) | Outcome::RejectInvalid(_) | Outcome::RejectConcurrency(_) => {}
            }
        }
        println!(
            "{minute:>6}  {:>8}  {:>8}  {:>10}  {:>4}  {:>4}  {rpm:>10}  {prompt_tpm:>16}  {generated_tpm:>19}",
            m.demanded, m.admitted, m.over_limit, m.rate_limited, m.shed
        );
    }

    println!("\nLimits against the ramp Fireworks publishes:");
    println!("time     RPM (published)    prompt TPM (published)    generated TPM (published)");
    let published =
        [(60, 60_000, 6_000), (120, 120_000, 12_000), (720, 720_000, 72_000), (1_440, 1_440_000, 144_000)];
    for ((minute, rpm, prompt, generated), (p_rpm, p_prompt, p_generated)) in
        checkpoints.iter().zip(published)
    {
        let label = match minute {
            0 => "start".to_string(),
            m if m % 60 == 0 => format!("{} h", m / 60),
            m => format!("{m} min"),
        };
        println!(
            "{label:<7}  {rpm:>5} ({p_rpm:>5})    {prompt:>9} ({p_prompt:>9})    {generated:>8} ({p_generated:>7})"
        );
    }
    Ok(())
}
