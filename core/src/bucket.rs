//! Token-bucket (GCRA) arithmetic for the four metrics of a scope, packed in one 128-bit word.
//!
//! Each metric's state is its *debt*: how far its theoretical arrival time lies past `now`, in
//! quanta of [`QUANTUM_NS`]. A bucket of limit `L` per minute holds one minute's worth
//! ([`WINDOW_Q`]); a token costs `WINDOW_Q / L` quanta of debt; debt drains one quantum per
//! quantum of time. So `level = (WINDOW_Q - debt) / cost_of_one_token`, and refill is exact:
//! no fraction of a token is ever lost to rounding, however often the word is updated.
//!
//! The packed word holds four 28-bit debt fields relative to the start of an epoch, a 12-bit
//! epoch tag and a 4-bit version that names which buffer of per-metric intervals the debts are
//! scaled by. A field below [`LINEAR_END`] is an exact offset in quanta, which covers every debt
//! admission can create. Above it, a field is a float (5-bit exponent, 13-bit mantissa) rounded
//! *up*: debt pushed there by settles and stream charges — up to ~36,000 years of it — is carried,
//! never forgiven (SPEC §3), at the cost of overcharging it by at most 1/8192 per rewrite.
//! Everything here is a pure function over plain integers.

use crate::metric::Metric;

/// Time resolution of the buckets: 1 µs. A 60 RPM limit costs exactly 1,000,000 quanta a request.
pub const QUANTUM_NS: u64 = 1_000;
/// One minute, the capacity of every bucket, in quanta.
pub const WINDOW_Q: u64 = 60_000_000;
/// Bits of each packed debt field.
const FIELD_BITS: u32 = 28;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
/// Field values at or above this are coarse codes; below it, exact offsets (about 268 s).
pub const LINEAR_END: u64 = (1 << FIELD_BITS) - (1 << COARSE_BITS);
/// Bits of a coarse code: a 5-bit exponent over a 13-bit mantissa.
const COARSE_BITS: u32 = 18;
const MANTISSA_BITS: u32 = 13;
/// The smallest coarse value is `2^13 << 15` = 2^28 quanta, just past the linear range.
const COARSE_SHIFT: u32 = FIELD_BITS - MANTISSA_BITS;
/// Largest offset a field can hold, about 2^60 quanta (36,000 years); beyond it debt saturates.
pub const OFFSET_MAX: u64 =
    ((1 << (MANTISSA_BITS + 1)) - 1) << (COARSE_SHIFT + (1 << (COARSE_BITS - MANTISSA_BITS)) - 1);
/// Epochs are 2^25 µs (about 33.5 s) long; debts are stored relative to the epoch's start.
const EPOCH_SHIFT: u32 = 25;
/// Length of an epoch in quanta.
pub const EPOCH_Q: u64 = 1 << EPOCH_SHIFT;
const EPOCH_BITS: u32 = 12;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
/// How far from the reference time an epoch tag decodes: ±2^11 epochs, about 19 hours.
pub const EPOCH_RANGE_Q: u64 = EPOCH_Q << (EPOCH_BITS - 1);
const VERSION_MASK: u8 = 0xF;
/// Longest debt the band checks may create: hard band plus smoothing wait must stay exact (in
/// the linear range) with an epoch of slack.
pub const MAX_HORIZON_Q: u64 = LINEAR_END - EPOCH_Q;
/// The low 124 bits of a word that marks a scope being reclaimed (any version); no real
/// bucket word has them all set.
const RETIRED_MASK: u128 = u128::MAX >> 4;

/// The marker of a reclaimed scope whose last word had `version`.
pub fn retired(version: u8) -> u128 {
    RETIRED_MASK | (u128::from(version & VERSION_MASK) << (4 * FIELD_BITS + EPOCH_BITS))
}

/// Whether `w` marks a scope being reclaimed.
pub fn is_retired(w: u128) -> bool {
    w & RETIRED_MASK == RETIRED_MASK
}

/// A debt offset as a field: exact below [`LINEAR_END`], else the smallest coarse value ≥ it.
#[cold]
fn encode(offset: u64) -> u64 {
    if offset < LINEAR_END {
        return offset;
    }
    let offset = offset.min(OFFSET_MAX);
    // Bits below the 14-bit significand, at least the coarse shift.
    let bits = u64::BITS - (offset - 1).leading_zeros();
    let mut shift = bits.saturating_sub(MANTISSA_BITS + 1).max(COARSE_SHIFT);
    let mut significand = offset.div_ceil(1 << shift);
    if significand >> (MANTISSA_BITS + 1) != 0 {
        shift += 1;
        significand = offset.div_ceil(1 << shift);
    }
    let exponent = u64::from(shift - COARSE_SHIFT);
    let mantissa = significand.max(1 << MANTISSA_BITS) - (1 << MANTISSA_BITS);
    LINEAR_END + ((exponent << MANTISSA_BITS) | mantissa)
}

/// The offset a field stands for.
#[cold]
fn decode(field: u64) -> u64 {
    if field < LINEAR_END {
        return field;
    }
    let code = field - LINEAR_END;
    let exponent = (code >> MANTISSA_BITS) as u32;
    let significand = (1 << MANTISSA_BITS) | (code & ((1 << MANTISSA_BITS) - 1));
    significand << (COARSE_SHIFT + exponent)
}

/// The unpacked bucket word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Word {
    /// Debt offsets from the epoch start, in quanta, per metric (as the fields decode them).
    pub offset: [u64; 4],
    /// Low 12 bits of the epoch the offsets are relative to.
    pub epoch: u64,
    /// Which interval buffer (`version & 1`) scales the debts; bumped on every limit change.
    pub version: u8,
}

impl Word {
    /// A scope with four full buckets at time `now_q`.
    pub fn fresh(now_q: u64, version: u8) -> Self {
        seal(now_q, [0; 4], version)
    }

    /// Packs into the stored representation.
    #[inline]
    pub fn pack(self) -> u128 {
        // Admission never leaves the exact range; only settles past the hard band do.
        let exact = self.offset.iter().all(|o| *o < LINEAR_END);
        let fields = if exact { self.offset } else { self.offset.map(encode) };
        let [a, b, c, d] = fields.map(u128::from);
        let packed = a
            | (b << FIELD_BITS)
            | (c << (2 * FIELD_BITS))
            | (d << (3 * FIELD_BITS))
            | (u128::from(self.epoch & EPOCH_MASK) << (4 * FIELD_BITS))
            | (u128::from(self.version & VERSION_MASK) << (4 * FIELD_BITS + EPOCH_BITS));
        // Keep the marker unique: only a ~36,000-year debt comes near it.
        if is_retired(packed) { packed - 1 } else { packed }
    }

    /// Unpacks a stored word.
    #[inline]
    pub fn unpack(w: u128) -> Self {
        let field = |shift: u32| ((w >> shift) as u64) & FIELD_MASK;
        let fields = [field(0), field(FIELD_BITS), field(2 * FIELD_BITS), field(3 * FIELD_BITS)];
        let exact = fields.iter().all(|f| *f < LINEAR_END);
        Word {
            offset: if exact { fields } else { fields.map(decode) },
            epoch: ((w >> (4 * FIELD_BITS)) as u64) & EPOCH_MASK,
            version: ((w >> (4 * FIELD_BITS + EPOCH_BITS)) as u8) & VERSION_MASK,
        }
    }

    /// The interval buffer this word's debts are scaled by.
    pub fn buffer(self) -> usize {
        usize::from(self.version & 1)
    }
}

/// The four debts at a moment, decoded from a word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Debts {
    /// The moment the debts are measured at: the caller's time, or the word's epoch start if
    /// the caller's clock is behind it (a clock going backwards never refills a bucket).
    pub now_q: u64,
    /// Debt per metric in quanta; 0 means the bucket is full.
    pub debt: [u64; 4],
}

/// Decodes `word` at time `now_q`.
///
/// The 12-bit epoch tag is read as the epoch nearest to `now_q` (within [`EPOCH_RANGE_Q`],
/// about 19 hours). The engine rewrites every word it ticks, and bounds the tick, so a word read
/// on the hot path is never that old; a word idle for longer is read with [`open_near`].
#[inline]
pub fn open(word: Word, now_q: u64) -> Debts {
    open_near(word, now_q, now_q)
}

/// Decodes `word` at time `now_q`, reading its epoch tag as the epoch nearest to `reference_q`
/// (a moment known to lie within [`EPOCH_RANGE_Q`] of the word's last write).
#[inline]
pub fn open_near(word: Word, reference_q: u64, now_q: u64) -> Debts {
    let e_ref = reference_q >> EPOCH_SHIFT;
    let diff = e_ref.wrapping_sub(word.epoch) & EPOCH_MASK;
    let e_word = if diff < (1 << (EPOCH_BITS - 1)) {
        e_ref.saturating_sub(diff)
    } else {
        e_ref.saturating_add((1 << EPOCH_BITS) - diff)
    };
    let base = e_word << EPOCH_SHIFT;
    let now = now_q.max(base);
    Debts { now_q: now, debt: word.offset.map(|o| base.saturating_add(o).saturating_sub(now)) }
}

/// Encodes debts measured at `now_q` into a word (exact up to [`MAX_HORIZON_Q`], rounded up
/// beyond it).
#[inline]
pub fn seal(now_q: u64, debt: [u64; 4], version: u8) -> Word {
    let epoch = now_q >> EPOCH_SHIFT;
    let into_epoch = now_q - (epoch << EPOCH_SHIFT);
    Word {
        offset: debt.map(|d| into_epoch.saturating_add(d)),
        epoch: epoch & EPOCH_MASK,
        version: version & VERSION_MASK,
    }
}

/// Quanta per token in 32.32 fixed point for a limit of `per_minute`; 0 for an unlimited metric.
pub fn interval(per_minute: f64) -> u64 {
    if !per_minute.is_finite() || per_minute >= UNLIMITED_F64 {
        return 0;
    }
    // Round the limit to 1/65536 so integer limits give exact intervals (60 RPM -> 10^6 quanta).
    let fixed = libm::round(per_minute.max(1.0) * 65_536.0) as u128;
    let numerator = u128::from(WINDOW_Q) << 48;
    let t = numerator.div_ceil(fixed.max(1));
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// Limits at or above this are unlimited (no bucket).
pub const UNLIMITED_F64: f64 = 1.0e15;

/// The per-minute limit an interval stands for, rounded to the nearest whole unit.
pub fn limit_of(interval: u64) -> u64 {
    if interval == 0 {
        return u64::MAX;
    }
    let numerator = u128::from(WINDOW_Q) << 32;
    let l = (numerator + u128::from(interval) / 2) / u128::from(interval);
    u64::try_from(l).unwrap_or(u64::MAX)
}

/// Debt in quanta that `tokens` add at `interval`, rounded up.
#[inline]
pub fn cost(tokens: u64, interval: u64) -> u64 {
    let q = (u128::from(tokens) * u128::from(interval) + 0xFFFF_FFFF) >> 32;
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// Tokens a debt stands for, rounded up: a part-used token is in use, so that with
/// [`remaining`] (rounded down) the two add up to the limit.
pub fn tokens_owed(debt: u64, interval: u64) -> u64 {
    if interval == 0 {
        return 0;
    }
    let q = (u128::from(debt) << 32).div_ceil(u128::from(interval));
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// Whole tokens left in a bucket with `debt` (0 when it is in the over-limit band).
pub fn remaining(debt: u64, interval: u64) -> u64 {
    if interval == 0 {
        return u64::MAX;
    }
    let level = WINDOW_Q.saturating_sub(debt);
    u64::try_from((u128::from(level) << 32) / u128::from(interval)).unwrap_or(u64::MAX)
}

/// Debt after a limit change that keeps the bucket's level in tokens (clamped to the new
/// capacity) and lets it refill at the new rate (SPEC §3).
pub fn rescale(debt: u64, old_interval: u64, new_interval: u64) -> u64 {
    if old_interval == 0 || new_interval == 0 {
        return 0;
    }
    let window = i128::from(WINDOW_Q);
    let level_q = window - i128::from(debt);
    let new_level_q = level_q * i128::from(new_interval) / i128::from(old_interval);
    let d = (window - new_level_q).max(0);
    u64::try_from(d).unwrap_or(u64::MAX)
}

/// Debt after a settle correction of `delta` quanta (refunds stop at a full bucket).
#[inline]
pub fn adjust(debt: u64, delta: i128) -> u64 {
    let d = (i128::from(debt) + delta).max(0);
    u64::try_from(d).unwrap_or(u64::MAX)
}

/// The band a request lands in (SPEC §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Band {
    /// Within every metric's normal limit.
    Normal,
    /// Over some metric's normal limit but within the hard band: run at lower priority.
    OverLimit,
}

/// Bucket capacities a policy derives, in quanta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bands {
    /// The normal capacity: one minute.
    pub normal_q: u64,
    /// The hard band: ρ minutes.
    pub hard_q: u64,
    /// Longest smoothing wait a request may be given.
    pub max_wait_q: u64,
}

/// The outcome of checking a request's costs against the four debts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Admissible, possibly after a smoothing wait.
    Fits {
        /// Band at the moment the request runs.
        band: Band,
        /// Smoothing delay before the gateway forwards it, in quanta.
        wait_q: u64,
        /// Debts once the request is charged.
        debt: [u64; 4],
    },
    /// Beyond the hard band on `binding`.
    Exceeds {
        /// The metric that binds (largest excess; `requests` wins ties).
        binding: Metric,
        /// Quanta until the request would fit the hard band.
        retry_after_q: u64,
        /// The cost alone exceeds the hard band: it can never fit at the current limit.
        too_large: bool,
    },
}

/// Checks `cost` against `debt`. A metric with zero cost passes unless it is past the hard band:
/// debt carried there must be repaid before the scope admits anything (SPEC §3, §4).
#[inline]
pub fn fit(debt: [u64; 4], cost: [u64; 4], bands: Bands) -> Fit {
    let mut after = [0u64; 4];
    let mut worst = 0u64;
    let mut binding = 0usize;
    let mut largest_cost = 0u64;
    let mut largest = 0usize;
    // Straight-line over the four metrics; only metrics with a cost take part.
    for (i, ((a, d), c)) in after.iter_mut().zip(debt).zip(cost).enumerate() {
        *a = d.saturating_add(c);
        let excess = match c {
            0 if d <= bands.hard_q => 0,
            _ => a.saturating_sub(bands.normal_q),
        };
        if excess > worst {
            worst = excess;
            binding = i;
        }
        if c > largest_cost {
            largest_cost = c;
            largest = i;
        }
    }
    let metric = |i: usize| Metric::ALL.get(i).copied().unwrap_or(Metric::Requests);
    if largest_cost > bands.hard_q {
        return Fit::Exceeds { binding: metric(largest), retry_after_q: 0, too_large: true };
    }
    if worst == 0 {
        return Fit::Fits { band: Band::Normal, wait_q: 0, debt: after };
    }
    let hard_slack = bands.hard_q - bands.normal_q;
    let wait = worst.saturating_sub(hard_slack);
    if wait > bands.max_wait_q {
        return Fit::Exceeds { binding: metric(binding), retry_after_q: wait, too_large: false };
    }
    let band = if worst > wait { Band::OverLimit } else { Band::Normal };
    Fit::Fits { band, wait_q: wait, debt: after }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BANDS: Bands = Bands { normal_q: WINDOW_Q, hard_q: 2 * WINDOW_Q, max_wait_q: 0 };

    #[test]
    fn sixty_rpm_costs_exactly_one_second_a_request() {
        let t = interval(60.0);
        assert_eq!(cost(1, t), 1_000_000);
        assert_eq!(limit_of(t), 60);
        assert_eq!(cost(0, t), 0);
    }

    #[test]
    fn pack_round_trips_and_never_forms_the_sentinel() {
        let w = Word { offset: [1, LINEAR_END - 1, 12345, 0], epoch: 4095, version: 15 };
        assert_eq!(Word::unpack(w.pack()), w);
        let all = Word { offset: [OFFSET_MAX; 4], epoch: 4095, version: 15 };
        assert!(!is_retired(all.pack()));
        assert!(is_retired(retired(7)));
        assert_eq!(Word::unpack(retired(7)).version, 7);
    }

    #[test]
    fn debt_past_the_linear_range_is_rounded_up_never_forgiven() {
        for offset in [LINEAR_END, 1 << 28, (1 << 28) + 1, 3_600_000_000, 1 << 40, OFFSET_MAX - 1, OFFSET_MAX]
        {
            let stored = decode(encode(offset));
            assert!(stored >= offset, "{offset} stored as {stored}");
            // At most one part in 2^13 over, plus the first code's step.
            assert!(stored - offset <= (offset >> MANTISSA_BITS).max(1 << COARSE_BITS), "{offset}: {stored}");
        }
        assert_eq!(decode(encode(u64::MAX)), OFFSET_MAX);
        for exact in [0, 1, 12_345, LINEAR_END - 1] {
            assert_eq!(decode(encode(exact)), exact);
        }
        // Codes are monotonic: a larger debt never stores smaller.
        let mut last = 0;
        for field in LINEAR_END..LINEAR_END + (1 << COARSE_BITS) {
            let v = decode(field);
            assert!(v > last || field == LINEAR_END);
            last = v;
        }
    }

    #[test]
    fn the_largest_code_is_the_largest_debt_a_field_holds() {
        let largest = decode(LINEAR_END + (1 << COARSE_BITS) - 1);
        assert_eq!(largest, OFFSET_MAX);
        // ~36,000 years of µs: (2^14 - 1) << 46.
        assert_eq!(OFFSET_MAX, ((1 << 14) - 1) << 46);
        const { assert!(OFFSET_MAX / 1_000_000 / 86_400 / 365 > 36_000) };
    }

    #[test]
    fn the_epoch_tag_reads_exactly_within_its_range() {
        let t0 = 9_000 * EPOCH_Q + 17;
        let w = seal(t0, [3 * EPOCH_Q, 0, 0, 0], 0);
        // Read from as far ahead as the range allows, the word still decodes to its epoch.
        let inside = t0 + EPOCH_RANGE_Q - 2 * EPOCH_Q;
        assert_eq!(open(w, inside).debt[0], 0);
        assert_eq!(open_near(w, t0, t0 + EPOCH_Q).debt[0], 2 * EPOCH_Q);
        // Past it, the 12-bit tag wraps and reads as a word from the future: the reason every
        // tick re-seals words and a far-behind scope is read against its last tick.
        let beyond = t0 + EPOCH_RANGE_Q + 2 * EPOCH_Q;
        assert!(open(w, beyond).debt[0] > 3 * EPOCH_Q);
        assert_eq!(EPOCH_RANGE_Q, 1 << 36);
    }

    #[test]
    fn an_hour_of_debt_drains_at_the_refill_rate() {
        let hour = 3_600_000_000;
        let w = seal(7, [hour, 0, 0, 0], 1).pack();
        let d = open(Word::unpack(w), 7);
        assert!(d.debt[0] >= hour && d.debt[0] - hour <= hour >> MANTISSA_BITS);
        let later = open(Word::unpack(w), 7 + 1_000_000);
        assert_eq!(d.debt[0] - later.debt[0], 1_000_000);
    }

    #[test]
    fn an_old_word_decodes_near_its_reference() {
        let t0 = 100 * EPOCH_Q;
        let w = seal(t0, [5_000_000, 0, 0, 0], 0);
        let day = 86_400_000_000;
        // Read a day later relative to `now`, the tag aliases; relative to t0 it does not.
        let near = open_near(w, t0, t0 + day);
        assert_eq!(near.debt[0], 0);
        assert_eq!(open_near(w, t0, t0 + 1_000_000).debt[0], 4_000_000);
    }

    #[test]
    fn new_bucket_is_full_and_refills_exactly() {
        let t = interval(60.0);
        let w = Word::fresh(5, 0);
        let d = open(w, 5);
        assert_eq!(d.debt, [0; 4]);
        assert_eq!(remaining(d.debt[0], t), 60);
        // Spend 60 requests; 1.5 s later exactly 1.5 requests have refilled.
        let spent = seal(5, [60 * 1_000_000, 0, 0, 0], 0);
        let later = open(spent, 5 + 1_500_000);
        assert_eq!(later.debt[0], 58_500_000);
        assert_eq!(remaining(later.debt[0], t), 1);
    }

    #[test]
    fn clock_going_backwards_never_refills() {
        let spent = seal(10 * EPOCH_Q + 7, [30_000_000, 0, 0, 0], 0);
        let earlier = open(spent, 3);
        assert!(earlier.debt[0] >= 30_000_000);
    }

    #[test]
    fn epoch_tag_decodes_across_wraps() {
        let t0 = 5000 * EPOCH_Q + 123;
        let w = seal(t0, [1000, 0, 0, 0], 3);
        let d = open(w, t0 + 10);
        assert_eq!(d.debt[0], 990);
    }

    #[test]
    fn zero_cost_metrics_pass_within_the_hard_band() {
        let f = fit([2 * WINDOW_Q, 0, 0, 0], [0, 10, 0, 0], BANDS);
        assert!(matches!(f, Fit::Fits { band: Band::Normal, .. }));
    }

    #[test]
    fn zero_cost_is_refused_past_the_hard_band() {
        let f = fit([3 * WINDOW_Q, 0, 0, 0], [0, 10, 0, 0], BANDS);
        assert_eq!(f, Fit::Exceeds { binding: Metric::Requests, retry_after_q: WINDOW_Q, too_large: false });
    }

    #[test]
    fn bands_follow_the_hard_factor() {
        let one = WINDOW_Q / 60;
        assert!(matches!(
            fit([WINDOW_Q - one, 0, 0, 0], [one, 0, 0, 0], BANDS),
            Fit::Fits { band: Band::Normal, .. }
        ));
        assert!(matches!(
            fit([WINDOW_Q, 0, 0, 0], [one, 0, 0, 0], BANDS),
            Fit::Fits { band: Band::OverLimit, .. }
        ));
        match fit([2 * WINDOW_Q, 0, 0, 0], [one, 0, 0, 0], BANDS) {
            Fit::Exceeds { binding, retry_after_q, too_large } => {
                assert_eq!(binding, Metric::Requests);
                assert_eq!(retry_after_q, one);
                assert!(!too_large);
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn cost_beyond_the_hard_band_is_too_large() {
        let f = fit([0; 4], [0, 2 * WINDOW_Q + 1, 0, 0], BANDS);
        assert!(matches!(f, Fit::Exceeds { binding: Metric::PromptTokens, too_large: true, .. }));
    }

    #[test]
    fn rescale_keeps_the_absolute_level() {
        let old = interval(60.0);
        let new = interval(120.0);
        // 30 of 60 left; with a limit of 120 still 30 left.
        let d = rescale(30_000_000, old, new);
        assert_eq!(remaining(d, new), 30);
        // A full bucket of 120 shrinking to 60 is clamped to the new capacity.
        assert_eq!(rescale(0, new, old), 0);
    }
}
