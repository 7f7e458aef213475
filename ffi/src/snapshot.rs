//! Snapshot and restore.

use crate::boundary::{arg, boundary, buffer, bytes, out, sg_result, sg_result::*};
use crate::engine::sg_engine;

/// Bytes a snapshot of the engine's current contents needs.
///
/// # Safety
/// `engine` must be a live engine; `size` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_snapshot_size(engine: *const sg_engine, size: *mut usize) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, size) = unsafe { (arg(engine)?, out(size)?) };
        *size = engine.inner.snapshot_size();
        Ok(())
    })
}

/// Writes the engine's state as of `now_ns`; `*written` receives the length, or on
/// `SG_ERR_BUFFER_TOO_SMALL` the length needed. Other threads may use the engine meanwhile; keys
/// they add can make a buffer sized by `sg_snapshot_size` too small: retry with `*written` bytes.
///
/// # Safety
/// `engine` must be a live engine; `buf` NULL (with `len` 0) or `len` writable bytes; `written`
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_snapshot_write(
    engine: *const sg_engine,
    buf: *mut u8,
    len: usize,
    now_ns: u64,
    written: *mut usize,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, buf, written) = unsafe { (arg(engine)?, buffer(buf, len)?, out(written)?) };
        match engine.inner.snapshot(buf, now_ns) {
            Ok(n) => {
                *written = n;
                Ok(())
            }
            Err(sluicegate_core::SnapshotError::BufferTooSmall { needed }) => {
                *written = needed;
                Err(SgErrBufferTooSmall)
            }
            Err(e) => Err(e.into()),
        }
    })
}

/// Replaces the engine's state with a snapshot's, re-based on `now_ns`. The engine must have
/// the snapshot's capacities and must not be used by another thread during the call. On any
/// error the engine is unchanged. To restore while serving, restore into a second engine built
/// with the same config and swap the pointer requests use (README, "Snapshots of a serving
/// engine"); permits the first engine issued are stale in the second.
///
/// A shared engine (`sg_engine_open_shared`) is restored in place, and only while no other
/// process or handle has its file open (`SG_ERR_SNAPSHOT_IN_USE` otherwise). Processes forked
/// from an opener share its file lock and count as that opener, so open the engine in each
/// worker after the fork. An engine in host memory (`sg_engine_in_region`) cannot tell who else
/// uses it: the host must stop every other process first.
///
/// # Safety
/// `engine` must be a live engine used by no other thread meanwhile; `bytes` valid for `len`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_restore(
    engine: *mut sg_engine,
    data: *const u8,
    len: usize,
    now_ns: u64,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract (exclusive use of the engine).
        let (engine, data) = unsafe { (out(engine)?, bytes(data, len)?) };
        Ok(engine.inner.restore(data, now_ns)?)
    })
}
