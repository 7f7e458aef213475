//! A read-only look at a shared region from a process that serves nothing (`sluicegate top`).
//! It needs no policy: the header gives the capacities, and each scope's slot its own limits.
//! Nothing is written, so the memory may be mapped read-only: 64-bit fields are plain loads,
//! and the two 128-bit words (which a 128-bit atomic load would read with a compare-exchange,
//! a write) are read as two 64-bit halves until two reads agree.

use core::mem::size_of;
use core::ptr::NonNull;

use crate::bucket::{self, QUANTUM_NS, Word};
use crate::decision::Levels;
use crate::error::RegionError;
use crate::key::{ACCOUNT_KEY_MAX, MODEL_KEY_MAX, Variant};
use crate::metrics::ModelMetrics;
use crate::region::{LAYOUT_VERSION, Region};
use crate::scope::{self, ScopeSlot};
use crate::storage::{Capacity, Storage};
use crate::sync::{AtomicU128, Ordering};
use crate::table;

/// A region opened only to be read.
pub struct Inspector<'a> {
    region: Region<'a>,
}

/// One scope as an inspector sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopeView {
    account: [u8; ACCOUNT_KEY_MAX],
    account_len: usize,
    model: [u8; MODEL_KEY_MAX],
    model_len: usize,
    /// The variant.
    pub variant: Variant,
    /// Its four limits and levels now.
    pub levels: Levels,
    /// Permits outstanding.
    pub in_flight: u64,
}

impl ScopeView {
    /// The account id.
    pub fn account(&self) -> &[u8] {
        self.account.get(..self.account_len).unwrap_or_default()
    }

    /// The model id.
    pub fn model(&self) -> &[u8] {
        self.model.get(..self.model_len).unwrap_or_default()
    }
}

/// A 128-bit word read as two 64-bit halves, until two reads agree.
fn read_u128(word: &AtomicU128) -> u128 {
    let halves = word.as_ptr().cast::<[u64; 2]>();
    // SAFETY: `halves` points to the word's 16 aligned, readable bytes; other processes may
    // write them meanwhile, which is why two reads must agree.
    let [low, high] = agreed(|| unsafe { core::ptr::read_volatile(halves) }).map(u64::from_le);
    u128::from(low) | (u128::from(high) << 64)
}

/// The first read that the next one agrees with (a read a writer tore differs from the next),
/// or the last of a few tries while a writer keeps changing the word.
fn agreed(mut read: impl FnMut() -> [u64; 2]) -> [u64; 2] {
    let mut last = read();
    for _ in 0..16 {
        let again = read();
        if again == last {
            break;
        }
        last = again;
    }
    last
}

fn copy_key<const N: usize>(len: usize, words: &[u64]) -> ([u8; N], usize) {
    let mut bytes = [0u8; N];
    for (chunk, w) in bytes.chunks_mut(8).zip(words) {
        chunk.copy_from_slice(w.to_le_bytes().get(..chunk.len()).unwrap_or_default());
    }
    (bytes, len.min(N))
}

impl<'a> Inspector<'a> {
    /// Opens the region at `base` for reading: its header must be a ready region of this
    /// build's layout with a valid checksum, and `len` must hold its tables.
    ///
    /// # Safety
    /// `base..base + len` must be readable for `'a` (a read-only mapping will do) and hold a
    /// region written by [`Region::open`] or nothing.
    pub unsafe fn open(base: NonNull<u8>, len: usize) -> Result<Self, RegionError> {
        if base.as_ptr() as usize % 128 != 0 {
            return Err(RegionError::Misaligned);
        }
        if len < 128 {
            return Err(RegionError::TooSmall { needed: 128 });
        }
        // SAFETY: at least the header's 128 bytes are readable (checked), aligned.
        let words = unsafe { core::ptr::read_volatile(base.as_ptr().cast::<[u64; 11]>()) };
        let [magic, state, version, scopes, accounts, models, permits, ..] = words;
        if magic != u64::from_le_bytes(*b"SLUICEGR") {
            return Err(RegionError::NotARegion);
        }
        if state != crate::region::READY {
            return Err(RegionError::NotReady);
        }
        if version != u64::from(LAYOUT_VERSION) {
            return Err(RegionError::UnsupportedVersion(version as u32));
        }
        let n = |v: u64| usize::try_from(v).map_err(|_| RegionError::Corrupt);
        let capacity =
            Capacity { scopes: n(scopes)?, accounts: n(accounts)?, models: n(models)?, permits: n(permits)? };
        // SAFETY: the caller's promise; `layout_for` checks the capacity and that `len` holds it.
        let region = unsafe { Region::for_reading(base, len, capacity) }?;
        Ok(Inspector { region })
    }

    /// The region's capacities.
    pub fn capacity(&self) -> Capacity {
        self.region.tables().capacity()
    }

    /// Calls `each` with every model variant's metrics (as [`crate::Engine::for_each_model_metrics`],
    /// without the requests refused before any model: those are counted by each process).
    pub fn for_each_model_metrics(&self, each: impl FnMut(&ModelMetrics)) {
        crate::metrics::each_model(self.region.tables().models, each);
    }

    /// Calls `each` with every scope, its levels read at `now_ns` (the clock the serving
    /// processes pass, e.g. `CLOCK_MONOTONIC`).
    pub fn for_each_scope(&self, now_ns: u64, mut each: impl FnMut(&ScopeView)) {
        let t = self.region.tables();
        for slot in t.scopes {
            let id = slot.id.load(Ordering::Acquire);
            if !table::is_ready(id) {
                continue;
            }
            let (model, variant) = scope::model_and_variant(id);
            let (Some(a), Some(m)) = (t.accounts.get(scope::account_of(id)), t.models.get(model)) else {
                continue;
            };
            let (alen, awords) = a.key.read();
            let (mlen, mwords) = m.key.read();
            let (account, account_len) = copy_key::<ACCOUNT_KEY_MAX>(alen, &awords);
            let (model, model_len) = copy_key::<MODEL_KEY_MAX>(mlen, &mwords);
            let view = ScopeView {
                account,
                account_len,
                model,
                model_len,
                variant,
                levels: levels(slot, now_ns),
                in_flight: scope::in_flight_of(slot.tick.load(Ordering::Acquire)),
            };
            each(&view);
        }
    }
}

fn levels(slot: &ScopeSlot, now_ns: u64) -> Levels {
    let word = Word::unpack(read_u128(&slot.bucket));
    let interval = slot.intervals(word.buffer());
    Levels { debt_q: bucket::open(word, now_ns / QUANTUM_NS).debt, interval }
}

const _: () = assert!(size_of::<[u64; 11]>() <= 128);

#[cfg(all(test, not(loom)))]
mod tests {
    use super::agreed;

    /// What `agreed` returns over a scripted sequence of reads (then the last word for ever),
    /// and how many reads it made.
    fn agreed_over(words: &[[u64; 2]]) -> ([u64; 2], usize) {
        let reads = core::cell::Cell::new(0);
        let read = || {
            let i = reads.get();
            reads.set(i + 1);
            words.get(i).or(words.last()).copied().unwrap_or_default()
        };
        (agreed(read), reads.get())
    }

    /// A read torn by a writer (its halves from two writes) differs from the next read: the
    /// word is read again until two reads agree, and that value is the one returned.
    #[test]
    fn a_torn_read_is_read_again_until_two_reads_agree() {
        let (torn, whole) = ([1, 2], [3, 2]);
        assert_eq!(agreed_over(&[torn, whole, whole]), (whole, 3));
        assert_eq!(agreed_over(&[whole, whole]), (whole, 2), "two agreeing reads are enough");
    }

    /// A word a writer changes on every read is given up on after a few tries: the last read.
    #[test]
    fn a_word_that_never_settles_is_read_a_bounded_number_of_times() {
        let changing: std::vec::Vec<[u64; 2]> = (0..100).map(|i| [i, i]).collect();
        assert_eq!(agreed_over(&changing), ([16, 16], 17));
    }
}
