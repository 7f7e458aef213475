//! A reference model of `shared/SPEC.md` §2–§7, written from the SPEC and not from the engine:
//! plain maps, no atomics, no packing, no horizons. Each bucket is its theoretical arrival time
//! (when it would be full again) as an `i128` of µs, so debt is carried without limit.
//!
//! Covered: the four metrics and their costs (§2); continuously refilled buckets, debt never
//! forgiven, levels kept across limit changes (§3); the bands, `too_large`, zero-cost requests,
//! smoothing waits (§4); the `fixed`, threshold and EWMA adaptation with lazy ticks in closed
//! form, capacity holding growth (§5); shedding classes on a reported load (§6); permits with
//! their time-to-live, settle, stream charges and cancels (§7); tiers' ceilings, un-pins and
//! per-account overrides, re-clamped at once (§8); a restore, after which permits are stale
//! (§10); quotas (§8); spend limits with money reserved like tokens — the worst case held at
//! admission, replaced by the bill at settle, expiry billing the reservation, tiers' limits, the
//! user's own limit, billing periods (§8).
//!
//! Readings of the SPEC this model makes, where it is silent (each also a documented engine
//! behaviour):
//! - Time is quantised to 1 µs and a cost is rounded up to whole µs (§3's "quanta").
//! - Ticks missed while a scope was idle are applied at its next use as one period, the usage
//!   counted since the last tick spread evenly over it (§5: "every tick missed, in O(1)").
//! - Decay never raises a limit: S ← max(F, min(S, κ·peak), S·2^(−Δ/1 h)) (§5 writes
//!   max(F, κ·peak, …), which would raise S while "decaying" after a high peak).
//! - The metric that binds a 429 is the one with the largest excess, the earliest in
//!   [`METRICS`] order on ties; for `too_large`, the one with the largest cost.
//! - A permit's deadline is admission time + ttl rounded up to the caller's whole second.
//! - A metric that starts or stops being enforced (an override on a metric the policy leaves
//!   unlimited) has a full bucket: an unenforced metric keeps no debt.
//! - The EWMA average never falls below F / factor: below it the average could not move the
//!   limit, and an idle scope returns exactly to a fresh one.
//! - Money is integer nano-dollars: tokens × µ$ per million tokens / 1,000, rounded down.
//! - An account's spend is checked before its scopes' limits: a request refused for both is a
//!   spend refusal. An account at or over its limit refuses every request; a request whose worst
//!   case would take it over is refused and holds nothing. An unlimited account holds nothing.
//! - An operation on a clock that has gone back takes effect at that earlier time: decisions read
//!   at least as much debt as at the latest time seen (never a refill), and the test re-syncs the
//!   scope afterwards (see [`Model::sync`]).

// Loops over metric indices read like the SPEC's per-metric rules, over several arrays at once;
// and each test crate that includes the model uses only part of it.
#![allow(clippy::needless_range_loop, dead_code)]

use std::collections::BTreeMap;

pub const SECOND: u64 = 1_000_000_000;
pub const MINUTE: u64 = 60 * SECOND;
const WINDOW_US: i128 = 60_000_000;

/// Metric order: requests, prompt, uncached prompt, generated.
pub const METRICS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Adapt {
    Fixed,
    /// SPEC §5's default rule with the Fireworks parameters.
    Threshold,
    /// Together's: the limit is `factor` × an exponential average of usage with time constant
    /// `tau_ns`.
    Ewma {
        factor: f64,
        tau_ns: u64,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Per-minute floors and ceilings; infinite for an unenforced metric.
    pub floor: [f64; METRICS],
    pub ceiling: [f64; METRICS],
    /// ρ.
    pub hard: f64,
    /// Longest smoothing wait.
    pub max_wait_ns: u64,
    /// Each tier's ceiling scale, Tier 1 first.
    pub tier_scale: [f64; 5],
    pub adapt: Adapt,
    pub tick_ns: u64,
    pub ttl_ns: u64,
    /// Shed thresholds, ‰, in shedding order: over-limit flex, in-limit flex, over-limit default,
    /// over-limit priority, in-limit default, in-limit priority.
    pub shed: [u64; 6],
    /// Each tier's monthly spend limit, µ$, Tier 1 first (`u64::MAX`: none).
    pub tier_spend_limit: [u64; 5],
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub account: Vec<u8>,
    pub model: Vec<u8>,
    pub fast: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub prompt: u64,
    pub cached: u64,
    pub max_tokens: u64,
    pub n: u64,
    /// The service tier asked for: [`FLEX`], [`DEFAULT`] or [`PRIORITY`].
    pub tier: usize,
}

/// Service tiers, ordered: a request is served at the lower of its ask and its account's grant.
pub const FLEX: usize = 0;
pub const DEFAULT: usize = 1;
pub const PRIORITY: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted, to be forwarded after `wait_us` of smoothing.
    Admit {
        over_limit: bool,
        wait_us: u64,
    },
    RateLimited {
        metric: usize,
        too_large: bool,
    },
    Shed {
        over_limit: bool,
    },
    /// The account may not spend: at or over its limit, or this request's worst case would be.
    SpendLimitExceeded,
    Invalid,
}

/// How close a decision came to going the other way, µs: near 0, rounding may flip it.
#[derive(Clone, Copy, Debug)]
pub struct Decision {
    pub outcome: Outcome,
    pub margin_us: i128,
    /// For a 429, the metrics that bind within rounding (the engine's intervals are 32.32
    /// fixed point, so two costs a few parts in 10^10 apart cannot be ordered).
    pub ties: [bool; METRICS],
}

/// Metrics whose `value` is within rounding of the largest.
fn ties_of(values: [i128; METRICS]) -> [bool; METRICS] {
    let top = values.iter().copied().max().unwrap_or(0);
    values.map(|v| top - v <= 2 + top / 1_000_000_000)
}

#[derive(Clone, Debug)]
struct Scope {
    /// When each bucket is full again, µs of the caller's clock.
    full_at: [i128; METRICS],
    limit: [f64; METRICS],
    /// The threshold rule's decaying peak use per minute.
    peak: [f64; METRICS],
    /// Settled since the last tick.
    usage: [u64; METRICS],
    last_tick: u64,
    /// The latest time this scope has seen: a clock that goes back never refills.
    high_water: u64,
}

impl Scope {
    /// A new limit for metric `m`: the level in units is kept (clamped to the new capacity) and
    /// refills at the new rate (§3).
    fn set_limit(&mut self, m: usize, limit: f64, now_us: i128) {
        let before = self.limit[m];
        if !(before.is_finite() && limit.is_finite()) {
            // An unenforced metric has no bucket: one that starts being enforced starts full.
            self.full_at[m] = self.full_at[m].min(now_us);
        } else if limit != before {
            let debt = (self.full_at[m] - now_us).max(0) as f64;
            let level = (WINDOW_US as f64 - debt) * before / 60.0e6;
            let new_debt = (WINDOW_US as f64 - level * 60.0e6 / limit).max(0.0);
            self.full_at[m] = now_us + new_debt.round() as i128;
        }
        self.limit[m] = limit;
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Permit {
    key_index: usize,
    reserved: [u64; METRICS],
    /// Nano-dollars held against the account's spend limit.
    money: u128,
    streamed: u64,
    pub deadline_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleResult {
    Ok,
    AlreadySettled,
    Expired,
    /// Issued before a restore.
    Stale,
}

/// A permit's life: live until settled or past its deadline; stale after a restore.
#[derive(Clone, Copy, Debug)]
enum PermitState {
    Live(Permit),
    Settled(u64),
    Stale,
}

/// Everything a decision can change, to undo it.
#[derive(Clone)]
pub struct State {
    scopes: BTreeMap<Key, Scope>,
    permits: Vec<PermitState>,
    accounts: BTreeMap<Vec<u8>, Account>,
}

/// An account's say in its scopes' bounds, and its quotas (§8).
#[derive(Clone, Copy, Debug, Default)]
struct Account {
    /// The pinned tier (0 = Tier 1), if any; unpinned accounts here have earned Tier 1.
    tier: usize,
    /// The service tier granted (`None`: [`DEFAULT`]).
    grant: Option<usize>,
    /// Per-metric floor and ceiling overrides.
    overrides: [Option<(f64, f64)>; METRICS],
    /// (used, limit) per quota, once touched: deployed models, A100 GPUs, H100 GPUs.
    quotas: Option<[(u32, u32); 3]>,
    /// The limit the user chose, µ$.
    chosen_limit: Option<u64>,
    /// Billed this period, and held by outstanding permits (expired ones until met), n$.
    period_spend: u128,
    reserved: u128,
}

/// What a quota call answers: the new (used, limit), or why it changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaResult {
    Ok(u32, u32),
    /// Acquiring past the limit.
    Exhausted,
    /// Releasing more than is held.
    NotHeld,
    /// A limit below what is in use.
    BelowUse,
}

/// §8's defaults: 100 deployed models, 8 A100 GPUs, 8 H100 GPUs.
const QUOTA_DEFAULTS: [(u32, u32); 3] = [(0, 100), (0, 8), (0, 8)];

/// How a quota call changes (used, limit).
#[derive(Clone, Copy, Debug)]
pub enum QuotaCall {
    Acquire(u32),
    Release(u32),
    SetLimit(u32),
}

#[derive(Default)]
pub struct Model {
    pub config: Option<Config>,
    keys: Vec<Key>,
    scopes: BTreeMap<Key, Scope>,
    accounts: BTreeMap<Vec<u8>, Account>,
    /// Reported load per (model, fast), ‰.
    load: BTreeMap<(Vec<u8>, bool), u64>,
    /// Prices per (model, fast), µ$ per million tokens: uncached prompt, cached prompt, generated.
    prices: BTreeMap<(Vec<u8>, bool), [u64; 3]>,
    permits: Vec<PermitState>,
}

/// What `tokens` cost at `limit` per minute, µs (rounded up to the quantum): exact integer
/// arithmetic for whole-number limits, as every policy and override has; adapted limits are
/// fractional and go through `f64`.
fn cost_us(tokens: u64, limit: f64) -> i128 {
    if !limit.is_finite() || tokens == 0 {
        return 0;
    }
    if limit.fract() == 0.0 && limit < 9.0e15 {
        let (numerator, l) = (i128::from(tokens) * WINDOW_US, limit as i128);
        return (numerator + l - 1) / l;
    }
    (tokens as f64 * 60.0e6 / limit).ceil() as i128
}

/// What tokens cost at `price` (µ$ per million: uncached prompt, cached prompt, generated), n$:
/// held at the largest amount money counters carry, never wrapped.
fn money(price: [u64; 3], uncached: u64, cached: u64, generated: u64) -> u128 {
    let pico = [uncached, cached, generated]
        .iter()
        .zip(price)
        .fold(0u128, |sum, (t, p)| sum.saturating_add(u128::from(*t) * u128::from(p)));
    (pico / 1_000).min(u128::from(u64::MAX))
}

impl Model {
    pub fn new(config: Config) -> Self {
        Model { config: Some(config), ..Model::default() }
    }

    fn config(&self) -> Config {
        self.config.expect("a model has a config")
    }

    fn key_index(&mut self, key: &Key) -> usize {
        if let Some(i) = self.keys.iter().position(|k| k == key) {
            return i;
        }
        self.keys.push(key.clone());
        self.keys.len() - 1
    }

    /// An account's floors and ceilings: its overrides, else the policy's with the ceiling
    /// scaled by its tier.
    fn bounds(&self, account: &[u8]) -> ([f64; METRICS], [f64; METRICS]) {
        let c = self.config();
        let a = self.accounts.get(account).copied().unwrap_or_default();
        let scale = c.tier_scale[a.tier];
        let pair = |m: usize| a.overrides[m].unwrap_or((c.floor[m], (c.ceiling[m] * scale).max(c.floor[m])));
        (std::array::from_fn(|m| pair(m).0), std::array::from_fn(|m| pair(m).1))
    }

    fn fresh_memory(&self, floor: f64) -> f64 {
        match self.config().adapt {
            Adapt::Ewma { factor, .. } => floor / factor,
            _ => 0.0,
        }
    }

    fn scope(&mut self, key: &Key, now: u64) -> &mut Scope {
        let c = self.config();
        let (floor, _) = self.bounds(&key.account);
        let peak = floor.map(|f| self.fresh_memory(f));
        self.scopes.entry(key.clone()).or_insert_with(|| Scope {
            full_at: [(now / 1_000) as i128; METRICS],
            limit: floor,
            peak,
            usage: [0; METRICS],
            last_tick: now / c.tick_ns,
            high_water: now,
        })
    }

    /// Brings a scope to `now`: the clock never goes back for it, and due ticks are applied.
    /// Returns the time it reads its buckets at.
    fn touch(&mut self, key: &Key, now: u64) -> u64 {
        let c = self.config();
        let loaded = self.load_of(key) >= c.shed[4];
        let bounds = self.bounds(&key.account);
        let s = self.scope(key, now);
        s.high_water = s.high_water.max(now);
        let at = s.high_water;
        let tick = at / c.tick_ns;
        if tick > s.last_tick {
            let period = (tick - s.last_tick) * c.tick_ns;
            let usage = std::mem::take(&mut s.usage);
            let now_us = (at / 1_000) as i128;
            for m in 0..METRICS {
                let before = s.limit[m];
                let (floor, ceiling) = (bounds.0[m], bounds.1[m]);
                let (limit, peak) = adapt(&c, floor, ceiling, before, s.peak[m], usage[m], period, loaded);
                s.peak[m] = peak;
                s.set_limit(m, limit, now_us);
            }
            s.last_tick = tick;
        }
        at
    }

    /// Re-clamps every scope of `account` to its bounds at once (§8), after due ticks.
    fn reclamp(&mut self, account: &[u8], now: u64) {
        let keys: Vec<Key> = self.scopes.keys().filter(|k| k.account == account).cloned().collect();
        let (floor, ceiling) = self.bounds(account);
        let fixed = self.config().adapt == Adapt::Fixed;
        for key in keys {
            let at = self.touch(&key, now);
            let s = self.scopes.get_mut(&key).expect("listed");
            for m in 0..METRICS {
                // Under `fixed` the limit is the floor (§5: no adaptation, a plain limiter).
                let limit = if fixed { floor[m] } else { s.limit[m].clamp(floor[m], ceiling[m]) };
                s.set_limit(m, limit, (at / 1_000) as i128);
            }
        }
    }

    /// Pins an account's tier (0 = Tier 1) or, with `None`, returns it to the tier it earned
    /// (Tier 1 here: these accounts spend nothing).
    pub fn set_tier(&mut self, account: &[u8], tier: Option<usize>, now: u64) {
        self.accounts.entry(account.to_vec()).or_default().tier = tier.unwrap_or(0);
        self.reclamp(account, now);
    }

    /// Grants an account a service tier: its requests are served at no higher one.
    pub fn set_grant(&mut self, account: &[u8], tier: usize) {
        self.accounts.entry(account.to_vec()).or_default().grant = Some(tier);
    }

    /// Gives an account its own floor and ceiling on metric `m`, or returns it to the policy's.
    pub fn set_override(&mut self, account: &[u8], m: usize, bounds: Option<(f64, f64)>, now: u64) {
        self.accounts.entry(account.to_vec()).or_default().overrides[m] = bounds;
        self.reclamp(account, now);
    }

    /// Acquires, releases or re-limits quota `q` of `account`: all or nothing (§8).
    pub fn quota(&mut self, account: &[u8], q: usize, call: QuotaCall) -> QuotaResult {
        let a = self.accounts.entry(account.to_vec()).or_default();
        let quotas = a.quotas.get_or_insert(QUOTA_DEFAULTS);
        let (used, limit) = quotas[q];
        let next = match call {
            QuotaCall::Acquire(n) => match used.checked_add(n) {
                Some(u) if u <= limit => (u, limit),
                _ => return QuotaResult::Exhausted,
            },
            QuotaCall::Release(n) => match used.checked_sub(n) {
                Some(u) => (u, limit),
                None => return QuotaResult::NotHeld,
            },
            QuotaCall::SetLimit(l) if l < used => return QuotaResult::BelowUse,
            QuotaCall::SetLimit(l) => (used, l),
        };
        quotas[q] = next;
        QuotaResult::Ok(next.0, next.1)
    }

    /// A snapshot restored at `now` into a new engine incarnation: every scope is brought up to
    /// date, and every outstanding permit is stale.
    pub fn restore(&mut self, now: u64) {
        let keys: Vec<Key> = self.scopes.keys().cloned().collect();
        for key in keys {
            self.touch(&key, now);
        }
        // What an expired permit held is billed; what a live one held is released.
        let held: Vec<Permit> = self
            .permits
            .iter()
            .filter_map(|p| if let PermitState::Live(p) = p { Some(*p) } else { None })
            .collect();
        for p in held {
            self.bill(p, if now > p.deadline_ns { p.money } else { 0 });
        }
        self.permits.iter_mut().for_each(|p| *p = PermitState::Stale);
    }

    fn load_of(&self, key: &Key) -> u64 {
        self.load.get(&(key.model.clone(), key.fast)).copied().unwrap_or(0)
    }

    pub fn set_load(&mut self, model: &[u8], fast: bool, permille: u64) {
        self.load.insert((model.to_vec(), fast), permille);
    }

    /// The debt of each metric in units (requests or tokens), rounded down, and each limit.
    pub fn levels(&mut self, key: &Key, now: u64) -> Option<([u64; METRICS], [f64; METRICS])> {
        self.scopes.get(key)?;
        let at = self.touch(key, now);
        let s = &self.scopes[key];
        let now_us = (at / 1_000) as i128;
        let used = std::array::from_fn(|m| {
            let debt = (s.full_at[m] - now_us).max(0);
            if s.limit[m].is_finite() { (debt as f64 * s.limit[m] / 60.0e6).floor() as u64 } else { 0 }
        });
        Some((used, s.limit))
    }

    /// Decides a request (§4) and, if admitted, reserves it; returns the decision and the
    /// model's permit index.
    pub fn admit(&mut self, key: &Key, r: &Request, now: u64) -> (Decision, Option<usize>) {
        let c = self.config();
        let invalid = Decision { outcome: Outcome::Invalid, margin_us: i128::MAX, ties: [false; METRICS] };
        if r.n == 0 || r.cached > r.prompt {
            return (invalid, None);
        }
        let Some(generated) = r.n.checked_mul(r.max_tokens) else { return (invalid, None) };
        let cost = [r.n, r.prompt, r.prompt - r.cached, generated];
        // The scope exists from its first request on, refused or not.
        self.scope(key, now);
        let Some(money) = self.hold(key, r.prompt, generated) else {
            let outcome = Outcome::SpendLimitExceeded;
            return (Decision { outcome, margin_us: i128::MAX, ties: [false; METRICS] }, None);
        };
        let load = self.load_of(key);
        let at = self.touch(key, now);
        let s = self.scopes.get_mut(key).expect("touched");
        let now_us = (at / 1_000) as i128;
        let hard = (c.hard * WINDOW_US as f64).ceil() as i128;
        let cost_q: [i128; METRICS] = std::array::from_fn(|m| cost_us(cost[m], s.limit[m]));
        let debt: [i128; METRICS] = std::array::from_fn(|m| (s.full_at[m] - now_us).max(0));
        // The largest cost decides `too_large`.
        let (big, big_cost) =
            (0..METRICS).fold((0, 0), |(bm, bc), m| if cost_q[m] > bc { (m, cost_q[m]) } else { (bm, bc) });
        if big_cost > hard {
            let outcome = Outcome::RateLimited { metric: big, too_large: true };
            return (Decision { outcome, margin_us: big_cost - hard, ties: ties_of(cost_q) }, None);
        }
        let mut worst = (0usize, 0i128);
        let mut excesses = [0i128; METRICS];
        let mut margin = i128::MAX;
        for m in 0..METRICS {
            let excess = if cost_q[m] == 0 {
                // A zero-cost metric passes unless it is past the hard band (§3).
                if debt[m] > hard { debt[m] - WINDOW_US } else { 0 }
            } else {
                (debt[m] + cost_q[m] - WINDOW_US).max(0)
            };
            if cost_q[m] > 0 {
                margin = margin
                    .min((debt[m] + cost_q[m] - WINDOW_US).abs())
                    .min((debt[m] + cost_q[m] - hard).abs());
            } else if s.limit[m].is_finite() {
                margin = margin.min((debt[m] - hard).abs());
            }
            excesses[m] = excess;
            if excess > worst.1 {
                worst = (m, excess);
            }
        }
        // Past the hard band a request may still wait up to max_wait for it (§4, smoothing);
        // it runs over-limit if it is still past the normal band when it runs.
        let wait = (worst.1 - (hard - WINDOW_US)).max(0);
        if wait > (c.max_wait_ns / 1_000) as i128 {
            let outcome = Outcome::RateLimited { metric: worst.0, too_large: false };
            return (Decision { outcome, margin_us: margin, ties: ties_of(excesses) }, None);
        }
        let over_limit = worst.1 > wait;
        let grant = self.accounts.get(&key.account).and_then(|a| a.grant).unwrap_or(DEFAULT);
        let threshold = match (over_limit, r.tier.min(grant)) {
            (true, FLEX) => c.shed[0],
            (false, FLEX) => c.shed[1],
            (true, DEFAULT) => c.shed[2],
            (true, _) => c.shed[3],
            (false, DEFAULT) => c.shed[4],
            (false, _) => c.shed[5],
        };
        if load >= threshold {
            let outcome = Outcome::Shed { over_limit };
            return (Decision { outcome, margin_us: margin, ties: [false; METRICS] }, None);
        }
        let permit = self.reserve(key, cost, at, money);
        let outcome = Outcome::Admit { over_limit, wait_us: wait as u64 };
        (Decision { outcome, margin_us: margin, ties: [false; METRICS] }, Some(permit))
    }

    /// The account's spend limit, n$ (`u64::MAX`: none).
    fn spend_limit(&self, account: &[u8]) -> u128 {
        let a = self.accounts.get(account).copied().unwrap_or_default();
        let tier = self.config().tier_spend_limit[a.tier];
        let micros = tier.min(a.chosen_limit.unwrap_or(u64::MAX));
        u128::from(micros.saturating_mul(1_000))
    }

    fn price_of(&self, key: &Key) -> [u64; 3] {
        self.prices.get(&(key.model.clone(), key.fast)).copied().unwrap_or([0; 3])
    }

    /// The money a request would hold against its account's limit (§8: prompt at the uncached
    /// price, every reserved token generated), or `None` when the account may not spend it.
    fn hold(&self, key: &Key, prompt: u64, generated: u64) -> Option<u128> {
        let a = self.accounts.get(&key.account).copied().unwrap_or_default();
        let limit = self.spend_limit(&key.account);
        let committed = a.period_spend + a.reserved;
        if committed >= limit {
            return None;
        }
        let worst = money(self.price_of(key), prompt, 0, generated);
        if worst == 0 || limit == u128::from(u64::MAX) {
            return Some(0);
        }
        (committed + worst <= limit).then_some(worst)
    }

    /// Charges an admitted request's costs and issues its permit.
    fn reserve(&mut self, key: &Key, cost: [u64; METRICS], at: u64, money: u128) -> usize {
        let c = self.config();
        let s = self.scopes.get_mut(key).expect("touched");
        let now_us = (at / 1_000) as i128;
        for m in 0..METRICS {
            s.full_at[m] = now_us.max(s.full_at[m]) + cost_us(cost[m], s.limit[m]);
        }
        let deadline_ns = at.saturating_add(c.ttl_ns).div_ceil(SECOND).saturating_mul(SECOND);
        let key_index = self.key_index(key);
        self.accounts.entry(key.account.clone()).or_default().reserved += money;
        let permit = Permit { key_index, reserved: cost, money, streamed: 0, deadline_ns };
        self.permits.push(PermitState::Live(permit));
        self.permits.len() - 1
    }

    /// Takes `outcome` (the engine's, on a decision within rounding of an edge) instead of
    /// the model's own: reserves if it admitted.
    pub fn follow(&mut self, key: &Key, r: &Request, now: u64, outcome: Outcome) -> Option<usize> {
        self.scope(key, now);
        let Outcome::Admit { .. } = outcome else { return None };
        let generated = r.n.saturating_mul(r.max_tokens);
        let money = self.hold(key, r.prompt, generated).expect("the engine admitted within the spend limit");
        let at = self.touch(key, now);
        let cost = [r.n, r.prompt, r.prompt - r.cached, generated];
        Some(self.reserve(key, cost, at, money))
    }

    /// Sets a scope's buckets to the debts (µs) the engine reports at `at`: after an operation on
    /// a clock that had gone back, which takes effect at that earlier time (a charge there may
    /// use refill the bucket had by the later time; bounded by the skew, and no time is added).
    pub fn sync(&mut self, key: &Key, at: u64, debt_us: [u64; METRICS]) {
        if let Some(s) = self.scopes.get_mut(key) {
            for m in 0..METRICS {
                if s.limit[m].is_finite() {
                    s.full_at[m] = (at / 1_000) as i128 + debt_us[m] as i128;
                }
            }
        }
    }

    /// The deadline the engine gave a permit (the model checks its range).
    pub fn set_deadline(&mut self, p: usize, deadline_ns: u64) {
        if let Some(PermitState::Live(permit)) = self.permits.get_mut(p) {
            permit.deadline_ns = deadline_ns;
        }
    }

    pub fn clone_state(&self) -> State {
        State { scopes: self.scopes.clone(), permits: self.permits.clone(), accounts: self.accounts.clone() }
    }

    pub fn restore_state(&mut self, state: State) {
        self.scopes = state.scopes;
        self.permits = state.permits;
        self.accounts = state.accounts;
    }

    /// A live permit, or why it is not: past its deadline is `Expired` whatever happened
    /// before; a settled one within it is `AlreadySettled`.
    fn live(&mut self, p: usize, now: u64) -> Result<Permit, SettleResult> {
        let (deadline, live) = match self.permits.get(p) {
            Some(PermitState::Live(permit)) => (permit.deadline_ns, Some(*permit)),
            Some(PermitState::Settled(deadline)) => (*deadline, None),
            Some(PermitState::Stale) => return Err(SettleResult::Stale),
            None => return Err(SettleResult::AlreadySettled),
        };
        if now > deadline {
            if let Some(permit) = live {
                self.bill(permit, permit.money);
            }
            self.permits[p] = PermitState::Settled(deadline);
            return Err(SettleResult::Expired);
        }
        live.ok_or(SettleResult::AlreadySettled)
    }

    /// Settles (or with `counts = false`, an upstream failure) permit `p` with what it used (§7).
    pub fn settle(
        &mut self,
        p: usize,
        prompt: u64,
        cached: u64,
        generated: u64,
        counts: bool,
        now: u64,
    ) -> SettleResult {
        let permit = match self.live(p, now) {
            Ok(permit) => permit,
            Err(refused) => return refused,
        };
        self.permits[p] = PermitState::Settled(permit.deadline_ns);
        let key = self.keys[permit.key_index].clone();
        let billed = if counts { money(self.price_of(&key), prompt - cached, cached, generated) } else { 0 };
        self.bill(permit, billed);
        let at = self.touch(&key, now);
        let s = self.scopes.get_mut(&key).expect("a permit's scope exists");
        let now_us = (at / 1_000) as i128;
        let actual = [permit.reserved[0], prompt, prompt - cached, generated];
        let billed = [
            permit.reserved[0],
            permit.reserved[1],
            permit.reserved[2],
            permit.reserved[3].max(permit.streamed),
        ];
        for m in 1..METRICS {
            let delta = actual[m] as i128 - billed[m] as i128;
            let q = cost_us(delta.unsigned_abs() as u64, s.limit[m]);
            let debt = (s.full_at[m] - now_us).max(0);
            // Refunds stop at a full bucket; charges go into debt without limit.
            s.full_at[m] = now_us + (debt + if delta < 0 { -q } else { q }).max(0);
        }
        if counts {
            for m in 0..METRICS {
                s.usage[m] = s.usage[m].saturating_add(actual[m]);
            }
        }
        SettleResult::Ok
    }

    /// Replaces a permit's held money with what it is billed (§8).
    fn bill(&mut self, permit: Permit, billed: u128) {
        let account = self.keys[permit.key_index].account.clone();
        let a = self.accounts.entry(account).or_default();
        a.reserved -= permit.money;
        a.period_spend += billed;
    }

    /// What the account has spent this period plus what its permits hold, n$.
    pub fn committed(&self, account: &[u8]) -> u128 {
        self.accounts.get(account).map_or(0, |a| a.period_spend + a.reserved)
    }

    pub fn set_price(&mut self, model: &[u8], fast: bool, price: [u64; 3]) {
        self.prices.insert((model.to_vec(), fast), price);
    }

    /// The user's own spend limit, µ$: refused (false) above the tier's.
    pub fn set_spend_limit(&mut self, account: &[u8], micros: u64) -> bool {
        let a = self.accounts.entry(account.to_vec()).or_default();
        if micros > self.config.expect("a model has a config").tier_spend_limit[a.tier] {
            return false;
        }
        a.chosen_limit = Some(micros);
        true
    }

    /// A new billing period at `now`: permits expired by then are billed to the closing period,
    /// spend starts again from zero, and what live permits hold stays held.
    pub fn start_billing_period(&mut self, now: u64) {
        for p in 0..self.permits.len() {
            if matches!(self.permits[p], PermitState::Live(permit) if now > permit.deadline_ns) {
                let _ = self.live(p, now);
            }
        }
        self.accounts.values_mut().for_each(|a| a.period_spend = 0);
    }

    /// A stream's `tokens` more generated tokens; those past the reservation are charged now.
    pub fn charge(&mut self, p: usize, tokens: u64, now: u64) -> SettleResult {
        let permit = match self.live(p, now) {
            Ok(permit) => permit,
            Err(refused) => return refused,
        };
        let after = permit.streamed + tokens;
        let extra = after.saturating_sub(permit.reserved[3].max(permit.streamed));
        if let Some(PermitState::Live(live)) = self.permits.get_mut(p) {
            live.streamed = after;
        }
        let key = self.keys[permit.key_index].clone();
        let at = self.touch(&key, now);
        let s = self.scopes.get_mut(&key).expect("a permit's scope exists");
        let now_us = (at / 1_000) as i128;
        let q = cost_us(extra, s.limit[3]);
        s.full_at[3] = now_us.max(s.full_at[3]) + q;
        SettleResult::Ok
    }
}

/// One adaptation period of `period_ns` for a metric with bounds `floor`..`ceiling` (§5): the
/// new limit and memory (the threshold rule's peak, or the EWMA's average).
#[allow(clippy::too_many_arguments)]
fn adapt(
    c: &Config,
    floor: f64,
    ceiling: f64,
    limit: f64,
    memory: f64,
    usage: u64,
    period_ns: u64,
    loaded: bool,
) -> (f64, f64) {
    if !floor.is_finite() {
        return (limit, memory);
    }
    let minutes = period_ns as f64 / MINUTE as f64;
    let per_minute = usage as f64 / minutes;
    let hours = period_ns as f64 / (60 * MINUTE) as f64;
    let (next, memory) = match c.adapt {
        Adapt::Fixed => (floor, 0.0),
        Adapt::Threshold => {
            let mut peak = (memory * 0.5f64.powf(hours)).max(per_minute);
            if peak < 1.0 {
                peak = 0.0;
            }
            let u = per_minute / limit;
            let next = if u >= 0.8 {
                if loaded { limit } else { grow(limit, floor, period_ns) }
            } else if u >= 0.5 {
                limit
            } else {
                (limit * 0.5f64.powf(hours)).max(limit.min(2.0 * peak)).max(floor)
            };
            (next, peak)
        }
        Adapt::Ewma { factor, tau_ns } => {
            let keep = (-(period_ns as f64) / tau_ns as f64).exp();
            let average = (per_minute + (memory - per_minute) * keep).max(floor / factor);
            let mut next = (factor * average).clamp(floor, ceiling);
            if loaded {
                next = next.min(limit);
            }
            (next, average)
        }
    };
    (next.clamp(floor, ceiling), memory)
}

/// Slow start (×2 per 10 minutes) while under twice the floor, then +floor/5 per minute.
fn grow(limit: f64, floor: f64, period_ns: u64) -> f64 {
    let minutes = period_ns as f64 / MINUTE as f64;
    if limit >= 2.0 * floor {
        return limit + floor / 5.0 * minutes;
    }
    let to_double = 10.0 * (2.0 * floor / limit).log2();
    if minutes <= to_double {
        limit * 2f64.powf(minutes / 10.0)
    } else {
        2.0 * floor + floor / 5.0 * (minutes - to_double)
    }
}
