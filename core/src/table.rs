//! Fixed-capacity open addressing with lock-free slot claiming.
//!
//! A slot's `id` word is `tag << 2 | state`. A key lives within [`PROBE_WINDOW`] slots of its
//! home; lookups scan the whole window (an empty slot does not end a search), so slots can be
//! emptied again. To insert, a thread claims a slot (`CLAIMING`), writes the key, then checks
//! the window for a rival claim of the same key: a published one or a claim nearer home wins
//! and the thread backs out; a claim farther from home is killed (`DEAD`, reset by its owner).
//! Claims and checks are sequentially consistent, so of two rivals at least one sees the other,
//! and at most one key copy is ever published.

use crate::sync::{AtomicU64, Ordering, spin_hint};

/// Slots a key may live in, starting at its home.
pub(crate) const PROBE_WINDOW: usize = 64;

const STATE_MASK: u64 = 3;
const EMPTY: u64 = 0;
const CLAIMING: u64 = 1;
const READY: u64 = 2;
const DEAD: u64 = 3;

/// A slot of a table: anything with an `id` word.
pub(crate) trait Slot {
    fn id(&self) -> &AtomicU64;
}

/// A slot that stores its key's bytes (accounts and models), and may be reclaimed for another
/// key once nothing references it and it holds nothing worth keeping.
pub(crate) trait Keyed {
    fn key_equals(&self, key: &[u8]) -> bool;
    fn refs(&self) -> &crate::refs::Refs;
    fn holds_nothing(&self) -> bool;
}

/// The published id of a key with `tag`.
pub(crate) const fn ready(tag: u64) -> u64 {
    (tag << 2) | READY
}

pub(crate) const fn claiming(tag: u64) -> u64 {
    (tag << 2) | CLAIMING
}

/// The id of an emptied slot that held `id`: the tag stays, so the next claim's generation moves on.
pub(crate) const fn emptied(id: u64) -> u64 {
    id & !STATE_MASK
}

/// The id a repair gives a slot whose claim was abandoned (claimed or dead): empty, tag kept.
pub(crate) const fn abandoned(id: u64) -> Option<u64> {
    match id & STATE_MASK {
        CLAIMING | DEAD => Some(emptied(id)),
        _ => None,
    }
}

pub(crate) const fn tag_of(id: u64) -> u64 {
    id >> 2
}

pub(crate) const fn is_ready(id: u64) -> bool {
    id & STATE_MASK == READY
}

pub(crate) const fn is_claiming(id: u64) -> bool {
    id & STATE_MASK == CLAIMING
}

/// How a table recognises its keys.
pub(crate) struct Probe<'k, F: Fn(usize) -> bool> {
    /// Seeded hash of the key: picks the home slot.
    pub hash: u64,
    /// Tag the id word carries for the key (bits outside `mask` may vary, e.g. a generation).
    pub tag: u64,
    /// Bits of the tag that identify the key.
    pub mask: u64,
    /// Full comparison of a published slot's stored key.
    pub matches: &'k F,
}

impl<F: Fn(usize) -> bool> Probe<'_, F> {
    fn same_tag(&self, id: u64) -> bool {
        tag_of(id) & self.mask == self.tag & self.mask
    }

    fn window(&self, len: usize) -> impl Iterator<Item = usize> + use<F> {
        let home = ((u128::from(self.hash) * len as u128) >> 64) as usize;
        // home < len and the window is at most len long: one subtraction wraps, no division.
        (home..home + len.min(PROBE_WINDOW)).map(move |i| if i >= len { i - len } else { i })
    }
}

/// Whether a key hashing to `hash` may live at `index` of a table of `len` slots.
pub(crate) fn in_window(hash: u64, len: usize, index: usize) -> bool {
    let home = ((u128::from(hash) * len as u128) >> 64) as usize;
    let distance = (index + len - home.min(len)).checked_rem(len).unwrap_or(usize::MAX);
    index < len && distance < len.min(PROBE_WINDOW)
}

/// The published slot holding the key, with its id.
pub(crate) fn find<S: Slot, F: Fn(usize) -> bool>(slots: &[S], probe: &Probe<'_, F>) -> Option<(usize, u64)> {
    probe.window(slots.len()).find_map(|i| {
        let id = slots.get(i)?.id().load(Ordering::Acquire);
        (is_ready(id) && probe.same_tag(id) && (probe.matches)(i)).then_some((i, id))
    })
}

/// What an insert may do with a slot.
pub(crate) trait Claim {
    /// The tag to publish in a slot whose id was `old` (lets scopes bump a generation).
    fn tag(&self, old: u64) -> u64;
    /// Writes the key and a fresh state into slot `index`, claimed by this thread.
    fn init(&self, index: usize);
    /// Tries to take the published, idle slot `index` (id `old`) for the key by swapping its id
    /// to `new`; true when the slot is now claimed.
    fn reclaim(&self, index: usize, old: u64, new: u64) -> bool;
}

/// Rounds a call waits for another party's step before it takes that party for dead (a process
/// of a shared region killed mid-call): some milliseconds. An insert then kills the rival claim
/// of its key (safe, as for a claim farther from home: a live rival backs out and looks again);
/// a lookup of a key whose slot refuses references gives up with `TableFull`.
pub(crate) const PATIENCE: u32 = 1 << 14;

/// Finds the key's slot, inserting it if absent. `None` when the window has no room.
pub(crate) fn find_or_insert<S: Slot, F: Fn(usize) -> bool>(
    slots: &[S],
    probe: &Probe<'_, F>,
    claim: &impl Claim,
) -> Option<(usize, u64)> {
    let mut rounds = 0u32;
    loop {
        if let Some(found) = find(slots, probe) {
            return Some(found);
        }
        let impatient = rounds >= PATIENCE;
        rounds = rounds.saturating_add(1);
        let (mine, pos, id) = match take_slot(slots, probe, claim, impatient) {
            Taken::Slot(mine, pos, id) => (mine, pos, id),
            // Another thread is inserting this very key into the last room: wait for it. The
            // read-modify-write reads the slot's latest state, so the next lookup cannot keep
            // seeing a stale claim.
            Taken::RivalClaiming(rival) => {
                spin_hint();
                if let Some(slot) = slots.get(rival) {
                    slot.id().fetch_or(0, Ordering::SeqCst);
                }
                continue;
            }
            Taken::Full => return None,
        };
        claim.init(mine);
        let slot = slots.get(mine)?;
        let published = ready(tag_of(id));
        if !lost_to_rival(slots, probe, pos, impatient)
            && slot.id().compare_exchange(id, published, Ordering::SeqCst, Ordering::SeqCst).is_ok()
        {
            return Some((mine, published));
        }
        // Backed out or killed: only this thread writes a claimed or dead slot, so a store is safe.
        // The rival that won will publish the key; let it run.
        slot.id().store(id & !STATE_MASK, Ordering::SeqCst);
        spin_hint();
    }
}

/// What looking for room in a key's window found.
enum Taken {
    /// This thread claimed slot `.0` at window position `.1`; its id is now `.2`.
    Slot(usize, usize, u64),
    /// No room, but slot `.0` holds the same key, claimed by a rival: its claim will resolve.
    RivalClaiming(usize),
    /// No room.
    Full,
}

/// Claims the first empty slot of the window, else reclaims the first idle one. Any slot seen
/// holding the same key (being claimed, dying, or published since the lookup) means "look again"
/// rather than "full": another thread is inserting this very key. An `impatient` insert waits
/// only for a published copy: the owner of a claim may be gone (`lost_to_rival` kills it).
fn take_slot<S: Slot, F: Fn(usize) -> bool>(
    slots: &[S],
    probe: &Probe<'_, F>,
    claim: &impl Claim,
    impatient: bool,
) -> Taken {
    let mut rival = None;
    for (pos, i) in probe.window(slots.len()).enumerate() {
        let Some(slot) = slots.get(i) else { continue };
        let mut old = slot.id().load(Ordering::SeqCst);
        if old & STATE_MASK == EMPTY {
            let new = claiming(claim.tag(old));
            match slot.id().compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Taken::Slot(i, pos, new),
                Err(now) => old = now,
            }
        }
        if is_rival(probe, i, old) {
            rival = Some(i);
        }
    }
    for (pos, i) in probe.window(slots.len()).enumerate() {
        let Some(slot) = slots.get(i) else { continue };
        let old = slot.id().load(Ordering::SeqCst);
        if is_ready(old) && !probe.same_tag(old) {
            let new = claiming(claim.tag(old));
            if claim.reclaim(i, old, new) {
                return Taken::Slot(i, pos, new);
            }
        }
        if is_rival(probe, i, old) {
            rival = Some(i);
        }
    }
    match rival {
        Some(i) if !impatient || slots.get(i).is_some_and(|s| is_ready(s.id().load(Ordering::SeqCst))) => {
            Taken::RivalClaiming(i)
        }
        _ => Taken::Full,
    }
}

/// Kills every claim of the key's tag in the window except the one at position `mine`.
fn kill_rival_claims<S: Slot, F: Fn(usize) -> bool>(slots: &[S], probe: &Probe<'_, F>, mine: usize) {
    for (p, i) in probe.window(slots.len()).enumerate() {
        let Some(slot) = slots.get(i) else { continue };
        let id = slot.id().load(Ordering::SeqCst);
        if p != mine && probe.same_tag(id) && is_claiming(id) {
            let _ =
                slot.id().compare_exchange(id, (id & !STATE_MASK) | DEAD, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

/// Whether slot `i`, holding `id`, may be the key being inserted by another thread: claimed or
/// dying with the key's tag, or published under the very key. A published slot of another key
/// that only shares the tag is no rival: nothing about it will change for this insert.
fn is_rival<F: Fn(usize) -> bool>(probe: &Probe<'_, F>, i: usize, id: u64) -> bool {
    id & STATE_MASK != EMPTY && probe.same_tag(id) && (!is_ready(id) || (probe.matches)(i))
}

/// Whether another copy of the key (published, or claimed nearer home) beats the claim at `pos`;
/// claims farther from home are killed on the way, and an `impatient` claim kills nearer ones too.
fn lost_to_rival<S: Slot, F: Fn(usize) -> bool>(
    slots: &[S],
    probe: &Probe<'_, F>,
    pos: usize,
    impatient: bool,
) -> bool {
    if impatient {
        kill_rival_claims(slots, probe, pos);
    }
    for (p, i) in probe.window(slots.len()).enumerate() {
        if p == pos {
            continue;
        }
        let Some(slot) = slots.get(i) else { continue };
        let mut id = slot.id().load(Ordering::SeqCst);
        while probe.same_tag(id) {
            match id & STATE_MASK {
                READY if (probe.matches)(i) => return true,
                CLAIMING if p < pos => return true,
                CLAIMING => {
                    let dead = (id & !STATE_MASK) | DEAD;
                    match slot.id().compare_exchange(id, dead, Ordering::SeqCst, Ordering::SeqCst) {
                        Ok(_) => break,
                        Err(now) => id = now,
                    }
                }
                _ => break,
            }
        }
    }
    false
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    struct Cell(AtomicU64);

    impl Slot for Cell {
        fn id(&self) -> &AtomicU64 {
            &self.0
        }
    }

    /// Claims for a key whose tag is `TAG`; nothing to write, nothing to reclaim.
    struct Insert;

    impl Claim for Insert {
        fn tag(&self, _: u64) -> u64 {
            TAG
        }
        fn init(&self, _: usize) {}
        fn reclaim(&self, _: usize, _: u64, _: u64) -> bool {
            false
        }
    }

    const TAG: u64 = 0x5eed;

    fn slots(ids: [u64; 8]) -> [Cell; 8] {
        ids.map(|id| Cell(AtomicU64::new(id)))
    }

    /// Runs `f` on another thread and fails if it has not returned within a minute: a hang is
    /// the failure these tests look for.
    fn returns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the insert never returned")
    }

    /// A process of a shared region killed between claiming a slot for a key and publishing it
    /// leaves the claim forever. Inserting the key again must not back out before it forever.
    #[test]
    fn an_abandoned_claim_nearer_home_is_killed_and_the_key_published_beside_it() {
        let (found, table) = returns(|| {
            let table = slots([claiming(TAG), 0, 0, 0, 0, 0, 0, 0]);
            let probe = Probe { hash: 0, tag: TAG, mask: u64::MAX, matches: &|_| true };
            (find_or_insert(&table, &probe, &Insert), table.map(|c| c.0.into_inner()))
        });
        assert_eq!(found, Some((1, ready(TAG))));
        assert_eq!(table[0], (TAG << 2) | DEAD, "the abandoned claim is dead, never published");
    }

    /// With no room left, an abandoned claim of the key is not waited for: the window is full.
    #[test]
    fn a_full_window_whose_only_rival_is_an_abandoned_claim_is_full() {
        let (found, table) = returns(|| {
            let mut ids = [1u64, 2, 3, 4, 5, 6, 7, 8].map(ready);
            ids[3] = claiming(TAG);
            let table = slots(ids);
            let probe = Probe { hash: 0, tag: TAG, mask: u64::MAX, matches: &|_| true };
            (find_or_insert(&table, &probe, &Insert), table.map(|c| c.0.into_inner()))
        });
        assert_eq!(found, None);
        assert_eq!(table[3], claiming(TAG), "with no room to publish beside it, it is left as it was");
    }

    /// Of two claims of one key, the one farther from home is killed — marked dead with the
    /// key's tag, so others still see a rival there — and the nearer one goes on to publish.
    #[test]
    fn a_rival_claim_farther_from_home_is_killed_with_its_tag() {
        let table = slots([claiming(TAG), 0, claiming(TAG), 0, 0, 0, 0, 0]);
        let probe = Probe { hash: 0, tag: TAG, mask: u64::MAX, matches: &|_| true };
        assert!(!lost_to_rival(&table, &probe, 0, false), "the claim nearer home wins");
        assert_eq!(table[2].0.load(Ordering::SeqCst), (TAG << 2) | DEAD);
        assert!(lost_to_rival(&table, &probe, 2, false), "the farther one sees the nearer and backs out");
    }

    /// A rival is a claim (or dying claim) with the key's tag, or a published copy of the very
    /// key; an empty slot, another tag, or another key that only shares the tag is none.
    #[test]
    fn rivals_are_claims_of_the_tag_or_the_key_published() {
        let key = Probe { hash: 0, tag: TAG, mask: u64::MAX, matches: &|_| true };
        let other_key = Probe { hash: 0, tag: TAG, mask: u64::MAX, matches: &|_| false };
        assert!(!is_rival(&key, 0, 0), "an empty slot");
        assert!(!is_rival(&key, 0, TAG << 2), "an emptied slot of the tag");
        assert!(is_rival(&other_key, 0, claiming(TAG)), "a claim of the tag");
        assert!(is_rival(&other_key, 0, (TAG << 2) | DEAD), "a dying claim of the tag");
        assert!(is_rival(&key, 0, ready(TAG)), "the key, published");
        assert!(!is_rival(&other_key, 0, ready(TAG)), "another key sharing the tag");
        assert!(!is_rival(&key, 0, claiming(TAG + 1)), "another tag's claim");
    }

    /// With no room, a rival claim is waited for, unless the insert is impatient (its owner may
    /// be dead); a published copy is always waited for: it will be found.
    #[test]
    fn a_full_window_waits_for_a_rival_claim_only_while_patient() {
        let mut ids = [1u64, 2, 3, 4, 5, 6, 7, 8].map(ready);
        ids[5] = claiming(TAG);
        let table = slots(ids);
        let probe = Probe { hash: 0, tag: TAG, mask: u64::MAX, matches: &|_| true };
        assert!(matches!(take_slot(&table, &probe, &Insert, false), Taken::RivalClaiming(5)));
        assert!(matches!(take_slot(&table, &probe, &Insert, true), Taken::Full));
        table[5].0.store(ready(TAG), Ordering::SeqCst);
        assert!(matches!(take_slot(&table, &probe, &Insert, true), Taken::RivalClaiming(5)));
    }

    /// A slot whose id, after `after` looks at it, is published with the key: a rival claim
    /// whose owner is alive and publishes while the insert waits.
    struct Publishing {
        id: AtomicU64,
        looks: core::sync::atomic::AtomicUsize,
        after: usize,
    }

    impl Slot for Publishing {
        fn id(&self) -> &AtomicU64 {
            if self.looks.fetch_add(1, Ordering::SeqCst) + 1 == self.after {
                self.id.store(ready(TAG), Ordering::SeqCst);
            }
            &self.id
        }
    }

    /// An insert that finds its key being claimed by another in a full window starts patient:
    /// it waits for the rival, which publishes, and finds the key there. Starting impatient
    /// would give up on a live rival at once and call the table full.
    #[test]
    fn a_live_rival_claim_in_a_full_window_is_waited_for_until_it_publishes() {
        let found = returns(|| {
            let table = [1u64, 2, 3, 0, 5, 6, 7, 8].map(|t| Publishing {
                id: AtomicU64::new(if t == 0 { claiming(TAG) } else { ready(t) }),
                looks: core::sync::atomic::AtomicUsize::new(0),
                after: if t == 0 { 20 } else { usize::MAX },
            });
            let probe = Probe { hash: 0, tag: TAG, mask: u64::MAX, matches: &|i| i == 3 };
            find_or_insert(&table, &probe, &Insert)
        });
        assert_eq!(found, Some((3, ready(TAG))));
    }

    /// Records the slots an insert offers to reclaim, and takes none.
    struct Offered(std::sync::Mutex<std::vec::Vec<usize>>);

    impl Claim for Offered {
        fn tag(&self, _: u64) -> u64 {
            TAG
        }
        fn init(&self, _: usize) {}
        fn reclaim(&self, index: usize, _: u64, _: u64) -> bool {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(index);
            false
        }
    }

    /// Only slots published under another tag are offered for reclaim: never another insert's
    /// claim in progress, a dying claim, or a published key that shares the tag.
    #[test]
    fn only_published_slots_of_other_tags_are_offered_for_reclaim() {
        let table = slots([claiming(1), (2 << 2) | DEAD, ready(TAG), ready(4), ready(5), 0, 0, 0]);
        for slot in &table[5..] {
            slot.0.store(ready(9), Ordering::SeqCst);
        }
        let probe = Probe { hash: 0, tag: TAG, mask: u64::MAX, matches: &|_| false };
        let offered = Offered(std::sync::Mutex::new(std::vec::Vec::new()));
        assert!(matches!(take_slot(&table, &probe, &offered, false), Taken::Full));
        assert_eq!(offered.0.into_inner().unwrap_or_else(|e| e.into_inner()), [3, 4, 5, 6, 7]);
    }

    /// An emptied slot keeps its tag, so the next claim of the slot moves its generation on and
    /// an id seen before the slot was emptied never matches the next scope there.
    #[test]
    fn an_emptied_slot_keeps_its_tag() {
        assert_eq!(emptied(ready(TAG)), TAG << 2);
        assert_eq!(emptied(claiming(TAG)), TAG << 2);
        assert_eq!(abandoned(claiming(TAG)), Some(TAG << 2));
        assert_eq!(abandoned(ready(TAG)), None);
    }

    /// A key lives within the probe window from its home, and never past the table's end.
    #[test]
    fn the_window_starts_at_home_and_ends_in_the_table() {
        // Hash 0 has home 0 in any table.
        let len = 2 * PROBE_WINDOW;
        assert!(in_window(0, len, 0));
        assert!(in_window(0, len, PROBE_WINDOW - 1));
        assert!(!in_window(0, len, PROBE_WINDOW), "one past the window");
        assert!(!in_window(0, len, len), "past the table's end");
        // In a table smaller than the window, every slot is in it.
        assert!((0..8).all(|i| in_window(u64::MAX, 8, i)));
        assert!(!in_window(u64::MAX, 8, 8));
    }

    /// A published copy of the key is found, however many dead claims surround it.
    #[test]
    fn dead_claims_never_hide_a_published_key() {
        let table = slots([(TAG << 2) | DEAD, claiming(TAG), ready(TAG), 0, 0, 0, 0, 0]);
        let probe = Probe { hash: 0, tag: TAG, mask: u64::MAX, matches: &|_| true };
        assert_eq!(find_or_insert(&table, &probe, &Insert), Some((2, ready(TAG))));
    }
}
