//! Permits: what `admit` hands out and `settle` takes back, and the ledger that makes a second
//! settle of the same (copied) permit a typed error.

use crate::bucket::Band;
use crate::key::Variant;
use crate::service_tier::ServiceTier;
use crate::sync::{AtomicU64, AtomicU128, Ordering};

/// Amounts charged at admission, in requests and tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Reservation {
    /// Requests (`n`).
    pub requests: u64,
    /// Prompt tokens, cached and uncached.
    pub prompt_tokens: u64,
    /// Prompt tokens expected to miss the cache.
    pub uncached_prompt_tokens: u64,
    /// Generated tokens reserved: `n × min(max_tokens, estimate)`.
    pub generated_tokens: u64,
}

/// Proof of admission: settle it exactly once with the actual usage.
///
/// A permit is a small `Copy` value (no allocation, nothing to free); copies are detected: only
/// the first settle of a permit takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Permit {
    pub(crate) slot: u32,
    pub(crate) scope_id: u64,
    pub(crate) model: u32,
    pub(crate) variant: Variant,
    pub(crate) entry: u32,
    pub(crate) ticket: u32,
    pub(crate) incarnation: u32,
    pub(crate) tracked: bool,
    pub(crate) service_tier: ServiceTier,
    pub(crate) band: Band,
    pub(crate) wait_ns: u64,
    /// The caller's clock second after which the permit has expired (SPEC §7).
    pub(crate) deadline_s: u32,
    pub(crate) reserved: Reservation,
}

impl Permit {
    /// What admission charged.
    pub fn reserved(&self) -> Reservation {
        self.reserved
    }

    /// Whether the request runs at lower priority (`x-ratelimit-over-limit: yes`).
    pub fn over_limit(&self) -> bool {
        self.band == Band::OverLimit
    }

    /// The band the request was admitted in.
    pub fn band(&self) -> Band {
        self.band
    }

    /// How long the gateway should delay forwarding the request (smoothing), ns.
    pub fn wait_ns(&self) -> u64 {
        self.wait_ns
    }

    /// The service tier the request was served at: asked for, capped by its account's grant.
    pub fn service_tier(&self) -> ServiceTier {
        self.service_tier
    }

    /// The model variant the permit is for.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The caller's clock (ns) after which the permit has expired: settling it then is
    /// [`crate::SettleError::Expired`], and whatever it held is released (SPEC §7).
    pub fn expires_at_ns(&self) -> u64 {
        u64::from(self.deadline_s).saturating_mul(NS_PER_S)
    }

    pub(crate) fn expired(&self, now_ns: u64) -> bool {
        past(self.deadline_s, now_ns)
    }

    /// A checksum of the fields nothing else verifies (the reservation, flags, wait, deadline
    /// and model; slot, scope, entry, ticket and incarnation are checked against the tables),
    /// kept in the ledger entry: a permit damaged on its way through C or Python settles as
    /// stale instead of refunding the wrong amounts. Distinct rotations make any one damaged bit
    /// change the fold; the multiply spreads it over the 32 bits kept.
    pub(crate) fn checksum(&self, seed: u64) -> u32 {
        // Another mixing operator only mixes worse: an equivalent mutant (.cargo/mutants.toml).
        let r = self.reserved;
        let raw = self.to_raw().words;
        let fields = [
            r.requests,
            r.prompt_tokens,
            r.uncached_prompt_tokens,
            r.generated_tokens,
            raw[2] >> 32,
            raw[3] >> 32,
            self.wait_ns,
        ];
        let folded =
            fields.iter().zip([0u32, 9, 19, 29, 37, 47, 57]).fold(seed, |h, (f, k)| h ^ f.rotate_left(k));
        let mixed = folded.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (mixed >> 32) as u32 ^ mixed as u32
    }

    /// Who to release if this permit expires unsettled: its scope slot, model and variant, and
    /// whether it counts toward the model's tracked load.
    pub(crate) fn owner(&self, money: u64) -> Owner {
        Owner {
            slot: self.slot as usize,
            model: self.model as usize,
            variant: self.variant,
            tracked: self.tracked,
            service_tier: self.service_tier,
            money,
        }
    }
}

const NS_PER_S: u64 = 1_000_000_000;

/// Whether `now_ns` is past the deadline second. A clock beyond 2^32 s (136 years) saturates the
/// deadline, and a saturated deadline never passes.
fn past(deadline_s: u32, now_ns: u64) -> bool {
    deadline_s != u32::MAX && now_ns > u64::from(deadline_s) * NS_PER_S
}

/// The caller's clock second after which a permit issued at `now_ns` with `ttl_ns` expires.
pub(crate) fn deadline_s(now_ns: u64, ttl_ns: u64) -> u32 {
    u32::try_from(now_ns.saturating_add(ttl_ns).div_ceil(NS_PER_S)).unwrap_or(u32::MAX)
}

/// What an outstanding permit holds besides its tokens: its scope's in-flight count, its
/// model's tracked load, and the money reserved against its account's spend limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) slot: usize,
    pub(crate) model: usize,
    pub(crate) variant: Variant,
    pub(crate) tracked: bool,
    pub(crate) service_tier: ServiceTier,
    /// Nano-dollars reserved at admission (not packed: kept in the entry's own word).
    pub(crate) money: u64,
}

impl Owner {
    fn pack(self) -> u64 {
        // Disjoint bit fields: `^` for `|` is the same, an equivalent mutant (.cargo/mutants.toml).
        let tier = match self.service_tier {
            ServiceTier::Default => 0,
            ServiceTier::Priority => 1,
            ServiceTier::Flex => 2,
        };
        let flags = u64::from(self.variant == Variant::Fast) | (u64::from(self.tracked) << 1) | (tier << 2);
        (self.slot as u64 & 0xFFFF_FFFF) | ((self.model as u64 & 0xFFFF) << 32) | (flags << 48)
    }

    fn unpack(w: u64, money: u64) -> Self {
        let flags = w >> 48;
        Owner {
            slot: (w & 0xFFFF_FFFF) as usize,
            model: ((w >> 32) & 0xFFFF) as usize,
            variant: if flags & 1 != 0 { Variant::Fast } else { Variant::Regular },
            tracked: flags & 2 != 0,
            service_tier: match (flags >> 2) & 3 {
                1 => ServiceTier::Priority,
                2 => ServiceTier::Flex,
                _ => ServiceTier::Default,
            },
            money,
        }
    }
}

/// A permit as plain integers, for bindings that must hand it through C or Python. Any value
/// converts back safely: a forged or damaged one is refused at settle as stale or settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct RawPermit {
    /// The permit's fields, in an order private to this crate.
    pub words: [u64; 9],
}

const FAST: u64 = 1;
const TRACKED: u64 = 2;
const PRIORITY: u64 = 4;
const OVER_LIMIT: u64 = 8;
const FLEX: u64 = 16;

impl Permit {
    /// The permit as plain integers.
    pub fn to_raw(&self) -> RawPermit {
        let flag = |on: bool, bit: u64| if on { bit } else { 0 };
        let flags = flag(self.variant == Variant::Fast, FAST)
            | flag(self.tracked, TRACKED)
            | flag(self.service_tier == ServiceTier::Priority, PRIORITY)
            | flag(self.service_tier == ServiceTier::Flex, FLEX)
            | flag(self.band == Band::OverLimit, OVER_LIMIT);
        let r = self.reserved;
        RawPermit {
            words: [
                u64::from(self.slot) | (u64::from(self.entry) << 32),
                self.scope_id,
                u64::from(self.ticket) | (u64::from(self.deadline_s) << 32),
                u64::from(self.incarnation) | ((u64::from(self.model) & 0xFFFF) << 32) | (flags << 48),
                self.wait_ns,
                r.requests,
                r.prompt_tokens,
                r.uncached_prompt_tokens,
                r.generated_tokens,
            ],
        }
    }

    /// A permit from plain integers; `None` if the flags are not ones [`Permit::to_raw`] writes.
    pub fn from_raw(raw: &RawPermit) -> Option<Permit> {
        let [a, scope_id, b, c, wait_ns, requests, prompt_tokens, uncached_prompt_tokens, generated_tokens] =
            raw.words;
        let flags = c >> 48;
        if flags & !(FAST | TRACKED | PRIORITY | OVER_LIMIT | FLEX) != 0 {
            return None;
        }
        let service_tier = match (flags & PRIORITY != 0, flags & FLEX != 0) {
            (false, false) => ServiceTier::Default,
            (true, false) => ServiceTier::Priority,
            (false, true) => ServiceTier::Flex,
            (true, true) => return None,
        };
        Some(Permit {
            slot: a as u32,
            scope_id,
            model: ((c >> 32) & 0xFFFF) as u32,
            variant: if flags & FAST != 0 { Variant::Fast } else { Variant::Regular },
            entry: (a >> 32) as u32,
            ticket: b as u32,
            incarnation: c as u32,
            tracked: flags & TRACKED != 0,
            service_tier,
            band: if flags & OVER_LIMIT != 0 { Band::OverLimit } else { Band::Normal },
            wait_ns,
            deadline_s: (b >> 32) as u32,
            reserved: Reservation { requests, prompt_tokens, uncached_prompt_tokens, generated_tokens },
        })
    }
}

// Ledger entry, low 64 bits: bit 0 live, bits 1..33 ticket (bumped per use), bits 33..64 the
// generated tokens a stream has charged (31 bits).
// High 64 bits: the deadline (caller's clock second; 0 while the admitter is still filling the
// entry in) and a checksum of the permit.
const LIVE: u128 = 1;
const TICKET_SHIFT: u32 = 1;
const CHARGED_SHIFT: u32 = 33;
const DEADLINE_SHIFT: u32 = 64;
const CHECKSUM_SHIFT: u32 = 96;
/// Most generated tokens a stream may charge before it settles.
pub(crate) const CHARGED_MAX: u64 = (1 << 31) - 1;

/// One entry of the permit ledger.
#[derive(Debug)]
pub struct PermitSlot {
    state: AtomicU128,
    /// The holder's scope slot, model and variant, written before the entry is published.
    owner: AtomicU64,
    /// The money the holder reserved, written with `owner`.
    money: AtomicU64,
    /// The ticket of the last permit this entry expired (+ 2^32 so that 0 means none): a late
    /// settle learns "expired", not "settled", even after the entry is reused.
    last_expired: AtomicU64,
}

impl Default for PermitSlot {
    fn default() -> Self {
        Self::new()
    }
}

/// A ledger entry's state, unpacked.
#[derive(Clone, Copy)]
struct Entry(u128);

impl Entry {
    fn live(self) -> bool {
        self.0 & LIVE != 0
    }

    fn ticket(self) -> u32 {
        (self.0 >> TICKET_SHIFT) as u32
    }

    fn charged(self) -> u64 {
        (self.0 >> CHARGED_SHIFT) as u64 & CHARGED_MAX
    }

    fn deadline_s(self) -> u32 {
        (self.0 >> DEADLINE_SHIFT) as u32
    }

    fn checksum(self) -> u32 {
        (self.0 >> CHECKSUM_SHIFT) as u32
    }

    /// Published, and past its deadline at `now_ns`.
    fn expired(self, now_ns: u64) -> bool {
        let deadline = self.deadline_s();
        deadline != 0 && past(deadline, now_ns)
    }

    /// The free state this entry leaves behind (the ticket stays, so copies are still refused).
    fn freed(self) -> u128 {
        u128::from(self.ticket()) << TICKET_SHIFT
    }
}

fn expired_mark(ticket: u32) -> u64 {
    u64::from(ticket) | (1 << 32)
}

/// Why a ledger entry refused a settle or a stream charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Settled already (or the entry was reused since).
    Settled,
    /// Expired; `Some` when this call expired it, and so must release what it held.
    Expired(Option<Owner>),
    /// The permit does not match its entry: damaged or forged.
    Damaged,
    /// A stream charged more than an entry counts.
    TooLarge,
}

impl PermitSlot {
    /// A free entry.
    pub fn new() -> Self {
        PermitSlot {
            state: AtomicU128::new(0),
            owner: AtomicU64::new(0),
            money: AtomicU64::new(0),
            last_expired: AtomicU64::new(0),
        }
    }

    /// Frees the entry (restore, which has the engine to itself).
    pub(crate) fn clear(&self) {
        self.state.store(0, Ordering::Relaxed);
        self.owner.store(0, Ordering::Relaxed);
        self.money.store(0, Ordering::Relaxed);
        self.last_expired.store(0, Ordering::Relaxed);
    }

    /// Takes the entry if free; returns the ticket a permit must present. The entry stays
    /// unpublished (it never expires) until [`PermitSlot::publish`].
    pub(crate) fn take(&self) -> Option<u32> {
        let cur = Entry(self.state.load(Ordering::Relaxed));
        if cur.live() {
            return None;
        }
        let ticket = cur.ticket().wrapping_add(1);
        let live = LIVE | (u128::from(ticket) << TICKET_SHIFT);
        self.state.compare_exchange(cur.0, live, Ordering::AcqRel, Ordering::Relaxed).ok().map(|_| ticket)
    }

    /// Completes a taken entry for `permit`: who holds it, the money it reserved, its deadline
    /// and its checksum.
    pub(crate) fn publish(&self, permit: &Permit, checksum: u32, money: u64) {
        self.owner.store(permit.owner(money).pack(), Ordering::Relaxed);
        self.money.store(money, Ordering::Relaxed);
        let state = LIVE
            | (u128::from(permit.ticket) << TICKET_SHIFT)
            | (u128::from(permit.deadline_s.max(1)) << DEADLINE_SHIFT)
            | (u128::from(checksum) << CHECKSUM_SHIFT);
        // Nobody else writes a live, unpublished entry: no settle has the permit yet, and
        // expiry skips it.
        self.state.store(state, Ordering::Release);
    }

    /// Hands a taken, unpublished entry back (the admission it was taken for was refused).
    pub(crate) fn give_back_unused(&self, ticket: u32) {
        let cur = Entry(self.state.load(Ordering::Acquire));
        if cur.live() && cur.ticket() == ticket && cur.deadline_s() == 0 {
            let _ = self.state.compare_exchange(cur.0, cur.freed(), Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// Checks a live entry against a permit's ticket and checksum, at `now_ns`.
    fn check(&self, cur: Entry, ticket: u32, checksum: u32, now_ns: u64) -> Result<(), Refusal> {
        if !cur.live() || cur.ticket() != ticket {
            let expired = self.last_expired.load(Ordering::Acquire) == expired_mark(ticket);
            return Err(if expired { Refusal::Expired(None) } else { Refusal::Settled });
        }
        if cur.checksum() != checksum {
            return Err(Refusal::Damaged);
        }
        if cur.expired(now_ns) {
            return Err(Refusal::Expired(self.expire(now_ns)));
        }
        Ok(())
    }

    /// Frees the entry for its permit's settle; returns the tokens a stream had charged and the
    /// money the permit reserved.
    pub(crate) fn settle(&self, ticket: u32, checksum: u32, now_ns: u64) -> Result<(u64, u64), Refusal> {
        let mut cur = Entry(self.state.load(Ordering::Acquire));
        loop {
            self.check(cur, ticket, checksum, now_ns)?;
            // Read while the entry is still this permit's: once freed, a taker may overwrite it.
            let money = self.money.load(Ordering::Acquire);
            match self.state.compare_exchange(cur.0, cur.freed(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok((cur.charged(), money)),
                Err(now) => cur = Entry(now),
            }
        }
    }

    /// Adds `tokens` to the live entry's stream charge; returns (before, after).
    pub(crate) fn add_charge(
        &self,
        ticket: u32,
        checksum: u32,
        tokens: u64,
        now_ns: u64,
    ) -> Result<(u64, u64), Refusal> {
        let mut cur = Entry(self.state.load(Ordering::Acquire));
        loop {
            self.check(cur, ticket, checksum, now_ns)?;
            let before = cur.charged();
            let after = before.checked_add(tokens).filter(|a| *a <= CHARGED_MAX).ok_or(Refusal::TooLarge)?;
            let keep = !(u128::from(CHARGED_MAX) << CHARGED_SHIFT);
            let new = (cur.0 & keep) | (u128::from(after) << CHARGED_SHIFT);
            match self.state.compare_exchange(cur.0, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok((before, after)),
                Err(now) => cur = Entry(now),
            }
        }
    }

    /// For a repair with the tables to itself: frees an entry taken but never published (its
    /// admitter died), and returns what a published, live one holds.
    pub(crate) fn recover(&self) -> Option<Owner> {
        let cur = Entry(self.state.load(Ordering::Acquire));
        if !cur.live() {
            return None;
        }
        if cur.deadline_s() == 0 {
            self.state.store(cur.freed(), Ordering::Release);
            return None;
        }
        Some(Owner::unpack(self.owner.load(Ordering::Acquire), self.money.load(Ordering::Acquire)))
    }

    /// Expires the entry if it is live and past its deadline at `now_ns`; returns what its
    /// permit held, which the caller must release. Exactly one of this and a settle wins.
    pub(crate) fn expire(&self, now_ns: u64) -> Option<Owner> {
        let mut cur = Entry(self.state.load(Ordering::Acquire));
        while cur.live() && cur.expired(now_ns) {
            // Read before the entry is freed: a taker may overwrite it right after. The mark is
            // set first, so whoever sees the entry freed or reused sees it too.
            let owner = Owner::unpack(self.owner.load(Ordering::Acquire), self.money.load(Ordering::Acquire));
            let before = self.last_expired.swap(expired_mark(cur.ticket()), Ordering::AcqRel);
            match self.state.compare_exchange(cur.0, cur.freed(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(owner),
                Err(now) => {
                    self.last_expired.store(before, Ordering::Release);
                    cur = Entry(now);
                }
            }
        }
        None
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{Entry, PermitSlot, Refusal, TICKET_SHIFT};
    use crate::sync::{AtomicU128, Ordering};
    use crate::{Capacity, Engine, Permit, Policy, Request, ScopeKey};

    fn a_permit() -> Permit {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(8)).unwrap_or_else(|e| panic!("{e}"));
        let d = e.admit(ScopeKey::new(b"a", b"m"), &Request::new(1), 0).unwrap_or_else(|e| panic!("{e}"));
        *d.permit().unwrap_or_else(|| panic!("{d:?}"))
    }

    /// A refused admission hands back only the entry it took: not another ticket's, and not one
    /// already published for a permit.
    #[test]
    fn an_entry_is_given_back_only_by_its_own_unpublished_take() {
        let slot = PermitSlot::new();
        let taken = slot.take().unwrap_or_else(|| panic!("a free entry"));
        slot.give_back_unused(taken.wrapping_add(1));
        assert_eq!(slot.take(), None, "another ticket's give-back leaves the entry taken");
        slot.give_back_unused(taken);
        let ticket = slot.take().unwrap_or_else(|| panic!("given back"));
        assert_eq!(ticket, taken.wrapping_add(1));
        let permit = Permit { ticket, deadline_s: 100, ..a_permit() };
        slot.publish(&permit, 7, 0);
        slot.give_back_unused(ticket);
        assert_eq!(slot.take(), None, "a published entry is not given back");
        assert_eq!(slot.settle(ticket, 7, 0), Ok((0, 0)));
    }

    /// An entry whose ticket wrapped to 0 and never expired a permit says a second settle is a
    /// second settle, not an expiry: "none expired" is not the mark of ticket 0.
    #[test]
    fn a_wrapped_ticket_settled_twice_is_settled_not_expired() {
        let slot =
            PermitSlot { state: AtomicU128::new(u128::from(u32::MAX) << TICKET_SHIFT), ..PermitSlot::new() };
        assert!(!Entry(slot.state.load(Ordering::Relaxed)).live());
        let ticket = slot.take().unwrap_or_else(|| panic!("a free entry"));
        assert_eq!(ticket, 0);
        slot.give_back_unused(ticket);
        assert_eq!(slot.settle(ticket, 0, 0), Err(Refusal::Settled));
    }
}
