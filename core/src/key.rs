//! Keys: account and model ids as byte strings, the variant, and their seeded hash.

use core::hash::BuildHasher;

use crate::sync::{AtomicU64, Ordering};

/// Longest account id accepted, in bytes.
pub const ACCOUNT_KEY_MAX: usize = 64;
/// Longest model id accepted, in bytes.
pub const MODEL_KEY_MAX: usize = 128;

/// Fast and regular variants of a model have separate limits (SPEC §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Variant {
    /// The regular serving path.
    #[default]
    Regular,
    /// The fast serving path.
    Fast,
}

impl Variant {
    pub(crate) const fn index(self) -> usize {
        match self {
            Variant::Regular => 0,
            Variant::Fast => 1,
        }
    }
}

/// Names a scope: (account, model, variant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScopeKey<'a> {
    /// The account id (an API key's owner, an organisation).
    pub account: &'a [u8],
    /// The model id as the client names it.
    pub model: &'a [u8],
    /// Fast or regular.
    pub variant: Variant,
}

impl<'a> ScopeKey<'a> {
    /// A regular-variant scope key.
    pub const fn new(account: &'a [u8], model: &'a [u8]) -> Self {
        ScopeKey { account, model, variant: Variant::Regular }
    }

    /// The same key for the fast variant.
    pub const fn fast(self) -> Self {
        ScopeKey { variant: Variant::Fast, ..self }
    }
}

/// Hashes a key with the engine's seed (foldhash: fast on short keys, seeded against flooding).
pub(crate) fn hash(seed: u64, bytes: &[u8]) -> u64 {
    #[cfg(test)]
    if let Some(forced) = collide::forced(bytes) {
        return forced;
    }
    foldhash::fast::FixedState::with_seed(seed).hash_one(bytes)
}

/// Unit tests only: keys named `collide-…` all hash alike, so lookups must tell them apart by
/// the full key bytes, not by the ~60-bit tag alone.
#[cfg(test)]
pub(crate) mod collide {
    pub(crate) fn forced(bytes: &[u8]) -> Option<u64> {
        bytes.starts_with(b"collide-").then_some(0x5eed_c011_1de5_0000)
    }
}

/// Key bytes stored in a table slot, written while the slot is being claimed and read only once
/// it is published; atomics keep that race-free without `unsafe`.
#[derive(Debug)]
pub(crate) struct KeyBytes<const WORDS: usize> {
    len: AtomicU64,
    words: [AtomicU64; WORDS],
}

impl<const WORDS: usize> KeyBytes<WORDS> {
    pub(crate) fn new() -> Self {
        KeyBytes { len: AtomicU64::new(0), words: core::array::from_fn(|_| AtomicU64::new(0)) }
    }

    pub(crate) fn store(&self, key: &[u8]) {
        self.len.store(key.len() as u64, Ordering::Relaxed);
        let mut chunks = key.chunks(8);
        for w in &self.words {
            w.store(chunks.next().map_or(0, word_of), Ordering::Relaxed);
        }
    }

    pub(crate) fn equals(&self, key: &[u8]) -> bool {
        if self.len.load(Ordering::Relaxed) != key.len() as u64 {
            return false;
        }
        // Whole words first, as loads; then the zero-padded tail, if any.
        let mut words = self.words.iter().map(|w| w.load(Ordering::Relaxed));
        let mut chunks = key.chunks_exact(8);
        let whole =
            (&mut chunks).zip(&mut words).all(|(c, w)| Some(w) == c.try_into().ok().map(u64::from_le_bytes));
        let tail = chunks.remainder();
        whole && (tail.is_empty() || words.next() == Some(word_of(tail)))
    }

    /// The stored key: its length and the words holding it (zero-padded).
    pub(crate) fn read(&self) -> (usize, [u64; WORDS]) {
        let len = usize::try_from(self.len.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        (len, self.words.each_ref().map(|w| w.load(Ordering::Relaxed)))
    }

    /// Stores a key given as zero-padded words.
    pub(crate) fn write(&self, len: usize, words: &[u64; WORDS]) {
        self.len.store(len as u64, Ordering::Relaxed);
        self.words.iter().zip(words).for_each(|(w, v)| w.store(*v, Ordering::Relaxed));
    }
}

/// A key chunk of up to 8 bytes as a zero-padded little-endian word. Whole chunks load in one
/// move; a byte loop here compiled to a `memcpy` call per chunk, a fifth of a lookup's cost.
fn word_of(chunk: &[u8]) -> u64 {
    if let Ok(whole) = <[u8; 8]>::try_from(chunk) {
        return u64::from_le_bytes(whole);
    }
    chunk.iter().rev().fold(0, |w, b| (w << 8) + u64::from(*b))
}
