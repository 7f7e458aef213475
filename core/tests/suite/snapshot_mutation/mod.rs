//! Structure-aware snapshot corruption (issue 20, "Fuzzing past the checksum"), shared by the
//! stable proptest in `core/tests/suite/snapshot.rs` and the `restore` fuzz target, which includes this
//! file by path.
//!
//! A [`Case`] builds a small engine from a few operations, snapshots it, mutates *fields* of the
//! layout documented in `docs/snapshot.md` (a record and a field offset, set to an interesting
//! value; records swapped, duplicated or removed; counts changed), and re-seals the CRC, so the
//! bytes reach the validator behind the checksum. [`check`] restores them into an engine with the
//! same capacities, which must either refuse with a `SnapshotError` and stay byte-for-byte
//! unchanged, or accept and keep its invariants: admits and settles on the restored and on new
//! keys never panic, remaining ≤ limit, a permit settles at most once, admissions at one instant
//! stay within the hard band, what was accepted snapshots back as it was, and snapshots of the
//! restored engine — right away and after time passes — restore again.
//!
//! Failures are panics (`assert!`), which proptest shrinks and libFuzzer reports as crashes.

use sluicegate_core::bucket::{self, EPOCH_Q, LINEAR_END, OFFSET_MAX};
use sluicegate_core::snapshot::{ACCOUNT_RECORD, MODEL_RECORD, SCOPE_RECORD};
use sluicegate_core::{
    Capacity, Completion, Decision, Engine, Heap, Levels, Metric, MetricLimits, Outcome, Permit, Policy,
    Price, Quota, Request, ScopeKey, ServiceTier, SettleError, SpendRejection, Suspension, Tier, Usage,
    Variant,
};

/// Nanoseconds per second.
pub const SECOND: u64 = 1_000_000_000;
/// Where the building engine's clock starts.
pub const START: u64 = 1_000 * SECOND;
/// Account keys the operations use (the last is as long as a key may be).
pub const ACCOUNTS: [&[u8]; 5] = [
    b"a",
    b"acct-1",
    b"acct-2",
    b"team/3",
    b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
];
/// Model keys the operations use (the last is as long as a key may be).
pub const MODELS: [&[u8]; 3] = [
    b"m",
    b"llama-v3p1-70b",
    b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
      0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
];
/// Clock jumps an [`Op::Advance`] or the check's "later" picks from (1 µs to 3 days).
pub const JUMPS: [u64; 8] = [
    1_000,
    SECOND,
    59 * SECOND,
    61 * SECOND,
    600 * SECOND,
    3_600 * SECOND,
    20 * 3_600 * SECOND,
    72 * 3_600 * SECOND,
];
/// Clocks the restoring engine reads (`None`: the snapshot's own `now`).
pub const RESTORE_AT: [Option<u64>; 4] =
    [None, Some(0), Some(987_654 * SECOND), Some(40 * 365 * 24 * 3_600 * SECOND)];

const HEADER: usize = 56;

/// One operation on the engine a snapshot is taken of. Indices pick keys modulo their lists.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Admits a request; an admitted permit is kept for later settles and charges.
    Admit { account: u8, model: u8, fast: bool, prompt: u64, max_tokens: u64, n: u64, tier: u8 },
    /// Settles a kept permit (modulo their number) and forgets it.
    Settle { permit: u8, prompt: u64, generated: u64, completion: u8 },
    /// Charges streamed tokens to a kept permit.
    Charge { permit: u8, tokens: u64 },
    /// Adds prepaid credits (µ$).
    Credits { account: u8, micros: u64 },
    /// Sets the user's spend limit (µ$).
    SpendLimit { account: u8, micros: u64 },
    /// Sets (or with `None` removes) an override of a metric's floor and ceiling.
    Override { account: u8, metric: u8, limits: Option<(f64, f64)> },
    /// Pins a tier (index into `Tier::ALL`), or un-pins it.
    SetTier { account: u8, tier: Option<u8> },
    /// Acquires (or releases) quota units, or raises a quota's limit.
    Quota { account: u8, quota: u8, n: u32, kind: u8 },
    /// Sets a model variant's reported load (‰).
    Load { model: u8, fast: bool, permille: u32 },
    /// Sets a model variant's prices (µ$ per million tokens, all three kinds).
    Price { model: u8, fast: bool, micros: u64 },
    /// Sets a model variant's in-flight capacity.
    ModelCapacity { model: u8, fast: bool, capacity: u32 },
    /// Suspends an account or lifts a suspension.
    Suspend { account: u8, payment_failed: bool, on: bool },
    /// Records whether a payment method is on file.
    PaymentMethod { account: u8, on: bool },
    /// Grants a service tier (index into `ServiceTier::ALL`).
    Grant { account: u8, tier: u8 },
    /// Starts a new billing period.
    BillingPeriod,
    /// Moves the clock forward by `JUMPS[jump]`, plus `extra` ns.
    Advance { jump: u8, extra: u32 },
}

/// A part of the snapshot: the header or one of the three record sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The 56-byte header.
    Header,
    /// Account records.
    Accounts,
    /// Model records.
    Models,
    /// Scope records.
    Scopes,
}

/// A value to write into a field.
#[derive(Clone, Copy, Debug)]
pub enum Value {
    /// 0.
    Zero,
    /// 1.
    One,
    /// All ones (`u64::MAX`, or the field's width).
    Max,
    /// `u32::MAX`.
    U32Max,
    /// The old value plus this (wrapping).
    Add(u64),
    /// The old value minus this (wrapping).
    Sub(u64),
    /// The old value with this bit flipped.
    Flip(u8),
    /// The largest debt a bucket word holds.
    OffsetMax,
    /// One quantum more than a bucket word holds.
    PastOffsetMax,
    /// The bits of a float (NaN, −1.0, ±∞, −0.0, ...).
    F64(f64),
    /// Any value.
    Raw(u64),
}

/// Interesting floats for limit, memory and override fields.
pub const FLOATS: [f64; 14] = [
    f64::NAN,
    -1.0,
    f64::INFINITY,
    f64::NEG_INFINITY,
    -0.0,
    0.0,
    0.5,
    1.0,
    60.0,
    1.0e15,
    f64::MAX,
    f64::MIN_POSITIVE,
    5e-324,
    9.0e14,
];

/// One change to a snapshot. Records are picked modulo the section's record count, fields
/// modulo the section's field table (the layout of `docs/snapshot.md`).
#[derive(Clone, Copy, Debug)]
pub enum Mutation {
    /// Sets one field of one record (or of the header).
    Field { section: Section, record: usize, field: usize, value: Value },
    /// Writes one byte anywhere (modulo the length): the unstructured fallback.
    Byte { at: usize, value: u8 },
    /// Swaps two records of a section.
    Swap { section: Section, a: usize, b: usize },
    /// Copies record `from` over record `to`, or with `insert` inserts the copy after `to`
    /// (the declared count and length follow).
    Duplicate { section: Section, from: usize, to: usize, insert: bool },
    /// Removes a record (the declared count and length follow).
    Remove { section: Section, record: usize },
    /// Changes a declared count by `delta`; `mode` 1 also declares the length the counts imply,
    /// 2 also resizes the records to it (zero records added, or the last ones cut).
    Count { section: Section, delta: i8, mode: u8 },
    /// Points a scope's id at another account and model record and variant, keeping its
    /// generation (a scope named twice, or under another account).
    Retarget { scope: usize, account: usize, model: usize, fast: bool },
}

/// One whole case: how to build the engine, how to damage its snapshot, when to restore.
#[derive(Clone, Debug)]
pub struct Case {
    /// Preset: fireworks_2024, fireworks_2026, together, fixed (modulo 4).
    pub policy: u8,
    /// Capacities: small (every table within one probe window) or larger (modulo 2).
    pub capacity: u8,
    /// Hash seed of the engine snapshotted (the target uses another).
    pub seed: u64,
    /// What the engine does before the snapshot.
    pub ops: Vec<Op>,
    /// What is done to the snapshot before the CRC is re-sealed.
    pub mutations: Vec<Mutation>,
    /// Index into [`RESTORE_AT`].
    pub restore_at: u8,
    /// Index into [`JUMPS`]: how long the restored engine runs before its last snapshot.
    pub later: u8,
}

/// The policy a case names.
pub fn policy(index: u8) -> Policy {
    match index % 4 {
        0 => Policy::fireworks_2024(),
        1 => Policy::fireworks_2026(),
        2 => Policy::together(),
        _ => Policy::fixed(),
    }
}

/// The capacities a case names.
pub fn capacity(index: u8) -> Capacity {
    if index % 2 == 0 {
        Capacity { scopes: 64, accounts: 16, models: 4, permits: 64 }
    } else {
        Capacity { scopes: 200, accounts: 100, models: 70, permits: 128 }
    }
}

fn pick<T: Copy>(list: &[T], i: u8) -> T {
    list[usize::from(i) % list.len()]
}

fn variant(fast: bool) -> Variant {
    if fast { Variant::Fast } else { Variant::Regular }
}

fn key<'k>(account: &'k [u8], model: &'k [u8], fast: bool) -> ScopeKey<'k> {
    ScopeKey { account, model, variant: variant(fast) }
}

/// An engine of the case's policy and capacities with `seed`.
pub fn engine(case: &Case, seed: u64) -> Engine<Heap> {
    let storage = Heap::new(capacity(case.capacity)).expect("capacities are valid");
    Engine::with_storage(policy(case.policy), storage, seed).expect("presets are valid")
}

/// The engine's snapshot at `now`.
pub fn snapshot(e: &Engine<Heap>, now: u64) -> Vec<u8> {
    let mut buf = vec![0; e.snapshot_size()];
    let n = e.snapshot(&mut buf, now).expect("a buffer of snapshot_size() is large enough");
    buf.truncate(n);
    buf
}

/// Limits and levels are consistent: at least 1 per minute, and never more left than the limit.
fn check_levels(l: &Levels) {
    for m in Metric::ALL {
        assert!(l.limit(m) >= 1, "{m:?} limit below 1: {l:?}");
        assert!(l.remaining(m) <= l.limit(m), "{m:?} remaining above its limit: {l:?}");
    }
}

/// A decision's levels are consistent, and a 429 binds on a metric that is enforced (a metric
/// without a limit can never be what refuses a request).
fn check_decision(d: &Decision) {
    if d.levels == Levels::default() {
        return; // Refused before the buckets were read (spend, invalid request).
    }
    check_levels(&d.levels);
    if let Outcome::RejectRateLimited(r) = d.outcome {
        assert_ne!(d.levels.limit(r.metric), u64::MAX, "429 on {:?}, which has no limit: {d:?}", r.metric);
    }
}

/// Settles a permit; if that succeeds, settling it again must not.
fn settle_once(e: &Engine<Heap>, p: &Permit, usage: &Usage, completion: Completion, now: u64) {
    if e.settle(p, usage, completion, now).is_ok() {
        let again = e.settle(p, usage, completion, now);
        assert_eq!(again, Err(SettleError::AlreadySettled), "a permit settled twice");
    }
}

/// Runs one operation. Errors are typed results, and are ignored; panics are failures.
pub fn apply(e: &Engine<Heap>, op: &Op, now: &mut u64, permits: &mut Vec<Permit>) {
    let account = |i: u8| pick(&ACCOUNTS, i);
    let model = |i: u8| pick(&MODELS, i);
    match *op {
        Op::Admit { account: a, model: m, fast, prompt, max_tokens, n, tier } => {
            let r = Request::new(prompt)
                .max_tokens(max_tokens)
                .n(n)
                .service_tier(ServiceTier::ALL[usize::from(tier % 3)]);
            if let Ok(d) = e.admit(key(account(a), model(m), fast), &r, *now) {
                check_decision(&d);
                if let Some(p) = d.permit() {
                    permits.push(*p);
                }
            }
        }
        Op::Settle { permit, prompt, generated, completion } => {
            if !permits.is_empty() {
                let p = permits.swap_remove(usize::from(permit) % permits.len());
                let completion = pick(
                    &[Completion::Success, Completion::UpstreamFailure, Completion::Cancelled],
                    completion,
                );
                settle_once(e, &p, &Usage::new(prompt, generated), completion, *now);
            }
        }
        Op::Charge { permit, tokens } => {
            if !permits.is_empty() {
                let _ = e.charge(&permits[usize::from(permit) % permits.len()], tokens, *now);
            }
        }
        Op::Credits { account: a, micros } => {
            let _ = e.add_credits(account(a), micros);
        }
        Op::SpendLimit { account: a, micros } => {
            let _ = e.set_spend_limit(account(a), micros);
        }
        Op::Override { account: a, metric, limits } => {
            let limits = limits.map(|(floor, ceiling)| MetricLimits { floor, ceiling });
            let _ = e.set_limits_override(account(a), pick(&Metric::ALL, metric), limits, *now);
        }
        Op::SetTier { account: a, tier } => {
            let _ = e.set_tier(account(a), tier.map(|t| pick(&Tier::ALL, t)), *now);
        }
        Op::Quota { account: a, quota, n, kind } => {
            let q = pick(&Quota::ALL, quota);
            let _ = match kind % 3 {
                0 => e.acquire_quota(account(a), q, n),
                1 => e.release_quota(account(a), q, n),
                _ => e.set_quota_limit(account(a), q, n),
            };
        }
        Op::Load { model: m, fast, permille } => {
            let _ = e.set_load(model(m), variant(fast), permille);
        }
        Op::Price { model: m, fast, micros } => {
            let price = Price { uncached_prompt: micros, cached_prompt: micros / 2, generated: micros };
            let _ = e.set_price(model(m), variant(fast), price);
        }
        Op::ModelCapacity { model: m, fast, capacity } => {
            let _ = e.set_model_capacity(model(m), variant(fast), capacity);
        }
        Op::Suspend { account: a, payment_failed, on } => {
            let reason = if payment_failed { Suspension::PaymentFailed } else { Suspension::Operator };
            let _ = e.set_suspended(account(a), reason, on);
        }
        Op::PaymentMethod { account: a, on } => {
            let _ = e.set_payment_method(account(a), on);
        }
        Op::Grant { account: a, tier } => {
            let _ = e.set_service_tier_grant(account(a), ServiceTier::ALL[usize::from(tier % 3)]);
        }
        Op::BillingPeriod => e.start_billing_period(*now),
        Op::Advance { jump, extra } => *now = now.saturating_add(pick(&JUMPS, jump) + u64::from(extra)),
    }
}

/// Builds the case's engine with `seed`; returns it, its clock and its unsettled permits.
pub fn build(case: &Case, seed: u64) -> (Engine<Heap>, u64, Vec<Permit>) {
    let e = engine(case, seed);
    let mut now = START;
    let mut permits = Vec::new();
    for op in &case.ops {
        apply(&e, op, &mut now, &mut permits);
    }
    (e, now, permits)
}

/// Offsets and widths of the fields of each section (docs/snapshot.md).
fn fields(section: Section) -> Vec<(usize, usize)> {
    let words = |from: usize, to: usize| (from..to).step_by(8).map(|o| (o, 8));
    let mut f = vec![(0, 4), (4, 4)];
    match section {
        Section::Header => {
            f = vec![(4, 2), (6, 2), (8, 8), (16, 8)];
            f.extend((24..56).step_by(4).map(|o| (o, 4)));
        }
        Section::Accounts => f.extend(words(8, ACCOUNT_RECORD)),
        Section::Models => f.extend(words(8, MODEL_RECORD)),
        Section::Scopes => f.extend(words(8, SCOPE_RECORD)),
    }
    f
}

fn read(bytes: &[u8], at: usize, width: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = bytes.get(at..at + width) {
        b[..width].copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

fn write(bytes: &mut [u8], at: usize, width: usize, v: u64) {
    if let Some(dst) = bytes.get_mut(at..at + width) {
        dst.copy_from_slice(&v.to_le_bytes()[..width]);
    }
}

/// The records actually present, per section, as mutations add and remove them.
#[derive(Clone, Copy, Debug)]
struct Layout {
    counts: [usize; 3],
}

impl Layout {
    fn index(section: Section) -> Option<usize> {
        match section {
            Section::Header => None,
            Section::Accounts => Some(0),
            Section::Models => Some(1),
            Section::Scopes => Some(2),
        }
    }

    fn size(section: Section) -> usize {
        match section {
            Section::Header => HEADER,
            Section::Accounts => ACCOUNT_RECORD,
            Section::Models => MODEL_RECORD,
            Section::Scopes => SCOPE_RECORD,
        }
    }

    fn start(&self, section: Section) -> usize {
        let [a, m, _] = self.counts;
        match section {
            Section::Header => 0,
            Section::Accounts => HEADER,
            Section::Models => HEADER + a * ACCOUNT_RECORD,
            Section::Scopes => HEADER + a * ACCOUNT_RECORD + m * MODEL_RECORD,
        }
    }

    fn count(&self, section: Section) -> usize {
        Self::index(section).map_or(1, |i| self.counts[i])
    }

    /// Byte offset of record `i` (modulo the count), if the section has any.
    fn record(&self, section: Section, i: usize) -> Option<usize> {
        let n = self.count(section);
        (n > 0).then(|| self.start(section) + (i % n) * Self::size(section))
    }
}

/// Offset of a section's declared count in the header.
fn count_field(section: Section) -> Option<usize> {
    Layout::index(section).map(|i| 40 + 4 * i)
}

fn value_of(v: Value, old: u64, width: usize) -> u64 {
    let mask = if width >= 8 { u64::MAX } else { (1u64 << (8 * width)) - 1 };
    let new = match v {
        Value::Zero => 0,
        Value::One => 1,
        Value::Max => u64::MAX,
        Value::U32Max => u64::from(u32::MAX),
        Value::Add(k) => old.wrapping_add(k),
        Value::Sub(k) => old.wrapping_sub(k),
        Value::Flip(bit) => old ^ (1 << (bit % (8 * width as u8))),
        Value::OffsetMax => OFFSET_MAX,
        Value::PastOffsetMax => OFFSET_MAX + 1,
        Value::F64(f) => f.to_bits(),
        Value::Raw(r) => r,
    };
    new & mask
}

/// Changes the declared count of `section` by `delta` records and the declared length to match.
fn recount(bytes: &mut [u8], section: Section, delta: i64) {
    if let Some(at) = count_field(section) {
        let n = read(bytes, at, 4) as i64 + delta;
        write(bytes, at, 4, n as u64);
    }
    let len = bytes.len() as u64;
    write(bytes, 8, 8, len);
}

/// Applies the mutations to a snapshot and re-seals its CRC.
pub fn mutate(good: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = good.to_vec();
    let mut layout = Layout { counts: [40, 44, 48].map(|at| read(good, at, 4) as usize) };
    for m in mutations {
        match *m {
            Mutation::Field { section, record, field, value } => {
                let f = fields(section);
                let (offset, width) = f[field % f.len()];
                if let Some(start) = layout.record(section, record) {
                    let old = read(&bytes, start + offset, width);
                    write(&mut bytes, start + offset, width, value_of(value, old, width));
                }
            }
            Mutation::Byte { at, value } => {
                let n = bytes.len();
                bytes[at % n] = value;
            }
            Mutation::Swap { section, a, b } => {
                let size = Layout::size(section);
                if let (Some(x), Some(y)) = (layout.record(section, a), layout.record(section, b)) {
                    if x != y && section != Section::Header {
                        let rx = bytes[x..x + size].to_vec();
                        bytes.copy_within(y..y + size, x);
                        bytes[y..y + size].copy_from_slice(&rx);
                    }
                }
            }
            Mutation::Duplicate { section, from, to, insert } => {
                let size = Layout::size(section);
                let (Some(i), Some(x), Some(y)) =
                    (Layout::index(section), layout.record(section, from), layout.record(section, to))
                else {
                    continue;
                };
                let copy = bytes[x..x + size].to_vec();
                if insert {
                    bytes.splice(y + size..y + size, copy);
                    layout.counts[i] += 1;
                    recount(&mut bytes, section, 1);
                } else {
                    bytes[y..y + size].copy_from_slice(&copy);
                }
            }
            Mutation::Remove { section, record } => {
                let size = Layout::size(section);
                if let (Some(i), Some(x)) = (Layout::index(section), layout.record(section, record)) {
                    bytes.drain(x..x + size);
                    layout.counts[i] -= 1;
                    recount(&mut bytes, section, -1);
                }
            }
            Mutation::Count { section, delta, mode } => {
                let Some(at) = count_field(section) else { continue };
                let declared = read(&bytes, at, 4).wrapping_add(delta as i64 as u64) & 0xFFFF_FFFF;
                write(&mut bytes, at, 4, declared);
                let [a, m, s] = [40, 44, 48].map(|at| read(&bytes, at, 4) as usize);
                let implied = HEADER + a * ACCOUNT_RECORD + m * MODEL_RECORD + s * SCOPE_RECORD + 4;
                if mode % 3 >= 1 {
                    write(&mut bytes, 8, 8, implied as u64);
                }
                // Resize the records to what the counts declare, within reason.
                let i = Layout::index(section).unwrap_or(0);
                if mode % 3 == 2 && implied < bytes.len() + 64 * SCOPE_RECORD {
                    let end = layout.start(section) + layout.count(section) * Layout::size(section);
                    let want = usize::try_from(declared).unwrap_or(0).min(layout.count(section) + 64);
                    if want > layout.count(section) {
                        let extra = (want - layout.count(section)) * Layout::size(section);
                        bytes.splice(end..end, std::iter::repeat_n(0, extra));
                    } else {
                        let cut = (layout.count(section) - want) * Layout::size(section);
                        bytes.drain(end - cut..end);
                    }
                    layout.counts[i] = want;
                }
            }
            Mutation::Retarget { scope, account, model, fast } => {
                let (Some(s), Some(a), Some(m)) = (
                    layout.record(Section::Scopes, scope),
                    layout.record(Section::Accounts, account),
                    layout.record(Section::Models, model),
                ) else {
                    continue;
                };
                let (a, m) = (read(&bytes, a, 4), read(&bytes, m, 4));
                let id = read(&bytes, s + 8, 8);
                let generation = id & !((1 << 39) - 1);
                let retargeted = generation | (a << 15) | (m << 3) | (u64::from(fast) << 2) | (id & 3);
                write(&mut bytes, s + 8, 8, retargeted);
            }
        }
    }
    if bytes.len() >= 4 {
        let n = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }
    bytes
}

/// Keys and scope identities of an accepted snapshot, read from the documented layout.
struct Contents {
    accounts: Vec<(u64, Vec<u8>)>,
    models: Vec<(u64, Vec<u8>)>,
    /// (account index, model index, fast) per scope record.
    scopes: Vec<(u64, u64, bool)>,
}

/// Slot index and the four limits of each scope record.
fn scope_limits(bytes: &[u8]) -> Vec<(u64, [f64; 4])> {
    let [a, m, s] = [40, 44, 48].map(|at| read(bytes, at, 4) as usize);
    let scopes_at = HEADER + a * ACCOUNT_RECORD + m * MODEL_RECORD;
    (0..s)
        .map(|i| {
            let r = scopes_at + i * SCOPE_RECORD;
            (read(bytes, r, 4), [0, 1, 2, 3].map(|k| f64::from_bits(read(bytes, r + 48 + 8 * k, 8))))
        })
        .collect()
}

/// The tables' own invariant (`table.rs`): a key is published at most once. Two records of one
/// account or model key, or two scopes of one (account, model, variant), would leave one copy
/// unreachable until the other is reclaimed, when its state would come back.
fn assert_unique(c: &Contents) {
    for (what, keys) in [("account", &c.accounts), ("model", &c.models)] {
        for (i, (x, k)) in keys.iter().enumerate() {
            for (y, l) in keys.iter().skip(i + 1) {
                assert!(k != l, "{what} key {k:?} restored twice, in slots {x} and {y}");
            }
        }
    }
    for (i, s) in c.scopes.iter().enumerate() {
        assert!(!c.scopes[i + 1..].contains(s), "scope {s:?} restored twice");
    }
}

/// No limit below 1 per minute appears that was not restored as such: every floor, the
/// policy's or an override, is at least 1, and limits are clamped to their floors.
fn assert_limits_floored(accepted: &[u8], later: &[u8]) {
    let before = scope_limits(accepted);
    for (slot, limits) in scope_limits(later) {
        let was = before.iter().find(|(s, _)| *s == slot).map(|(_, l)| *l);
        for (k, l) in limits.iter().enumerate() {
            let restored_low = was.is_some_and(|w| w[k] < 1.0);
            assert!(*l >= 1.0 || restored_low, "scope in slot {slot}: limit {k} is {l}, below every floor");
        }
    }
}

/// Every suspension can be lifted by clearing its cause (SPEC §8).
fn assert_suspensions_lift(e: &Engine<Heap>, account: &[u8]) {
    let _ = e.set_suspended(account, Suspension::Operator, false);
    let _ = e.set_suspended(account, Suspension::PaymentFailed, false);
    let _ = e.set_payment_method(account, true);
    if let Ok(a) = e.account(account) {
        assert_ne!(a.refusal, Some(SpendRejection::AccountSuspended), "a suspension nothing lifts: {a:?}");
    }
}

fn contents(bytes: &[u8]) -> Contents {
    let [a, m, s] = [40, 44, 48].map(|at| read(bytes, at, 4) as usize);
    let keys = |start: usize, n: usize, size: usize| {
        (0..n)
            .map(|i| {
                let r = start + i * size;
                let len = read(bytes, r + 4, 4) as usize;
                (read(bytes, r, 4), bytes[r + 8..r + 8 + len].to_vec())
            })
            .collect()
    };
    let scopes_at = HEADER + a * ACCOUNT_RECORD + m * MODEL_RECORD;
    Contents {
        accounts: keys(HEADER, a, ACCOUNT_RECORD),
        models: keys(HEADER + a * ACCOUNT_RECORD, m, MODEL_RECORD),
        scopes: (0..s)
            .map(|i| {
                let id = read(bytes, scopes_at + i * SCOPE_RECORD + 8, 8);
                ((id >> 15) & 0xFF_FFFF, (id >> 3) & 0xFFF, id & 4 != 0)
            })
            .collect(),
    }
}

/// A restore re-seals each bucket word on the new clock: debts stay exact in the linear range,
/// and beyond it round up by less than 1/4096 (or, at the very top, lose less than an epoch).
fn debt_kept(before: u64, after: u64) -> bool {
    if before < LINEAR_END - EPOCH_Q {
        after == before
    } else {
        after.saturating_add(EPOCH_Q) >= before && after <= before.saturating_add(before >> 12)
    }
}

/// What was accepted snapshots back as it was: byte for byte, except bucket debts (re-sealed
/// on the restoring clock, and none on a metric without a limit) and usage counters (which hold
/// 32 bits).
fn assert_kept(accepted: &[u8], again: &[u8]) {
    assert_eq!(accepted.len(), again.len(), "the restored engine snapshots to another length");
    assert_eq!(accepted[..HEADER], again[..HEADER], "the restored engine snapshots another header");
    let [a, m, s] = [40, 44, 48].map(|at| read(accepted, at, 4) as usize);
    let scopes_at = HEADER + a * ACCOUNT_RECORD + m * MODEL_RECORD;
    assert_eq!(accepted[HEADER..scopes_at], again[HEADER..scopes_at], "accounts or models changed");
    for i in 0..s {
        let r = scopes_at + i * SCOPE_RECORD;
        let (x, y) = (&accepted[r..r + SCOPE_RECORD], &again[r..r + SCOPE_RECORD]);
        assert_eq!(x[..16], y[..16], "scope record {i}: index or id changed");
        for k in 0..4 {
            let (d0, d1) = (read(x, 16 + 8 * k, 8), read(y, 16 + 8 * k, 8));
            // A metric without a limit owes nothing, whatever the snapshot said.
            let unenforced = bucket::interval(f64::from_bits(read(x, 48 + 8 * k, 8))) == 0;
            let kept = if unenforced { d1 == 0 } else { debt_kept(d0, d1) };
            assert!(kept, "scope record {i}: debt {k} was {d0}, is {d1}");
        }
        assert_eq!(x[48..112], y[48..112], "scope record {i}: limits or memories changed");
        for k in 0..4 {
            let (u0, u1) = (read(x, 112 + 8 * k, 8), read(y, 112 + 8 * k, 8));
            assert_eq!(u0.min(u64::from(u32::MAX)), u1, "scope record {i}: usage {k}");
        }
    }
}

/// Admissions at one instant stay within the hard band (plus the smoothing wait): from a
/// restored debt D on `requests`, at most (ρ·W + wait − D) / cost requests pass.
fn assert_hard_band(e: &Engine<Heap>, key: ScopeKey<'_>, now: u64) {
    let Ok(levels) = e.limits(key, now) else { return };
    let (debt, interval) = levels.to_raw();
    let cost = bucket::cost(1, interval[0]);
    if interval[0] == 0 || levels.limit(Metric::Requests) > 2_000 || cost == 0 {
        return;
    }
    let bands = e.policy().bands().expect("a valid policy");
    let bound = (bands.hard_q + bands.max_wait_q).saturating_sub(debt[0]) / cost;
    let mut admitted = 0;
    for _ in 0..bound + 2 {
        match e.admit(key, &Request::new(0), now) {
            Ok(d) => {
                if let Some(p) = d.permit() {
                    admitted += 1;
                    settle_once(e, p, &Usage::default(), Completion::Success, now);
                }
            }
            Err(_) => break,
        }
    }
    assert!(admitted <= bound, "{admitted} requests admitted at one instant, at most {bound} fit");
}

/// Admits, settles and charges on `key`; checks the levels and that permits settle once.
fn exercise(e: &Engine<Heap>, key: ScopeKey<'_>, now: u64) {
    if let Ok(l) = e.limits(key, now) {
        check_levels(&l);
    }
    for r in [Request::new(0), Request::new(1_000).max_tokens(200), Request::new(1 << 40).n(3)] {
        let Ok(d) = e.admit(key, &r, now) else { continue };
        check_decision(&d);
        if let Some(p) = d.permit() {
            let _ = e.charge(p, 500, now);
            assert_eq!(e.settle(p, &Usage::new(900, 700), Completion::Success, now), Ok(()));
            assert_eq!(
                e.settle(p, &Usage::new(900, 700), Completion::Success, now),
                Err(SettleError::AlreadySettled)
            );
            assert_eq!(e.charge(p, 1, now), Err(SettleError::AlreadySettled));
        }
    }
    if let Ok(a) = e.account(key.account) {
        for (used, limit) in a.quotas {
            assert!(used <= limit, "quota use {used} above its limit {limit}");
        }
    }
}

/// The whole property: restore the mutated snapshot; refused means unchanged, accepted means
/// a working engine.
pub fn check(case: &Case) {
    let (source, now, _) = build(case, case.seed);
    let good = snapshot(&source, now);
    let bad = mutate(&good, &case.mutations);
    let at = pick(&RESTORE_AT, case.restore_at).unwrap_or(now);

    // The target holds state of its own (the same operations under another seed).
    let (mut target, _, outstanding) = build(case, case.seed ^ 0x5eed);
    // A first snapshot at `at` expires the permits past their deadline, billing their
    // reservations: the state to compare with is the one after that.
    snapshot(&target, at);
    let before = snapshot(&target, at);
    if let Err(e) = target.restore(&bad, at) {
        assert!(bad != good, "an intact snapshot was refused: {e:?}");
        assert_eq!(snapshot(&target, at), before, "a refused restore ({e:?}) changed the engine");
        return;
    }

    // Accepted: permits issued before the restore never settle (nor charge) after it.
    for p in &outstanding {
        let settled = target.settle(p, &Usage::default(), Completion::Success, at);
        assert_eq!(settled, Err(SettleError::StalePermit), "a permit from before the restore");
        assert_eq!(
            target.charge(p, 1, at),
            Err(SettleError::StalePermit),
            "a permit from before the restore"
        );
    }

    // It snapshots back as it was, and that snapshot restores to the same bytes.
    let again = snapshot(&target, at);
    assert_kept(&bad, &again);
    let mut other = engine(case, !case.seed);
    assert_eq!(other.restore(&again, at), Ok(()), "the restored engine's snapshot is refused");
    assert_eq!(snapshot(&other, at), again, "a second restore changed the state");

    // Restored keys, scopes and new keys all work.
    let c = contents(&bad);
    assert_unique(&c);
    let name =
        |list: &[(u64, Vec<u8>)], index: u64| list.iter().find(|(i, _)| *i == index).map(|(_, k)| k.clone());
    let mut keys: Vec<(Vec<u8>, Vec<u8>, bool)> = Vec::new();
    for &(a, m, fast) in c.scopes.iter().take(6) {
        if let (Some(a), Some(m)) = (name(&c.accounts, a), name(&c.models, m)) {
            keys.push((a, m, fast));
        }
    }
    let first_model = c.models.first().map_or(b"m".to_vec(), |(_, k)| k.clone());
    for (_, a) in c.accounts.iter().take(3) {
        keys.push((a.clone(), first_model.clone(), false));
    }
    keys.push((b"new-account".to_vec(), first_model, true));
    keys.push((c.accounts.first().map_or(b"a".to_vec(), |(_, k)| k.clone()), b"new-model".to_vec(), false));
    if let Some((a, m, fast)) = keys.first() {
        assert_hard_band(&target, key(a, m, *fast), at);
    }
    for (a, m, fast) in &keys {
        exercise(&target, key(a, m, *fast), at);
    }

    // Time passes (adaptation runs on whatever was restored); it still works and snapshots
    // into something that restores.
    let later = at.saturating_add(pick(&JUMPS, case.later));
    for (a, m, fast) in keys.iter().take(4) {
        exercise(&target, key(a, m, *fast), later);
    }
    for (_, a) in &c.accounts {
        assert_suspensions_lift(&target, a);
    }
    let last = snapshot(&target, later);
    assert_limits_floored(&bad, &last);
    let mut fresh = engine(case, case.seed.rotate_left(17));
    assert_eq!(fresh.restore(&last, later), Ok(()), "a snapshot of the restored engine is refused");
}

/// Reads a case from fuzzer bytes: a few header bytes, then operations, then mutations until
/// the bytes run out (zeros past the end).
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, pos: 0 }
    }

    /// Whether every byte was read.
    pub fn done(&self) -> bool {
        self.pos >= self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A token count: mostly small, sometimes huge.
    fn tokens(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => 0,
            1 => u64::MAX,
            2 => self.u64(),
            _ => u64::from(self.u16()) * 16,
        }
    }

    fn section(&mut self) -> Section {
        pick(&[Section::Header, Section::Accounts, Section::Models, Section::Scopes], self.u8())
    }

    fn value(&mut self) -> Value {
        match self.u8() % 11 {
            0 => Value::Zero,
            1 => Value::One,
            2 => Value::Max,
            3 => Value::U32Max,
            4 => Value::Add(u64::from(self.u8())),
            5 => Value::Sub(u64::from(self.u8())),
            6 => Value::Flip(self.u8()),
            7 => Value::OffsetMax,
            8 => Value::PastOffsetMax,
            9 => Value::F64(pick(&FLOATS, self.u8())),
            _ => Value::Raw(self.u64()),
        }
    }

    fn op(&mut self) -> Op {
        match self.u8() % 16 {
            0..=3 => Op::Admit {
                account: self.u8(),
                model: self.u8(),
                fast: self.bool(),
                prompt: self.tokens(),
                max_tokens: self.tokens(),
                n: u64::from(self.u8() % 4),
                tier: self.u8(),
            },
            4 | 5 => Op::Settle {
                permit: self.u8(),
                prompt: self.tokens(),
                generated: self.tokens(),
                completion: self.u8(),
            },
            6 => Op::Charge { permit: self.u8(), tokens: self.tokens() },
            7 => Op::Credits { account: self.u8(), micros: self.tokens().saturating_mul(1_000) },
            8 => Op::SpendLimit { account: self.u8(), micros: self.tokens().saturating_mul(1_000) },
            9 => {
                let (account, metric, on) = (self.u8(), self.u8(), self.bool());
                let floor = pick(&[1.0, 60.0, 900.0, 1.0e6, 1.0e15, f64::INFINITY], self.u8());
                let ceiling = floor * pick(&[1.0, 2.0, 100.0], self.u8());
                Op::Override { account, metric, limits: on.then_some((floor, ceiling)) }
            }
            10 => {
                let (account, tier) = (self.u8(), self.u8());
                Op::SetTier { account, tier: (tier < 200).then_some(tier) }
            }
            11 => {
                Op::Quota { account: self.u8(), quota: self.u8(), n: u32::from(self.u8()), kind: self.u8() }
            }
            12 => {
                let (model, fast) = (self.u8(), self.bool());
                match self.u8() % 3 {
                    0 => Op::Load { model, fast, permille: u32::from(self.u16()) },
                    1 => Op::Price { model, fast, micros: self.tokens() },
                    _ => Op::ModelCapacity { model, fast, capacity: u32::from(self.u8()) },
                }
            }
            13 => Op::Suspend { account: self.u8(), payment_failed: self.bool(), on: self.bool() },
            14 => match self.u8() % 4 {
                0 => Op::BillingPeriod,
                1 => Op::Grant { account: self.u8(), tier: self.u8() },
                _ => Op::PaymentMethod { account: self.u8(), on: self.bool() },
            },
            _ => Op::Advance { jump: self.u8(), extra: self.u32() },
        }
    }

    fn mutation(&mut self) -> Mutation {
        match self.u8() % 16 {
            0..=8 => Mutation::Field {
                section: self.section(),
                record: usize::from(self.u8()),
                field: usize::from(self.u8()),
                value: self.value(),
            },
            9 => Mutation::Byte { at: usize::from(self.u16()), value: self.u8() },
            10 => Mutation::Swap {
                section: self.section(),
                a: usize::from(self.u8()),
                b: usize::from(self.u8()),
            },
            11 => Mutation::Duplicate {
                section: self.section(),
                from: usize::from(self.u8()),
                to: usize::from(self.u8()),
                insert: self.bool(),
            },
            12 => Mutation::Remove { section: self.section(), record: usize::from(self.u8()) },
            13 => Mutation::Count { section: self.section(), delta: self.u8() as i8, mode: self.u8() },
            _ => Mutation::Retarget {
                scope: usize::from(self.u8()),
                account: usize::from(self.u8()),
                model: usize::from(self.u8()),
                fast: self.bool(),
            },
        }
    }

    /// The whole case: a header byte, a seed, up to 24 operations, then mutations (at most 16).
    pub fn case(&mut self) -> Case {
        let head = self.u8();
        let seed = self.u64();
        let n_ops = self.u8() % 25;
        let ops = (0..n_ops).map(|_| self.op()).collect();
        let mut mutations = Vec::new();
        while !self.done() && mutations.len() < 16 {
            mutations.push(self.mutation());
        }
        Case {
            policy: head & 3,
            capacity: (head >> 2) & 1,
            seed,
            ops,
            mutations,
            restore_at: (head >> 3) & 3,
            later: head >> 5,
        }
    }
}
