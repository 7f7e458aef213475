//! An engine in a file every worker process maps (`/dev/shm/...`): limits are shared exactly.
//!
//! Openers take an exclusive lock on the file while they create, size, check or initialise it,
//! then hold a shared lock while the engine lives. The kernel drops a dead process's locks, so
//! an initialisation torn by a crash is redone by the next opener, and a restore can tell
//! whether any other process still has the engine open.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;

use fs4::FileExt;

use crate::engine::Engine;
use crate::error::{Error, RegionError, SnapshotError};
use crate::policy::Policy;
use crate::region::{Opening, Region, region_size};
use crate::storage::{Capacity, Identity, Storage, Tables, random_seed};

/// An engine's tables in a memory-mapped file that several processes open.
#[derive(Debug)]
pub struct SharedFile {
    /// Points into `map`, so it is declared (and dropped) first.
    region: Region<'static>,
    map: memmap2::MmapRaw,
    file: File,
}

fn io(e: std::io::Error) -> Error {
    Error::Region(RegionError::Io(e.raw_os_error().unwrap_or(0)))
}

/// Whether the region still has to be initialised: a new (empty or short) file, or a state word
/// that says empty or initialising. Read under the lock, so it cannot change. Any
/// other state is for `Region::open` to attach to or refuse, at once.
fn needs_initialising(file: &File) -> bool {
    use std::os::unix::fs::FileExt as _;
    let mut state = [0; 8];
    file.read_exact_at(&mut state, crate::region::STATE_OFFSET).is_err()
        || matches!(u64::from_le_bytes(state), crate::region::EMPTY | crate::region::INITIALISING)
}

/// Openers wait this long, in all, for another's initialisation of a new file.
const INIT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Takes this opener's lock on `file`: shared to attach to a ready region, exclusive to
/// initialise one (new, or torn by a crash). Attachers hold the shared lock for their lifetime,
/// so an opener never blocks on the exclusive lock (it would wait for every attacher): it tries
/// it, and while another opener holds a lock, waits for the shared lock and looks again.
fn lock(file: &File) -> Result<Opening, Error> {
    let deadline = std::time::Instant::now() + INIT_WAIT;
    loop {
        // An initialiser or a restore holds the exclusive lock: wait for it, but no longer than
        // the deadline. One that is stopped or hung while alive keeps its lock, and a blocking
        // lock would hang every worker started after it.
        match FileExt::try_lock_shared(file) {
            Ok(()) => {
                if !needs_initialising(file) {
                    return Ok(Opening::Attach);
                }
                FileExt::unlock(file).map_err(io)?;
                if FileExt::try_lock(file).is_ok() {
                    return Ok(Opening::Exclusive);
                }
                // Another opener is between its locks.
            }
            Err(fs4::TryLockError::WouldBlock) => {}
            Err(fs4::TryLockError::Error(e)) => return Err(io(e)),
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Region(RegionError::NotReady));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Whether this opener, holding the shared lock, is the only one: it gets the exclusive lock.
/// A refused conversion may have dropped the shared lock, which is then taken back.
fn alone(file: &File) -> Result<bool, Error> {
    if FileExt::try_lock(file).is_ok() {
        return Ok(true);
    }
    FileExt::lock_shared(file).map_err(io)?;
    Ok(false)
}

impl SharedFile {
    /// Creates (mode 0600) or opens `path`, maps it, and initialises it or checks it was made
    /// for this `policy` and `capacity`. The file is never deleted by sluicegate.
    pub fn open(path: &Path, policy: &Policy, capacity: Capacity) -> Result<Self, Error> {
        policy.bands()?;
        let size = region_size(capacity)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let opening = lock(&file)?;
        // Dropping `file` on an error releases the lock.
        let len = file.metadata().map_err(io)?.len();
        if len == 0 && opening == Opening::Exclusive {
            file.set_len(size as u64).map_err(io)?;
        }
        let len = usize::try_from(file.metadata().map_err(io)?.len())
            .map_err(|_| RegionError::TooSmall { needed: size })?;
        let map = memmap2::MmapOptions::new().len(len).map_raw(&file).map_err(io)?;
        let base = NonNull::new(map.as_mut_ptr()).ok_or(RegionError::Io(0))?;
        // SAFETY: the mapping is `len` bytes, readable and writable, and lives as long as the
        // region (both are fields of `SharedFile`, the region dropped first); other processes
        // use the file only through this function.
        let region = unsafe { Region::open(base, len, policy, capacity, random_seed(), opening) }?;
        if opening == Opening::Attach && alone(&file)? {
            // Every other opener is gone: put right what any of them left half-done.
            crate::repair::repair(region.tables());
        }
        FileExt::lock_shared(&file).map_err(io)?;
        Ok(SharedFile { region, map, file })
    }

    /// A second handle on the same region that shares this one's file lock, so that a restore
    /// through either is not refused because of the other (one process's handles are one
    /// opener). It maps the region again, at its own address.
    pub fn try_clone(&self) -> Result<Self, Error> {
        let file = self.file.try_clone().map_err(io)?;
        let map = memmap2::MmapOptions::new().len(self.map.len()).map_raw(&file).map_err(io)?;
        let base = NonNull::new(map.as_mut_ptr()).ok_or(RegionError::Io(0))?;
        // SAFETY: as in `open`; the region was ready when `self` opened it.
        let region = unsafe { Region::reattach(base, map.len(), &self.region) }?;
        Ok(SharedFile { region, map, file })
    }

    /// Where this process mapped the region (each process maps it at its own address).
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }
}

impl Storage for SharedFile {
    #[inline]
    fn tables(&self) -> Tables<'_> {
        self.region.tables()
    }

    fn identity(&self) -> Option<Identity> {
        self.region.identity()
    }

    /// Only when no other process (nor another handle in this one) has the file open.
    fn begin_restore(&mut self) -> Result<(), SnapshotError> {
        if !alone(&self.file).map_err(|_| SnapshotError::InUse)? {
            return Err(SnapshotError::InUse);
        }
        self.region.begin_restore()
    }

    fn end_restore(&mut self, identity: Identity) {
        self.region.end_restore(identity);
        // Back to shared; if this fails the exclusive lock stays, which only delays openers.
        let _ = FileExt::lock_shared(&self.file);
    }
}

impl Engine<SharedFile> {
    /// An engine every process that opens `path` with the same `policy` and `capacity` shares:
    /// one account's limits hold across all of them, exactly (SPEC §11).
    ///
    /// The first opener creates the file (mode 0600) and initialises it; later openers check
    /// its header and attach. A file made for another policy or capacity, or damaged, is an
    /// [`Error::Region`]. Put it on a memory file system such as `/dev/shm`.
    ///
    /// ```
    /// use sluicegate_core::{Capacity, Engine, Policy, Request, ScopeKey};
    /// let path = std::env::temp_dir().join(format!("sluicegate-doc-{}", std::process::id()));
    /// let worker_1 = Engine::open_shared(&path, Policy::fixed(), Capacity::scopes(1024))?;
    /// let worker_2 = Engine::open_shared(&path, Policy::fixed(), Capacity::scopes(1024))?;
    /// let key = ScopeKey::new(b"acct-1", b"model");
    /// worker_1.admit(key, &Request::new(10), 0)?;
    /// assert_eq!(worker_2.limits(key, 0)?.remaining(sluicegate_core::Metric::Requests),
    ///            worker_1.limits(key, 0)?.remaining(sluicegate_core::Metric::Requests));
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_shared(path: impl AsRef<Path>, policy: Policy, capacity: Capacity) -> Result<Self, Error> {
        let file = SharedFile::open(path.as_ref(), &policy, capacity)?;
        Engine::with_storage(policy, file, 0)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::{Capacity, Engine, Policy, Request, ScopeKey, Storage};

    /// An opener that is not alone never repairs: the counts it would recount may be half-way
    /// through a live process's call. Here an account's permits in flight read 99 (as if 98
    /// admissions were between their steps elsewhere): a second handle leaves them so.
    #[test]
    fn an_opener_that_is_not_alone_never_repairs() {
        fn in_flight(e: &Engine<super::SharedFile>, account: usize) -> &crate::sync::AtomicU64 {
            let accounts = e.storage().tables().accounts;
            accounts.get(account).map(|a| &a.in_flight).unwrap_or_else(|| panic!("account {account}"))
        }
        let path =
            std::env::temp_dir().join(std::format!("sluicegate-unit-{}-not-alone", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let capacity = Capacity::scopes(64);
        let first = Engine::open_shared(&path, Policy::fixed(), capacity).unwrap_or_else(|e| panic!("{e}"));
        let key = ScopeKey::new(b"a", b"m");
        assert!(first.admit(key, &Request::new(1), 0).is_ok_and(|d| d.admitted()));
        let at = first.locate(key, 0, false).ok().flatten().unwrap_or_else(|| panic!("a has a scope"));
        assert_eq!(
            in_flight(&first, at.account).load(crate::sync::Ordering::Acquire),
            1,
            "it holds its permit"
        );
        in_flight(&first, at.account).store(99, crate::sync::Ordering::Release);
        let second = Engine::open_shared(&path, Policy::fixed(), capacity).unwrap_or_else(|e| panic!("{e}"));
        let read = in_flight(&second, at.account).load(crate::sync::Ordering::Acquire);
        assert_eq!(read, 99, "the second opener repaired a region in use");
        drop((first, second));
        let _ = std::fs::remove_file(&path);
    }
}
