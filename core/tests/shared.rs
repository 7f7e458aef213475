//! Engines in one shared region (SPEC §11): exact across mappings, typed errors for regions
//! that disagree or are damaged, torn initialisation redone, restore only when alone.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Barrier;
use std::thread;

use sluicegate_core::{
    Capacity, Completion, Engine, Error, Metric, Policy, RegionError, Request, ScopeKey, SettleError, SharedFile,
    SnapshotError, Storage, Usage,
};

const KEY: ScopeKey<'static> = ScopeKey::new(b"acct-shared", b"model");
const SECOND: u64 = 1_000_000_000;

fn policy(requests_per_minute: f64) -> Policy {
    let mut policy = Policy::fixed().with_fixed_limit(Metric::Requests, requests_per_minute);
    policy.max_in_flight = Some(u32::MAX);
    policy
}

fn capacity() -> Capacity {
    Capacity { scopes: 256, accounts: 256, models: 16, permits: 4096 }
}

/// A fresh path under the temp dir, removed when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("sluicegate-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        TempPath(path)
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open(path: &TempPath, policy: Policy) -> Result<Engine<SharedFile>, Error> {
    Engine::open_shared(&path.0, policy, capacity())
}

fn region_error(result: Result<Engine<SharedFile>, Error>) -> RegionError {
    match result {
        Err(Error::Region(e)) => e,
        other => panic!("expected a region error, got {other:?}"),
    }
}

#[test]
fn two_mappings_at_different_addresses_admit_exactly_the_limit_from_four_threads() {
    let path = TempPath::new("exact");
    let engines = [open(&path, policy(600.0)).unwrap(), open(&path, policy(600.0)).unwrap()];
    let tables = engines.each_ref().map(|e| e.storage().as_ptr());
    assert_ne!(tables[0], tables[1], "each open maps the file at its own address");
    let barrier = Barrier::new(4);
    let admitted: usize = thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let engine = &engines[t % 2];
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    (0..500).filter(|_| engine.admit(KEY, &Request::new(0), 0).unwrap().admitted()).count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(admitted, 600);
    for engine in &engines {
        assert_eq!(engine.limits(KEY, 0).unwrap().remaining(Metric::Requests), 0);
    }
    // A second later both see the same 10 requests refilled.
    let later = engines.each_ref().map(|e| e.limits(KEY, SECOND).unwrap().remaining(Metric::Requests));
    assert_eq!(later, [10, 10]);
}

#[test]
fn a_permit_from_one_mapping_settles_through_another_exactly_once() {
    let path = TempPath::new("settle");
    let a = open(&path, policy(600.0)).unwrap();
    let b = open(&path, policy(600.0)).unwrap();
    let d = a.admit(KEY, &Request::new(10).max_tokens(20), 0).unwrap();
    let permit = d.permit().copied().unwrap();
    b.settle(&permit, &Usage::new(10, 5), Completion::Success, SECOND).unwrap();
    assert_eq!(a.settle(&permit, &Usage::new(10, 5), Completion::Success, SECOND), Err(SettleError::AlreadySettled));
}

#[test]
fn the_file_is_created_readable_and_writable_by_its_owner_only() {
    let path = TempPath::new("mode");
    let _engine = open(&path, policy(600.0)).unwrap();
    let mode = std::fs::metadata(&path.0).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn an_opener_with_other_capacities_or_another_policy_gets_a_typed_error() {
    let path = TempPath::new("mismatch");
    let _first = open(&path, policy(600.0)).unwrap();
    let other = Capacity { permits: 2048, ..capacity() };
    let bigger = Capacity { scopes: 512, ..capacity() };
    assert_eq!(region_error(Engine::open_shared(&path.0, policy(600.0), other)), RegionError::CapacityMismatch);
    assert_eq!(region_error(Engine::open_shared(&path.0, policy(600.0), bigger)), RegionError::CapacityMismatch);
    assert_eq!(region_error(open(&path, policy(601.0))), RegionError::PolicyMismatch);
    assert!(open(&path, policy(600.0)).is_ok(), "a refused opener changes nothing");
}

#[test]
fn every_flipped_header_bit_is_a_typed_error() {
    let path = TempPath::new("flip");
    drop(open(&path, policy(600.0)).unwrap());
    let pristine = std::fs::read(&path.0).unwrap();
    // The header's eleven words: magic, state, version, capacities, fingerprint, seed,
    // incarnation, checksum.
    for bit in 0..88 * 8 {
        let mut damaged = pristine.clone();
        damaged[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(&path.0, &damaged).unwrap();
        let e = region_error(open(&path, policy(600.0)));
        assert!(
            matches!(e, RegionError::NotARegion | RegionError::Corrupt),
            "bit {bit}: {e:?} (a flip must read as damage, not as a mismatch)"
        );
        // Nothing was written over the damaged region.
        assert_eq!(std::fs::read(&path.0).unwrap(), damaged, "bit {bit}");
    }
    std::fs::write(&path.0, &pristine).unwrap();
    assert!(open(&path, policy(600.0)).is_ok());
}

#[test]
fn a_file_that_is_not_a_region_is_refused_and_left_alone() {
    let path = TempPath::new("foreign");
    let foreign = b"not a region at all".repeat(2000);
    std::fs::write(&path.0, &foreign).unwrap();
    assert_eq!(region_error(open(&path, policy(600.0))), RegionError::NotARegion);
    assert_eq!(std::fs::read(&path.0).unwrap(), foreign);
    // Zeros where the state word is, text elsewhere: still not ours to initialise.
    let mut zeroed_state = foreign.clone();
    zeroed_state[8..16].fill(0);
    std::fs::write(&path.0, &zeroed_state).unwrap();
    assert_eq!(region_error(open(&path, policy(600.0))), RegionError::NotARegion);
    assert_eq!(std::fs::read(&path.0).unwrap(), zeroed_state);
    std::fs::write(&path.0, b"short").unwrap();
    assert!(matches!(region_error(open(&path, policy(600.0))), RegionError::TooSmall { .. }));
}

#[test]
fn an_initialisation_torn_by_a_crash_is_redone_by_the_next_opener() {
    let path = TempPath::new("torn");
    {
        let engine = open(&path, policy(600.0)).unwrap();
        engine.admit(KEY, &Request::new(0), 0).unwrap();
    }
    // An opener died between claiming the region and publishing it ready: the state word
    // (bytes 8..16) says "initialising" and nobody holds the file lock.
    let mut bytes = std::fs::read(&path.0).unwrap();
    bytes[8..16].copy_from_slice(&0x1417_1A11_5100_0001_u64.to_le_bytes());
    std::fs::write(&path.0, &bytes).unwrap();
    let engine = open(&path, policy(600.0)).unwrap();
    assert_eq!(engine.limits(KEY, 0).unwrap().remaining(Metric::Requests), 600, "initialised afresh");
}

#[test]
fn a_region_outlives_its_processes_and_a_later_opener_sees_its_state() {
    let path = TempPath::new("outlive");
    {
        let engine = open(&path, policy(600.0)).unwrap();
        for _ in 0..7 {
            assert!(engine.admit(KEY, &Request::new(0), 0).unwrap().admitted());
        }
    }
    assert!(path.0.exists(), "dropping the engine never deletes the file");
    let engine = open(&path, policy(600.0)).unwrap();
    assert_eq!(engine.limits(KEY, 0).unwrap().remaining(Metric::Requests), 593);
}

#[test]
fn restore_is_refused_while_another_opener_holds_the_region_and_allowed_alone() {
    let path = TempPath::new("restore");
    let mut a = open(&path, policy(600.0)).unwrap();
    a.admit(KEY, &Request::new(0), 0).unwrap();
    let mut buf = vec![0; a.snapshot_size()];
    let n = a.snapshot(&mut buf, 0).unwrap();
    let snapshot = &buf[..n];
    for _ in 0..5 {
        a.admit(KEY, &Request::new(0), 0).unwrap();
    }
    let b = open(&path, policy(600.0)).unwrap();
    assert_eq!(a.restore(snapshot, 0), Err(SnapshotError::InUse));
    assert_eq!(b.limits(KEY, 0).unwrap().remaining(Metric::Requests), 594, "a refused restore changes nothing");
    drop(b);
    a.restore(snapshot, 0).unwrap();
    assert_eq!(a.limits(KEY, 0).unwrap().remaining(Metric::Requests), 599);
    // A later opener adopts the restored seed: it finds the same scope.
    let c = open(&path, policy(600.0)).unwrap();
    assert_eq!(c.limits(KEY, 0).unwrap().remaining(Metric::Requests), 599);
    // And a permit issued by `c` settles through `a`: one incarnation for both.
    let permit = c.admit(KEY, &Request::new(0), 0).unwrap().permit().copied().unwrap();
    a.settle(&permit, &Usage::new(0, 0), Completion::Success, SECOND).unwrap();
}

#[test]
fn permits_of_a_heap_engine_are_stale_on_another_with_the_same_seed() {
    let make = || {
        let heap = sluicegate_core::Heap::new(capacity()).unwrap();
        Engine::with_storage(policy(600.0), heap, 42).unwrap()
    };
    let (a, b) = (make(), make());
    let permit = a.admit(KEY, &Request::new(0), 0).unwrap().permit().copied().unwrap();
    b.admit(KEY, &Request::new(0), 0).unwrap();
    assert_eq!(b.settle(&permit, &Usage::new(0, 0), Completion::Success, 0), Err(SettleError::StalePermit));
}

/// The storage's identity is the region's, whatever seed the engine was given.
#[test]
fn every_opener_uses_the_regions_seed_and_incarnation() {
    let path = TempPath::new("identity");
    let files = [0, 1, 2].map(|_| SharedFile::open(&path.0, &policy(600.0), capacity()).unwrap());
    let identities = files.each_ref().map(|f| f.identity().unwrap());
    assert_eq!(identities[0], identities[1]);
    assert_eq!(identities[1], identities[2]);
}
