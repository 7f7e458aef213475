//! The engine handle: creation from a preset plus overrides, admit, settle, charge, cancel,
//! limits and load.

use core::ffi::{CStr, c_char};

use sluicegate_core::{
    Backing, Capacity, Completion, Decision, Engine, Heap, Levels, Metric, Outcome, Overrides, Permit,
    Policy, RawPermit, Request, ScopeKey, ServiceTier, Usage, Variant, overrides,
};

use crate::boundary::{arg, boundary, bytes, out, sg_result, sg_result::*};

/// An engine: opaque, created by `sg_engine_new` (or `sg_engine_open_shared`,
/// `sg_engine_in_region`, `sg_engine_connect_redis`), freed by `sg_engine_free`.
pub struct sg_engine {
    pub(crate) inner: Engine<Backing>,
    /// A replica's leases of the global buckets in Redis (`sg_engine_connect_redis`).
    #[cfg(feature = "redis")]
    pub(crate) hosts: Option<sluicegate_redis::Hosts>,
}

impl sg_engine {
    /// An engine that admits from its own buckets.
    pub(crate) fn local(inner: Engine<Backing>) -> Self {
        sg_engine {
            inner,
            #[cfg(feature = "redis")]
            hosts: None,
        }
    }

    /// Admits from the scope's own buckets, or, for a replica, from its lease.
    pub(crate) fn admit(
        &self,
        key: ScopeKey<'_>,
        request: &Request,
        now_ns: u64,
    ) -> Result<Decision, sluicegate_core::Error> {
        #[cfg(feature = "redis")]
        if let Some(hosts) = &self.hosts {
            return hosts.admit(&self.inner, key, request, now_ns);
        }
        self.inner.admit(key, request, now_ns)
    }

    pub(crate) fn settle(
        &self,
        permit: &Permit,
        usage: &Usage,
        completion: Completion,
        now_ns: u64,
    ) -> Result<(), sluicegate_core::SettleError> {
        #[cfg(feature = "redis")]
        if let Some(hosts) = &self.hosts {
            return hosts.settle(&self.inner, permit, usage, completion, now_ns);
        }
        self.inner.settle(permit, usage, completion, now_ns)
    }

    pub(crate) fn charge(
        &self,
        permit: &Permit,
        generated_tokens: u64,
        now_ns: u64,
    ) -> Result<(), sluicegate_core::SettleError> {
        #[cfg(feature = "redis")]
        if let Some(hosts) = &self.hosts {
            return hosts.charge(&self.inner, permit, generated_tokens, now_ns);
        }
        self.inner.charge(permit, generated_tokens, now_ns)
    }

    /// Whether admissions come from leases of a Redis's global buckets.
    pub(crate) fn is_replica(&self) -> bool {
        #[cfg(feature = "redis")]
        return self.hosts.is_some();
        #[cfg(not(feature = "redis"))]
        false
    }
}

/// How to build an engine: a preset and overrides. Every zero (or NULL) field keeps the preset's
/// value, so a zero-initialised `sg_config` is the preset; `sg_config_default` gives the same.
/// Overrides are resolved together, in no order, then checked once: a value out of its range
/// (NaN, a limit below 1, a floor above its ceiling, a hard factor below 1) makes
/// `sg_engine_new` fail with `SG_ERR_POLICY`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sg_config {
    /// "fireworks_2024" (NULL), "fireworks_2026", "together" or "fixed".
    pub preset: *const c_char,
    /// Scope capacity (0: 100000).
    pub scopes: u64,
    /// Account capacity (0: as many as scopes, at most 2^24).
    pub accounts: u64,
    /// Model capacity (0: a quarter of the scope capacity, at least 256, at most 4096).
    pub models: u64,
    /// Outstanding permits (0: as many as scopes, at least 1024).
    pub permits: u64,
    /// Per-minute limits (floors when limits adapt), by `sg_metric`; 0 keeps the preset's,
    /// `INFINITY` turns the metric off. Under "fixed", setting any of them enforces only the ones
    /// set.
    pub floor: [f64; 4],
    /// Per-minute ceilings, by `sg_metric`; 0 keeps the preset's, `INFINITY` is none.
    pub ceiling: [f64; 4],
    /// Hard factor ρ (≥ 1); 0 keeps the preset's.
    pub hard_factor: f64,
    /// Longest smoothing wait, ns; 0 keeps the preset's (2 s under "together", none otherwise),
    /// `SG_MAX_WAIT_OFF` turns smoothing off.
    pub max_wait_ns: u64,
    /// How long a permit may stay unsettled before it expires, ns (at least 1 s); 0 keeps the
    /// preset's (15 minutes), `SG_PERMIT_TTL_NEVER` never expires. Settling or charging an
    /// expired permit is `SG_ERR_PERMIT_EXPIRED`: its reservation stays charged, and what it held
    /// (its ledger entry, the scope's in-flight count, the model's tracked load) is released.
    pub permit_ttl_ns: u64,
    /// Hash seed; 0 picks one at random.
    pub seed: u64,
    /// Most permits one account may have outstanding; beyond it admission is
    /// `SG_REJECT_CONCURRENCY`. 0 keeps the preset's (a quarter of the permit ledger, so that no
    /// account can take it all); above `UINT32_MAX` is no cap. Per account: `sg_set_max_in_flight`.
    pub max_in_flight: u64,
    /// The model load (‰ of capacity) at which each class of request is shed (SPEC §6), in
    /// shedding order: over-limit flex, in-limit flex, over-limit default, over-limit priority,
    /// in-limit default, in-limit priority. 0 keeps the preset's (600, 700, 800, 900, 1000,
    /// 1200); each must be at most the next, or `sg_engine_new` fails with `SG_ERR_POLICY`.
    pub shed_permille: [u32; 6],
}

/// `sg_config.max_wait_ns`: no smoothing wait, whatever the preset's.
pub const SG_MAX_WAIT_OFF: u64 = u64::MAX;

/// `sg_config.permit_ttl_ns`: permits never expire.
pub const SG_PERMIT_TTL_NEVER: u64 = u64::MAX;

/// The four metrics, indexes of every per-metric array.
#[repr(u32)]
pub enum sg_metric {
    /// Requests per minute.
    SgMetricRequests = 0,
    /// Prompt tokens per minute.
    SgMetricPromptTokens = 1,
    /// Uncached prompt tokens per minute.
    SgMetricUncachedPromptTokens = 2,
    /// Generated tokens per minute.
    SgMetricGeneratedTokens = 3,
}

/// The outcome of an admission (`sg_decision.outcome`).
#[repr(u32)]
pub enum sg_outcome {
    /// Run now.
    SgAdmit = 0,
    /// Run at lower priority: over a limit, within the hard band.
    SgAdmitOverLimit = 1,
    /// 429: beyond the hard band on `sg_decision.metric`.
    SgRejectRateLimited = 2,
    /// 503: the model is overloaded for this request's class.
    SgShed = 3,
    /// 402/429: the account is suspended or over its spend limit.
    SgRejectSpend = 4,
    /// 400: malformed request.
    SgRejectInvalid = 5,
    /// 429 `concurrency_limited`: the account has `sg_decision.reason` permits outstanding, its
    /// cap (`sg_config.max_in_flight`, `sg_set_max_in_flight`).
    SgRejectConcurrency = 6,
}

/// Service tiers (SPEC §6), after OpenAI's `service_tier` (`sg_request.service_tier`,
/// `sg_set_service_tier_grant`). Shed first to last: flex, default, priority. An account's grant
/// caps the tier its requests are served at. (Priority is 1, as the `priority` flag it replaces.)
#[repr(u32)]
pub enum sg_service_tier {
    /// The tier every account has unless granted another.
    SgServiceTierDefault = 0,
    /// Shed last.
    SgServiceTierPriority = 1,
    /// Sheddable batch traffic: shed first.
    SgServiceTierFlex = 2,
}

impl sg_service_tier {
    pub(crate) fn of(tier: ServiceTier) -> u32 {
        (match tier {
            ServiceTier::Default => sg_service_tier::SgServiceTierDefault,
            ServiceTier::Flex => sg_service_tier::SgServiceTierFlex,
            ServiceTier::Priority => sg_service_tier::SgServiceTierPriority,
        }) as u32
    }

    /// The tier a C value names; `SG_ERR_INVALID_ARGUMENT` for any other value.
    pub(crate) fn parse(value: u32) -> Result<ServiceTier, sg_result> {
        ServiceTier::ALL.into_iter().find(|t| Self::of(*t) == value).ok_or(SgErrInvalidArgument)
    }
}

/// How a request ended, for `sg_settle`.
#[repr(u32)]
pub enum sg_completion {
    /// It ran; its usage counts toward growth and is billed.
    SgCompletionSuccess = 0,
    /// The backend failed it: not counted, not billed.
    SgCompletionUpstreamFailure = 1,
    /// The client went away; it is settled with what it used.
    SgCompletionCancelled = 2,
}

/// A request to admit.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sg_request {
    /// Account id bytes (1 to 64).
    pub account: *const u8,
    /// Length of `account`.
    pub account_len: usize,
    /// Model id bytes (1 to 128).
    pub model: *const u8,
    /// Length of `model`.
    pub model_len: usize,
    /// Prompt tokens, cached and uncached.
    pub prompt_tokens: u64,
    /// Prompt tokens expected to hit the cache.
    pub cached_tokens: u64,
    /// The request's max_tokens.
    pub max_tokens: u64,
    /// Expected generated tokens per choice; 0 reserves max_tokens.
    pub expected_tokens: u64,
    /// Choices (n); 0 is invalid.
    pub n: u64,
    /// The `sg_service_tier` asked for (0: `SG_SERVICE_TIER_DEFAULT`); the account's grant
    /// (`sg_set_service_tier_grant`) caps it. Another value is `SG_ERR_INVALID_ARGUMENT`.
    pub service_tier: u32,
    /// Non-zero for the model's fast variant.
    pub fast: u32,
}

/// A permit: plain data, copied freely; settle it exactly once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct sg_permit {
    /// Opaque.
    pub words: [u64; 9],
}

/// Everything about one admission.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct sg_decision {
    /// An `sg_outcome`.
    pub outcome: u32,
    /// For `SG_REJECT_RATE_LIMITED`: the binding `sg_metric`.
    pub metric: u32,
    /// Non-zero when the request can never fit at the current limit.
    pub too_large: u32,
    /// Non-zero when the request runs (or would run) over its limit.
    pub over_limit: u32,
    /// For `SG_REJECT_SPEND`: 0 spend limit exceeded, 1 account suspended. For
    /// `SG_REJECT_INVALID`: 0 n is zero, 1 cached above prompt, 2 overflow. For
    /// `SG_REJECT_CONCURRENCY`: the account's cap on permits in flight.
    pub reason: u32,
    /// For `SG_SHED`: the model's load, ‰.
    pub load: u32,
    /// For 429 and 503: ns until the request would fit (503: before jitter).
    pub retry_after_ns: u64,
    /// For admitted requests: the smoothing delay before forwarding, ns.
    pub wait_ns: u64,
    /// The request's cost on each metric, by `sg_metric`.
    pub cost: [u64; 4],
    /// For admitted requests: the permit to settle.
    pub permit: sg_permit,
    /// The scope's bucket state at the decision; read it with `sg_decision_levels`.
    pub debt: [u64; 4],
    /// The scope's bucket state at the decision; read it with `sg_decision_levels`.
    pub interval: [u64; 4],
}

/// What a request used, for `sg_settle` and `sg_cancel`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct sg_usage {
    /// Prompt tokens, cached and uncached.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the cache.
    pub cached_tokens: u64,
    /// Generated tokens, all choices.
    pub generated_tokens: u64,
}

/// `sg_levels.limit` and `sg_levels.remaining` of a metric that is not enforced: turned off
/// (`INFINITY` in `sg_config.floor`), not named under "fixed", or without a limit in the preset
/// (requests under "fireworks_2026").
pub const SG_UNLIMITED: u64 = u64::MAX;

/// A scope's limits, levels and reset times, by `sg_metric`: the limits in force. A metric that
/// is not enforced reads `limit == remaining == SG_UNLIMITED` and `reset_ns == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct sg_levels {
    /// Limit per minute (`SG_UNLIMITED`: not enforced).
    pub limit: [u64; 4],
    /// Units left (`SG_UNLIMITED`: not enforced).
    pub remaining: [u64; 4],
    /// ns until full again (0: full, or not enforced).
    pub reset_ns: [u64; 4],
}

/// Fills `config` with the defaults: preset fireworks_2024 (NULL) and every other field 0, which
/// keeps the preset's value; the same as a zero-initialised `sg_config`.
///
/// # Safety
/// `config` must be NULL or point to a writable `sg_config`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_config_default(config: *mut sg_config) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let config = unsafe { out(config) }?;
        *config = sg_config {
            preset: core::ptr::null(),
            scopes: 0,
            accounts: 0,
            models: 0,
            permits: 0,
            floor: [0.0; 4],
            ceiling: [0.0; 4],
            hard_factor: 0.0,
            max_wait_ns: 0,
            permit_ttl_ns: 0,
            seed: 0,
            max_in_flight: 0,
            shed_permille: [0; 6],
        };
        Ok(())
    })
}

pub(crate) fn policy_of(config: &sg_config) -> Result<Policy, sg_result> {
    let preset = if config.preset.is_null() {
        Policy::fireworks_2024()
    } else {
        // SAFETY: a non-null preset must be a NUL-terminated string (documented on the field).
        let name = unsafe { CStr::from_ptr(config.preset) }.to_str().map_err(|_| SgErrInvalidArgument)?;
        Policy::preset(name).ok_or(SgErrInvalidArgument)?
    };
    let mut overrides = Overrides::default();
    let mut set = |name: &str, value: f64| overrides.set(name, value).map_err(|_| SgErrInvalidArgument);
    for (i, metric) in Metric::ALL.into_iter().enumerate() {
        let (floor, ceiling) = (config.floor[i], config.ceiling[i]);
        if floor != 0.0 {
            set(metric.limit_parameter(), floor)?;
        }
        if ceiling != 0.0 {
            set(overrides::NAMES[4 + i], ceiling)?;
        }
    }
    if config.hard_factor != 0.0 {
        set("hard_factor", config.hard_factor)?;
    }
    let seconds = |ns: u64| if ns == u64::MAX { f64::INFINITY } else { ns as f64 / 1e9 };
    match config.max_wait_ns {
        0 => {}
        SG_MAX_WAIT_OFF => set("max_wait", 0.0)?,
        ns => set("max_wait", seconds(ns))?,
    }
    match config.max_in_flight {
        0 => {}
        n if n > u64::from(u32::MAX) => set("max_in_flight", f64::INFINITY)?,
        n => set("max_in_flight", n as f64)?,
    }
    if config.permit_ttl_ns != 0 {
        set("permit_ttl", seconds(config.permit_ttl_ns))?;
    }
    for (i, permille) in config.shed_permille.into_iter().enumerate() {
        if permille != 0 {
            set(overrides::NAMES[overrides::SHED + i], f64::from(permille) / 1000.0)?;
        }
    }
    Ok(preset.with(&overrides)?)
}

pub(crate) fn capacity_of(config: &sg_config) -> Result<Capacity, sg_result> {
    let n = |v: u64| usize::try_from(v).map_err(|_| SgErrBadCapacity);
    let scopes = if config.scopes == 0 { 100_000 } else { n(config.scopes)? };
    let mut capacity = Capacity::scopes(scopes);
    for (field, value) in [
        (&mut capacity.accounts, config.accounts),
        (&mut capacity.models, config.models),
        (&mut capacity.permits, config.permits),
    ] {
        if value != 0 {
            *field = n(value)?;
        }
    }
    Ok(capacity)
}

/// Creates an engine; on success `*engine` owns it until `sg_engine_free`. Tables are allocated
/// here, once. On any error (a value out of range is `SG_ERR_POLICY`) `*engine` is set to NULL,
/// so a failed call never leaves a stale handle to free.
///
/// # Safety
/// `config` must be NULL or point to a valid `sg_config` (its `preset` NULL or NUL-terminated);
/// `engine` must be NULL or point to a writable `sg_engine *`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_engine_new(config: *const sg_config, engine: *mut *mut sg_engine) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let engine = unsafe { out(engine)? };
        // First: a failed call, a NULL config included, leaves no dangling handle behind.
        *engine = core::ptr::null_mut();
        // SAFETY: forwarded from this function's contract.
        let config = unsafe { arg(config)? };
        *engine = Box::into_raw(Box::new(sg_engine::local(heap_engine(config)?)));
        Ok(())
    })
}

/// An engine of `config` in this process's memory (its seed random unless `config` gives one).
pub(crate) fn heap_engine(config: &sg_config) -> Result<Engine<Backing>, sg_result> {
    let policy = policy_of(config)?;
    let capacity = capacity_of(config)?;
    let seed = if config.seed == 0 { sluicegate_core::storage::random_seed() } else { config.seed };
    Ok(Engine::with_storage(policy, Backing::Heap(Heap::new(capacity)?), seed)?)
}

/// Frees an engine. NULL is ignored. Freeing twice, or using the engine afterwards, is
/// undefined behaviour, as is freeing while another thread uses it.
///
/// # Safety
/// `engine` must be NULL or a pointer returned by `sg_engine_new` and not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_engine_free(engine: *mut sg_engine) {
    // SAFETY: engine came from Box::into_raw in sg_engine_new and is freed only once.
    unsafe { crate::boundary::free_boxed(engine) }
}

/// Nanoseconds from the OS monotonic clock (`CLOCK_MONOTONIC` on unix, whose origin every process
/// on the host shares, as Python's `time.monotonic_ns()`): a `now_ns` for callers without their
/// own clock, on which workers sharing one engine agree.
#[unsafe(no_mangle)]
pub extern "C" fn sg_now_ns() -> u64 {
    sluicegate_core::clock::now_ns()
}

pub(crate) fn variant(fast: u32) -> Variant {
    if fast != 0 { Variant::Fast } else { Variant::Regular }
}

pub(crate) fn decision_of(d: &Decision) -> sg_decision {
    let l = &d.levels;
    let (debt, interval) = l.to_raw();
    let mut c = sg_decision {
        cost: d.cost.0,
        debt,
        interval,
        over_limit: u32::from(l.over_limit()),
        ..sg_decision::default()
    };
    match d.outcome {
        Outcome::Admit(p) | Outcome::AdmitOverLimit(p) => {
            c.outcome = if p.over_limit() { 1 } else { 0 };
            c.over_limit = u32::from(p.over_limit());
            c.wait_ns = p.wait_ns();
            c.permit = sg_permit { words: p.to_raw().words };
        }
        Outcome::RejectRateLimited(r) => {
            c.outcome = 2;
            c.metric = r.metric as u32;
            c.too_large = u32::from(r.too_large);
            c.retry_after_ns = r.retry_after_ns;
        }
        Outcome::Shed(s) => {
            c.outcome = 3;
            c.load = s.load;
            c.retry_after_ns = s.retry_after_ns;
        }
        Outcome::RejectSpend(s) => {
            c.outcome = 4;
            c.reason = s as u32;
        }
        Outcome::RejectInvalid(i) => {
            c.outcome = 5;
            c.reason = i as u32;
        }
        Outcome::RejectConcurrency(l) => {
            c.outcome = 6;
            c.reason = l.max_in_flight;
            c.retry_after_ns = l.retry_after_ns;
        }
    }
    c
}

/// Decides whether a request may run (see the README's outcome table). On `SG_ADMIT` and
/// `SG_ADMIT_OVER_LIMIT`, `out->permit` must be settled; nothing else charges anything.
///
/// # Safety
/// `engine` must be a live engine; `request` and `out` must be NULL or valid, and the request's
/// byte pointers valid for their lengths.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_admit(
    engine: *const sg_engine,
    request: *const sg_request,
    now_ns: u64,
    decision: *mut sg_decision,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, r, decision) = unsafe { (arg(engine)?, arg(request)?, out(decision)?) };
        // SAFETY: the request's pointers are valid for their lengths (contract).
        let (account, model) = unsafe { (bytes(r.account, r.account_len)?, bytes(r.model, r.model_len)?) };
        let key = ScopeKey { account, model, variant: variant(r.fast) };
        *decision = decision_of(&engine.admit(key, &request_of(r)?, now_ns)?);
        Ok(())
    })
}

/// The costs and class of an `sg_request` (its key aside), shared by `sg_admit` and
/// `sg_admit_scope`.
pub(crate) fn request_of(r: &sg_request) -> Result<Request, sg_result> {
    let mut request = Request::new(r.prompt_tokens).cached_tokens(r.cached_tokens).max_tokens(r.max_tokens);
    request = request.n(r.n).service_tier(sg_service_tier::parse(r.service_tier)?);
    if r.expected_tokens != 0 {
        request = request.expected_tokens(r.expected_tokens);
    }
    Ok(request)
}

fn permit_of(p: &sg_permit) -> Result<Permit, sg_result> {
    Permit::from_raw(&RawPermit { words: p.words }).ok_or(SgErrStalePermit)
}

fn usage_of(u: &sg_usage) -> Usage {
    Usage {
        prompt_tokens: u.prompt_tokens,
        cached_tokens: u.cached_tokens,
        generated_tokens: u.generated_tokens,
    }
}

/// Settles a permit with what the request used; a second settle is `SG_ERR_ALREADY_SETTLED`
/// and changes nothing. Any thread may settle a permit another thread admitted. A permit not
/// settled within the policy's permit TTL (`sg_config.permit_ttl_ns`, by `now_ns`) has expired:
/// settling it is `SG_ERR_PERMIT_EXPIRED` and changes nothing (its reservation stays charged).
///
/// # Safety
/// `engine` must be a live engine; `permit` and `usage` NULL or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_settle(
    engine: *const sg_engine,
    permit: *const sg_permit,
    usage: *const sg_usage,
    completion: u32,
    now_ns: u64,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, permit, usage) = unsafe { (arg(engine)?, arg(permit)?, arg(usage)?) };
        let completion = match completion {
            0 => Completion::Success,
            1 => Completion::UpstreamFailure,
            2 => Completion::Cancelled,
            _ => return Err(SgErrInvalidArgument),
        };
        Ok(engine.settle(&permit_of(permit)?, &usage_of(usage), completion, now_ns)?)
    })
}

/// Settles a request the client abandoned, with what it used.
///
/// # Safety
/// As `sg_settle`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_cancel(
    engine: *const sg_engine,
    permit: *const sg_permit,
    usage: *const sg_usage,
    now_ns: u64,
) -> sg_result {
    // SAFETY: same contract.
    unsafe { sg_settle(engine, permit, usage, 2, now_ns) }
}

/// Records generated tokens of a stream as they arrive; tokens beyond the reservation are
/// charged at once. Past the permit TTL it is `SG_ERR_PERMIT_EXPIRED`, as for `sg_settle`.
///
/// # Safety
/// `engine` must be a live engine; `permit` NULL or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_charge(
    engine: *const sg_engine,
    permit: *const sg_permit,
    generated_tokens: u64,
    now_ns: u64,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, permit) = unsafe { (arg(engine)?, arg(permit)?) };
        Ok(engine.charge(&permit_of(permit)?, generated_tokens, now_ns)?)
    })
}

pub(crate) fn levels_of(l: &Levels) -> sg_levels {
    sg_levels {
        limit: Metric::ALL.map(|m| l.limit(m)),
        remaining: Metric::ALL.map(|m| l.remaining(m)),
        reset_ns: Metric::ALL.map(|m| l.reset_ns(m)),
    }
}

/// The limits, units left and reset times behind a decision (computed here, not in `sg_admit`,
/// which stays cheap for callers that do not need them).
///
/// # Safety
/// `decision` NULL or valid; `levels` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_decision_levels(
    decision: *const sg_decision,
    levels: *mut sg_levels,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (d, levels) = unsafe { (arg(decision)?, out(levels)?) };
        *levels = levels_of(&Levels::from_raw(d.debt, d.interval));
        Ok(())
    })
}

/// A scope's current limits and levels, without creating it.
///
/// # Safety
/// `engine` must be a live engine; key pointers valid for their lengths; `levels` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_limits(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    model: *const u8,
    model_len: usize,
    fast: u32,
    now_ns: u64,
    levels: *mut sg_levels,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, levels) = unsafe { (arg(engine)?, out(levels)?) };
        // SAFETY: forwarded from this function's contract.
        let (account, model) = unsafe { (bytes(account, account_len)?, bytes(model, model_len)?) };
        let key = ScopeKey { account, model, variant: variant(fast) };
        *levels = levels_of(&engine.inner.limits(key, now_ns)?);
        Ok(())
    })
}

/// Sets a model variant's load signal in ‰ of capacity; requests are shed by class as it rises.
///
/// # Safety
/// `engine` must be a live engine; `model` valid for `model_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_set_load(
    engine: *const sg_engine,
    model: *const u8,
    model_len: usize,
    fast: u32,
    load_permille: u32,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, model) = unsafe { (arg(engine)?, bytes(model, model_len)?) };
        Ok(engine.inner.set_load(model, variant(fast), load_permille)?)
    })
}

/// Lets the engine derive a variant's load from outstanding permits (0 turns it off).
///
/// # Safety
/// `engine` must be a live engine; `model` valid for `model_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_set_model_capacity(
    engine: *const sg_engine,
    model: *const u8,
    model_len: usize,
    fast: u32,
    in_flight_capacity: u32,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, model) = unsafe { (arg(engine)?, bytes(model, model_len)?) };
        Ok(engine.inner.set_model_capacity(model, variant(fast), in_flight_capacity)?)
    })
}
