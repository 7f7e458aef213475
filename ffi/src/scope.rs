//! Resolved scopes: resolve an API key's scope once, keep the handle, admit through it without
//! the key lookups of `sg_admit`.

use sluicegate_core::{ScopeHandle, ScopeKey};

use crate::boundary::{arg, boundary, bytes, out, sg_result};
use crate::engine::{decision_of, request_of, sg_decision, sg_engine, sg_request, variant};

/// A resolved scope: opaque, created by `sg_scope_resolve`, freed by `sg_scope_free`. It holds a
/// copy of its key (account, model, variant) and where its scope was last found; it does not
/// point into the engine, so it may be freed before or after the engine.
///
/// Any number of threads may admit through one `sg_scope` at once. It stays correct for the
/// engine's whole life: if its scope was reclaimed while idle (for another key), or the engine
/// restored (`sg_restore`), the next `sg_admit_scope` looks the key up again, as `sg_admit`
/// would, and remembers where. Passed with another engine, it admits its key in that engine.
pub struct sg_scope {
    inner: ScopeHandle,
}

/// Resolves the scope of a key (creating it, its account and its model if new, as `sg_admit`
/// does) for `sg_admit_scope`. On success `*scope` owns a handle until `sg_scope_free`; this is
/// the one allocation, made once per call. Errors are `sg_admit`'s for the same key:
/// `SG_ERR_NULL`, `SG_ERR_EMPTY_KEY`, `SG_ERR_KEY_TOO_LONG`, `SG_ERR_TABLE_FULL`. On any error
/// `*scope` is set to NULL, so a failed call never leaves a stale handle to free.
///
/// # Safety
/// `engine` must be NULL or a live engine; `account` and `model` NULL (with length 0) or valid
/// for their lengths; `scope` NULL or a writable `sg_scope *`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_scope_resolve(
    engine: *const sg_engine,
    account: *const u8,
    account_len: usize,
    model: *const u8,
    model_len: usize,
    fast: u32,
    now_ns: u64,
    scope: *mut *mut sg_scope,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let scope = unsafe { out(scope)? };
        // First: a failed call leaves no dangling handle behind.
        *scope = core::ptr::null_mut();
        // SAFETY: forwarded from this function's contract.
        let engine = unsafe { arg(engine)? };
        // SAFETY: forwarded from this function's contract.
        let (account, model) = unsafe { (bytes(account, account_len)?, bytes(model, model_len)?) };
        let key = ScopeKey { account, model, variant: variant(fast) };
        let inner = engine.inner.scope(key, now_ns)?;
        *scope = Box::into_raw(Box::new(sg_scope { inner }));
        Ok(())
    })
}

/// `sg_admit` through a resolved scope: the same decision `sg_admit` gives a request with the
/// scope's key, without its key lookups. The request's `account`, `account_len`, `model`,
/// `model_len` and `fast` fields are ignored (they may be NULL and 0): the scope's key is used.
/// Settle an admitted `decision->permit` with `sg_settle`, as any other. A scope whose table slot
/// was reclaimed for another key may find the table full (`SG_ERR_TABLE_FULL`, as `sg_admit`
/// would for its key).
///
/// # Safety
/// `engine` must be NULL or a live engine; `scope` NULL or a handle from `sg_scope_resolve` not
/// yet freed; `request` NULL or valid; `decision` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_admit_scope(
    engine: *const sg_engine,
    scope: *const sg_scope,
    request: *const sg_request,
    now_ns: u64,
    decision: *mut sg_decision,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, scope, r, decision) =
            unsafe { (arg(engine)?, arg(scope)?, arg(request)?, out(decision)?) };
        // A replica's admissions come from its leases, found by key.
        let decided = if engine.is_replica() {
            engine.admit(scope.inner.key(), &request_of(r)?, now_ns)?
        } else {
            engine.inner.admit_scope(&scope.inner, &request_of(r)?, now_ns)?
        };
        *decision = decision_of(&decided);
        Ok(())
    })
}

/// Frees a scope handle. NULL is ignored. Freeing twice, using the handle afterwards, or
/// freeing it while another thread uses it, is undefined behaviour. Nothing in the engine
/// changes: the scope itself stays, as after `sg_admit`.
///
/// # Safety
/// `scope` must be NULL or a pointer returned by `sg_scope_resolve` and not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_scope_free(scope: *mut sg_scope) {
    // SAFETY: scope came from Box::into_raw in sg_scope_resolve and is freed only once.
    unsafe { crate::boundary::free_boxed(scope) }
}
