//! Permits: what `admit` hands out and `settle` takes back, and the ledger that makes a second
//! settle of the same (copied) permit a typed error.

use crate::bucket::Band;
use crate::key::Variant;
use crate::sync::{AtomicU64, Ordering};

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
    pub(crate) priority: bool,
    pub(crate) band: Band,
    pub(crate) wait_ns: u64,
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

    /// Whether the request was sent on the priority tier.
    pub fn priority(&self) -> bool {
        self.priority
    }

    /// The model variant the permit is for.
    pub fn variant(&self) -> Variant {
        self.variant
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

impl Permit {
    /// The permit as plain integers.
    pub fn to_raw(&self) -> RawPermit {
        let flag = |on: bool, bit: u64| if on { bit } else { 0 };
        let flags = flag(self.variant == Variant::Fast, FAST)
            | flag(self.tracked, TRACKED)
            | flag(self.priority, PRIORITY)
            | flag(self.band == Band::OverLimit, OVER_LIMIT);
        let r = self.reserved;
        RawPermit {
            words: [
                u64::from(self.slot) | (u64::from(self.entry) << 32),
                self.scope_id,
                u64::from(self.model) | (u64::from(self.ticket) << 32),
                u64::from(self.incarnation) | (flags << 32),
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
        let flags = c >> 32;
        if flags & !(FAST | TRACKED | PRIORITY | OVER_LIMIT) != 0 {
            return None;
        }
        Some(Permit {
            slot: a as u32,
            scope_id,
            model: b as u32,
            variant: if flags & FAST != 0 { Variant::Fast } else { Variant::Regular },
            entry: (a >> 32) as u32,
            ticket: (b >> 32) as u32,
            incarnation: c as u32,
            tracked: flags & TRACKED != 0,
            priority: flags & PRIORITY != 0,
            band: if flags & OVER_LIMIT != 0 { Band::OverLimit } else { Band::Normal },
            wait_ns,
            reserved: Reservation { requests, prompt_tokens, uncached_prompt_tokens, generated_tokens },
        })
    }
}

// Ledger entry: bit 0 live, bits 1..33 ticket (bumped per use), bits 33..64 tokens charged so
// far by a stream beyond nothing (31 bits).
const LIVE: u64 = 1;
const TICKET_SHIFT: u32 = 1;
const CHARGED_SHIFT: u32 = 33;
/// Most generated tokens a stream may charge before it settles.
pub(crate) const CHARGED_MAX: u64 = (1 << 31) - 1;

/// One entry of the permit ledger.
#[derive(Debug)]
pub struct PermitSlot(AtomicU64);

impl Default for PermitSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl PermitSlot {
    /// A free entry.
    pub fn new() -> Self {
        PermitSlot(AtomicU64::new(0))
    }

    /// Frees the entry (restore, which has the engine to itself).
    pub(crate) fn clear(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// Takes the entry if free; returns the ticket a permit must present.
    pub(crate) fn take(&self) -> Option<u32> {
        let cur = self.0.load(Ordering::Relaxed);
        if cur & LIVE != 0 {
            return None;
        }
        let ticket = ((cur >> TICKET_SHIFT) as u32).wrapping_add(1);
        let live = LIVE | (u64::from(ticket) << TICKET_SHIFT);
        self.0.compare_exchange(cur, live, Ordering::AcqRel, Ordering::Relaxed).ok().map(|_| ticket)
    }

    /// Frees the entry if it is live under `ticket`; returns the tokens it had charged.
    pub(crate) fn give_back(&self, ticket: u32) -> Option<u64> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            if cur & LIVE == 0 || (cur >> TICKET_SHIFT) as u32 != ticket {
                return None;
            }
            let free = u64::from(ticket) << TICKET_SHIFT;
            match self.0.compare_exchange(cur, free, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(cur >> CHARGED_SHIFT),
                Err(now) => cur = now,
            }
        }
    }

    /// Adds `tokens` to the live entry's stream charge; returns (before, after).
    pub(crate) fn add_charge(&self, ticket: u32, tokens: u64) -> Result<(u64, u64), ChargeRefused> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            if cur & LIVE == 0 || (cur >> TICKET_SHIFT) as u32 != ticket {
                return Err(ChargeRefused::NotLive);
            }
            let before = cur >> CHARGED_SHIFT;
            let after =
                before.checked_add(tokens).filter(|a| *a <= CHARGED_MAX).ok_or(ChargeRefused::TooLarge)?;
            let new = (cur & ((1 << CHARGED_SHIFT) - 1)) | (after << CHARGED_SHIFT);
            match self.0.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok((before, after)),
                Err(now) => cur = now,
            }
        }
    }
}

/// Why a stream charge was refused.
pub(crate) enum ChargeRefused {
    NotLive,
    TooLarge,
}
