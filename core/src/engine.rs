//! The engine: admit, settle, charge and cancel, gluing buckets, adaptation, shedding and tables.

use crate::adapt::{self, MetricState, Period};
use crate::bucket::{self, Bands, EPOCH_RANGE_Q, Fit, QUANTUM_NS, Word};
use crate::decision::{ConcurrencyLimited, Decision, Levels, Outcome, RateLimited, Shed};
use crate::error::{Error, SettleError, Table};
use crate::key::{ScopeKey, Variant};
use crate::lease::{Grant, Lease, LeasedScope};
use crate::metric::{Metric, PerMetric};
use crate::metrics::{Counters, Event};
use crate::permit::{self, Owner, Permit, Refusal, Reservation};
use crate::policy::{MetricLimits, Policy};
use crate::request::{Completion, Request, Usage};
use crate::scope::{self, IN_FLIGHT_ONE, ScopeAdaptation, ScopeSlot};
use crate::service_tier::ServiceTier;
use crate::shed::{Class, LoadPermille};
use crate::storage::{Capacity, Identity, Storage, Tables};
use crate::sync::{Ordering, fence};
use crate::table;

/// Seeds of the three hashes, so one key hashes differently in each table.
pub(crate) const MODEL_SALT: u64 = 0x9e37_79b9_7f4a_7c15;
pub(crate) const SCOPE_SALT: u64 = 0xc2b2_ae3d_27d4_eb4f;
/// Permit-ledger slots tried before the ledger counts as full.
const LEDGER_PROBE: usize = 64;

/// An admission engine: fixed-capacity tables of scopes, accounts, models and permits, shared by
/// any number of threads without locks.
///
/// ```
/// use sluicegate_core::{Completion, Engine, Outcome, Policy, Request, ScopeKey, Usage};
/// let engine = Engine::new(Policy::fireworks_2024(), sluicegate_core::Capacity::scopes(1024))?;
/// let key = ScopeKey::new(b"acct-1", b"llama-v3p1-70b");
/// let decision = engine.admit(key, &Request::new(1200).max_tokens(256), 0)?;
/// let Outcome::Admit(permit) = decision.outcome else { panic!("a new account starts with full buckets") };
/// engine.settle(&permit, &Usage::new(1200, 180), Completion::Success, 2_000_000_000)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Engine<S: Storage> {
    pub(crate) storage: S,
    pub(crate) policy: Policy,
    bands: Bands,
    pub(crate) seed: u64,
    pub(crate) incarnation: u32,
    /// The last tick index computed: saves a division on almost every call.
    tick_cache: crate::sync::AtomicU64,
    /// Where the next sweep for expired permits starts in the ledger.
    sweep_cursor: crate::sync::AtomicU64,
    /// Permits one account may hold when neither it nor the policy says otherwise.
    default_in_flight: u64,
    /// Requests refused before any model was found: invalid, or a full table. Kept by each
    /// process, as the engine handle is (a shared region holds only the models' counters).
    pub(crate) unattributed: Counters,
}

/// `retry_after` of a request refused for too many requests in flight: a place frees when one
/// of the account's requests finishes, which the engine cannot foresee.
const CONCURRENCY_RETRY_NS: u64 = 1_000_000_000;

/// Ledger entries swept for expired permits each time the engine's tick advances; a ledger up
/// to this size is swept whole every tick.
pub(crate) const SWEEP_PER_TICK: usize = 4096;
/// Ledger entries swept each time a scope applies its ticks.
const SWEEP_PER_SCOPE_TICK: usize = 64;

/// Where a scope lives, as resolved for one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Located {
    pub(crate) slot: usize,
    pub(crate) id: u64,
    pub(crate) account: usize,
    pub(crate) model: usize,
    pub(crate) variant: Variant,
}

impl Located {
    pub(crate) fn of_id(slot: usize, id: u64) -> Self {
        let (model, variant) = scope::model_and_variant(id);
        Located { slot, id, account: scope::account_of(id), model, variant }
    }
}

/// Decides and charges one admission on a located scope: its buckets, or a lease.
pub(crate) trait Charge:
    Fn(&ScopeSlot, Located, PerMetric<u64>, ServiceTier, LoadPermille, u64) -> Attempt
{
}

impl<F: Fn(&ScopeSlot, Located, PerMetric<u64>, ServiceTier, LoadPermille, u64) -> Attempt> Charge for F {}

/// How one attempt on the bucket word ended.
pub(crate) enum Attempt {
    Decided(Decision),
    /// The slot was reclaimed under us: resolve the key again.
    Moved,
}

#[cfg(feature = "std")]
impl Engine<crate::storage::Heap> {
    /// An engine with heap tables of `capacity` and a random hash seed.
    pub fn new(policy: Policy, capacity: Capacity) -> Result<Self, Error> {
        Self::with_storage(policy, crate::storage::Heap::new(capacity)?, crate::storage::random_seed())
    }
}

impl<S: Storage> Engine<S> {
    /// An engine over `storage`, hashing keys with `seed` (pick it at random per process).
    /// Shared storage brings its own seed, and `seed` is ignored.
    pub fn with_storage(policy: Policy, storage: S, seed: u64) -> Result<Self, Error> {
        let bands = policy.bands()?;
        storage.tables().capacity().check()?;
        let Identity { seed, incarnation } = storage.identity().unwrap_or_else(|| Identity::local(seed));
        // A quarter of the ledger: one account can never take it all (SPEC §8).
        let default_in_flight = (storage.tables().permits.len() as u64 / 4).max(1);
        Ok(Engine {
            storage,
            policy,
            bands,
            seed,
            incarnation,
            tick_cache: crate::sync::AtomicU64::new(0),
            sweep_cursor: crate::sync::AtomicU64::new(0),
            default_in_flight,
            unattributed: Counters::new(),
        })
    }

    /// The engine's policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// How to render this engine's decisions in `dialect` (per-second token limits if the policy
    /// asks for them).
    pub fn render(&self, dialect: crate::response::Dialect) -> crate::response::Render {
        crate::response::Render::new(dialect).per_second(self.policy.per_second_headers)
    }

    /// Where the engine's tables live.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The engine's table sizes.
    pub fn capacity(&self) -> Capacity {
        self.storage.tables().capacity()
    }

    pub(crate) fn tables(&self) -> Tables<'_> {
        self.storage.tables()
    }

    /// Decides whether a request may run now (SPEC §4). `now_ns` is the caller's monotonic clock.
    ///
    /// On `Admit`/`AdmitOverLimit` the costs are reserved and must be settled with
    /// [`Engine::settle`]; every other outcome charges nothing. `Err` is for conditions that are
    /// not about the request: a bad key or a full table.
    pub fn admit(&self, key: ScopeKey<'_>, request: &Request, now_ns: u64) -> Result<Decision, Error> {
        let costs = match request.costs() {
            Ok(c) => c,
            Err(reason) => {
                self.unattributed.add(key.variant, key.account.len(), request.service_tier, Event::Invalid);
                return Ok(Decision::invalid(reason));
            }
        };
        self.admit_key(key, costs, request.service_tier, now_ns, |_| {}, self.own_buckets())
    }

    /// Admission from the scopes' own buckets.
    pub(crate) fn own_buckets(&self) -> impl Charge + '_ {
        |slot: &ScopeSlot, at, costs, tier, load, now_ns| {
            self.charge_bucket(slot, at, costs, tier, load, now_ns)
        }
    }

    /// [`Engine::admit`], taking the costs from `lease` instead of the scope's buckets (SPEC §11,
    /// many hosts): everything else — validation, spend, concurrency caps, shedding, the permit
    /// and its ledger entry — is the engine's. Settle its permits with [`Engine::settle_leased`].
    ///
    /// ```
    /// use sluicegate_core::lease::{Grant, Lease, LeasedScope};
    /// use sluicegate_core::{Band, Capacity, Completion, Engine, Levels, PerMetric, Policy, Request, ScopeKey, Usage};
    /// use std::sync::atomic::{AtomicI64, Ordering};
    ///
    /// /// A lease of requests only: tokens are not limited.
    /// struct Requests(AtomicI64);
    /// impl Lease for Requests {
    ///     fn take(&self, _: LeasedScope, _: ScopeKey<'_>, cost: PerMetric<u64>, _: u64) -> (Grant, Levels) {
    ///         let n = cost.0[0] as i64;
    ///         let taken = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| (left >= n).then(|| left - n));
    ///         let grant = match taken {
    ///             Ok(_) => Grant::Taken(Band::Normal),
    ///             Err(_) => Grant::Refused(sluicegate_core::RateLimited {
    ///                 metric: sluicegate_core::Metric::Requests,
    ///                 retry_after_ns: 1_000_000_000,
    ///                 too_large: false,
    ///             }),
    ///         };
    ///         (grant, Levels::default())
    ///     }
    ///     fn adjust(&self, _: LeasedScope, delta: [i128; 4], _: u64) {
    ///         self.0.fetch_sub(delta[0] as i64, Ordering::AcqRel);
    ///     }
    /// }
    ///
    /// let engine = Engine::new(Policy::fixed(), Capacity::scopes(64))?;
    /// let lease = Requests(AtomicI64::new(1));
    /// let key = ScopeKey::new(b"acct", b"model");
    /// let first = engine.admit_leased(key, &Request::new(10), 0, &lease)?;
    /// assert!(first.admitted());
    /// assert!(!engine.admit_leased(key, &Request::new(10), 0, &lease)?.admitted(), "the lease is spent");
    /// engine.settle_leased(first.permit().unwrap(), &Usage::new(10, 0), Completion::Success, 0, &lease)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn admit_leased<L: Lease>(
        &self,
        key: ScopeKey<'_>,
        request: &Request,
        now_ns: u64,
        lease: &L,
    ) -> Result<Decision, Error> {
        let costs = match request.costs() {
            Ok(c) => c,
            Err(reason) => {
                self.unattributed.add(key.variant, key.account.len(), request.service_tier, Event::Invalid);
                return Ok(Decision::invalid(reason));
            }
        };
        let leased = |slot: &ScopeSlot, at, costs, tier, load, now_ns| {
            self.charge_lease(lease, key, slot, at, costs, tier, load, now_ns)
        };
        self.admit_key(key, costs, request.service_tier, now_ns, |_| {}, leased)
    }

    /// Looks `key` up and admits there, telling `found` each place it was found.
    pub(crate) fn admit_key(
        &self,
        key: ScopeKey<'_>,
        costs: PerMetric<u64>,
        asked: ServiceTier,
        now_ns: u64,
        found: impl Fn(Located),
        charge: impl Charge,
    ) -> Result<Decision, Error> {
        // Each round that looks again found the scope being reclaimed; a slot that stays so for
        // `table::PATIENCE` rounds was left by a reclaimer that died (a process of a shared
        // region killed), and waiting on it would wait forever.
        let full = |e: Error| {
            if matches!(e, Error::TableFull(_)) {
                self.unattributed.add(key.variant, key.account.len(), asked, Event::TableFull);
            }
            e
        };
        for _ in 0..table::PATIENCE {
            let at = self
                .locate(key, now_ns, true)
                .map_err(full)?
                .ok_or_else(|| full(Error::TableFull(Table::Scopes)))?;
            found(at);
            if let Attempt::Decided(d) = self.admit_at(at, costs, asked, now_ns, &charge)? {
                return Ok(d);
            }
        }
        Err(full(Error::TableFull(Table::Scopes)))
    }

    pub(crate) fn admit_at(
        &self,
        at: Located,
        costs: PerMetric<u64>,
        asked: ServiceTier,
        now_ns: u64,
        charge: &impl Charge,
    ) -> Result<Attempt, Error> {
        let t = self.tables();
        let (Some(slot), Some(model), Some(account)) =
            (t.scopes.get(at.slot), t.models.get(at.model), t.accounts.get(at.account))
        else {
            return Ok(Attempt::Moved);
        };
        let settings = account.settings();
        let tier = asked.within(settings.service_tier_grant());
        let count = |event| model.counters.add(at.variant, at.slot, tier, event);
        let refuse = |reason| {
            count(Event::SpendRefused);
            Ok(Attempt::Decided(Decision {
                outcome: Outcome::RejectSpend(reason),
                levels: Levels::default(),
                cost: costs,
            }))
        };
        if let Some(reason) = account.refusal() {
            return refuse(reason);
        }
        let cap = match settings.in_flight_cap().or(self.policy.max_in_flight) {
            Some(cap) => u64::from(cap),
            None => self.default_in_flight,
        };
        // Full: the account's abandoned permits may have expired unmet. Meet a stretch of the
        // ledger (bounded work, on the refusal path only) before refusing.
        let entered = account.enter(cap) || {
            self.sweep(now_ns, SWEEP_PER_SCOPE_TICK);
            account.enter(cap)
        };
        if !entered {
            let limited = ConcurrencyLimited {
                max_in_flight: u32::try_from(cap).unwrap_or(u32::MAX),
                retry_after_ns: CONCURRENCY_RETRY_NS,
            };
            let outcome = Outcome::RejectConcurrency(limited);
            count(Event::ConcurrencyLimited);
            return Ok(Attempt::Decided(Decision { outcome, levels: Levels::default(), cost: costs }));
        }
        // The worst case — every prompt token uncached, every reserved token generated — is held
        // against the spend limit before the rate limits are tried, and taken back if they refuse.
        let [_, prompt, _, generated] = costs.0;
        let money = match account.reserve(model.price(at.variant).cost(prompt, 0, generated)) {
            Ok(money) => money,
            Err(reason) => {
                account.leave();
                return refuse(reason);
            }
        };
        let now_ns = self.tick(at, now_ns);
        let load = model.load(at.variant);
        // Count the permit before touching the bucket, so a reclaim never takes a busy scope;
        // the count also spreads concurrent permits of one scope over the ledger.
        let outstanding = scope::in_flight_of(slot.tick.fetch_add(IN_FLIGHT_ONE, Ordering::AcqRel));
        let (entry, ticket) = match self.take_ledger_entry(at.slot, outstanding, now_ns) {
            Ok(taken) => taken,
            Err(e) => {
                slot.tick.fetch_sub(IN_FLIGHT_ONE, Ordering::AcqRel);
                account.release_reservation(money);
                account.leave();
                count(Event::TableFull);
                return Err(e);
            }
        };
        let mut attempt = charge(slot, at, costs, tier, load, now_ns);
        if let Attempt::Decided(d) = &attempt {
            count(Event::of(&d.outcome));
        }
        let ledger = t.permits.get(entry);
        match &mut attempt {
            Attempt::Decided(Decision {
                outcome: Outcome::Admit(p) | Outcome::AdmitOverLimit(p), ..
            }) => {
                p.entry = entry as u32;
                p.ticket = ticket;
                p.tracked = model.enter(at.variant);
                if let Some(e) = ledger {
                    e.publish(p, p.checksum(self.seed), money);
                }
            }
            _ => {
                slot.tick.fetch_sub(IN_FLIGHT_ONE, Ordering::AcqRel);
                account.release_reservation(money);
                account.leave();
                if let Some(e) = ledger {
                    e.give_back_unused(ticket);
                }
            }
        }
        Ok(attempt)
    }

    /// The compare-exchange loop that decides and, if admitted, charges the four buckets at once.
    fn charge_bucket(
        &self,
        slot: &ScopeSlot,
        at: Located,
        costs: PerMetric<u64>,
        tier: ServiceTier,
        load: LoadPermille,
        now_ns: u64,
    ) -> Attempt {
        let now_q = now_ns / QUANTUM_NS;
        let mut w = slot.bucket.load(Ordering::Acquire);
        loop {
            if bucket::is_retired(w) || slot.id.load(Ordering::Acquire) != at.id {
                return Attempt::Moved;
            }
            let word = Word::unpack(w);
            let interval = slot.intervals(word.buffer());
            let debts = bucket::open(word, now_q);
            let mut cost_q = [0u64; 4];
            for (q, (c, t)) in cost_q.iter_mut().zip(costs.0.iter().zip(interval)) {
                *q = bucket::cost(*c, t);
            }
            let levels = |debt_q| Levels { debt_q, interval };
            let outcome = match bucket::fit(debts.debt, cost_q, self.bands) {
                Fit::Fits { band, .. } if self.policy.shed.sheds(Class::of(band, tier), load) => {
                    Outcome::Shed(Shed { band, load, retry_after_ns: self.policy.shed_retry_after_ns })
                }
                Fit::Fits { band, wait_q, debt } => {
                    let new = bucket::seal(debts.now_q, debt, word.version).pack();
                    match slot.bucket.compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => {
                            let permit = self.permit(at, costs, band, tier, wait_q, now_ns);
                            let outcome = match band {
                                bucket::Band::Normal => Outcome::Admit(permit),
                                bucket::Band::OverLimit => Outcome::AdmitOverLimit(permit),
                            };
                            return Attempt::Decided(Decision { outcome, levels: levels(debt), cost: costs });
                        }
                        Err(cur) => {
                            w = cur;
                            continue;
                        }
                    }
                }
                Fit::Exceeds { binding, retry_after_q, too_large } => {
                    let binding = if too_large { largest_cost(costs, interval) } else { binding };
                    Outcome::RejectRateLimited(RateLimited {
                        metric: binding,
                        retry_after_ns: retry_after_q.saturating_mul(QUANTUM_NS),
                        too_large,
                    })
                }
            };
            // A refusal writes nothing; it stands if the word (and so the intervals read for it)
            // did not change meanwhile.
            fence(Ordering::Acquire);
            let again = slot.bucket.load(Ordering::Relaxed);
            if again == w {
                return Attempt::Decided(Decision { outcome, levels: levels(debts.debt), cost: costs });
            }
            w = again;
        }
    }

    /// [`Engine::charge_bucket`]'s decision, with the costs taken from a lease.
    #[allow(clippy::too_many_arguments)]
    fn charge_lease(
        &self,
        lease: &impl Lease,
        key: ScopeKey<'_>,
        slot: &ScopeSlot,
        at: Located,
        costs: PerMetric<u64>,
        tier: ServiceTier,
        load: LoadPermille,
        now_ns: u64,
    ) -> Attempt {
        if bucket::is_retired(slot.bucket.load(Ordering::Acquire)) || slot.id.load(Ordering::Acquire) != at.id
        {
            return Attempt::Moved;
        }
        let scope = LeasedScope { slot: at.slot, id: at.id };
        let (grant, levels) = lease.take(scope, key, costs, now_ns);
        let outcome = match grant {
            Grant::Refused(limited) => Outcome::RejectRateLimited(limited),
            Grant::Taken(band) if self.policy.shed.sheds(Class::of(band, tier), load) => {
                lease.adjust(scope, costs.0.map(|c| -i128::from(c)), now_ns);
                Outcome::Shed(Shed { band, load, retry_after_ns: self.policy.shed_retry_after_ns })
            }
            Grant::Taken(band) => {
                let permit = self.permit(at, costs, band, tier, 0, now_ns);
                match band {
                    bucket::Band::Normal => Outcome::Admit(permit),
                    bucket::Band::OverLimit => Outcome::AdmitOverLimit(permit),
                }
            }
        };
        Attempt::Decided(Decision { outcome, levels, cost: costs })
    }

    fn permit(
        &self,
        at: Located,
        costs: PerMetric<u64>,
        band: bucket::Band,
        service_tier: ServiceTier,
        wait_q: u64,
        now_ns: u64,
    ) -> Permit {
        let [requests, prompt_tokens, uncached_prompt_tokens, generated_tokens] = costs.0;
        Permit {
            slot: at.slot as u32,
            scope_id: at.id,
            model: at.model as u32,
            variant: at.variant,
            entry: 0,
            ticket: 0,
            incarnation: self.incarnation,
            tracked: false,
            service_tier,
            band,
            wait_ns: wait_q.saturating_mul(QUANTUM_NS),
            deadline_s: permit::deadline_s(now_ns, self.policy.permit_ttl_ns),
            reserved: Reservation { requests, prompt_tokens, uncached_prompt_tokens, generated_tokens },
        }
    }

    /// Takes a free ledger entry near a spread start, expiring any abandoned permit on the way.
    fn take_ledger_entry(&self, slot: usize, outstanding: u64, now_ns: u64) -> Result<(usize, u32), Error> {
        let permits = self.tables().permits;
        let salt = (slot as u64).wrapping_mul(MODEL_SALT) ^ outstanding.rotate_left(32);
        let start = ((u128::from(salt.wrapping_mul(SCOPE_SALT)) * permits.len() as u128) >> 64) as usize;
        (0..permits.len().min(LEDGER_PROBE))
            .find_map(|i| {
                let idx = (start + i).checked_rem(permits.len())?;
                let entry = permits.get(idx)?;
                entry
                    .take()
                    .or_else(|| {
                        // Expired, or settled meanwhile: either way it may be free now.
                        if let Some(owner) = entry.expire(now_ns) {
                            self.release(owner);
                        }
                        entry.take()
                    })
                    .map(|ticket| (idx, ticket))
            })
            .ok_or(Error::TableFull(Table::Permits))
    }

    /// Releases what an expired permit held: its scope's in-flight count and its model's load.
    /// Its reservation stays charged, as if fully used, and its reserved money is billed.
    fn release(&self, owner: Owner) {
        let t = self.tables();
        if let Some(slot) = t.scopes.get(owner.slot) {
            // The scope is still the permit's: its in-flight count keeps it from reclaim.
            let account = scope::account_of(slot.id.load(Ordering::Acquire));
            if let Some(a) = t.accounts.get(account) {
                a.settle_reservation(owner.money, owner.money, &self.policy.tiers);
                a.leave();
            }
            slot.tick.fetch_sub(IN_FLIGHT_ONE, Ordering::AcqRel);
        }
        if let Some(m) = t.models.get(owner.model) {
            if owner.tracked {
                m.leave(owner.variant);
            }
            m.counters.add(owner.variant, owner.slot, owner.service_tier, Event::Expired);
            m.counters.add_spend(owner.variant, owner.slot, owner.service_tier, owner.money);
        }
    }

    /// Expires the abandoned permits among `budget` ledger entries from the sweep cursor.
    pub(crate) fn sweep(&self, now_ns: u64, budget: usize) {
        let permits = self.tables().permits;
        let budget = budget.min(permits.len());
        let start = self.sweep_cursor.fetch_add(budget as u64, Ordering::Relaxed);
        let len = permits.len() as u64;
        for i in 0..budget as u64 {
            let Some(index) = start.wrapping_add(i).checked_rem(len) else { return };
            if let Some(owner) = permits.get(index as usize).and_then(|e| e.expire(now_ns)) {
                self.release(owner);
            }
        }
    }

    /// Maps a ledger refusal to the settle error, releasing what an expiry found.
    fn refused(&self, refusal: Refusal) -> SettleError {
        match refusal {
            Refusal::Settled => SettleError::AlreadySettled,
            Refusal::Damaged => SettleError::StalePermit,
            Refusal::TooLarge => SettleError::InvalidUsage,
            Refusal::Expired(owner) => {
                if let Some(owner) = owner {
                    self.release(owner);
                }
                SettleError::Expired
            }
        }
    }

    /// Refuses a permit past its deadline, expiring its entry if nobody has yet.
    fn check_expiry(&self, permit: &Permit, now_ns: u64) -> Result<(), SettleError> {
        if !permit.expired(now_ns) {
            return Ok(());
        }
        if let Some(owner) = self.tables().permits.get(permit.entry as usize).and_then(|e| e.expire(now_ns)) {
            self.release(owner);
        }
        Err(SettleError::Expired)
    }

    /// Settles a permit with what the request actually used (SPEC §7): each token metric is
    /// corrected by actual − reserved (refunds stop at a full bucket; extra usage goes into debt),
    /// and the account is billed at the model's prices (SPEC §8) unless the upstream failed.
    ///
    /// A second settle of the same permit, or of one from before a restore, is an error and
    /// changes nothing.
    pub fn settle(
        &self,
        permit: &Permit,
        usage: &Usage,
        completion: Completion,
        now_ns: u64,
    ) -> Result<(), SettleError> {
        self.settle_with(permit, usage, completion, now_ns, |slot, delta, now_ns| {
            self.correct(slot, delta, now_ns)
        })
    }

    /// [`Engine::settle`] of a permit from [`Engine::admit_leased`]: the token corrections go to
    /// `lease` instead of the scope's buckets.
    pub fn settle_leased(
        &self,
        permit: &Permit,
        usage: &Usage,
        completion: Completion,
        now_ns: u64,
        lease: &impl Lease,
    ) -> Result<(), SettleError> {
        self.settle_with(permit, usage, completion, now_ns, |_, delta, now_ns| {
            Self::correct_lease(lease, permit, delta, now_ns)
        })
    }

    fn settle_with(
        &self,
        permit: &Permit,
        usage: &Usage,
        completion: Completion,
        now_ns: u64,
        correct: impl FnOnce(&ScopeSlot, [i128; 4], u64),
    ) -> Result<(), SettleError> {
        let actual = usage.tokens().ok_or(SettleError::InvalidUsage)?;
        let slot = self.valid_slot(permit, now_ns)?;
        let t = self.tables();
        let entry = t.permits.get(permit.entry as usize).ok_or(SettleError::StalePermit)?;
        let (charged, money) =
            entry.settle(permit.ticket, permit.checksum(self.seed), now_ns).map_err(|r| self.refused(r))?;
        let at = Located::of_id(permit.slot as usize, permit.scope_id);
        let now_ns = self.tick(at, now_ns);
        let r = permit.reserved;
        let billed = [r.prompt_tokens, r.uncached_prompt_tokens, r.generated_tokens.max(charged)];
        let mut delta = [0i128; 4];
        for ((d, a), b) in delta.iter_mut().skip(1).zip(actual).zip(billed) {
            *d = i128::from(a) - i128::from(b);
        }
        correct(slot, delta, now_ns);
        let mut billed = 0;
        if completion.counts() {
            let [prompt, uncached, generated] = actual;
            slot.add_usage([r.requests, prompt, uncached, generated]);
            if let Some(model) = t.models.get(at.model) {
                billed = model.price(at.variant).cost(uncached, prompt - uncached, generated);
            }
        }
        if let Some(account) = t.accounts.get(at.account) {
            account.settle_reservation(money, billed, &self.policy.tiers);
            account.leave();
        }
        slot.tick.fetch_sub(IN_FLIGHT_ONE, Ordering::AcqRel);
        if let Some(m) = t.models.get(at.model) {
            if permit.tracked {
                m.leave(permit.variant);
            }
            m.counters.add(permit.variant, at.slot, permit.service_tier, Event::settled(completion));
            m.counters.add_spend(permit.variant, at.slot, permit.service_tier, billed);
        }
        Ok(())
    }

    /// Settles a request the client abandoned, with what it used.
    pub fn cancel(&self, permit: &Permit, usage: &Usage, now_ns: u64) -> Result<(), SettleError> {
        self.settle(permit, usage, Completion::Cancelled, now_ns)
    }

    /// Records `generated_tokens` more tokens of a streaming response. Tokens beyond the
    /// reservation are charged at once, so a long stream pushes its bucket into debt as it goes.
    pub fn charge(&self, permit: &Permit, generated_tokens: u64, now_ns: u64) -> Result<(), SettleError> {
        self.charge_with(permit, generated_tokens, now_ns, |slot, delta, now_ns| {
            self.correct(slot, delta, now_ns)
        })
    }

    /// [`Engine::charge`] of a permit from [`Engine::admit_leased`]: tokens beyond the
    /// reservation are charged to `lease`.
    pub fn charge_leased(
        &self,
        permit: &Permit,
        generated_tokens: u64,
        now_ns: u64,
        lease: &impl Lease,
    ) -> Result<(), SettleError> {
        self.charge_with(permit, generated_tokens, now_ns, |_, delta, now_ns| {
            Self::correct_lease(lease, permit, delta, now_ns)
        })
    }

    fn charge_with(
        &self,
        permit: &Permit,
        generated_tokens: u64,
        now_ns: u64,
        correct: impl FnOnce(&ScopeSlot, [i128; 4], u64),
    ) -> Result<(), SettleError> {
        let slot = self.valid_slot(permit, now_ns)?;
        let entry = self.tables().permits.get(permit.entry as usize).ok_or(SettleError::StalePermit)?;
        let (before, after) = entry
            .add_charge(permit.ticket, permit.checksum(self.seed), generated_tokens, now_ns)
            .map_err(|r| self.refused(r))?;
        let extra = after.saturating_sub(permit.reserved.generated_tokens.max(before));
        let now_ns = self.tick(Located::of_id(permit.slot as usize, permit.scope_id), now_ns);
        correct(slot, [0, 0, 0, i128::from(extra)], now_ns);
        Ok(())
    }

    fn valid_slot(&self, permit: &Permit, now_ns: u64) -> Result<&ScopeSlot, SettleError> {
        if permit.incarnation != self.incarnation {
            return Err(SettleError::StalePermit);
        }
        // Before the scope check: an expired permit's scope may well have been reclaimed since.
        self.check_expiry(permit, now_ns)?;
        let slot = self.tables().scopes.get(permit.slot as usize).ok_or(SettleError::StalePermit)?;
        if slot.id.load(Ordering::Acquire) != permit.scope_id {
            return Err(SettleError::StalePermit);
        }
        Ok(slot)
    }

    /// Hands a permit's token corrections to its lease, if there are any.
    fn correct_lease(lease: &impl Lease, permit: &Permit, delta: [i128; 4], now_ns: u64) {
        if delta.iter().any(|d| *d != 0) {
            lease.adjust(LeasedScope { slot: permit.slot as usize, id: permit.scope_id }, delta, now_ns);
        }
    }

    /// Applies token corrections to the buckets; writes nothing when there are none.
    fn correct(&self, slot: &ScopeSlot, delta_tokens: [i128; 4], now_ns: u64) {
        if delta_tokens.iter().all(|d| *d == 0) {
            return;
        }
        let now_q = now_ns / QUANTUM_NS;
        let mut w = slot.bucket.load(Ordering::Acquire);
        while !bucket::is_retired(w) {
            let word = Word::unpack(w);
            let interval = slot.intervals(word.buffer());
            let debts = bucket::open(word, now_q);
            let mut debt = debts.debt;
            for ((d, delta), t) in debt.iter_mut().zip(delta_tokens).zip(interval) {
                let q = i128::from(bucket::cost(u64::try_from(delta.unsigned_abs()).unwrap_or(u64::MAX), t));
                *d = bucket::adjust(*d, if delta.is_negative() { -q } else { q });
            }
            let new = bucket::seal(debts.now_q, debt, word.version).pack();
            match slot.bucket.compare_exchange(w, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(cur) => w = cur,
            }
        }
    }

    /// A scope's bounds per metric: its account's overrides, or the policy's with the tier's
    /// ceiling scale.
    pub(crate) fn bounds(&self, account: Option<usize>) -> PerMetric<MetricLimits> {
        let tiers = &self.policy.tiers;
        match account.and_then(|a| self.tables().accounts.get(a)) {
            Some(a) => self.policy.limits.map(|m, l| a.bounds(m as usize, l, tiers)),
            None => self.policy.limits,
        }
    }

    /// The adaptive state and intervals of a scope nobody has used.
    pub(crate) fn fresh(&self, bounds: &PerMetric<MetricLimits>) -> (PerMetric<MetricState>, [u64; 4]) {
        let states = bounds.map(|_, l| MetricState::fresh(&self.policy.adaptation, l));
        let intervals = scope::intervals_of(&states);
        (states, intervals)
    }

    /// Applies every adaptation tick missed up to `now_ns` (SPEC §5): the first caller after a
    /// tick boundary wins and applies them all in closed form; everyone else carries on — unless
    /// the scope is so far behind that its word's epoch tag cannot be read against `now` until
    /// the winner has re-sealed it (a scope idle for hours; the wait is the winner's few hundred
    /// nanoseconds).
    ///
    /// Returns the time the scope should be read at: `now_ns`, or — if the caller's clock has
    /// gone back past ticks already applied — the start of the last tick, so that no clock, however
    /// far back, can refill a bucket. The same if the scope is too far behind and nobody re-seals
    /// it: a tick lock held by a process of a shared region that was killed applying a tick.
    #[inline]
    pub(crate) fn tick(&self, at: Located, now_ns: u64) -> u64 {
        let index = self.tick_index(now_ns);
        let Some(slot) = self.tables().scopes.get(at.slot) else { return now_ns };
        if slot.tick_due(index) {
            return if self.catch_up(at, slot, now_ns, index) {
                now_ns
            } else {
                self.last_tick_q(slot, now_ns).saturating_mul(QUANTUM_NS)
            };
        }
        match slot.ticks_behind(index) {
            0 => now_ns,
            behind => (index + behind).saturating_mul(self.policy.tick_ns).max(now_ns),
        }
    }

    /// Applies the ticks due, or waits for whoever applies them if the scope is so far behind
    /// that its word cannot be read against `now` before it is re-sealed; false if that wait
    /// outlasted [`table::PATIENCE`] rounds (the applier is gone).
    #[cold]
    fn catch_up(&self, at: Located, slot: &ScopeSlot, now_ns: u64, index: u64) -> bool {
        self.apply_ticks(at, now_ns);
        for _ in 0..table::PATIENCE {
            if slot.ticks_ahead(index) <= self.stale_ticks() || slot.id.load(Ordering::Acquire) != at.id {
                return true;
            }
            crate::sync::spin_hint();
            self.apply_ticks(at, now_ns);
        }
        false
    }

    /// Ticks a scope may fall behind before its word must not be read against `now`: half the
    /// epoch tag's range, less the tick in which the word was last written.
    fn stale_ticks(&self) -> u64 {
        (EPOCH_RANGE_Q / 2).saturating_mul(QUANTUM_NS) / self.policy.tick_ns
    }

    /// The start of the last tick applied to `slot`, in quanta: its word was last written within a
    /// tick of it, so the word's epoch tag reads correctly against it however long ago it was.
    fn last_tick_q(&self, slot: &ScopeSlot, now_ns: u64) -> u64 {
        let index = self.tick_index(now_ns);
        let last = index.saturating_sub(slot.ticks_ahead(index)).saturating_add(slot.ticks_behind(index));
        last.saturating_mul(self.policy.tick_ns) / QUANTUM_NS
    }

    #[cold]
    fn apply_ticks(&self, at: Located, now_ns: u64) {
        let t = self.tables();
        let (Some(slot), Some(adaptation)) = (t.scopes.get(at.slot), t.adaptation.get(at.slot)) else {
            return;
        };
        let index = self.tick_index(now_ns);
        if slot.id.load(Ordering::SeqCst) != at.id {
            return;
        }
        let Some(ticks) = slot.begin_tick(index) else { return };
        // Reclaimed and reused since the caller looked it up: not ours to tick. A claim waits for
        // the tick lock, so under it the id cannot change.
        if slot.id.load(Ordering::SeqCst) != at.id {
            slot.end_tick(None);
            return;
        }
        let since_q = self.last_tick_q(slot, now_ns);
        let loaded =
            t.models.get(at.model).is_some_and(|m| self.policy.shed.holds_growth(m.load(at.variant)));
        let duration_ns = ticks.saturating_mul(self.policy.tick_ns);
        let mut usage = slot.take_usage().into_iter();
        let bounds = self.bounds(Some(at.account));
        let after = adaptation.load().map(|m, s| {
            let period = Period { usage: usage.next().unwrap_or(0), duration_ns, loaded };
            adapt::next(&self.policy.adaptation, s, *bounds.get(m), period)
        });
        self.install(slot, adaptation, &after, since_q, now_ns);
        slot.end_tick(Some(index));
        self.sweep(now_ns, SWEEP_PER_SCOPE_TICK);
    }

    /// `now_ns / tick_ns`, usually without dividing: most calls fall in the tick computed last.
    /// The caller that moves the engine into a new tick sweeps the ledger for expired permits.
    #[inline]
    pub(crate) fn tick_index(&self, now_ns: u64) -> u64 {
        let tick = self.policy.tick_ns;
        let cached = self.tick_cache.load(Ordering::Relaxed);
        if let Some(start) = cached.checked_mul(tick) {
            if now_ns >= start && now_ns - start < tick {
                return cached;
            }
        }
        self.next_tick_index(cached, now_ns)
    }

    /// The tick index outside the cached tick; whoever moves the cache forward sweeps.
    #[cold]
    fn next_tick_index(&self, cached: u64, now_ns: u64) -> u64 {
        let index = now_ns / self.policy.tick_ns;
        if self.tick_cache.compare_exchange(cached, index, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            && index > cached
        {
            self.sweep(now_ns, SWEEP_PER_TICK);
        }
        index
    }

    /// Makes `states` a scope's limits: writes their intervals into the spare buffer and, in the
    /// same compare-exchange, flips the word's version and rescales each bucket so its level in
    /// tokens stays (SPEC §3). The word is re-sealed at `now_ns` even when nothing changed, so
    /// its epoch tag stays readable; it is read against `since_q`, a moment within a tick of its
    /// last write. The caller holds the scope's adaptation lock.
    fn install(
        &self,
        slot: &ScopeSlot,
        adaptation: &ScopeAdaptation,
        states: &PerMetric<MetricState>,
        since_q: u64,
        now_ns: u64,
    ) {
        adaptation.store(states);
        let mut w = slot.bucket.load(Ordering::Acquire);
        let buffer = Word::unpack(w).buffer();
        let old = slot.intervals(buffer);
        let new = scope::intervals_of(states);
        let changed = old != new;
        if changed {
            slot.store_intervals(1 - buffer, new);
        }
        let now_q = now_ns / QUANTUM_NS;
        while !bucket::is_retired(w) {
            let word = Word::unpack(w);
            let debts = bucket::open_near(word, since_q, now_q);
            let mut debt = debts.debt;
            let mut version = word.version;
            if changed {
                for ((d, o), n) in debt.iter_mut().zip(old).zip(new) {
                    *d = bucket::rescale(*d, o, n);
                }
                version = version.wrapping_add(1);
            }
            let next = bucket::seal(debts.now_q, debt, version).pack();
            if next == w {
                return;
            }
            match slot.bucket.compare_exchange(w, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(cur) => w = cur,
            }
        }
    }

    /// Re-clamps every scope of an account to its current bounds, at once (after an operator
    /// changes its tier or overrides). A scope being claimed is waited for; one claimed after the
    /// scan passes its slot reads the new bounds, because the bounds were stored, the slot read
    /// here and the claim made, all sequentially consistent, in that order. A claim or tick lock
    /// that outlasts [`table::PATIENCE`] rounds belongs to a dead process: that slot is skipped.
    pub(crate) fn reclamp_account(&self, account: usize, now_ns: u64) {
        let t = self.tables();
        let bounds = self.bounds(Some(account));
        for (i, (slot, adaptation)) in t.scopes.iter().zip(t.adaptation).enumerate() {
            for _ in 0..table::PATIENCE {
                let id = slot.id.load(Ordering::SeqCst);
                if scope::account_of(id) != account || !(table::is_ready(id) || table::is_claiming(id)) {
                    break;
                }
                if table::is_claiming(id) {
                    crate::sync::spin_hint();
                    continue;
                }
                // Bring it up to date first, so its word was written within a tick of the last.
                let now_ns = self.tick(Located::of_id(i, id), now_ns);
                if !slot.begin_exclusive() {
                    break;
                }
                if slot.id.load(Ordering::SeqCst) == id {
                    let states = adaptation.load().map(|m, s| {
                        let b = bounds.get(m);
                        // A plain limiter's limit is its floor, from the moment it changes.
                        let limit = match self.policy.adaptation {
                            crate::policy::Adaptation::Fixed => b.floor,
                            _ => s.limit.clamp(b.floor, b.ceiling),
                        };
                        MetricState { limit, ..s }
                    });
                    self.install(slot, adaptation, &states, self.last_tick_q(slot, now_ns), now_ns);
                }
                slot.end_tick(None);
                break;
            }
        }
    }

    /// The current limits and levels of a scope, without creating it (an unknown scope reports
    /// its floors and full buckets).
    pub fn limits(&self, key: ScopeKey<'_>, now_ns: u64) -> Result<Levels, Error> {
        let Some(at) = self.locate(key, now_ns, false)? else {
            let account = self.account_index(key.account)?;
            let (_, interval) = self.fresh(&self.bounds(account));
            return Ok(Levels { debt_q: [0; 4], interval });
        };
        let now_ns = self.tick(at, now_ns);
        let slot = self.tables().scopes.get(at.slot).ok_or(Error::TableFull(Table::Scopes))?;
        let word = Word::unpack(slot.bucket.load(Ordering::Acquire));
        let interval = slot.intervals(word.buffer());
        Ok(Levels { debt_q: bucket::open(word, now_ns / QUANTUM_NS).debt, interval })
    }

    /// Sets a model variant's load signal, in ‰ of capacity (SPEC §6), e.g. from queue depth or
    /// KV-cache use. Requests are shed by class as it crosses the policy's thresholds.
    pub fn set_load(&self, model: &[u8], variant: Variant, load: LoadPermille) -> Result<(), Error> {
        self.with_model(model, |m| m.report(variant, load))
    }

    /// Lets the engine derive a variant's load from its outstanding permits: load = in-flight ×
    /// 1000 / `in_flight_capacity` (0 turns it off). Costs a shared counter per admit and settle.
    pub fn set_model_capacity(
        &self,
        model: &[u8],
        variant: Variant,
        in_flight_capacity: u32,
    ) -> Result<(), Error> {
        self.with_model(model, |m| m.set_capacity(variant, in_flight_capacity))
    }

    /// A model variant's current load, ‰.
    pub fn load(&self, model: &[u8], variant: Variant) -> Result<LoadPermille, Error> {
        self.with_model(model, |m| m.load(variant))
    }
}

/// The metric whose cost is largest, exactly: quanta saturate at `u64::MAX` for absurd token
/// counts, which would make every huge metric tie. Earliest in [`Metric::ALL`] on a real tie.
#[cold]
fn largest_cost(costs: PerMetric<u64>, interval: [u64; 4]) -> Metric {
    let exact = costs.0.iter().zip(interval).map(|(c, t)| u128::from(*c) * u128::from(t));
    let (largest, _) = Metric::ALL
        .into_iter()
        .zip(exact)
        .fold((Metric::Requests, 0), |best, (m, q)| if q > best.1 { (m, q) } else { best });
    largest
}

impl Metric {
    /// Whether this metric binding a 429 makes it `dynamic_request_limited` (else token limited).
    pub const fn is_request_limited(self) -> bool {
        matches!(self, Metric::Requests)
    }
}

#[cfg(test)]
mod tests {
    use super::Attempt;
    use crate::{Capacity, Completion, Engine, Metric, Policy, Request, ScopeKey, Usage};

    const MINUTE: u64 = 60_000_000_000;

    /// An admission that resolved its scope just before the slot was reclaimed for another key
    /// must resolve again, never charge the new scope: deterministic stand-in for the race.
    #[test]
    fn a_stale_lookup_never_charges_the_scope_that_took_its_slot() {
        let capacity = Capacity { scopes: 1, accounts: 4, models: 1, permits: 8 };
        let e = Engine::new(Policy::fixed(), capacity).unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (ScopeKey::new(b"a", b"m"), ScopeKey::new(b"b", b"m"));
        let d = e.admit(a, &Request::new(0), 0).unwrap_or_else(|e| panic!("{e}"));
        let p = *d.permit().unwrap_or_else(|| panic!("{d:?}"));
        e.settle(&p, &Usage::new(0, 0), Completion::Success, 0).unwrap_or_else(|e| panic!("{e}"));
        let stale = e.locate(a, 0, false).ok().flatten().unwrap_or_else(|| panic!("a has a scope"));
        // Minutes later "a" is idle and "b" takes the only slot.
        assert!(e.admit(b, &Request::new(0), 5 * MINUTE).unwrap_or_else(|e| panic!("{e}")).admitted());
        let costs = Request::new(0).costs().unwrap_or_else(|e| panic!("{e:?}"));
        let attempt = e
            .admit_at(stale, costs, crate::ServiceTier::Default, 5 * MINUTE, &e.own_buckets())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(attempt, Attempt::Moved));
        let levels = e.limits(b, 5 * MINUTE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(levels.remaining(Metric::Requests), 59, "only b's own request is charged");
        // Nor is a lease asked for it: the lease would charge the scope the slot holds now.
        let lease = Takes(core::cell::Cell::new(0));
        let leased = |slot: &crate::scope::ScopeSlot, at, costs, tier, load, now| {
            e.charge_lease(&lease, a, slot, at, costs, tier, load, now)
        };
        let attempt = e
            .admit_at(stale, costs, crate::ServiceTier::Default, 5 * MINUTE, &leased)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(attempt, Attempt::Moved));
        assert_eq!(lease.0.get(), 0);
    }

    /// A lease that counts what it is asked for and grants everything.
    struct Takes(core::cell::Cell<u32>);

    impl crate::lease::Lease for Takes {
        fn take(
            &self,
            _: crate::lease::LeasedScope,
            _: ScopeKey<'_>,
            _: crate::PerMetric<u64>,
            _: u64,
        ) -> (crate::lease::Grant, crate::Levels) {
            self.0.set(self.0.get() + 1);
            (crate::lease::Grant::Taken(crate::Band::Normal), crate::Levels::default())
        }
        fn adjust(&self, _: crate::lease::LeasedScope, _: [i128; 4], _: u64) {}
    }

    /// While another holds a scope's tick lock, its word is read against now as long as its
    /// epoch tag still reads correctly (a few ticks behind), and at its last tick once it is too
    /// far behind (a day): never against a misread epoch, never after an endless wait.
    #[test]
    fn a_scope_behind_a_held_tick_lock_is_read_against_now_only_while_it_can_be() {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        let key = ScopeKey::new(b"a", b"m");
        assert!(e.admit(key, &Request::new(0), 0).is_ok_and(|d| d.admitted()));
        let at = e.locate(key, 0, false).ok().flatten().unwrap_or_else(|| panic!("a has a scope"));
        assert!(e.tables().scopes.get(at.slot).unwrap_or_else(|| panic!("slot")).begin_exclusive());
        let tick = e.policy.tick_ns;
        let soon = 3 * tick + 7;
        assert_eq!(e.tick(at, soon), soon, "three ticks behind: read against now");
        let day = 24 * 60 * MINUTE;
        let read = e.tick(at, day);
        assert!(read < tick, "a day behind: read at its last tick (0), not at {read}");
    }

    /// A process of a shared region killed while applying a scope's tick leaves its tick lock
    /// held. A day later the scope is too far behind to be read against now: calls neither wait
    /// forever for a tick nobody applies nor read the word against a misread epoch; they read
    /// it at its last tick. Its burst was spent then, so it admits nothing more.
    #[test]
    fn a_scope_whose_tick_lock_was_abandoned_is_read_at_its_last_tick() {
        let e = std::sync::Arc::new(
            Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}")),
        );
        let key = ScopeKey::new(b"a", b"m");
        let spent =
            (0..100).filter(|_| e.admit(key, &Request::new(0), 0).is_ok_and(|d| d.admitted())).count();
        assert_eq!(spent, 60);
        let at = e.locate(key, 0, false).ok().flatten().unwrap_or_else(|| panic!("a has a scope"));
        assert!(e.tables().scopes.get(at.slot).unwrap_or_else(|| panic!("slot")).begin_exclusive());
        let (done, result) = std::sync::mpsc::channel();
        let engine = std::sync::Arc::clone(&e);
        std::thread::spawn(move || {
            let day = 24 * 60 * MINUTE;
            let admitted = (0..100)
                .filter(|_| engine.admit(key, &Request::new(0), day).is_ok_and(|d| d.admitted()))
                .count();
            done.send(admitted)
        });
        let admitted = result.recv_timeout(std::time::Duration::from_secs(60));
        assert_eq!(admitted, Ok(0), "read at its last tick, nothing has refilled");
    }
}
