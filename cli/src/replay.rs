//! Replaying a trace through an engine in simulated time, minute by minute.

use std::collections::{BinaryHeap, HashMap};

use sluicegate_core::headers::for_each_header;
use sluicegate_core::response::{Dialect, Render};
use sluicegate_core::{
    Capacity, Completion, Engine, Heap, Metric, Outcome, Permit, Policy, Request, ScopeKey, ServiceTier,
    Usage, Variant,
};

use crate::backend::{Backend, Slots};
use crate::trace::{BadRow, Trace, TraceRequest};

const MINUTE_NS: u64 = 60_000_000_000;

/// What became of a request, in the order the tables, CSV and plots stack them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Admitted within every limit.
    Admitted,
    /// Admitted over a limit, at lower priority.
    OverLimit,
    /// 429: a rate or concurrency limit.
    RateLimited,
    /// 503: the model was too loaded for the request's class.
    Shed,
    /// 402: the account may not spend.
    SpendRefused,
    /// 400: malformed, or a row the engine refused as an error (a key too long, a full table).
    Invalid,
}

impl Fate {
    /// Every fate, in stacking order.
    pub const ALL: [Fate; 6] =
        [Fate::Admitted, Fate::OverLimit, Fate::RateLimited, Fate::Shed, Fate::SpendRefused, Fate::Invalid];

    /// The words every table, legend and document uses for it.
    pub fn label(self) -> &'static str {
        match self {
            Fate::Admitted => "admitted (in limit)",
            Fate::OverLimit => "over limit (lower priority)",
            Fate::RateLimited => "rate limited (429)",
            Fate::Shed => "shed (503)",
            Fate::SpendRefused => "spend refused (402)",
            Fate::Invalid => "invalid (400)",
        }
    }

    fn of(outcome: &Outcome) -> Fate {
        match outcome {
            Outcome::Admit(_) => Fate::Admitted,
            Outcome::AdmitOverLimit(_) => Fate::OverLimit,
            Outcome::RejectRateLimited(_) | Outcome::RejectConcurrency(_) => Fate::RateLimited,
            Outcome::Shed(_) => Fate::Shed,
            Outcome::RejectSpend(_) => Fate::SpendRefused,
            Outcome::RejectInvalid(_) => Fate::Invalid,
        }
    }
}

/// Why a 429 was given: the binding metric, or the account's cap on requests in flight.
pub const BINDINGS: [&str; 5] =
    ["requests", "prompt_tokens", "uncached_prompt_tokens", "generated_tokens", "concurrency"];

/// What happened in one minute of the trace that saw requests (idle minutes are not stored).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the trace's first request.
    pub minute: u64,
    /// Requests by [`Fate`], in [`Fate::ALL`] order.
    pub fates: [u64; 6],
    /// 429s by [`BINDINGS`].
    pub bound: [u64; 5],
    /// Per metric ([`Metric::ALL`]), the units demanded by [`Fate`]: requests, prompt tokens,
    /// uncached prompt tokens and generated tokens (what the trace says each would generate).
    pub demand: [[u64; 6]; 4],
    /// Each metric's limit per minute at the minute's end, summed over the scopes that made
    /// requests in it (`u64::MAX`: not enforced), so it compares with `demand`.
    pub limits: [u64; 4],
    /// The headers of the minute's last decision, if asked for.
    pub headers: Vec<(String, String)>,
}

impl Minute {
    /// Requests that met `fate`.
    pub fn count(&self, fate: Fate) -> u64 {
        self.fates[fate as usize]
    }

    /// Requests that arrived: every one meets exactly one fate.
    pub fn demanded(&self) -> u64 {
        self.fates.iter().sum()
    }
}

/// A whole replay.
#[derive(Debug)]
pub struct Replay {
    /// The minutes that saw requests, in order.
    pub minutes: Vec<Minute>,
    /// Rows the engine refused as errors, with the reason (counted [`Fate::Invalid`]).
    pub errors: Vec<BadRow>,
    /// Requests refused (every fate but admitted and over limit) per account, by account index.
    pub refused_by_account: Vec<u64>,
}

impl Replay {
    /// Requests by fate over the whole trace.
    pub fn fates(&self) -> [u64; 6] {
        self.total(|m| m.fates)
    }

    /// 429s by binding over the whole trace.
    pub fn bound(&self) -> [u64; 5] {
        self.total(|m| m.bound)
    }

    fn total<const N: usize>(&self, counts: impl Fn(&Minute) -> [u64; N]) -> [u64; N] {
        self.minutes.iter().map(counts).fold([0; N], |sum, c| core::array::from_fn(|i| sum[i] + c[i]))
    }

    /// The `n` accounts most refused, most first (ties by account index): (index, refusals).
    pub fn most_refused(&self, n: usize) -> Vec<(usize, u64)> {
        let mut refused: Vec<(usize, u64)> =
            self.refused_by_account.iter().copied().enumerate().filter(|(_, r)| *r > 0).collect();
        refused.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        refused.truncate(n);
        refused
    }
}

/// How to replay.
pub struct Setup {
    /// The policy.
    pub policy: Policy,
    /// Show each minute's last decision's headers in this dialect, as the engine renders them,
    /// with dated resets read from this Unix time (ns) at the trace's start.
    pub headers: Option<(Dialect, u64)>,
    /// Model a backend per model variant, whose load feeds the engine; without it every admitted
    /// request is settled the moment it is admitted and the load stays 0.
    pub backend: Option<Backend>,
    /// Stop at the first row the engine refuses as an error.
    pub strict: bool,
}

/// An admitted request waiting for its backend to finish it.
struct Running {
    finish_ns: u64,
    permit: Permit,
    usage: Usage,
}

impl PartialEq for Running {
    fn eq(&self, other: &Self) -> bool {
        self.finish_ns == other.finish_ns
    }
}
impl Eq for Running {}
impl PartialOrd for Running {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Running {
    /// Reversed: the heap pops the earliest finish.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.finish_ns.cmp(&self.finish_ns)
    }
}

/// Room for everything the trace names, sized by one pass over it: tables are hashed into
/// windows near each key's home slot, so each gets twice what it holds.
fn capacity_for(trace: &Trace, scopes: usize, backend: Option<&Backend>) -> Capacity {
    let most = Capacity::scopes(usize::MAX);
    let in_flight = backend.map_or(0, |b| b.slots as usize * 2 * trace.models.len().max(1) * 2);
    Capacity {
        scopes: scopes.saturating_mul(2).saturating_add(64).min(u32::MAX as usize),
        accounts: (trace.accounts.len().saturating_mul(2) + 64).min(most.accounts),
        models: (trace.models.len().saturating_mul(2) + 16).clamp(256, most.models),
        permits: (in_flight + 1_024).min(most.permits),
    }
}

/// Replays `trace` (time-ordered). `progress` is called with the number of requests done. A trace
/// records the tier each request ran at, so an account is granted priority when it
/// asks. A row the engine refuses as an error is counted invalid and reported in
/// [`Replay::errors`], or ends the replay under `strict`.
pub fn replay(trace: &Trace, setup: Setup, mut progress: impl FnMut(u64)) -> Result<Replay, BadRow> {
    let mut scope_of: HashMap<(u32, u32, bool), u32> = HashMap::new();
    let mut keys: Vec<(u32, u32, bool)> = Vec::new();
    let scope_ids: Vec<u32> = trace
        .requests
        .iter()
        .map(|r| {
            let key = (r.account, r.model, r.fast);
            *scope_of.entry(key).or_insert_with(|| {
                keys.push(key);
                keys.len() as u32 - 1
            })
        })
        .collect();
    let engine = Engine::new(setup.policy, capacity_for(trace, keys.len(), setup.backend.as_ref()))
        .map_err(|e| BadRow { line: 0, reason: e.to_string() })?;
    let render = setup.headers.map(|(dialect, unix_ns)| Render { unix_ns, ..engine.render(dialect) });
    if let Some(backend) = &setup.backend {
        for model in &trace.models {
            for variant in [Variant::Regular, Variant::Fast] {
                let set = engine.set_model_capacity(model.as_bytes(), variant, backend.slots);
                set.map_err(|e| BadRow { line: 0, reason: format!("model {model:?}: {e}") })?;
            }
        }
    }
    let mut run = Run {
        engine: &engine,
        trace,
        keys: &keys,
        backend: setup.backend.map(Slots::new),
        running: BinaryHeap::new(),
        seen_in: vec![u64::MAX; keys.len()],
        active: Vec::new(),
        replay: Replay {
            minutes: Vec::new(),
            errors: Vec::new(),
            refused_by_account: vec![0; trace.accounts.len()],
        },
    };
    for (done, (r, &scope)) in trace.requests.iter().zip(&scope_ids).enumerate() {
        let minute = r.t_ns / MINUTE_NS;
        if run.replay.minutes.last().is_none_or(|m| m.minute != minute) {
            run.close();
            run.replay.minutes.push(Minute { minute, ..Minute::default() });
        }
        run.finish_until(r.t_ns);
        if let Err(e) = run.admit(r, scope, render.as_ref()) {
            let bad = BadRow { line: r.line, reason: e.to_string() };
            if setup.strict {
                return Err(bad);
            }
            run.count(r, Fate::Invalid, None);
            run.replay.errors.push(bad);
        }
        progress(done as u64 + 1);
    }
    run.close();
    run.finish_until(u64::MAX);
    Ok(run.replay)
}

/// A replay in progress.
struct Run<'a> {
    engine: &'a Engine<Heap>,
    trace: &'a Trace,
    /// Each scope's (account, model, fast), by scope index.
    keys: &'a [(u32, u32, bool)],
    backend: Option<Slots>,
    running: BinaryHeap<Running>,
    /// The minute each scope last made a request in.
    seen_in: Vec<u64>,
    /// Scopes that made requests in the current minute.
    active: Vec<u32>,
    replay: Replay,
}

impl<'a> Run<'a> {
    fn key(&self, scope: u32) -> Option<ScopeKey<'a>> {
        let (trace, keys) = (self.trace, self.keys);
        let &(account, model, fast) = keys.get(scope as usize)?;
        Some(ScopeKey {
            account: trace.accounts.get(account as usize)?.as_bytes(),
            model: trace.models.get(model as usize)?.as_bytes(),
            variant: if fast { Variant::Fast } else { Variant::Regular },
        })
    }

    fn admit(
        &mut self,
        r: &TraceRequest,
        scope: u32,
        headers: Option<&Render>,
    ) -> Result<(), sluicegate_core::Error> {
        let key = self.key(scope).ok_or(sluicegate_core::Error::TableFull(sluicegate_core::Table::Scopes))?;
        // The engine writes a grant only when it changes, so granting at every ask is cheap.
        if r.service_tier == ServiceTier::Priority {
            self.engine.set_service_tier_grant(key.account, ServiceTier::Priority)?;
        }
        let request = Request::new(r.prompt_tokens)
            .cached_tokens(r.cached_tokens)
            .max_tokens(r.max_tokens)
            .n(r.n)
            .service_tier(r.service_tier);
        let decision = self.engine.admit(key, &request, r.t_ns)?;
        let bound = match decision.outcome {
            Outcome::RejectRateLimited(limited) => Some(limited.metric as usize),
            Outcome::RejectConcurrency(_) => Some(BINDINGS.len() - 1),
            _ => None,
        };
        self.count(r, Fate::of(&decision.outcome), bound);
        if let (Some(minute), Some(render)) = (self.replay.minutes.last_mut(), headers) {
            minute.headers.clear();
            for_each_header(&decision, render, r.t_ns, |n, v| minute.headers.push((n.into(), v.into())));
        }
        if let Some(seen) = self.seen_in.get_mut(scope as usize) {
            if std::mem::replace(seen, r.t_ns / MINUTE_NS) != r.t_ns / MINUTE_NS {
                self.active.push(scope);
            }
        }
        if let Some(permit) = decision.permit() {
            let usage = Usage {
                prompt_tokens: r.prompt_tokens,
                cached_tokens: r.cached_tokens,
                generated_tokens: r.generated_tokens,
            };
            let finish_ns = match &mut self.backend {
                Some(slots) => slots.serve(r),
                None => r.t_ns,
            };
            self.running.push(Running { finish_ns, permit: *permit, usage });
            self.finish_until(r.t_ns);
        }
        Ok(())
    }

    fn count(&mut self, r: &TraceRequest, fate: Fate, bound: Option<usize>) {
        let Some(m) = self.replay.minutes.last_mut() else { return };
        m.fates[fate as usize] += 1;
        if let Some(b) = bound.and_then(|b| m.bound.get_mut(b)) {
            *b += 1;
        }
        let uncached = r.prompt_tokens.saturating_sub(r.cached_tokens);
        let units = [1, r.prompt_tokens, uncached, r.generated_tokens];
        for (demand, units) in m.demand.iter_mut().zip(units) {
            demand[fate as usize] = demand[fate as usize].saturating_add(units);
        }
        if !matches!(fate, Fate::Admitted | Fate::OverLimit) {
            if let Some(refused) = self.replay.refused_by_account.get_mut(r.account as usize) {
                *refused += 1;
            }
        }
    }

    /// Settles every running request that finished by `now_ns`, at its finish time.
    fn finish_until(&mut self, now_ns: u64) {
        while self.running.peek().is_some_and(|r| r.finish_ns <= now_ns) {
            let Some(done) = self.running.pop() else { break };
            // Each permit is settled once, here; a failure (its TTL passed while it queued) is
            // what the engine would also see from a real backend, and changes no count.
            let _ = self.engine.settle(&done.permit, &done.usage, Completion::Success, done.finish_ns);
        }
    }

    /// Records the limits at the end of the current minute, summed over its active scopes.
    fn close(&mut self) {
        let Some(minute) = self.replay.minutes.last().map(|m| m.minute) else { return };
        let end = (minute + 1).saturating_mul(MINUTE_NS) - 1;
        self.finish_until(end);
        let mut sums = [0u64; 4];
        for scope in std::mem::take(&mut self.active) {
            let Some(key) = self.key(scope) else { continue };
            if let Ok(levels) = self.engine.limits(key, end) {
                for (sum, metric) in sums.iter_mut().zip(Metric::ALL) {
                    *sum = sum.saturating_add(levels.limit(metric));
                }
            }
        }
        if let Some(m) = self.replay.minutes.last_mut() {
            m.limits = sums;
        }
    }
}
