//! Engines several processes share: in a file every worker maps, or in memory the host owns
//! (an nginx shared zone). Limits hold exactly across all of them (SPEC §11).

use core::ffi::{CStr, c_char};
use core::ptr::NonNull;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use sluicegate_core::{
    Backing, Engine, Opening, Region, SharedFile, region::region_size, storage::random_seed,
};

use crate::boundary::{arg, boundary, out, sg_result, sg_result::*};
use crate::engine::{capacity_of, policy_of, sg_config, sg_engine};

/// Opens, or creates with mode 0600, the file at `path` (put it on a memory file system such as
/// `/dev/shm`) and an engine in it. Every process that opens the same path with the same
/// configuration (preset, overrides, capacities) shares its limits; `config.seed` is ignored
/// (the region keeps its own). The first opener initialises the file; later ones check its
/// header: another configuration is `SG_ERR_REGION_POLICY_MISMATCH` or
/// `SG_ERR_REGION_CAPACITY_MISMATCH`, damaged bytes `SG_ERR_REGION_CORRUPT`, a file that is not
/// a region `SG_ERR_NOT_A_REGION` (and is left alone). A process that dies holding permits
/// harms nobody: they expire after the policy's permit TTL. One killed inside a call may leave
/// a count one off until every process has closed the file: an opener that finds itself alone
/// recounts the region first (docs/region.md). `sg_engine_free` unmaps the file and never
/// deletes it.
///
/// # Safety
/// `path` must be NULL or NUL-terminated; `config` and `engine` as for `sg_engine_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_engine_open_shared(
    path: *const c_char,
    config: *const sg_config,
    engine: *mut *mut sg_engine,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let engine = unsafe { out(engine)? };
        *engine = core::ptr::null_mut();
        // SAFETY: forwarded from this function's contract.
        let (path, config) = unsafe { (arg(path)?, arg(config)?) };
        // SAFETY: the caller promises a NUL-terminated string.
        let path = OsStr::from_bytes(unsafe { CStr::from_ptr(path) }.to_bytes());
        let policy = policy_of(config)?;
        let file = SharedFile::open(path.as_ref(), &policy, capacity_of(config)?)?;
        let inner = Engine::with_storage(policy, Backing::Shared(file), 0)?;
        *engine = Box::into_raw(Box::new(sg_engine::local(inner)));
        Ok(())
    })
}

/// The bytes `sg_engine_in_region` needs for `config`'s capacities (a multiple of 128).
///
/// # Safety
/// `config` must be NULL or valid; `size` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_region_size(config: *const sg_config, size: *mut usize) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (config, size) = unsafe { (arg(config)?, out(size)?) };
        *size = region_size(capacity_of(config)?)?;
        Ok(())
    })
}

/// An engine in `len` bytes at `mem`, memory the host owns and maps into each process that uses
/// it (an nginx shared zone), aligned to 128 bytes and at least `sg_region_size` long. With
/// `initialise` non-zero, zeroed memory is initialised by the first caller (concurrent callers
/// wait for it); with 0, the call only attaches to a region someone initialised
/// (`SG_ERR_REGION_NOT_READY` otherwise). Memory that is neither zero nor a region is
/// `SG_ERR_NOT_A_REGION` and is not written. `sg_engine_free` leaves the memory as it is.
///
/// # Safety
/// `mem..mem + len` must be readable and writable, used for nothing else, and stay mapped until
/// `sg_engine_free`; `config` and `engine` as for `sg_engine_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_engine_in_region(
    mem: *mut core::ffi::c_void,
    len: usize,
    config: *const sg_config,
    initialise: u32,
    engine: *mut *mut sg_engine,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let engine = unsafe { out(engine)? };
        *engine = core::ptr::null_mut();
        // SAFETY: forwarded from this function's contract.
        let config = unsafe { arg(config)? };
        let base = NonNull::new(mem.cast::<u8>()).ok_or(SgErrNull)?;
        let policy = policy_of(config)?;
        policy.bands()?;
        let opening = if initialise != 0 { Opening::InitialiseIfEmpty } else { Opening::Attach };
        let seed = if config.seed == 0 { random_seed() } else { config.seed };
        // SAFETY: the caller promises the memory is valid, exclusive to sluicegate, and mapped
        // until the engine is freed.
        let region = unsafe { Region::open(base, len, &policy, capacity_of(config)?, seed, opening) }?;
        let inner = Engine::with_storage(policy, Backing::Region(region), 0)?;
        *engine = Box::into_raw(Box::new(sg_engine::local(inner)));
        Ok(())
    })
}
