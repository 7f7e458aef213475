//! Durable state (SPEC §10): the whole engine in a versioned, checksummed byte buffer.
//!
//! The format is documented in `docs/snapshot.md`. A snapshot carries the engine's hash seed,
//! its capacities and, per record, the slot it came from; restoring requires the same
//! capacities, adopts the seed and puts every record back in its slot. Placement therefore can
//! never fail half-way, and a restore either applies completely or — on any error — changes
//! nothing. Debts are stored relative to the snapshot's clock and re-based on the restoring
//! engine's clock, so earned limits and bucket levels survive a restart.

use crate::account::{AccountSlot, GRANT_MASK, SETTINGS_KNOWN};
use crate::adapt::MetricState;
use crate::bucket::{self, OFFSET_MAX, QUANTUM_NS, Word};
use crate::engine::{Engine, MODEL_SALT};
use crate::error::SnapshotError;
use crate::key::{self, ACCOUNT_KEY_MAX, MODEL_KEY_MAX};
use crate::metric::PerMetric;
use crate::model::ModelSlot;
use crate::scope::{self, ScopeSlot};
use crate::storage::{Capacity, Identity, Storage};
use crate::sync::{AtomicU64, Ordering};
use crate::table::{self, Keyed, Slot};
use crate::tier::Tier;

const MAGIC: &[u8; 4] = b"SLGT";
/// The format version this build writes and reads.
pub const VERSION: u16 = 2;
const HEADER: usize = 56;
const CHECKSUM: usize = 4;
const ACCOUNT_WORDS: usize = ACCOUNT_KEY_MAX / 8;
const MODEL_WORDS: usize = MODEL_KEY_MAX / 8;
/// The suspension reasons an account record may carry: operator, payment failed, no payment
/// method.
const ACCOUNT_SUSPENSION_BITS: u64 = 0b111;
/// Bytes per account record.
pub const ACCOUNT_RECORD: usize = 8 + ACCOUNT_KEY_MAX + 8 * 17;
/// Bytes per model record.
pub const MODEL_RECORD: usize = 8 + MODEL_KEY_MAX + 8 * 10;
/// Bytes per scope record.
pub const SCOPE_RECORD: usize = 16 + 8 * 4 + 8 * 12;

/// Bounds-checked little-endian writer over a caller's buffer.
struct Out<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Out<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        let end = self.pos + bytes.len();
        let dst = self.buf.get_mut(self.pos..end).ok_or(SnapshotError::BufferTooSmall { needed: end })?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    fn u32(&mut self, v: u32) -> Result<(), SnapshotError> {
        self.put(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> Result<(), SnapshotError> {
        self.put(&v.to_le_bytes())
    }

    fn atomics(&mut self, values: &[AtomicU64]) -> Result<(), SnapshotError> {
        values.iter().try_for_each(|a| self.u64(a.load(Ordering::Acquire)))
    }
}

/// Bounds-checked little-endian reader.
#[derive(Clone)]
struct In<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let bytes = self.buf.get(self.pos..self.pos + n).ok_or(SnapshotError::Truncated)?;
        self.pos += n;
        Ok(bytes)
    }

    fn u16(&mut self) -> Result<u16, SnapshotError> {
        let mut b = [0; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn words<const N: usize>(&mut self) -> Result<[u64; N], SnapshotError> {
        let mut out = [0; N];
        for w in &mut out {
            *w = self.u64()?;
        }
        Ok(out)
    }
}

/// The fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    total_len: usize,
    seed: u64,
    capacity: Capacity,
    accounts: usize,
    models: usize,
    scopes: usize,
    /// The flags and reserved words, both documented as 0.
    flags: u16,
    reserved: u32,
}

fn to_usize(v: u64) -> Result<usize, SnapshotError> {
    usize::try_from(v).map_err(|_| SnapshotError::Corrupt)
}

fn read_header(bytes: &[u8]) -> Result<Header, SnapshotError> {
    let mut r = In { buf: bytes, pos: 0 };
    if r.take(4)? != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    match r.u16()? {
        VERSION => {}
        v => return Err(SnapshotError::UnsupportedVersion(v)),
    }
    let flags = r.u16()?;
    let total_len = to_usize(r.u64()?)?;
    let seed = r.u64()?;
    let [scopes, accounts, models, permits] = [r.u32()?, r.u32()?, r.u32()?, r.u32()?].map(|v| v as usize);
    let capacity = Capacity { scopes, accounts, models, permits };
    let [a, m, s] = [r.u32()?, r.u32()?, r.u32()?].map(|v| v as usize);
    let reserved = r.u32()?;
    Ok(Header { total_len, seed, capacity, accounts: a, models: m, scopes: s, flags, reserved })
}

fn body_len(accounts: usize, models: usize, scopes: usize) -> Option<usize> {
    let a = accounts.checked_mul(ACCOUNT_RECORD)?;
    let m = models.checked_mul(MODEL_RECORD)?;
    let s = scopes.checked_mul(SCOPE_RECORD)?;
    HEADER.checked_add(a)?.checked_add(m)?.checked_add(s)?.checked_add(CHECKSUM)
}

impl<S: Storage> Engine<S> {
    /// Bytes a snapshot of the engine's current contents takes (it may grow if keys are added
    /// before [`Engine::snapshot`] runs).
    pub fn snapshot_size(&self) -> usize {
        let t = self.tables();
        let ready = |ids: &mut dyn Iterator<Item = &AtomicU64>| {
            ids.filter(|id| table::is_ready(id.load(Ordering::Acquire))).count()
        };
        let accounts = ready(&mut t.accounts.iter().map(Slot::id));
        let models = ready(&mut t.models.iter().map(Slot::id));
        let scopes = ready(&mut t.scopes.iter().map(Slot::id));
        body_len(accounts, models, scopes).unwrap_or(usize::MAX)
    }

    /// Writes the whole state into `buf` as of `now_ns`; returns the bytes written.
    ///
    /// Safe under live traffic: each scope is read atomically, as it was at some moment during
    /// the write, and the accounts and models written are held until the end, so every scope
    /// written names a key that is in the file; a scope created after its key was passed is left
    /// out, as if the snapshot had come just before it. The snapshot is not one cut across scopes
    /// while other threads keep admitting. Outstanding permits are not saved: after a restore
    /// they settle with [`SettleError::StalePermit`](crate::SettleError::StalePermit). Keys added
    /// while it runs can make `buf` too small: the error gives a size to retry with.
    ///
    /// ```
    /// use sluicegate_core::{Capacity, Engine, Metric, Policy, Request, ScopeKey};
    /// let a = Engine::new(Policy::fixed(), Capacity::scopes(64))?;
    /// let key = ScopeKey::new(b"acct", b"model");
    /// a.admit(key, &Request::new(0).n(10), 0)?;
    /// let mut buf = vec![0; a.snapshot_size()];
    /// let n = a.snapshot(&mut buf, 0)?;
    /// let mut b = Engine::new(Policy::fixed(), Capacity::scopes(64))?;
    /// b.restore(&buf[..n], 5_000_000_000_000)?; // another clock origin
    /// assert_eq!(b.limits(key, 5_000_000_000_000)?.remaining(Metric::Requests), 50);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn snapshot(&self, buf: &mut [u8], now_ns: u64) -> Result<usize, SnapshotError> {
        let needed = self.snapshot_size();
        if buf.len() < needed {
            return Err(SnapshotError::BufferTooSmall { needed });
        }
        // Expired permits are billed before spend is written: a restore voids outstanding permits,
        // and must not forgive what an abandoned one reserved.
        self.sweep(now_ns, self.tables().permits.len());
        let mut out = Out { buf, pos: HEADER };
        let mut counts = [0u32; 3];
        let body = self.write_body(&mut out, &mut counts, now_ns);
        self.release_held(out.buf, counts);
        if let Err(SnapshotError::BufferTooSmall { .. }) = body {
            let needed = retry_size(self.snapshot_size(), out.buf.len());
            return Err(SnapshotError::BufferTooSmall { needed });
        }
        body?;
        let total = out.pos + CHECKSUM;
        let capacity = self.capacity();
        let mut head = Out { buf: out.buf, pos: 0 };
        head.put(MAGIC)?;
        head.put(&VERSION.to_le_bytes())?;
        head.put(&0u16.to_le_bytes())?;
        head.u64(total as u64)?;
        head.u64(self.seed)?;
        for c in [capacity.scopes, capacity.accounts, capacity.models, capacity.permits] {
            head.u32(c as u32)?;
        }
        counts.iter().try_for_each(|c| head.u32(*c))?;
        head.u32(0)?;
        let body = head.buf.get(..total - CHECKSUM).ok_or(SnapshotError::BufferTooSmall { needed: total })?;
        let crc = crc32fast::hash(body);
        let mut tail = Out { buf: head.buf, pos: total - CHECKSUM };
        tail.u32(crc)?;
        Ok(total)
    }

    /// Writes the records; `counts` says how many of each were written, so that the accounts
    /// and models held can be let go whatever happens.
    fn write_body(&self, out: &mut Out<'_>, counts: &mut [u32; 3], now_ns: u64) -> Result<(), SnapshotError> {
        let t = self.tables();
        for (i, a) in t.accounts.iter().enumerate() {
            if hold(a) {
                write_account(out, i, a).inspect_err(|_| a.refs.unpin())?;
                counts[0] += 1;
            }
        }
        for (i, m) in t.models.iter().enumerate() {
            if hold(m) {
                write_model(out, i, m).inspect_err(|_| m.refs.unpin())?;
                counts[1] += 1;
            }
        }
        let accounts_at = HEADER;
        let models_at = accounts_at + counts[0] as usize * ACCOUNT_RECORD;
        for (i, (s, adaptation)) in t.scopes.iter().zip(t.adaptation).enumerate() {
            let id = s.id.load(Ordering::Acquire);
            if !table::is_ready(id) {
                continue;
            }
            // Apply due ticks first: a word idle for hours reads right only once re-sealed.
            let now = self.tick(crate::engine::Located::of_id(i, id), now_ns);
            let w = s.bucket.load(Ordering::Acquire);
            let states = adaptation.load();
            let usage = s.usage();
            // Reclaimed meanwhile: the word may be the next scope's. Left out, as it is gone.
            if bucket::is_retired(w) || s.id.load(Ordering::Acquire) != id {
                continue;
            }
            let written = |at: usize, count: u32, size: usize, index: usize| {
                has_record(&In { buf: &*out.buf, pos: at }, count as usize, size, index)
            };
            let (model, _) = scope::model_and_variant(id);
            if !(written(accounts_at, counts[0], ACCOUNT_RECORD, scope::account_of(id))?
                && written(models_at, counts[1], MODEL_RECORD, model)?)
            {
                continue;
            }
            let debts = bucket::open(Word::unpack(w), now / QUANTUM_NS).debt;
            write_scope(out, i, id, debts, &states, usage)?;
            counts[2] += 1;
        }
        Ok(())
    }

    /// Lets go of the accounts and models [`Engine::write_body`] held: those it wrote.
    fn release_held(&self, buf: &[u8], counts: [u32; 3]) {
        let t = self.tables();
        let index_at = |pos: usize| {
            let mut r = In { buf, pos };
            r.u32().ok().map(|i| i as usize)
        };
        for k in 0..counts[0] as usize {
            if let Some(a) = index_at(HEADER + k * ACCOUNT_RECORD).and_then(|i| t.accounts.get(i)) {
                a.refs.unpin();
            }
        }
        let models_at = HEADER + counts[0] as usize * ACCOUNT_RECORD;
        for k in 0..counts[1] as usize {
            if let Some(m) = index_at(models_at + k * MODEL_RECORD).and_then(|i| t.models.get(i)) {
                m.refs.unpin();
            }
        }
    }

    /// Replaces the engine's whole state with a snapshot's, re-basing its clock on `now_ns`.
    ///
    /// The engine must have the capacities the snapshot was taken with. A truncated, damaged,
    /// foreign or inconsistent buffer is an error and leaves the engine unchanged. Permits issued
    /// before the restore become stale.
    pub fn restore(&mut self, bytes: &[u8], now_ns: u64) -> Result<(), SnapshotError> {
        let header = self.validate(bytes)?;
        self.storage.begin_restore()?;
        self.seed = header.seed;
        // Odd, as every incarnation: a permit of zeros never matches.
        self.incarnation =
            (self.incarnation.wrapping_mul(0x9E37_79B9) ^ (header.seed as u32)).wrapping_add(2) | 1;
        let filled = self.fill(bytes, &header, now_ns);
        self.storage.end_restore(Identity { seed: self.seed, incarnation: self.incarnation });
        filled
    }

    /// Empties the tables and puts back a validated snapshot's records.
    fn fill(&self, bytes: &[u8], header: &Header, now_ns: u64) -> Result<(), SnapshotError> {
        let t = self.tables();
        t.scopes.iter().for_each(ScopeSlot::clear);
        t.adaptation.iter().for_each(|a| a.store(&PerMetric([MetricState { limit: 0.0, memory: 0.0 }; 4])));
        t.accounts.iter().for_each(AccountSlot::clear);
        t.models.iter().for_each(ModelSlot::clear);
        t.permits.iter().for_each(crate::permit::PermitSlot::clear);
        let mut r = In { buf: bytes, pos: HEADER };
        for _ in 0..header.accounts {
            self.restore_account(&mut r)?;
        }
        for _ in 0..header.models {
            self.restore_model(&mut r)?;
        }
        for _ in 0..header.scopes {
            self.restore_scope(&mut r, now_ns)?;
        }
        Ok(())
    }

    /// Checks every byte of a snapshot before anything is changed.
    fn validate(&self, bytes: &[u8]) -> Result<Header, SnapshotError> {
        let h = read_header(bytes)?;
        if h.total_len > bytes.len() {
            return Err(SnapshotError::Truncated);
        }
        if h.total_len < bytes.len() {
            return Err(SnapshotError::TrailingBytes);
        }
        let body = bytes.get(..h.total_len.saturating_sub(CHECKSUM)).ok_or(SnapshotError::Truncated)?;
        let mut tail = In { buf: bytes, pos: body.len() };
        if h.total_len < HEADER + CHECKSUM || crc32fast::hash(body) != tail.u32()? {
            return Err(SnapshotError::BadChecksum);
        }
        if h.capacity != self.capacity() {
            return Err(SnapshotError::CapacityMismatch);
        }
        let cap = h.capacity;
        // Flags this reader does not know, or a reserved word in use, mean another format.
        if h.flags != 0 || h.reserved != 0 {
            return Err(SnapshotError::Corrupt);
        }
        if body_len(h.accounts, h.models, h.scopes) != Some(h.total_len) {
            return Err(SnapshotError::Corrupt);
        }
        let mut r = In { buf: bytes, pos: HEADER };
        let accounts_at = r.clone();
        let mut last = None;
        for _ in 0..h.accounts {
            let index = r.u32()? as usize;
            let len = r.u32()? as usize;
            let key = key_bytes::<ACCOUNT_WORDS>(r.words()?, len, ACCOUNT_KEY_MAX)?;
            let [settings, _chosen, _period, _historical, _credits, suspension] = r.words::<6>()?;
            let limits: [u64; 8] = r.words()?;
            let quotas: [u64; 3] = r.words()?;
            ascending(&mut last, index, cap.accounts)?;
            placed(key::hash(h.seed, key.as_slice()), cap.accounts, index)?;
            // Only the documented bits: an unknown suspension bit would refuse every request
            // with nothing able to lift it, an unknown setting keep the account forever.
            let tier_ok = Tier::from_index((settings & 0xFF) as u8).is_some()
                && settings & !SETTINGS_KNOWN == 0
                && settings & GRANT_MASK != GRANT_MASK;
            let suspension_ok = suspension & !ACCOUNT_SUSPENSION_BITS == 0;
            let quotas_ok = quotas.iter().all(|q| (q >> 32) <= (q & 0xFFFF_FFFF));
            if !tier_ok || !suspension_ok || !quotas_ok || !overrides_ok(&limits) {
                return Err(SnapshotError::Corrupt);
            }
        }
        let models_at = r.clone();
        last = None;
        for _ in 0..h.models {
            let index = r.u32()? as usize;
            let len = r.u32()? as usize;
            let key = key_bytes::<MODEL_WORDS>(r.words()?, len, MODEL_KEY_MAX)?;
            r.words::<10>()?;
            ascending(&mut last, index, cap.models)?;
            placed(key::hash(h.seed ^ MODEL_SALT, key.as_slice()), cap.models, index)?;
        }
        let scopes_at = r.clone();
        last = None;
        for _ in 0..h.scopes {
            let index = r.u32()? as usize;
            let reserved = r.u32()?;
            let id = r.u64()?;
            let debts: [u64; 4] = r.words()?;
            let states: [u64; 8] = r.words()?;
            r.words::<4>()?;
            ascending(&mut last, index, cap.scopes)?;
            let (model, _) = scope::model_and_variant(id);
            let identity = table::tag_of(id) & scope::IDENTITY_MASK;
            placed(crate::locate::scope_hash(h.seed, identity), cap.scopes, index)?;
            let refers = has_record(&accounts_at, h.accounts, ACCOUNT_RECORD, scope::account_of(id))?
                && has_record(&models_at, h.models, MODEL_RECORD, model)?;
            let debts_ok = debts.iter().all(|d| *d <= OFFSET_MAX);
            let states_ok = states.iter().all(|b| {
                let v = f64::from_bits(*b);
                !v.is_nan() && v >= 0.0
            });
            if reserved != 0 || !table::is_ready(id) || !refers || !debts_ok || !states_ok {
                return Err(SnapshotError::Corrupt);
            }
        }
        // A key is published at most once: a second copy would be unreachable until the first
        // is reclaimed, and then bring back its own state.
        let same_key = |a: &[u8], b: &[u8], max: usize| a.get(4..8 + max) == b.get(4..8 + max);
        let identity = |r: &[u8]| {
            let mut id = [0; 8];
            id.copy_from_slice(r.get(8..16).unwrap_or(&[0; 8]));
            table::tag_of(u64::from_le_bytes(id)) & scope::IDENTITY_MASK
        };
        if repeated(&accounts_at, h.accounts, ACCOUNT_RECORD, |a, b| same_key(a, b, ACCOUNT_KEY_MAX))?
            || repeated(&models_at, h.models, MODEL_RECORD, |a, b| same_key(a, b, MODEL_KEY_MAX))?
            || repeated(&scopes_at, h.scopes, SCOPE_RECORD, |a, b| identity(a) == identity(b))?
        {
            return Err(SnapshotError::Corrupt);
        }
        Ok(h)
    }

    fn restore_account(&self, r: &mut In<'_>) -> Result<(), SnapshotError> {
        let index = r.u32()? as usize;
        let len = r.u32()? as usize;
        let words: [u64; ACCOUNT_WORDS] = r.words()?;
        let key = key_bytes::<ACCOUNT_WORDS>(words, len, ACCOUNT_KEY_MAX)?;
        let a = self.tables().accounts.get(index).ok_or(SnapshotError::Corrupt)?;
        a.key.write(len, &words);
        let fields: [u64; 6] = r.words()?;
        let cells = [&a.settings, &a.chosen_limit, &a.period_spend, &a.historical, &a.credits, &a.suspension];
        cells.iter().zip(fields).for_each(|(c, v)| c.store(v, Ordering::Relaxed));
        // Permits do not survive a restore: no money is reserved, only what was spent.
        a.committed.store(a.period_spend.load(Ordering::Relaxed), Ordering::Relaxed);
        let limits: [u64; 8] = r.words()?;
        let overrides = a.floor_override.iter().chain(&a.ceiling_override);
        overrides.zip(limits).for_each(|(c, v)| c.store(v, Ordering::SeqCst));
        for (q, v) in a.quotas.iter().zip(r.words::<3>()?) {
            q.reset((v >> 32) as u32, v as u32);
        }
        a.refresh_limit(&self.policy.tiers);
        let tag = key::hash(self.seed, key.as_slice()) >> 2;
        a.id().store(table::ready(tag), Ordering::Release);
        Ok(())
    }

    fn restore_model(&self, r: &mut In<'_>) -> Result<(), SnapshotError> {
        let index = r.u32()? as usize;
        let len = r.u32()? as usize;
        let words: [u64; MODEL_WORDS] = r.words()?;
        let key = key_bytes::<MODEL_WORDS>(words, len, MODEL_KEY_MAX)?;
        let m = self.tables().models.get(index).ok_or(SnapshotError::Corrupt)?;
        m.key.write(len, &words);
        let cells = m.reported.iter().chain(&m.capacity).chain(m.price.iter().flatten());
        cells.zip(r.words::<10>()?).for_each(|(c, v)| c.store(v, Ordering::Relaxed));
        let tag = key::hash(self.seed ^ MODEL_SALT, key.as_slice()) >> 2;
        m.id().store(table::ready(tag), Ordering::Release);
        Ok(())
    }

    fn restore_scope(&self, r: &mut In<'_>, now_ns: u64) -> Result<(), SnapshotError> {
        let index = r.u32()? as usize;
        r.u32()?;
        let id = r.u64()?;
        let mut debts: [u64; 4] = r.words()?;
        let [l0, l1, l2, l3, m0, m1, m2, m3] = r.words::<8>()?.map(f64::from_bits);
        let states = PerMetric(
            [(l0, m0), (l1, m1), (l2, m2), (l3, m3)].map(|(limit, memory)| MetricState { limit, memory }),
        );
        let usage: [u64; 4] = r.words()?;
        let t = self.tables();
        let (Some(s), Some(adaptation)) = (t.scopes.get(index), t.adaptation.get(index)) else {
            return Err(SnapshotError::Corrupt);
        };
        let intervals = scope::intervals_of(&states);
        // A metric without a limit (interval 0) owes nothing, as when a limit is lifted
        // (`bucket::rescale`): a debt there would refuse requests on a metric nothing enforces.
        // A snapshot taken while a limit was being lifted can pair the old debt with the new limit.
        for (d, i) in debts.iter_mut().zip(intervals) {
            if i == 0 {
                *d = 0;
            }
        }
        adaptation.store(&states);
        let now_q = now_ns / QUANTUM_NS;
        s.init(intervals, now_q, self.tick_index(now_ns));
        s.bucket.store(bucket::seal(now_q, debts, 0).pack(), Ordering::Release);
        s.set_usage(usage);
        s.id.store(id, Ordering::Release);
        // The scope holds its account and model, as a created one does (validated to exist).
        let (model, _) = scope::model_and_variant(id);
        if let (Some(a), Some(m)) = (t.accounts.get(scope::account_of(id)), t.models.get(model)) {
            for refs in [&a.refs, &m.refs] {
                refs.pin();
                refs.set_scope_hint(index);
            }
        }
        Ok(())
    }
}

/// Room to ask for after keys added during a write overflowed a buffer of `tried` bytes: more
/// than the engine's contents now, and than the buffer tried, with room for a few more keys.
fn retry_size(contents: usize, tried: usize) -> usize {
    const MORE_KEYS: usize = 16 * SCOPE_RECORD;
    contents.max(tried).saturating_add(MORE_KEYS)
}

/// Holds a published key's slot for the snapshot: while held it cannot be reclaimed, so the
/// scopes written after it still name it.
fn hold<T: Slot + Keyed>(slot: &T) -> bool {
    let id = slot.id().load(Ordering::Acquire);
    if !table::is_ready(id) || !slot.refs().pin() {
        return false;
    }
    if slot.id().load(Ordering::Acquire) == id {
        return true;
    }
    slot.refs().unpin();
    false
}

fn write_account(out: &mut Out<'_>, index: usize, a: &AccountSlot) -> Result<(), SnapshotError> {
    let (len, words) = a.key.read();
    out.u32(index as u32)?;
    out.u32(len as u32)?;
    words.iter().try_for_each(|w| out.u64(*w))?;
    for c in [&a.settings, &a.chosen_limit, &a.period_spend, &a.historical, &a.credits, &a.suspension] {
        out.u64(c.load(Ordering::Acquire))?;
    }
    out.atomics(&a.floor_override)?;
    out.atomics(&a.ceiling_override)?;
    a.quotas.iter().try_for_each(|q| {
        let (used, limit) = q.get();
        out.u64((u64::from(used) << 32) | u64::from(limit))
    })
}

fn write_model(out: &mut Out<'_>, index: usize, m: &ModelSlot) -> Result<(), SnapshotError> {
    let (len, words) = m.key.read();
    out.u32(index as u32)?;
    out.u32(len as u32)?;
    words.iter().try_for_each(|w| out.u64(*w))?;
    out.atomics(&m.reported)?;
    out.atomics(&m.capacity)?;
    m.price.iter().try_for_each(|p| out.atomics(p))
}

fn write_scope(
    out: &mut Out<'_>,
    index: usize,
    id: u64,
    debts: [u64; 4],
    states: &PerMetric<MetricState>,
    usage: [u64; 4],
) -> Result<(), SnapshotError> {
    out.u32(index as u32)?;
    out.u32(0)?;
    out.u64(id)?;
    debts.iter().try_for_each(|d| out.u64(*d))?;
    states.0.iter().try_for_each(|m| out.u64(m.limit.to_bits()))?;
    states.0.iter().try_for_each(|m| out.u64(m.memory.to_bits()))?;
    usage.iter().try_for_each(|u| out.u64(*u))
}

/// A stored key's bytes, checked: 1..=max long and zero past its length.
fn key_bytes<const N: usize>(words: [u64; N], len: usize, max: usize) -> Result<KeyBuf<N>, SnapshotError> {
    if len == 0 || len > max {
        return Err(SnapshotError::Corrupt);
    }
    let mut bytes = [0u8; 128];
    for (chunk, w) in bytes.chunks_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    if bytes.get(len..).is_some_and(|rest| rest.iter().any(|b| *b != 0)) {
        return Err(SnapshotError::Corrupt);
    }
    Ok(KeyBuf { bytes, len })
}

struct KeyBuf<const N: usize> {
    bytes: [u8; 128],
    len: usize,
}

impl<const N: usize> KeyBuf<N> {
    fn as_slice(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&[])
    }
}

fn ascending(last: &mut Option<usize>, index: usize, capacity: usize) -> Result<(), SnapshotError> {
    if index >= capacity || last.is_some_and(|l| index <= l) {
        return Err(SnapshotError::Corrupt);
    }
    *last = Some(index);
    Ok(())
}

fn placed(hash: u64, capacity: usize, index: usize) -> Result<(), SnapshotError> {
    if table::in_window(hash, capacity, index) { Ok(()) } else { Err(SnapshotError::Corrupt) }
}

/// Overrides are either absent (both words zero) or a floor of at least 1 below a ceiling.
///
/// Absence is a matter of bits, as the engine reads it: a floor of −0.0 compares equal to 0.0
/// but is an override, of a floor below 1.
fn overrides_ok(limits: &[u64; 8]) -> bool {
    let (floors, ceilings) = limits.split_at(4);
    floors.iter().zip(ceilings).all(|(f, c)| {
        let none = *f == 0 && *c == 0;
        let (f, c) = (f64::from_bits(*f), f64::from_bits(*c));
        none || (f >= 1.0 && c >= f)
    })
}

/// Whether two of the `count` records of `size` bytes at `at` are the `same`. Records that are
/// the same key share a home slot, so both lie in its probe window: in ascending slot order they
/// are fewer than [`table::PROBE_WINDOW`] records apart, counting round the end of the table.
fn repeated(
    at: &In<'_>,
    count: usize,
    size: usize,
    same: impl Fn(&[u8], &[u8]) -> bool,
) -> Result<bool, SnapshotError> {
    let record =
        |i: usize| at.buf.get(at.pos + i * size..at.pos + (i + 1) * size).ok_or(SnapshotError::Truncated);
    for i in 0..count {
        let a = record(i)?;
        for k in 1..count.min(table::PROBE_WINDOW) {
            if same(a, record((i + k) % count)?) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Whether the sorted, fixed-size records at `at` include slot `index` (binary search).
fn has_record(at: &In<'_>, count: usize, size: usize, index: usize) -> Result<bool, SnapshotError> {
    let (mut lo, mut hi) = (0, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let mut r = In { buf: at.buf, pos: at.pos + mid * size };
        let found = r.u32()? as usize;
        match found.cmp(&index) {
            core::cmp::Ordering::Equal => return Ok(true),
            core::cmp::Ordering::Less => lo = mid + 1,
            core::cmp::Ordering::Greater => hi = mid,
        }
    }
    Ok(false)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{SCOPE_RECORD, retry_size};
    use crate::{Capacity, Engine, Heap, Policy, Request, ScopeKey};

    /// Admits one request on each (account, model) pair, making its scope.
    fn admit_all(e: &Engine<Heap>, keys: &[(&str, &str)]) {
        for (account, model) in keys {
            let key = ScopeKey::new(account.as_bytes(), model.as_bytes());
            assert!(e.admit(key, &Request::new(1), 0).is_ok_and(|d| d.admitted()));
        }
    }

    /// How many holds each account, then each model, has.
    fn holds(e: &Engine<Heap>) -> std::vec::Vec<u64> {
        let t = e.tables();
        let accounts = t.accounts.iter().map(|a| a.refs.count());
        accounts.chain(t.models.iter().map(|m| m.refs.count())).collect()
    }

    /// A snapshot holds the accounts and models it writes until it is done, then lets every one
    /// go: after it, each is held exactly as before (by its scopes), so none is kept from reclaim
    /// and none loses a hold a scope needs.
    #[test]
    fn a_snapshot_lets_go_of_every_account_and_model_it_held() {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        admit_all(&e, &[("a", "m1"), ("b", "m1"), ("b", "m2"), ("c", "m3")]);
        let before = holds(&e);
        assert_eq!(before.iter().sum::<u64>(), 8, "each of the four scopes holds its account and model");
        let mut buf = std::vec![0; e.snapshot_size()];
        assert!(e.snapshot(&mut buf, 0).is_ok());
        assert_eq!(holds(&e), before);
    }

    /// A scope whose word a reclaimer has retired but not yet handed on (a reclaimer stopped
    /// mid-way, as a killed process of a shared region can leave one) is left out: its word
    /// holds the marker, not debts.
    #[test]
    fn a_scope_retired_mid_reclaim_is_left_out() {
        let e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        admit_all(&e, &[("a", "m"), ("b", "m")]);
        let at = e
            .locate(ScopeKey::new(b"a", b"m"), 0, false)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("a has a scope"));
        let slot = &e.tables().scopes[at.slot];
        assert!(slot.retire(slot.bucket.load(crate::sync::Ordering::Acquire)));
        let mut buf = std::vec![0; e.snapshot_size()];
        let n = e.snapshot(&mut buf, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(buf[48..52], 1u32.to_le_bytes(), "only b's scope is written");
        let mut restored =
            Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        assert!(restored.restore(&buf[..n], 0).is_ok());
    }

    /// A restore over a used engine forgets the holds of the scopes it replaces: each account
    /// and model is held once per restored scope, or a key whose scopes all went could never
    /// be reclaimed.
    #[test]
    fn a_restore_over_a_used_engine_holds_each_key_once_per_restored_scope() {
        let mut e = Engine::new(Policy::fixed(), Capacity::scopes(64)).unwrap_or_else(|e| panic!("{e}"));
        admit_all(&e, &[("a", "m1"), ("b", "m1"), ("b", "m2")]);
        let mut buf = std::vec![0; e.snapshot_size()];
        let n = e.snapshot(&mut buf, 0).unwrap_or_else(|e| panic!("{e}"));
        admit_all(&e, &[("a", "m2"), ("c", "m1"), ("d", "m3")]);
        assert!(e.restore(&buf[..n], 0).is_ok());
        let held = holds(&e);
        assert_eq!(held.iter().sum::<u64>(), 6, "three scopes, each holding its account and model: {held:?}");
    }

    #[test]
    fn a_retry_asks_for_more_than_the_contents_and_the_buffer_tried() {
        assert_eq!(retry_size(1_000, 600), 1_000 + 16 * SCOPE_RECORD);
        assert_eq!(retry_size(600, 1_000), 1_000 + 16 * SCOPE_RECORD);
        assert_eq!(retry_size(usize::MAX, 0), usize::MAX);
    }
}
