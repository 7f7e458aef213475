//! Accounts, spend, prices and quotas.

use sluicegate_core::{Metric, MetricLimits, Price, Quota, Suspension, Tier, Variant};

use crate::boundary::{arg, boundary, bytes, out, sg_result, sg_result::*};
use crate::engine::{sg_engine, sg_service_tier};

/// Spending tiers (`sg_account.tier`, `sg_set_tier`).
#[repr(u32)]
pub enum sg_tier {
    /// $50/month.
    SgTier1 = 0,
    /// $500/month.
    SgTier2 = 1,
    /// $5,000/month.
    SgTier3 = 2,
    /// $50,000/month.
    SgTier4 = 3,
    /// No spend limit.
    SgTierUnlimited = 4,
    /// For `sg_set_tier`: back to the tier the account's spend has earned.
    SgTierEarned = 255,
}

/// Why an operator suspends an account.
#[repr(u32)]
pub enum sg_suspension {
    /// A manual suspension.
    SgSuspensionOperator = 0,
    /// A failed invoice payment.
    SgSuspensionPaymentFailed = 1,
}

/// Per-account quotas.
#[repr(u32)]
pub enum sg_quota {
    /// Deployed models (default 100).
    SgQuotaDeployedModels = 0,
    /// A100 GPUs (default 8).
    SgQuotaA100Gpus = 1,
    /// H100 GPUs (default 8).
    SgQuotaH100Gpus = 2,
}

/// A model variant's prices, micro-dollars per million tokens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct sg_price {
    /// Uncached prompt tokens.
    pub uncached_prompt: u64,
    /// Cached prompt tokens.
    pub cached_prompt: u64,
    /// Generated tokens.
    pub generated: u64,
}

/// Everything about an account; money in micro-dollars.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct sg_account {
    /// An `sg_tier`.
    pub tier: u32,
    /// Non-zero when an operator set the tier.
    pub tier_pinned: u32,
    /// Non-zero when a payment method is on file.
    pub payment_method: u32,
    /// 0 in good standing; 1 over the spend limit; 2 suspended.
    pub refusal: u32,
    /// Effective monthly spend limit (`UINT64_MAX`: none).
    pub spend_limit: u64,
    /// Spend this billing period.
    pub period_spend: u64,
    /// Payments and prepaid credits, ever.
    pub historical_spend: u64,
    /// Prepaid credits left.
    pub credits: u64,
    /// Non-zero flags: suspended by an operator, for a failed payment, for no payment method.
    pub suspended: [u32; 3],
    /// Quota use, by `sg_quota`.
    pub quota_used: [u32; 3],
    /// Quota limits, by `sg_quota`.
    pub quota_limit: [u32; 3],
    /// The worst-case cost of the account's outstanding permits, held against its spend limit
    /// until each is settled (then replaced by what it is billed) or expires (then billed).
    pub reserved: u64,
    /// The account's permits outstanding (admitted, not yet settled, cancelled or expired).
    pub in_flight: u64,
    /// The account's own cap on permits in flight (`sg_set_max_in_flight`); 0: the engine's
    /// (`sg_config.max_in_flight`).
    pub max_in_flight: u32,
    /// The `sg_service_tier` granted (`sg_set_service_tier_grant`; `SG_SERVICE_TIER_DEFAULT`
    /// unless granted another).
    pub service_tier_grant: u32,
}

macro_rules! account_call {
    ($engine:ident, $account:ident, $len:ident, |$e:ident, $a:ident| $body:expr) => {
        boundary(|| {
            // SAFETY: forwarded from the calling function's contract.
            let ($e, $a) = unsafe { (arg($engine)?, bytes($account, $len)?) };
            $body
        })
    };
}

/// Reads an account (`SG_ERR_UNKNOWN_ACCOUNT` if it has never been seen).
///
/// # Safety
/// `engine` must be a live engine; `account` valid for `account_len` bytes; `state` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_account_get(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    state: *mut sg_account,
) -> sg_result {
    account_call!(engine, account, account_len, |e, a| {
        // SAFETY: forwarded from this function's contract.
        let state = unsafe { out(state) }?;
        let s = e.inner.account(a)?;
        *state = sg_account {
            tier: s.tier as u32,
            tier_pinned: u32::from(s.tier_pinned),
            payment_method: u32::from(s.payment_method),
            refusal: s.refusal.map_or(0, |r| r as u32 + 1),
            spend_limit: s.spend_limit,
            period_spend: s.period_spend,
            historical_spend: s.historical_spend,
            credits: s.credits,
            suspended: [s.suspended_by_operator, s.payment_failed, s.no_payment_method].map(u32::from),
            quota_used: s.quotas.map(|(u, _)| u),
            quota_limit: s.quotas.map(|(_, l)| l),
            reserved: s.reserved,
            in_flight: s.in_flight,
            max_in_flight: s.max_in_flight.unwrap_or(0),
            service_tier_grant: sg_service_tier::of(s.service_tier_grant),
        };
        Ok(())
    })
}

/// Adds prepaid credits (micro-dollars); they raise historical spend and so maybe the tier.
///
/// # Safety
/// `engine` must be a live engine; `account` valid for `account_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_add_credits(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    micros: u64,
) -> sg_result {
    account_call!(engine, account, account_len, |e, a| Ok(e.inner.add_credits(a, micros)?))
}

/// Records whether a payment method is on file (non-zero) or not.
///
/// # Safety
/// `engine` must be a live engine; `account` valid for `account_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_set_payment_method(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    on_file: u32,
) -> sg_result {
    account_call!(engine, account, account_len, |e, a| Ok(e.inner.set_payment_method(a, on_file != 0)?))
}

/// Sets the user's own monthly spend limit (micro-dollars), within the tier's.
///
/// # Safety
/// `engine` must be a live engine; `account` valid for `account_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_set_spend_limit(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    micros: u64,
) -> sg_result {
    account_call!(engine, account, account_len, |e, a| Ok(e.inner.set_spend_limit(a, micros)?))
}

/// Sets how many of the account's permits may be outstanding at once; 0 returns it to the
/// engine's `sg_config.max_in_flight`, and values above `UINT32_MAX` are refused.
///
/// # Safety
/// `engine` must be a live engine; `account` valid for `account_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_set_max_in_flight(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    max: u64,
) -> sg_result {
    account_call!(engine, account, account_len, |e, a| {
        let max = if max == 0 { None } else { Some(u32::try_from(max).map_err(|_| SgErrInvalidArgument)?) };
        Ok(e.inner.set_max_in_flight(a, max)?)
    })
}

/// Grants an account an `sg_service_tier` (SPEC §6): its requests are served at the tier they
/// ask for (`sg_request.service_tier`), or at the grant if they ask for more. Every account has
/// `SG_SERVICE_TIER_DEFAULT` until granted another; a grant is kept in snapshots. Another value
/// is `SG_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `engine` must be a live engine; `account` valid for `account_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_set_service_tier_grant(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    service_tier: u32,
) -> sg_result {
    account_call!(engine, account, account_len, |e, a| {
        Ok(e.inner.set_service_tier_grant(a, sg_service_tier::parse(service_tier)?)?)
    })
}

/// Suspends (non-zero `suspended`) or lifts a suspension for an `sg_suspension` reason.
///
/// # Safety
/// `engine` must be a live engine; `account` valid for `account_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_set_suspended(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    reason: u32,
    suspended: u32,
) -> sg_result {
    account_call!(engine, account, account_len, |e, a| {
        let reason = match reason {
            0 => Suspension::Operator,
            1 => Suspension::PaymentFailed,
            _ => return Err(SgErrInvalidArgument),
        };
        Ok(e.inner.set_suspended(a, reason, suspended != 0)?)
    })
}

/// Grants an `sg_tier`, or with `SG_TIER_EARNED` returns to the earned one.
///
/// # Safety
/// `engine` must be a live engine; `account` valid for `account_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_set_tier(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    tier: u32,
    now_ns: u64,
) -> sg_result {
    account_call!(engine, account, account_len, |e, a| {
        let tier = match tier {
            255 => None,
            t => Some(u8::try_from(t).ok().and_then(Tier::from_index).ok_or(SgErrInvalidArgument)?),
        };
        Ok(e.inner.set_tier(a, tier, now_ns)?)
    })
}

/// Gives an account its own floor and ceiling on an `sg_metric` (both 0: back to the policy's).
///
/// # Safety
/// `engine` must be a live engine; `account` valid for `account_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_set_limits_override(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    metric: u32,
    floor: f64,
    ceiling: f64,
    now_ns: u64,
) -> sg_result {
    account_call!(engine, account, account_len, |e, a| {
        let metric = *Metric::ALL.get(metric as usize).ok_or(SgErrInvalidArgument)?;
        let limits = (floor != 0.0 || ceiling != 0.0).then_some(MetricLimits { floor, ceiling });
        Ok(e.inner.set_limits_override(a, metric, limits, now_ns)?)
    })
}

/// Starts a new billing period for every account at `now_ns`: permits expired by then are billed
/// to the closing period first.
///
/// # Safety
/// `engine` must be NULL or a live engine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_start_billing_period(engine: *const sg_engine, now_ns: u64) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        unsafe { arg(engine) }?.inner.start_billing_period(now_ns);
        Ok(())
    })
}

/// Sets a model variant's prices.
///
/// # Safety
/// `engine` must be a live engine; `model` valid for `model_len` bytes; `price` NULL or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_set_price(
    engine: *const sg_engine,
    model: *const u8,
    model_len: usize,
    fast: u32,
    price: *const sg_price,
) -> sg_result {
    account_call!(engine, model, model_len, |e, m| {
        // SAFETY: forwarded from this function's contract.
        let p = unsafe { arg(price) }?;
        let variant = if fast != 0 { Variant::Fast } else { Variant::Regular };
        let price = Price {
            uncached_prompt: p.uncached_prompt,
            cached_prompt: p.cached_prompt,
            generated: p.generated,
        };
        Ok(e.inner.set_price(m, variant, price)?)
    })
}

fn quota(q: u32) -> Result<Quota, sg_result> {
    Quota::ALL.get(q as usize).copied().ok_or(SgErrInvalidArgument)
}

/// What a quota call does.
enum QuotaOp {
    Acquire,
    Release,
    SetLimit,
}

/// # Safety
/// As the quota functions.
unsafe fn quota_call(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    which: u32,
    n: u32,
    op: QuotaOp,
    used: *mut u32,
    limit: *mut u32,
) -> sg_result {
    account_call!(engine, account, account_len, |e, a| {
        let q = quota(which)?;
        let (u, l) = match op {
            QuotaOp::Acquire => e.inner.acquire_quota(a, q, n),
            QuotaOp::Release => e.inner.release_quota(a, q, n),
            QuotaOp::SetLimit => e.inner.set_quota_limit(a, q, n),
        }?;
        // SAFETY: forwarded from the calling function's contract; NULL outputs are skipped.
        if let Some(used) = unsafe { used.as_mut() } {
            *used = u;
        }
        // SAFETY: as above.
        if let Some(limit) = unsafe { limit.as_mut() } {
            *limit = l;
        }
        Ok(())
    })
}

/// Acquires `n` units of an `sg_quota`; `used` and `limit` (each may be NULL) receive the new
/// state.
///
/// # Safety
/// `engine` must be a live engine; `account` valid for `account_len` bytes; `used`, `limit` NULL
/// or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_quota_acquire(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    quota: u32,
    n: u32,
    used: *mut u32,
    limit: *mut u32,
) -> sg_result {
    // SAFETY: same contract.
    unsafe { quota_call(engine, account, account_len, quota, n, QuotaOp::Acquire, used, limit) }
}

/// Releases `n` units of an `sg_quota` (never below zero).
///
/// # Safety
/// As `sg_quota_acquire`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_quota_release(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    quota: u32,
    n: u32,
    used: *mut u32,
    limit: *mut u32,
) -> sg_result {
    // SAFETY: same contract.
    unsafe { quota_call(engine, account, account_len, quota, n, QuotaOp::Release, used, limit) }
}

/// Sets an `sg_quota`'s limit (not below what is in use).
///
/// # Safety
/// As `sg_quota_acquire`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_quota_set_limit(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    quota: u32,
    new_limit: u32,
    used: *mut u32,
    limit: *mut u32,
) -> sg_result {
    // SAFETY: same contract.
    unsafe { quota_call(engine, account, account_len, quota, new_limit, QuotaOp::SetLimit, used, limit) }
}
