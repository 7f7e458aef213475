//! Accounts (SPEC §8): spend limits, credits, tiers, per-account rate-limit overrides and quotas,
//! in a fixed table that scopes refer to by index.

use crate::decision::SpendRejection;
use crate::key::{ACCOUNT_KEY_MAX, KeyBytes};
use crate::policy::MetricLimits;
use crate::price::{NANOS_PER_MICRO, Nanos};
use crate::quota::{Quota, QuotaCell};
use crate::refs::Refs;
use crate::service_tier::ServiceTier;
use crate::sync::{AtomicU64, Ordering};
use crate::table::{Keyed, Slot};
use crate::tier::{Micros, Tier, Tiers};

// Suspension reasons: any set bit refuses every request with `account_suspended`.
const SUSPENDED_BY_OPERATOR: u64 = 1;
const PAYMENT_FAILED: u64 = 2;
const NO_PAYMENT_METHOD: u64 = 4;

// Settings word: tier in bits 0..8, pinned by an operator (bit 8), payment method on file (bit 9),
// the service tier granted in bits 10..12 (0 default, 1 priority, 2 flex), the account's own cap
// on permits in flight in bits 16..48 (0: the policy's).
const TIER_MASK: u64 = 0xFF;
const PINNED: u64 = 1 << 8;
const PAYMENT_METHOD: u64 = 1 << 9;
const GRANT_SHIFT: u32 = 10;
pub(crate) const GRANT_MASK: u64 = 3 << GRANT_SHIFT;
const IN_FLIGHT_CAP_SHIFT: u32 = 16;
const IN_FLIGHT_CAP_MASK: u64 = 0xFFFF_FFFF << IN_FLIGHT_CAP_SHIFT;
/// Every bit of the settings word that means something; a snapshot with others is refused.
/// (Written out: the fields it covers are checked by a unit test.)
pub(crate) const SETTINGS_KNOWN: u64 = 0x0000_FFFF_FFFF_0FFF;
/// What pinning or un-pinning a tier leaves as it was: the payment method, the service tier
/// granted and the cap (tested).
const KEPT_BY_PIN: u64 = 0x0000_FFFF_FFFF_0E00;

/// The tier a settings word records.
fn tier_of(settings: u64) -> Tier {
    Tier::from_index((settings & TIER_MASK) as u8).unwrap_or(Tier::One)
}

/// An account's settings word, read once per admission.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings(u64);

impl Settings {
    /// The highest service tier the account's requests are served at.
    pub(crate) fn service_tier_grant(self) -> ServiceTier {
        match (self.0 & GRANT_MASK) >> GRANT_SHIFT {
            1 => ServiceTier::Priority,
            2 => ServiceTier::Flex,
            _ => ServiceTier::Default,
        }
    }

    /// The account's own cap on permits in flight, if an operator set one.
    pub(crate) fn in_flight_cap(self) -> Option<u32> {
        match (self.0 & IN_FLIGHT_CAP_MASK) >> IN_FLIGHT_CAP_SHIFT {
            0 => None,
            cap => u32::try_from(cap).ok(),
        }
    }
}

/// A service tier grant's bits in the settings word.
const fn grant_bits(tier: ServiceTier) -> u64 {
    (match tier {
        ServiceTier::Default => 0,
        ServiceTier::Priority => 1,
        ServiceTier::Flex => 2,
    }) << GRANT_SHIFT
}

/// Why an operator suspends an account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Suspension {
    /// A manual suspension.
    Operator,
    /// An invoice payment failed; lifted when the invoices are paid.
    PaymentFailed,
}

impl Suspension {
    const fn bit(self) -> u64 {
        match self {
            Suspension::Operator => SUSPENDED_BY_OPERATOR,
            Suspension::PaymentFailed => PAYMENT_FAILED,
        }
    }
}

/// One account. The first fields are what every admission reads.
#[derive(Debug)]
pub struct AccountSlot {
    id: AtomicU64,
    /// Spend in the current billing period, nano-dollars.
    pub(crate) period_spend: AtomicU64,
    /// Period spend plus the worst-case cost outstanding permits have reserved, nano-dollars:
    /// what admission holds against the spend limit (SPEC §8, money is reserved like tokens).
    pub(crate) committed: AtomicU64,
    /// The effective monthly limit (the lower of the tier's and the user's), nano-dollars.
    pub(crate) spend_limit: AtomicU64,
    /// Suspension reasons; 0 in good standing.
    pub(crate) suspension: AtomicU64,
    pub(crate) key: KeyBytes<{ ACCOUNT_KEY_MAX / 8 }>,
    pub(crate) settings: AtomicU64,
    /// The limit the user chose, micro-dollars; `u64::MAX` for the tier's.
    pub(crate) chosen_limit: AtomicU64,
    /// Payments and prepaid credits bought, ever, nano-dollars.
    pub(crate) historical: AtomicU64,
    /// Prepaid credits left, nano-dollars.
    pub(crate) credits: AtomicU64,
    /// Per-metric floor and ceiling overrides as `f64` bits; 0 when the policy applies.
    pub(crate) floor_override: [AtomicU64; 4],
    pub(crate) ceiling_override: [AtomicU64; 4],
    pub(crate) quotas: [QuotaCell; 3],
    /// Scopes and operator calls using the account: while any is held it is never reclaimed.
    pub(crate) refs: Refs,
    /// The account's permits outstanding (SPEC §8, `max_in_flight`).
    pub(crate) in_flight: AtomicU64,
}

impl Default for AccountSlot {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything about an account, read at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AccountState {
    /// The current tier.
    pub tier: Tier,
    /// The tier was set by an operator rather than earned.
    pub tier_pinned: bool,
    /// A payment method is on file.
    pub payment_method: bool,
    /// The effective monthly spend limit; `u64::MAX` for none.
    pub spend_limit: Micros,
    /// Spend in the current billing period.
    pub period_spend: Micros,
    /// The worst-case cost of the account's outstanding permits, held against its spend limit.
    pub reserved: Micros,
    /// The account's permits outstanding.
    pub in_flight: u64,
    /// The account's own cap on permits in flight (`None`: the policy's).
    pub max_in_flight: Option<u32>,
    /// The highest service tier its requests are served at (SPEC §6; `Default` unless granted).
    pub service_tier_grant: ServiceTier,
    /// Payments and prepaid credits, ever.
    pub historical_spend: Micros,
    /// Prepaid credits left.
    pub credits: Micros,
    /// Why requests are refused, if they are.
    pub refusal: Option<SpendRejection>,
    /// Suspended by an operator.
    pub suspended_by_operator: bool,
    /// Suspended for a failed invoice payment.
    pub payment_failed: bool,
    /// Suspended for having no payment method once credits ran out.
    pub no_payment_method: bool,
    /// `(used, limit)` per quota, in [`Quota::ALL`] order.
    pub quotas: [(u32, u32); 3],
}

fn nanos(micros: Micros) -> Nanos {
    micros.saturating_mul(NANOS_PER_MICRO)
}

/// Adds `amount` to a money counter, stopping at `u64::MAX`: a huge (saturated) cost must never
/// wrap spend back to a small number and so forgive it.
fn saturating_add(counter: &AtomicU64, amount: Nanos) {
    if amount != 0 {
        counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_add(amount))).ok();
    }
}

impl AccountSlot {
    /// An empty slot.
    pub fn new() -> Self {
        AccountSlot {
            id: AtomicU64::new(0),
            period_spend: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            spend_limit: AtomicU64::new(u64::MAX),
            suspension: AtomicU64::new(0),
            key: KeyBytes::new(),
            settings: AtomicU64::new(PAYMENT_METHOD),
            chosen_limit: AtomicU64::new(u64::MAX),
            historical: AtomicU64::new(0),
            credits: AtomicU64::new(0),
            floor_override: core::array::from_fn(|_| AtomicU64::new(0)),
            ceiling_override: core::array::from_fn(|_| AtomicU64::new(0)),
            quotas: Quota::ALL.map(|q| QuotaCell::new(q.default_limit())),
            refs: Refs::new(),
            in_flight: AtomicU64::new(0),
        }
    }

    /// Resets a slot this thread has just claimed to a new account: Tier 1, a payment method on
    /// file (so rate limiting works before any billing is set up), nothing spent.
    pub(crate) fn init(&self, key: &[u8], tiers: &Tiers) {
        self.key.store(key);
        for a in [
            &self.period_spend,
            &self.committed,
            &self.suspension,
            &self.historical,
            &self.credits,
            &self.in_flight,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        // Disjoint bits: `^` for `|` is the same, an equivalent mutant (.cargo/mutants.toml).
        self.settings.store(PAYMENT_METHOD | Tier::One as u64, Ordering::Relaxed);
        self.chosen_limit.store(u64::MAX, Ordering::Relaxed);
        for o in self.floor_override.iter().chain(&self.ceiling_override) {
            o.store(0, Ordering::Relaxed);
        }
        for q in Quota::ALL {
            if let Some(cell) = self.quotas.get(q.index()) {
                cell.reset(0, q.default_limit());
            }
        }
        self.refresh_limit(tiers);
    }

    /// Whether the account holds nothing worth keeping: the state of a key never seen (SPEC §1).
    /// Historical spend counts as worth keeping: it is a customer's tier.
    pub(crate) fn holds_nothing(&self) -> bool {
        let zero = |a: &AtomicU64| a.load(Ordering::Acquire) == 0;
        // Disjoint bits below: `^` for `|` is the same, an equivalent mutant (.cargo/mutants.toml).
        self.settings.load(Ordering::Acquire) == PAYMENT_METHOD | Tier::One as u64
            && self.chosen_limit.load(Ordering::Acquire) == u64::MAX
            && [
                &self.period_spend,
                &self.committed,
                &self.historical,
                &self.credits,
                &self.suspension,
                &self.in_flight,
            ]
            .into_iter()
            .all(zero)
            && self.floor_override.iter().chain(&self.ceiling_override).all(zero)
            && Quota::ALL.iter().zip(&self.quotas).all(|(q, c)| c.get() == (0, q.default_limit()))
    }

    /// Empties the slot (restore, which has the engine to itself).
    pub(crate) fn clear(&self) {
        self.refs.clear();
        self.id.store(0, Ordering::Relaxed);
        self.init(&[], &Tiers::FIREWORKS);
        self.spend_limit.store(u64::MAX, Ordering::Relaxed);
    }

    /// Why requests of this account are refused right now, if they are.
    pub(crate) fn refusal(&self) -> Option<SpendRejection> {
        if self.suspension.load(Ordering::Acquire) != 0 {
            Some(SpendRejection::AccountSuspended)
        } else if self.committed.load(Ordering::Acquire) >= self.spend_limit.load(Ordering::Acquire) {
            Some(SpendRejection::SpendLimitExceeded)
        } else {
            None
        }
    }

    pub(crate) fn tier(&self) -> Tier {
        tier_of(self.settings.load(Ordering::Acquire))
    }

    fn has_payment_method(&self) -> bool {
        self.settings.load(Ordering::Acquire) & PAYMENT_METHOD != 0
    }

    /// Recomputes the effective spend limit from the tier and the user's choice.
    pub(crate) fn refresh_limit(&self, tiers: &Tiers) {
        let tier = tiers.spec(self.tier()).monthly_spend_limit;
        let chosen = self.chosen_limit.load(Ordering::Acquire);
        self.spend_limit.store(nanos(tier.min(chosen)), Ordering::Release);
    }

    /// Moves an unpinned account up to the tier its historical spend has earned.
    fn promote(&self, tiers: &Tiers) {
        // Unpinned, never above the earned tier: `>=` for `>` only re-raises it to the tier it
        // has, an equivalent mutant (.cargo/mutants.toml), as is `^` for `|` on disjoint bits.
        let earned = tiers.earned(self.historical.load(Ordering::Acquire) / NANOS_PER_MICRO);
        let raised = self.settings.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            let current = tier_of(s);
            (s & PINNED == 0 && earned > current).then_some((s & !TIER_MASK) | earned as u64)
        });
        if raised.is_ok() {
            self.refresh_limit(tiers);
        }
    }

    /// Takes one of the account's `cap` places in flight; false (and nothing taken) when all
    /// are taken.
    pub(crate) fn enter(&self, cap: u64) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1))
            .is_ok()
    }

    /// Gives back a place taken with [`AccountSlot::enter`].
    pub(crate) fn leave(&self) {
        self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).ok();
    }

    /// The settings word, as one admission reads it.
    pub(crate) fn settings(&self) -> Settings {
        Settings(self.settings.load(Ordering::Acquire))
    }

    /// Writes only a change: gateways that grant per request leave the cache line shared.
    fn set_service_tier_grant(&self, tier: ServiceTier) {
        let bits = grant_bits(tier);
        self.settings
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & GRANT_MASK != bits).then_some(s - (s & GRANT_MASK) + bits)
            })
            .ok();
    }

    fn set_in_flight_cap(&self, cap: Option<u32>) {
        let bits = u64::from(cap.unwrap_or(0)) << IN_FLIGHT_CAP_SHIFT;
        self.settings
            // The cap's bits replaced: take the old ones out, add the new.
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some(s - (s & IN_FLIGHT_CAP_MASK) + bits))
            .ok();
    }

    /// Reserves an admission's worst-case cost against the spend limit, all or nothing; returns
    /// what was reserved. An account without a payment method may reserve only its credits.
    /// Nothing is held for an unlimited account (nothing to cross) or a free request.
    ///
    /// One compare-exchange on `committed`: a reservation that would cross the limit writes
    /// nothing, so a refusal is never caused by a reservation that is then taken back — except
    /// the engine's own rollback when the rate limits refuse the same request (see
    /// [`AccountSlot::release_reservation`]).
    pub(crate) fn reserve(&self, worst_case: Nanos) -> Result<Nanos, SpendRejection> {
        let limit = self.spend_limit.load(Ordering::Acquire);
        let paying = self.has_payment_method();
        if worst_case == 0 || (limit == u64::MAX && paying) {
            return Ok(0);
        }
        let (cap, refusal) = if paying {
            (limit, SpendRejection::SpendLimitExceeded)
        } else {
            // Credits are spent before period spend is recorded (`record_spend`), so this sum
            // only ever reads low: a race refuses, never over-reserves.
            let credit_cap = self
                .period_spend
                .load(Ordering::Acquire)
                .saturating_add(self.credits.load(Ordering::Acquire));
            if credit_cap < limit {
                (credit_cap, SpendRejection::AccountSuspended)
            } else {
                (limit, SpendRejection::SpendLimitExceeded)
            }
        };
        self.committed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                c.checked_add(worst_case).filter(|n| *n <= cap)
            })
            .map(|_| worst_case)
            .map_err(|_| refusal)
    }

    /// Takes `amount` out of committed money: a reservation whose admission the rate limits or
    /// the ledger refused, or a closing period's spend.
    pub(crate) fn release_reservation(&self, amount: Nanos) {
        if amount != 0 {
            self.committed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| Some(c.saturating_sub(amount)))
                .ok();
        }
    }

    /// Replaces a settled (or expired) permit's reservation with what it is billed, and bills it.
    pub(crate) fn settle_reservation(&self, reserved: Nanos, billed: Nanos, tiers: &Tiers) {
        if reserved != billed {
            self.committed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                    Some(c.saturating_sub(reserved).saturating_add(billed))
                })
                .ok();
        }
        self.record_spend(billed, tiers);
    }

    /// Records the cost of a settled request: it counts against the limit, is paid from
    /// credits first, and what credits do not cover adds to historical spend. `committed`
    /// already holds it (see [`AccountSlot::settle_reservation`]).
    fn record_spend(&self, cost: Nanos, tiers: &Tiers) {
        if cost == 0 {
            return;
        }
        let before = self
            .credits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| Some(c.saturating_sub(cost)))
            .unwrap_or(0);
        saturating_add(&self.period_spend, cost);
        let covered = before.min(cost);
        // Both calls below recompute from state: more of them changes nothing (.cargo/mutants.toml).
        if before > 0 && before <= cost {
            self.update_payment_standing();
        }
        if cost > covered {
            saturating_add(&self.historical, cost - covered);
            self.promote(tiers);
        }
    }

    /// Prepaid credits: spendable, and they count toward historical spend (and so the tier).
    pub(crate) fn add_credits(&self, amount: Micros, tiers: &Tiers) {
        saturating_add(&self.credits, nanos(amount));
        saturating_add(&self.historical, nanos(amount));
        self.update_payment_standing();
        self.promote(tiers);
    }

    pub(crate) fn set_payment_method(&self, on: bool) {
        if on {
            self.settings.fetch_or(PAYMENT_METHOD, Ordering::AcqRel);
        } else {
            self.settings.fetch_and(!PAYMENT_METHOD, Ordering::AcqRel);
        }
        self.update_payment_standing();
    }

    /// Suspended for want of payment exactly when there is no payment method and no credit.
    fn update_payment_standing(&self) {
        if self.has_payment_method() || self.credits.load(Ordering::Acquire) > 0 {
            self.suspension.fetch_and(!NO_PAYMENT_METHOD, Ordering::AcqRel);
        } else {
            self.suspension.fetch_or(NO_PAYMENT_METHOD, Ordering::AcqRel);
        }
    }

    pub(crate) fn suspend(&self, reason: Suspension, on: bool) {
        if on {
            self.suspension.fetch_or(reason.bit(), Ordering::AcqRel);
        } else {
            self.suspension.fetch_and(!reason.bit(), Ordering::AcqRel);
        }
    }

    /// Sets the user's own limit; refused above the tier's.
    pub(crate) fn choose_limit(&self, limit: Micros, tiers: &Tiers) -> Result<(), Micros> {
        let max = tiers.spec(self.tier()).monthly_spend_limit;
        if limit > max {
            return Err(max);
        }
        self.chosen_limit.store(limit, Ordering::Release);
        self.refresh_limit(tiers);
        Ok(())
    }

    /// Pins the tier (an operator's grant), or with `None` returns to the tier historical spend
    /// has earned.
    ///
    /// The user's chosen limit is never rewritten: the effective limit is the lower of the
    /// tier's and the user's, so a lower pinned tier caps spend only while it lasts, and un-pinning
    /// or a later promotion brings back the tier's limit (or the user's own, if lower).
    pub(crate) fn pin_tier(&self, tier: Option<Tier>, tiers: &Tiers) {
        // Sequentially consistent, like the override stores: a scope claimed after the re-clamp
        // scan passed its slot must read the new bounds (see `Engine::reclamp_account`).
        self.settings
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                let settings = match tier {
                    // Disjoint bits: `^` for `|` is the same (.cargo/mutants.toml).
                    Some(t) => PINNED | t as u64,
                    None => tiers.earned(self.historical.load(Ordering::Acquire) / NANOS_PER_MICRO) as u64,
                };
                Some((s & KEPT_BY_PIN) + settings)
            })
            .ok();
        // Spend recorded while the tier was being set may have earned more.
        self.promote(tiers);
        self.refresh_limit(tiers);
    }

    /// A new billing period: spend starts again from zero; outstanding reservations stay held.
    pub(crate) fn start_billing_period(&self) {
        let spent = self.period_spend.swap(0, Ordering::AcqRel);
        self.release_reservation(spent);
    }

    /// The account's bounds on `index`'s metric: its override, else the policy's with the
    /// ceiling scaled by the tier.
    pub(crate) fn bounds(&self, index: usize, policy: MetricLimits, tiers: &Tiers) -> MetricLimits {
        let read = |a: Option<&AtomicU64>| a.map_or(0, |a| a.load(Ordering::SeqCst));
        let (floor, ceiling) = (read(self.floor_override.get(index)), read(self.ceiling_override.get(index)));
        if floor != 0 {
            return MetricLimits { floor: f64::from_bits(floor), ceiling: f64::from_bits(ceiling) };
        }
        let tier =
            Tier::from_index((self.settings.load(Ordering::SeqCst) & TIER_MASK) as u8).unwrap_or(Tier::One);
        let scale = tiers.spec(tier).ceiling_scale;
        MetricLimits { floor: policy.floor, ceiling: (policy.ceiling * scale).max(policy.floor) }
    }

    pub(crate) fn set_override(&self, index: usize, limits: Option<MetricLimits>) {
        let (floor, ceiling) = limits.map_or((0, 0), |l| (l.floor.to_bits(), l.ceiling.to_bits()));
        if let (Some(f), Some(c)) = (self.floor_override.get(index), self.ceiling_override.get(index)) {
            c.store(ceiling, Ordering::SeqCst);
            f.store(floor, Ordering::SeqCst);
        }
    }

    pub(crate) fn state(&self) -> AccountState {
        let settings = self.settings.load(Ordering::Acquire);
        let suspension = self.suspension.load(Ordering::Acquire);
        let limit = self.spend_limit.load(Ordering::Acquire);
        AccountState {
            tier: self.tier(),
            tier_pinned: settings & PINNED != 0,
            payment_method: settings & PAYMENT_METHOD != 0,
            spend_limit: if limit == u64::MAX { u64::MAX } else { limit / NANOS_PER_MICRO },
            period_spend: self.period_spend.load(Ordering::Acquire) / NANOS_PER_MICRO,
            in_flight: self.in_flight.load(Ordering::Acquire),
            max_in_flight: Settings(settings).in_flight_cap(),
            service_tier_grant: Settings(settings).service_tier_grant(),
            reserved: self
                .committed
                .load(Ordering::Acquire)
                .saturating_sub(self.period_spend.load(Ordering::Acquire))
                / NANOS_PER_MICRO,
            historical_spend: self.historical.load(Ordering::Acquire) / NANOS_PER_MICRO,
            credits: self.credits.load(Ordering::Acquire) / NANOS_PER_MICRO,
            refusal: self.refusal(),
            suspended_by_operator: suspension & SUSPENDED_BY_OPERATOR != 0,
            payment_failed: suspension & PAYMENT_FAILED != 0,
            no_payment_method: suspension & NO_PAYMENT_METHOD != 0,
            quotas: self.quotas.each_ref().map(QuotaCell::get),
        }
    }
}

impl Slot for AccountSlot {
    fn id(&self) -> &AtomicU64 {
        &self.id
    }
}

impl Keyed for AccountSlot {
    fn key_equals(&self, key: &[u8]) -> bool {
        self.key.equals(key)
    }

    fn refs(&self) -> &Refs {
        &self.refs
    }

    fn holds_nothing(&self) -> bool {
        AccountSlot::holds_nothing(self)
    }
}

/// The account operations of an engine (SPEC §8). Each creates the account if it is new, so an
/// operator can configure accounts before their first request.
impl<S: crate::storage::Storage> crate::engine::Engine<S> {
    /// Everything about an account.
    ///
    /// ```
    /// use sluicegate_core::{Capacity, Engine, Policy, Tier};
    /// let e = Engine::new(Policy::fireworks_2024(), Capacity::scopes(64))?;
    /// e.add_credits(b"acct", 100_000_000)?; // $100 of prepaid credits
    /// let a = e.account(b"acct")?;
    /// assert_eq!((a.tier, a.spend_limit, a.credits), (Tier::Two, 500_000_000, 100_000_000));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn account(&self, account: &[u8]) -> Result<AccountState, crate::error::Error> {
        self.with_account(account, false, |_, a| a.state())
    }

    /// Adds prepaid credits (micro-dollars): they pay for spend first and count toward
    /// historical spend, so buying them can raise the tier at once.
    pub fn add_credits(&self, account: &[u8], amount: Micros) -> Result<(), crate::error::Error> {
        self.with_account(account, true, |_, a| a.add_credits(amount, &self.policy.tiers))
    }

    /// Records whether a payment method is on file. Without one, an account is suspended once
    /// its credits are depleted.
    pub fn set_payment_method(&self, account: &[u8], on_file: bool) -> Result<(), crate::error::Error> {
        self.with_account(account, true, |_, a| a.set_payment_method(on_file))
    }

    /// Sets the monthly spend limit the user chose (micro-dollars); refused above the tier's.
    pub fn set_spend_limit(&self, account: &[u8], limit: Micros) -> Result<(), crate::error::Error> {
        self.with_account(account, true, |_, a| a.choose_limit(limit, &self.policy.tiers))?
            .map_err(|max| crate::error::Error::SpendLimitAboveTier { max })
    }

    /// Sets how many of the account's permits may be outstanding at once (`None`: the policy's
    /// `max_in_flight`), e.g. more for an account that streams many slow completions. Beyond
    /// it, admission is `RejectConcurrency` (429 `concurrency_limited`).
    ///
    /// ```
    /// use sluicegate_core::{Capacity, Engine, Outcome, Policy, Request, ScopeKey};
    /// let e = Engine::new(Policy::fixed(), Capacity::scopes(64))?;
    /// e.set_max_in_flight(b"acct", Some(1))?;
    /// let key = ScopeKey::new(b"acct", b"model");
    /// let first = e.admit(key, &Request::new(1), 0)?;
    /// assert!(first.admitted());
    /// assert!(matches!(e.admit(key, &Request::new(1), 0)?.outcome, Outcome::RejectConcurrency(_)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_max_in_flight(&self, account: &[u8], max: Option<u32>) -> Result<(), crate::error::Error> {
        if max == Some(0) {
            return Err(crate::error::Error::Policy(crate::error::PolicyError::BadParameter(
                "max_in_flight",
            )));
        }
        self.with_account(account, true, |_, a| a.set_in_flight_cap(max))
    }

    /// Grants an account a service tier (SPEC §6): its requests are served at the tier they ask
    /// for, or at the grant if they ask for more. Every account has `Default` until granted
    /// another; a grant keeps the account (it is not reclaimed while idle) and is in snapshots.
    ///
    /// ```
    /// use sluicegate_core::{Capacity, Engine, Policy, Request, ScopeKey, ServiceTier};
    /// let e = Engine::new(Policy::fixed(), Capacity::scopes(64))?;
    /// let ask = Request::new(1).service_tier(ServiceTier::Priority);
    /// let served = |e: &Engine<_>| e.admit(ScopeKey::new(b"acct", b"m"), &ask, 0).map(|d| d.permit().unwrap().service_tier());
    /// assert_eq!(served(&e)?, ServiceTier::Default);
    /// e.set_service_tier_grant(b"acct", ServiceTier::Priority)?;
    /// assert_eq!(served(&e)?, ServiceTier::Priority);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_service_tier_grant(
        &self,
        account: &[u8],
        tier: ServiceTier,
    ) -> Result<(), crate::error::Error> {
        self.with_account(account, true, |_, a| a.set_service_tier_grant(tier))
    }

    /// Suspends an account (`suspended = true`) or lifts that suspension. Every admission of a
    /// suspended account is `RejectSpend(AccountSuspended)`.
    pub fn set_suspended(
        &self,
        account: &[u8],
        reason: Suspension,
        suspended: bool,
    ) -> Result<(), crate::error::Error> {
        self.with_account(account, true, |_, a| a.suspend(reason, suspended))
    }

    /// Grants a tier (e.g. `Unlimited` for "a custom solution"), or with `None` returns the
    /// account to the tier its spend has earned. Its scopes' ceilings change at once.
    pub fn set_tier(
        &self,
        account: &[u8],
        tier: Option<Tier>,
        now_ns: u64,
    ) -> Result<(), crate::error::Error> {
        self.with_account(account, true, |index, a| {
            a.pin_tier(tier, &self.policy.tiers);
            self.reclamp_account(index, now_ns);
        })
    }

    /// Gives an account its own floor and ceiling on a metric (higher limits from day one, or
    /// past the highest tier's bound), or with `None` returns it to the policy's. Existing scopes
    /// are re-clamped at once, keeping their buckets' levels.
    pub fn set_limits_override(
        &self,
        account: &[u8],
        metric: crate::metric::Metric,
        limits: Option<MetricLimits>,
        now_ns: u64,
    ) -> Result<(), crate::error::Error> {
        if let Some(l) = limits {
            if l.floor.is_nan() || l.floor < 1.0 || l.ceiling.is_nan() {
                return Err(crate::error::PolicyError::BadLimit(metric).into());
            }
            if l.floor > l.ceiling {
                return Err(crate::error::PolicyError::FloorAboveCeiling(metric).into());
            }
        }
        self.with_account(account, true, |index, a| {
            a.set_override(metric as usize, limits);
            self.reclamp_account(index, now_ns);
        })
    }

    /// Starts a new billing period for every account at `now_ns`: period spend returns to zero,
    /// lifting spend-limit suspensions. Permits expired by then are billed to the closing period
    /// first (each is billed its reservation); the money live permits hold stays held.
    pub fn start_billing_period(&self, now_ns: u64) {
        self.sweep(now_ns, self.tables().permits.len());
        self.tables().accounts.iter().for_each(AccountSlot::start_billing_period);
    }

    /// Sets a model variant's prices (micro-dollars per million tokens); spend is computed from
    /// them at settle.
    pub fn set_price(
        &self,
        model: &[u8],
        variant: crate::key::Variant,
        price: crate::price::Price,
    ) -> Result<(), crate::error::Error> {
        self.with_model(model, |m| m.set_price(variant, price))
    }

    /// Acquires `n` units of a quota; refused (changing nothing) past its limit. Returns
    /// `(used, limit)`.
    pub fn acquire_quota(
        &self,
        account: &[u8],
        quota: Quota,
        n: u32,
    ) -> Result<(u32, u32), crate::error::Error> {
        self.with_quota(account, quota, |q| q.acquire(n))
    }

    /// Releases `n` units of a quota; refused (changing nothing) beyond what is held.
    pub fn release_quota(
        &self,
        account: &[u8],
        quota: Quota,
        n: u32,
    ) -> Result<(u32, u32), crate::error::Error> {
        self.with_quota(account, quota, |q| q.release(n))
    }

    /// Raises (or lowers, not below use) an account's quota limit.
    pub fn set_quota_limit(
        &self,
        account: &[u8],
        quota: Quota,
        limit: u32,
    ) -> Result<(u32, u32), crate::error::Error> {
        self.with_quota(account, quota, |q| q.set_limit(limit))
    }

    fn with_quota(
        &self,
        account: &[u8],
        quota: Quota,
        f: impl FnOnce(&QuotaCell) -> Result<(u32, u32), crate::quota::QuotaError>,
    ) -> Result<(u32, u32), crate::error::Error> {
        let cell = |_, a: &AccountSlot| a.quotas.get(quota.index()).map(f);
        let done = self.with_account(account, true, cell)?.ok_or(crate::error::Error::UnknownAccount)?;
        done.map_err(crate::error::Error::Quota)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_known_settings_are_the_tier_its_pin_the_payment_method_and_the_cap() {
        assert_eq!(SETTINGS_KNOWN, TIER_MASK | PINNED | PAYMENT_METHOD | GRANT_MASK | IN_FLIGHT_CAP_MASK);
        for field in [TIER_MASK, PINNED, PAYMENT_METHOD, GRANT_MASK, IN_FLIGHT_CAP_MASK] {
            assert_eq!(SETTINGS_KNOWN & field, field);
        }
        assert_eq!(SETTINGS_KNOWN & (1 << 12), 0);
        assert_eq!(SETTINGS_KNOWN >> 48, 0);
        assert_eq!(KEPT_BY_PIN, PAYMENT_METHOD | GRANT_MASK | IN_FLIGHT_CAP_MASK);
    }

    #[test]
    fn granting_a_service_tier_keeps_every_other_setting() {
        let a = AccountSlot::new();
        let others = PINNED | PAYMENT_METHOD | 3 | (7 << IN_FLIGHT_CAP_SHIFT);
        a.settings.store(others, Ordering::Relaxed);
        assert_eq!(a.settings().service_tier_grant(), ServiceTier::Default);
        for tier in [ServiceTier::Priority, ServiceTier::Flex, ServiceTier::Default, ServiceTier::Flex] {
            a.set_service_tier_grant(tier);
            assert_eq!(a.settings().service_tier_grant(), tier);
            assert_eq!(a.settings.load(Ordering::Relaxed) & !GRANT_MASK, others);
        }
        // The unused fourth value reads as the default.
        a.settings.store(others | GRANT_MASK, Ordering::Relaxed);
        assert_eq!(a.settings().service_tier_grant(), ServiceTier::Default);
    }

    #[test]
    fn setting_the_cap_keeps_every_other_setting() {
        let a = AccountSlot::new();
        a.settings.store(PINNED | PAYMENT_METHOD | 3, Ordering::Relaxed);
        for cap in [Some(7), Some(u32::MAX), Some(1), None] {
            a.set_in_flight_cap(cap);
            assert_eq!(a.settings().in_flight_cap(), cap);
            assert_eq!(a.settings.load(Ordering::Relaxed) & !IN_FLIGHT_CAP_MASK, PINNED | PAYMENT_METHOD | 3);
        }
    }
}
