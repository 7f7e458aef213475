//! Result codes, the panic boundary every function runs inside, and checked pointer access.

use core::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};

use sluicegate_core::{
    Error, PolicyError, QuotaError, RegionError, SettleError, SnapshotError, text::BufferTooSmall,
};

/// What every function returns. `SG_OK` is 0; `sg_result_str` describes each code.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum sg_result {
    /// Success.
    SgOk = 0,
    /// A required pointer argument was NULL.
    SgErrNull = 1,
    /// Rust code panicked; the call had no effect. Please report it.
    SgErrPanic = 2,
    /// An argument is out of range (an unknown enum value, a bad preset name, not UTF-8).
    SgErrInvalidArgument = 3,
    /// The policy is unusable (a floor above its ceiling, a hard factor below 1, a permit TTL
    /// below 1 s, ...).
    SgErrPolicy = 4,
    /// A capacity is zero or too large.
    SgErrBadCapacity = 5,
    /// A table has no free slot for this key.
    SgErrTableFull = 6,
    /// An account or model key is empty.
    SgErrEmptyKey = 7,
    /// An account key is longer than 64 bytes or a model key longer than 128.
    SgErrKeyTooLong = 8,
    /// No such account.
    SgErrUnknownAccount = 9,
    /// A spend limit above the tier's.
    SgErrSpendLimitAboveTier = 10,
    /// A quota acquisition beyond its limit.
    SgErrQuotaExhausted = 11,
    /// A quota release beyond what is held.
    SgErrQuotaNotHeld = 12,
    /// A quota limit below what is in use.
    SgErrQuotaBelowUse = 13,
    /// The permit was already settled.
    SgErrAlreadySettled = 14,
    /// The permit's scope was reclaimed or the engine restored since it was issued.
    SgErrStalePermit = 15,
    /// Usage reported at settle is impossible (cached above prompt tokens, or too large).
    SgErrInvalidUsage = 16,
    /// The output buffer is too small; the size needed was written to the size out-parameter.
    SgErrBufferTooSmall = 17,
    /// The snapshot ends early.
    SgErrSnapshotTruncated = 18,
    /// The snapshot has bytes past its end.
    SgErrSnapshotTrailingBytes = 19,
    /// Not a sluicegate snapshot.
    SgErrSnapshotBadMagic = 20,
    /// A snapshot format version this build does not read.
    SgErrSnapshotUnsupportedVersion = 21,
    /// The snapshot's checksum does not match.
    SgErrSnapshotBadChecksum = 22,
    /// The snapshot was taken with other table capacities.
    SgErrSnapshotCapacityMismatch = 23,
    /// A snapshot record is inconsistent.
    SgErrSnapshotCorrupt = 24,
    /// The permit was not settled within the policy's permit TTL: its reservation stays charged
    /// as if fully used, and nothing changed.
    SgErrPermitExpired = 25,
    /// The memory is shorter than the configuration needs (`sg_region_size` says how much).
    SgErrRegionTooSmall = 26,
    /// The memory is not aligned to 128 bytes.
    SgErrRegionMisaligned = 27,
    /// This machine has no lock-free 16-byte atomics: processes cannot share an engine.
    SgErrRegionNotLockFree = 28,
    /// The memory or file holds something other than a sluicegate region; it was left alone.
    SgErrNotARegion = 29,
    /// A region of a layout this build does not read.
    SgErrRegionUnsupportedVersion = 30,
    /// The region's header checksum does not match: its bytes were damaged.
    SgErrRegionCorrupt = 31,
    /// The region was made for other table capacities.
    SgErrRegionCapacityMismatch = 32,
    /// The region was made for another policy.
    SgErrRegionPolicyMismatch = 33,
    /// Another opener's initialisation did not finish in time (or, only attaching, nobody has
    /// initialised the region).
    SgErrRegionNotReady = 34,
    /// The operating system refused to create, size, lock or map the file (see `errno`).
    SgErrIo = 35,
    /// A restore of a shared engine while another process (or handle) has it open.
    SgErrSnapshotInUse = 36,
    /// The request body is not JSON (`error_offset` says where): answer 400.
    SgErrJsonMalformed = 37,
    /// The request body nests deeper than 64 (`error_offset` says where): answer 400.
    SgErrJsonTooDeep = 38,
    /// The request body ends before its JSON does, or is empty: answer 400.
    SgErrJsonTruncated = 39,
    /// The request body is JSON but not an object: answer 400.
    SgErrBodyNotAnObject = 40,
    /// The request body has no `model`, or one that is not a non-empty string: answer 400.
    SgErrBodyMissingModel = 41,
    /// The model is longer than `SG_MODEL_MAX` bytes or not Unicode (a lone surrogate): answer
    /// 400.
    SgErrBodyInvalidModel = 42,
    /// `max_completion_tokens` (or, without it, `max_tokens`) is not an integer from 1 to 2^32:
    /// answer 400.
    SgErrBodyInvalidMaxTokens = 43,
    /// `n` is not an integer from 1 to 2^32: answer 400.
    SgErrBodyInvalidN = 44,
    /// The `sg_usage_scanner` was never initialised by `sg_usage_scanner_init`, or was finished
    /// since (or a call on it panicked).
    SgErrScannerNotInitialised = 45,
    /// Redis could not be reached within the timeout, refused, answered an error, or answered
    /// something that is not sluicegate's (`sg_engine_connect_redis`).
    SgErrRedis = 46,
}

use sg_result::*;

/// A static, NUL-terminated description of a result code (any value is accepted).
#[unsafe(no_mangle)]
pub extern "C" fn sg_result_str(code: u32) -> *const c_char {
    let text: &'static core::ffi::CStr = match code {
        0 => c"ok",
        1 => c"a required pointer argument was NULL",
        2 => c"internal panic (the call had no effect)",
        3 => c"argument out of range",
        4 => c"invalid policy",
        5 => c"capacity is zero or too large",
        6 => c"table is full",
        7 => c"empty account or model key",
        8 => c"key too long",
        9 => c"unknown account",
        10 => c"spend limit above the tier's",
        11 => c"quota exhausted",
        12 => c"quota release beyond what is held",
        13 => c"quota limit below what is in use",
        14 => c"permit already settled",
        15 => c"permit is stale",
        16 => c"invalid usage",
        17 => c"buffer too small",
        18 => c"snapshot truncated",
        19 => c"snapshot has trailing bytes",
        20 => c"not a sluicegate snapshot",
        21 => c"unsupported snapshot version",
        22 => c"snapshot checksum mismatch",
        23 => c"snapshot taken with other capacities",
        24 => c"snapshot record inconsistent",
        25 => c"permit expired (not settled within the permit TTL)",
        26 => c"region too small for this configuration",
        27 => c"region not aligned to 128 bytes",
        28 => c"no lock-free 16-byte atomics: cannot share an engine between processes",
        29 => c"not a sluicegate region",
        30 => c"unsupported region layout version",
        31 => c"region header corrupt",
        32 => c"region made for other capacities",
        33 => c"region made for another policy",
        34 => c"region not ready (initialisation did not finish)",
        35 => c"operating system error on the shared file",
        36 => c"snapshot restore refused: the shared engine is in use by another process",
        37 => c"request body is not JSON",
        38 => c"request body nested too deep",
        39 => c"request body ends early (or is empty)",
        40 => c"request body is not a JSON object",
        41 => c"request body has no model",
        42 => c"request body's model is too long or not Unicode",
        43 => c"request body's max_tokens is not a positive integer",
        44 => c"request body's n is not a positive integer",
        45 => c"usage scanner not initialised (or already finished)",
        46 => c"redis unreachable, or its answer an error or not sluicegate's",
        _ => c"unknown result code",
    };
    text.as_ptr()
}

/// Runs a function body inside the one panic boundary: nothing unwinds into C.
pub(crate) fn boundary(body: impl FnOnce() -> Result<(), sg_result>) -> sg_result {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => SgOk,
        Ok(Err(code)) => code,
        Err(_) => SgErrPanic,
    }
}

/// A shared reference from a C pointer, or `SG_ERR_NULL`.
///
/// # Safety
/// `p` must be NULL or point to a valid, aligned `T` that outlives `'a`.
pub(crate) unsafe fn arg<'a, T>(p: *const T) -> Result<&'a T, sg_result> {
    // SAFETY: the caller promises p is NULL or valid; NULL is refused here.
    unsafe { p.as_ref() }.ok_or(SgErrNull)
}

/// A mutable reference from a C pointer, or `SG_ERR_NULL`.
///
/// # Safety
/// `p` must be NULL or point to a valid, aligned, writable `T` that outlives `'a`.
pub(crate) unsafe fn out<'a, T>(p: *mut T) -> Result<&'a mut T, sg_result> {
    // SAFETY: as for `arg`, and nobody else holds a reference to *p during the call.
    unsafe { p.as_mut() }.ok_or(SgErrNull)
}

/// Frees what `Box::into_raw` made, across the boundary; NULL is ignored.
///
/// # Safety
/// `p` must be NULL or come from `Box::into_raw` and not have been freed.
pub(crate) unsafe fn free_boxed<T>(p: *mut T) {
    let _ = boundary(|| {
        if !p.is_null() {
            // SAFETY: the caller's contract: p came from Box::into_raw and is freed only once.
            drop(unsafe { Box::from_raw(p) });
        }
        Ok(())
    });
}

/// A byte string from a pointer and length; NULL is accepted only with length 0.
///
/// # Safety
/// `p` must be NULL or point to `len` readable bytes that outlive `'a`.
pub(crate) unsafe fn bytes<'a>(p: *const u8, len: usize) -> Result<&'a [u8], sg_result> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(SgErrNull);
    }
    // SAFETY: p is non-null and the caller promises len readable bytes.
    Ok(unsafe { core::slice::from_raw_parts(p, len) })
}

/// A writable byte buffer from a pointer and length; NULL is accepted only with length 0.
///
/// # Safety
/// `p` must be NULL or point to `len` writable bytes that outlive `'a`, not aliased meanwhile.
pub(crate) unsafe fn buffer<'a>(p: *mut u8, len: usize) -> Result<&'a mut [u8], sg_result> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(SgErrNull);
    }
    // SAFETY: p is non-null and the caller promises len writable, unaliased bytes.
    Ok(unsafe { core::slice::from_raw_parts_mut(p, len) })
}

/// Reports the bytes written, or on a too-small buffer the size needed, through `written`.
pub(crate) fn sized(result: Result<usize, BufferTooSmall>, written: &mut usize) -> Result<(), sg_result> {
    let (n, outcome) = match result {
        Ok(n) => (n, Ok(())),
        Err(e) => (e.needed, Err(SgErrBufferTooSmall)),
    };
    *written = n;
    outcome
}

impl From<Error> for sg_result {
    fn from(e: Error) -> Self {
        match e {
            Error::Policy(_) => SgErrPolicy,
            Error::BadCapacity(_) => SgErrBadCapacity,
            Error::TableFull(_) => SgErrTableFull,
            Error::EmptyKey => SgErrEmptyKey,
            Error::KeyTooLong { .. } => SgErrKeyTooLong,
            Error::UnknownAccount => SgErrUnknownAccount,
            Error::SpendLimitAboveTier { .. } => SgErrSpendLimitAboveTier,
            Error::Quota(q) => q.into(),
            Error::Region(r) => r.into(),
        }
    }
}

impl From<RegionError> for sg_result {
    fn from(e: RegionError) -> Self {
        match e {
            RegionError::TooSmall { .. } => SgErrRegionTooSmall,
            RegionError::Misaligned => SgErrRegionMisaligned,
            RegionError::NotLockFree => SgErrRegionNotLockFree,
            RegionError::NotARegion => SgErrNotARegion,
            RegionError::UnsupportedVersion(_) => SgErrRegionUnsupportedVersion,
            RegionError::Corrupt => SgErrRegionCorrupt,
            RegionError::CapacityMismatch => SgErrRegionCapacityMismatch,
            RegionError::PolicyMismatch => SgErrRegionPolicyMismatch,
            RegionError::NotReady => SgErrRegionNotReady,
            RegionError::Io(_) => SgErrIo,
        }
    }
}

impl From<PolicyError> for sg_result {
    fn from(_: PolicyError) -> Self {
        SgErrPolicy
    }
}

impl From<QuotaError> for sg_result {
    fn from(e: QuotaError) -> Self {
        match e {
            QuotaError::Exhausted { .. } => SgErrQuotaExhausted,
            QuotaError::NotHeld { .. } => SgErrQuotaNotHeld,
            QuotaError::BelowUse { .. } => SgErrQuotaBelowUse,
        }
    }
}

impl From<SettleError> for sg_result {
    fn from(e: SettleError) -> Self {
        match e {
            SettleError::AlreadySettled => SgErrAlreadySettled,
            SettleError::StalePermit => SgErrStalePermit,
            SettleError::InvalidUsage => SgErrInvalidUsage,
            SettleError::Expired => SgErrPermitExpired,
        }
    }
}

impl From<SnapshotError> for sg_result {
    fn from(e: SnapshotError) -> Self {
        match e {
            SnapshotError::BufferTooSmall { .. } => SgErrBufferTooSmall,
            SnapshotError::Truncated => SgErrSnapshotTruncated,
            SnapshotError::TrailingBytes => SgErrSnapshotTrailingBytes,
            SnapshotError::BadMagic => SgErrSnapshotBadMagic,
            SnapshotError::UnsupportedVersion(_) => SgErrSnapshotUnsupportedVersion,
            SnapshotError::BadChecksum => SgErrSnapshotBadChecksum,
            SnapshotError::CapacityMismatch => SgErrSnapshotCapacityMismatch,
            SnapshotError::Corrupt => SgErrSnapshotCorrupt,
            SnapshotError::InUse => SgErrSnapshotInUse,
        }
    }
}
