//! An engine's tables in one block of memory that several processes may map, each at its own
//! address (SPEC §11). The block holds no pointers, only indices; it starts with a header that
//! names its layout, capacities, policy, hash seed and permit incarnation, so that a process
//! attaching to it uses the same ones or gets a typed error.

use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::ptr::NonNull;

use crate::account::AccountSlot;
use crate::engine::Engine;
use crate::error::{Error, RegionError, SnapshotError};
use crate::model::ModelSlot;
use crate::permit::PermitSlot;
use crate::policy::Policy;
use crate::scope::{ScopeAdaptation, ScopeSlot};
use crate::storage::{Capacity, Identity, Storage, Tables};
use crate::sync::{AtomicU64, AtomicU128, Ordering};

/// "SLUICEGR", little-endian: the first word of every region.
const MAGIC: u64 = u64::from_le_bytes(*b"SLUICEGR");
/// The layout this build reads and writes; any change to a slot's size or order bumps it.
pub const LAYOUT_VERSION: u32 = 2;
/// `state` of zeroed memory nobody has claimed.
pub(crate) const EMPTY: u64 = 0;
/// `state` while one opener writes the tables (or a restore replaces them).
pub(crate) const INITIALISING: u64 = 0x1417_1A11_5100_0001;
/// `state` once the tables are written and the header is final.
pub(crate) const READY: u64 = 0x5EAD_4EAD_5EAD_0002;
/// Spins an opener waits for another's initialisation before giving up: at least 2^20, and one
/// per 8 bytes of region (the initialiser writes those 8 bytes far faster than a spin turns), so
/// a torn initialisation is noticed in a fraction of a second on a small region, and a large
/// region's initialiser is still waited for.
fn ready_spins(size: usize) -> u64 {
    (size as u64 / 8).max(1 << 20)
}

/// The region's first 128 bytes. Every field is atomic: other processes read it while the
/// initialiser writes it.
#[repr(C, align(128))]
struct Header {
    magic: AtomicU64,
    state: AtomicU64,
    version: AtomicU64,
    capacity: [AtomicU64; 4],
    fingerprint: AtomicU64,
    seed: AtomicU64,
    incarnation: AtomicU64,
    /// CRC-32 of the words above except `state`.
    checksum: AtomicU64,
}

const _: () = assert!(size_of::<Header>() == 128);

/// Where the state word lies in the region, for a host that reads it without mapping the region.
pub(crate) const STATE_OFFSET: u64 = core::mem::offset_of!(Header, state) as u64;

/// Where each table starts, in bytes from the region's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    scopes: usize,
    adaptation: usize,
    accounts: usize,
    models: usize,
    permits: usize,
    size: usize,
}

impl Layout {
    /// The layout of a capacity an engine can have; `BadCapacity` otherwise.
    fn checked(capacity: Capacity) -> Result<Layout, Error> {
        capacity.check()?;
        // Checked capacities never overflow a `usize`; the message is for the impossible case.
        Layout::of(capacity).ok_or(Error::BadCapacity(crate::error::Table::Scopes))
    }

    fn of(capacity: Capacity) -> Option<Layout> {
        fn after<T>(start: usize, n: usize) -> Option<(usize, usize)> {
            let at = start.checked_next_multiple_of(align_of::<T>())?;
            Some((at, at.checked_add(size_of::<T>().checked_mul(n)?)?))
        }
        let (scopes, end) = after::<ScopeSlot>(size_of::<Header>(), capacity.scopes)?;
        let (adaptation, end) = after::<ScopeAdaptation>(end, capacity.scopes)?;
        let (accounts, end) = after::<AccountSlot>(end, capacity.accounts)?;
        let (models, end) = after::<ModelSlot>(end, capacity.models)?;
        let (permits, end) = after::<PermitSlot>(end, capacity.permits)?;
        // Whole 128-byte lines, so regions laid end to end stay aligned.
        let size = end.checked_next_multiple_of(128)?;
        Some(Layout { scopes, adaptation, accounts, models, permits, size })
    }
}

/// How [`Region::open`] may treat memory that is not yet a ready region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// Only attach: wait for another opener to initialise it.
    Attach,
    /// Initialise zeroed memory if no other opener has claimed it; otherwise wait for it.
    InitialiseIfEmpty,
    /// The caller excludes every other opener (it holds a lock they all take): memory left
    /// half-initialised by an opener that died is initialised again.
    Exclusive,
}

/// The bytes a region of `capacity` takes.
///
/// ```
/// use sluicegate_core::{Capacity, region::region_size};
/// assert!(region_size(Capacity::scopes(1024)).unwrap() > 1024 * 128);
/// ```
pub fn region_size(capacity: Capacity) -> Result<usize, Error> {
    Ok(Layout::checked(capacity)?.size)
}

/// A fingerprint of everything a policy decides: regions made for another policy are refused.
pub(crate) fn fingerprint(policy: &Policy) -> u64 {
    struct Crc(crc32fast::Hasher, u64);
    impl core::fmt::Write for Crc {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            self.0.update(s.as_bytes());
            self.1 += s.len() as u64;
            Ok(())
        }
    }
    let mut crc = Crc(crc32fast::Hasher::new(), 0);
    // Debug prints every field, floats exactly: equal policies print the same text.
    let _ = core::fmt::write(&mut crc, format_args!("{policy:?}"));
    u64::from(crc.0.finalize()) | (crc.1 << 32)
}

/// An engine's tables in memory shared between processes (or with a host such as nginx).
///
/// Open it with [`Engine::in_region`](crate::Engine::in_region) or, with `std`,
/// [`Engine::open_shared`](crate::Engine::open_shared).
#[derive(Debug)]
pub struct Region<'a> {
    header: NonNull<Header>,
    base: NonNull<u8>,
    layout: Layout,
    capacity: Capacity,
    memory: PhantomData<&'a [u8]>,
}

// SAFETY: the region holds only atomics, which any thread (or process) may use at once.
unsafe impl Send for Region<'_> {}
// SAFETY: as above.
unsafe impl Sync for Region<'_> {}

impl<'a> Region<'a> {
    /// Opens `len` bytes at `base` as a region of `capacity` for `policy`: initialises it if it
    /// is new (as `opening` allows), else checks its header and attaches.
    ///
    /// `seed` becomes the region's hash seed and incarnation only if this call initialises it;
    /// pick it at random.
    ///
    /// # Safety
    /// `base..base + len` must be valid for reads and writes for `'a`, and be used by nothing
    /// but sluicegate regions opened with this function.
    pub unsafe fn open(
        base: NonNull<u8>,
        len: usize,
        policy: &Policy,
        capacity: Capacity,
        seed: u64,
        opening: Opening,
    ) -> Result<Self, Error> {
        let layout = Layout::checked(capacity)?;
        // SAFETY: the caller's promise, passed on.
        Ok(unsafe { Self::open_laid_out(base, len, layout, policy, capacity, seed, opening) }?)
    }

    /// [`Region::open`] for a capacity already checked and laid out.
    ///
    /// # Safety
    /// As for [`Region::open`].
    unsafe fn open_laid_out(
        base: NonNull<u8>,
        len: usize,
        layout: Layout,
        policy: &Policy,
        capacity: Capacity,
        seed: u64,
        opening: Opening,
    ) -> Result<Self, RegionError> {
        if base.as_ptr() as usize % 128 != 0 {
            return Err(RegionError::Misaligned);
        }
        if !AtomicU128::is_lock_free() {
            return Err(RegionError::NotLockFree);
        }
        if len < size_of::<Header>() {
            return Err(RegionError::TooSmall { needed: layout.size });
        }
        let region = Region { header: base.cast(), base, layout, capacity, memory: PhantomData };
        let header = region.header();
        let fingerprint = fingerprint(policy);
        let mut spins = 0;
        loop {
            let state = header.state.load(Ordering::Acquire);
            let claim = match (state, opening) {
                (READY, _) => {
                    region.check(fingerprint)?;
                    return if len < layout.size {
                        Err(RegionError::TooSmall { needed: layout.size })
                    } else {
                        Ok(region)
                    };
                }
                // Memory that is not all zeros was never ours: leave it alone.
                (EMPTY, _) if region.sealed() != [0; 10] => return Err(RegionError::NotARegion),
                (EMPTY, Opening::InitialiseIfEmpty | Opening::Exclusive) => header
                    .state
                    .compare_exchange(EMPTY, INITIALISING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok(),
                (INITIALISING, Opening::Exclusive) => true,
                (EMPTY | INITIALISING, _) => false,
                _ if header.magic.load(Ordering::Acquire) != MAGIC => return Err(RegionError::NotARegion),
                _ => return Err(RegionError::Corrupt),
            };
            if claim {
                if len < layout.size {
                    header.state.store(state, Ordering::Release);
                    return Err(RegionError::TooSmall { needed: layout.size });
                }
                region.initialise(fingerprint, seed);
                return Ok(region);
            }
            spins += 1;
            if spins >= ready_spins(layout.size) {
                return Err(RegionError::NotReady);
            }
            crate::sync::spin_hint();
        }
    }

    /// A ready region of `capacity` (read from its header), checked by its checksum, for
    /// [`crate::inspect::Inspector`]: nothing that reads through it writes.
    ///
    /// # Safety
    /// `base..base + len` must be readable for `'a`, aligned to 128 bytes.
    #[cfg(not(loom))]
    pub(crate) unsafe fn for_reading(
        base: NonNull<u8>,
        len: usize,
        capacity: Capacity,
    ) -> Result<Self, RegionError> {
        capacity.check().map_err(|_| RegionError::Corrupt)?;
        let layout = Layout::of(capacity).ok_or(RegionError::Corrupt)?;
        if len < layout.size {
            return Err(RegionError::TooSmall { needed: layout.size });
        }
        let region = Region { header: base.cast(), base, layout, capacity, memory: PhantomData };
        if Self::checksum(&region.sealed()) != region.header().checksum.load(Ordering::Acquire) {
            return Err(RegionError::Corrupt);
        }
        Ok(region)
    }

    /// The region `other` opened, mapped again at `base` (by the same process).
    ///
    /// # Safety
    /// As for [`Region::open`], and `base..base + len` must map the memory `other` uses.
    #[cfg(all(feature = "std", unix))]
    pub(crate) unsafe fn reattach(
        base: NonNull<u8>,
        len: usize,
        other: &Region<'_>,
    ) -> Result<Self, RegionError> {
        if base.as_ptr() as usize % 128 != 0 {
            return Err(RegionError::Misaligned);
        }
        if len < other.layout.size {
            return Err(RegionError::TooSmall { needed: other.layout.size });
        }
        Ok(Region {
            header: base.cast(),
            base,
            layout: other.layout,
            capacity: other.capacity,
            memory: PhantomData,
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: `open` checked the memory holds at least a header, aligned.
        unsafe { self.header.as_ref() }
    }

    fn table<T>(&self, offset: usize, n: usize) -> &[T] {
        // SAFETY: `Layout::of` placed `n` aligned `T`s at `offset` within the region, which
        // `open` checked is that long; they were written by `initialise` (this or another
        // process) before `state` became ready, and are atomics.
        unsafe { core::slice::from_raw_parts(self.base.as_ptr().add(offset).cast::<T>(), n) }
    }

    /// The words the checksum covers.
    fn sealed(&self) -> [u64; 10] {
        let h = self.header();
        let [c0, c1, c2, c3] = h.capacity.each_ref().map(|c| c.load(Ordering::Acquire));
        [
            h.magic.load(Ordering::Acquire),
            h.version.load(Ordering::Acquire),
            c0,
            c1,
            c2,
            c3,
            h.fingerprint.load(Ordering::Acquire),
            h.seed.load(Ordering::Acquire),
            h.incarnation.load(Ordering::Acquire),
            0,
        ]
    }

    fn checksum(words: &[u64; 10]) -> u64 {
        let mut crc = crc32fast::Hasher::new();
        words.iter().for_each(|w| crc.update(&w.to_le_bytes()));
        u64::from(crc.finalize())
    }

    fn check(&self, fingerprint: u64) -> Result<(), RegionError> {
        let h = self.header();
        let words = self.sealed();
        if words[0] != MAGIC {
            return Err(RegionError::NotARegion);
        }
        if Self::checksum(&words) != h.checksum.load(Ordering::Acquire) {
            return Err(RegionError::Corrupt);
        }
        if words[1] != u64::from(LAYOUT_VERSION) {
            return Err(RegionError::UnsupportedVersion(words[1] as u32));
        }
        let c = self.capacity;
        if words[2..6] != [c.scopes, c.accounts, c.models, c.permits].map(|n| n as u64) {
            return Err(RegionError::CapacityMismatch);
        }
        if words[6] != fingerprint {
            return Err(RegionError::PolicyMismatch);
        }
        Ok(())
    }

    /// Writes empty tables and the header, then publishes `ready`. Only the opener that moved
    /// `state` to initialising (or holds the exclusive lock) calls this.
    fn initialise(&self, fingerprint: u64, seed: u64) {
        fn fill<T>(region: &Region<'_>, offset: usize, n: usize, new: fn() -> T) {
            let first = region.base.as_ptr().wrapping_add(offset).cast::<T>();
            for i in 0..n {
                // SAFETY: in bounds and aligned (`Layout::of`); nobody else reads the tables
                // before `state` is ready, so writing over whatever bytes were there is sound.
                unsafe { first.add(i).write(new()) };
            }
        }
        let l = self.layout;
        let c = self.capacity;
        fill(self, l.scopes, c.scopes, ScopeSlot::new);
        fill(self, l.adaptation, c.scopes, ScopeAdaptation::new);
        fill(self, l.accounts, c.accounts, AccountSlot::new);
        fill(self, l.models, c.models, ModelSlot::new);
        fill(self, l.permits, c.permits, PermitSlot::new);
        let h = self.header();
        h.magic.store(MAGIC, Ordering::Relaxed);
        h.version.store(u64::from(LAYOUT_VERSION), Ordering::Relaxed);
        for (word, n) in h.capacity.iter().zip([c.scopes, c.accounts, c.models, c.permits]) {
            word.store(n as u64, Ordering::Relaxed);
        }
        h.fingerprint.store(fingerprint, Ordering::Relaxed);
        self.seal(Identity::from_seed(seed));
    }

    /// Records the seed and incarnation, the checksum, and publishes `ready`.
    fn seal(&self, identity: Identity) {
        let h = self.header();
        h.seed.store(identity.seed, Ordering::Relaxed);
        h.incarnation.store(u64::from(identity.incarnation), Ordering::Relaxed);
        h.checksum.store(Self::checksum(&self.sealed()), Ordering::Relaxed);
        h.state.store(READY, Ordering::Release);
    }
}

impl Storage for Region<'_> {
    fn tables(&self) -> Tables<'_> {
        let l = self.layout;
        let c = self.capacity;
        Tables {
            scopes: self.table(l.scopes, c.scopes),
            adaptation: self.table(l.adaptation, c.scopes),
            accounts: self.table(l.accounts, c.accounts),
            models: self.table(l.models, c.models),
            permits: self.table(l.permits, c.permits),
        }
    }

    fn identity(&self) -> Option<Identity> {
        let h = self.header();
        let seed = h.seed.load(Ordering::Acquire);
        Some(Identity { seed, incarnation: h.incarnation.load(Ordering::Acquire) as u32 })
    }

    /// Openers wait while a restore replaces the tables, or redo them (`Exclusive`) if this
    /// process dies before `end_restore`. The caller must keep other processes off the region.
    fn begin_restore(&mut self) -> Result<(), SnapshotError> {
        self.header().state.store(INITIALISING, Ordering::Release);
        Ok(())
    }

    fn end_restore(&mut self, identity: Identity) {
        self.seal(identity);
    }
}

impl<'a> Engine<Region<'a>> {
    /// An engine in memory the host owns and maps into every process that uses it, such as an
    /// nginx shared zone: see [`Region::open`] for `seed` and `opening`.
    ///
    /// ```
    /// use core::ptr::NonNull;
    /// use sluicegate_core::{Capacity, Engine, Opening, Policy, region::region_size};
    /// let capacity = Capacity::scopes(64);
    /// #[repr(C, align(128))]
    /// struct Line([u8; 128]);
    /// let mut memory: Vec<Line> = (0..region_size(capacity)? / 128).map(|_| Line([0; 128])).collect();
    /// let base = NonNull::new(memory.as_mut_ptr().cast::<u8>()).unwrap();
    /// let len = memory.len() * 128;
    /// // SAFETY: `memory` outlives both engines and holds nothing else.
    /// let first = unsafe { Engine::in_region(base, len, Policy::fixed(), capacity, 7, Opening::InitialiseIfEmpty) }?;
    /// let second = unsafe { Engine::in_region(base, len, Policy::fixed(), capacity, 8, Opening::Attach) }?;
    /// assert_eq!(first.capacity(), second.capacity());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Safety
    /// As for [`Region::open`].
    pub unsafe fn in_region(
        base: NonNull<u8>,
        len: usize,
        policy: Policy,
        capacity: Capacity,
        seed: u64,
        opening: Opening,
    ) -> Result<Self, Error> {
        policy.bands()?;
        // SAFETY: the caller's promise, passed on.
        let region = unsafe { Region::open(base, len, &policy, capacity, seed, opening) }?;
        Engine::with_storage(policy, region, seed)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The fingerprint is the CRC-32 of the policy's `Debug` text and, above it, the text's
    /// length: two policies must collide on both to pass for each other.
    #[test]
    fn the_fingerprint_is_the_policy_texts_crc_and_length() {
        let policy = Policy::fixed();
        let text = std::format!("{policy:?}");
        let expected = u64::from(crc32fast::hash(text.as_bytes())) | ((text.len() as u64) << 32);
        assert_eq!(fingerprint(&policy), expected);
        assert_ne!(fingerprint(&policy), fingerprint(&Policy::fireworks_2024()));
    }

    /// Openers wait at least 2^20 spins, and one per 8 bytes of a larger region.
    #[test]
    fn openers_wait_in_proportion_to_the_region() {
        assert_eq!(ready_spins(128), 1 << 20);
        assert_eq!(ready_spins(64 << 20), 8 << 20);
    }
}
