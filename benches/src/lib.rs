//! Shared set-up of the benchmarks and the instruction-count harness: engines and governor
//! limiters configured so that every call is admitted (steady state, no rejections).

use std::num::NonZeroU32;

mod floor;
pub use floor::AtomicFloor;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use sluicegate_core::{
    Backing, Capacity, Engine, Heap, Metric, Policy, Request, ScopeHandle, ScopeKey, SharedFile, Storage,
};

/// Accounts the keyed benchmarks spread over.
pub const KEYS: usize = 1_000;
/// The model every benchmark request names.
pub const MODEL: &[u8] = b"llama-v3p1-70b-instruct";

/// An engine whose limits never bind, with tables at half load for `scopes` scopes (each key a
/// probe or two from its home slot).
pub fn engine(scopes: usize) -> Engine<Heap> {
    engine_with_permits(scopes, 4096)
}

/// As [`engine`], with room for `permits` outstanding permits.
pub fn engine_with_permits(scopes: usize, permits: usize) -> Engine<Heap> {
    // A fixed seed: the same key placement, and so the same instruction counts, on every run.
    let heap = Heap::new(capacity(scopes, permits)).unwrap_or_else(|e| panic!("tables: {e}"));
    Engine::with_storage(policy(), heap, 0x5eed_5eed).unwrap_or_else(|e| panic!("engine: {e}"))
}

/// As [`engine`], in a file every process that opens `path` shares (created if absent).
pub fn shared_engine(scopes: usize, path: &std::path::Path) -> Engine<SharedFile> {
    Engine::open_shared(path, policy(), capacity(scopes, 4096))
        .unwrap_or_else(|e| panic!("shared engine: {e}"))
}

/// As [`engine`], behind the run-time storage choice the C API and Python use.
pub fn backed_engine(scopes: usize) -> Engine<Backing> {
    let heap = Heap::new(capacity(scopes, 4096)).unwrap_or_else(|e| panic!("tables: {e}"));
    Engine::with_storage(policy(), Backing::Heap(heap), 0x5eed_5eed).unwrap_or_else(|e| panic!("engine: {e}"))
}

/// The benchmarks' policy: the fixed preset with limits no benchmark reaches.
pub fn policy() -> Policy {
    let mut policy = Policy::fixed();
    for m in Metric::ALL {
        policy = policy.with_fixed_limit(m, 1e12);
    }
    policy
}

/// Tables for `scopes` scopes (room to spare) and `permits` outstanding permits.
pub fn capacity(scopes: usize, permits: usize) -> Capacity {
    Capacity { scopes: 2 * scopes + 64, accounts: 2 * scopes + 64, models: 16, permits }
}

/// Account ids `acct-000000` … for `n` accounts.
pub fn accounts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("acct-{i:06}")).collect()
}

/// The request every benchmark admits: a chat completion of 1,200 prompt and 256 max tokens.
pub fn request() -> Request {
    Request::new(1_200).max_tokens(256)
}

/// One admit and its settle, at `now`.
pub fn admit_settle<S: Storage>(engine: &Engine<S>, account: &str, now: u64) {
    let key = ScopeKey::new(account.as_bytes(), MODEL);
    if let Ok(d) = engine.admit(key, &request(), now) {
        if let Some(p) = d.permit() {
            let _ = engine.settle(
                p,
                &sluicegate_core::Usage::new(1_200, 180),
                sluicegate_core::Completion::Success,
                now,
            );
        }
    }
}

/// One admit through a resolved scope and its settle, at `now`.
pub fn admit_settle_scope<S: Storage>(engine: &Engine<S>, scope: &ScopeHandle, now: u64) {
    if let Ok(d) = engine.admit_scope(scope, &request(), now) {
        if let Some(p) = d.permit() {
            let _ = engine.settle(
                p,
                &sluicegate_core::Usage::new(1_200, 180),
                sluicegate_core::Completion::Success,
                now,
            );
        }
    }
}

/// A resolved scope per account name, as a gateway caches them per API key.
pub fn scopes<S: Storage>(engine: &Engine<S>, names: &[String]) -> Vec<ScopeHandle> {
    let scope = |n: &String| engine.scope(ScopeKey::new(n.as_bytes(), MODEL), 0);
    names.iter().map(|n| scope(n).unwrap_or_else(|e| panic!("scope: {e}"))).collect()
}

/// An engine made through the C API, as a C gateway makes it: the `fixed` preset with limits
/// that never bind. Freed when dropped.
pub struct CEngine(*mut sluicegate::sg_engine);

/// A scope resolved through the C API; free it with [`CEngine::free_scope`].
#[derive(Clone, Copy)]
pub struct CScope(*mut sluicegate::sg_scope);

impl CEngine {
    /// Room for `scopes` scopes.
    pub fn new(scopes: usize) -> Self {
        let mut config = std::mem::MaybeUninit::<sluicegate::sg_config>::uninit();
        // SAFETY: sg_config_default fills every field.
        let mut config = unsafe {
            sluicegate::sg_config_default(config.as_mut_ptr());
            config.assume_init()
        };
        config.preset = c"fixed".as_ptr();
        config.floor = [1e12; 4];
        config.scopes = 2 * scopes as u64;
        let mut engine: *mut sluicegate::sg_engine = std::ptr::null_mut();
        // SAFETY: a valid config and out-pointer.
        let result = unsafe { sluicegate::sg_engine_new(&config, &mut engine) };
        assert!(!engine.is_null(), "sg_engine_new failed: {result:?}");
        CEngine(engine)
    }

    /// The resolved scope of `account`.
    pub fn scope(&self, account: &str) -> CScope {
        let mut scope = std::ptr::null_mut();
        let (a, m) = (account.as_bytes(), MODEL);
        // SAFETY: a live engine, key pointers valid for their lengths, an out-pointer.
        unsafe {
            sluicegate::sg_scope_resolve(self.0, a.as_ptr(), a.len(), m.as_ptr(), m.len(), 0, 0, &mut scope)
        };
        assert!(!scope.is_null(), "sg_scope_resolve failed");
        CScope(scope)
    }

    /// Frees a scope this engine resolved; it must not be used again.
    pub fn free_scope(&self, scope: CScope) {
        // SAFETY: it came from sg_scope_resolve; the caller frees it once.
        unsafe { sluicegate::sg_scope_free(scope.0) };
    }

    /// [`admit_settle`] through the C ABI: `sg_admit`, then `sg_settle` of its permit.
    pub fn admit_settle(&self, account: &str, now: u64) {
        self.settle(account, now, |request, d| {
            // SAFETY: a live engine, a valid request and out-pointer.
            unsafe { sluicegate::sg_admit(self.0, request, now, d) };
        });
    }

    /// [`admit_settle_scope`] through the C ABI: `sg_admit_scope`, then `sg_settle`.
    pub fn admit_settle_scope(&self, scope: CScope, now: u64) {
        // The scope names the key: the request's is left empty.
        self.settle("", now, |request, d| {
            // SAFETY: a live engine and scope, a valid request and out-pointer.
            unsafe { sluicegate::sg_admit_scope(self.0, scope.0, request, now, d) };
        });
    }

    /// Runs `admit` on the benchmarks' request for `account` and settles what it admitted.
    fn settle(
        &self,
        account: &str,
        now: u64,
        admit: impl FnOnce(&sluicegate::sg_request, &mut sluicegate::sg_decision),
    ) {
        let request = sluicegate::sg_request {
            account: account.as_ptr(),
            account_len: account.len(),
            model: MODEL.as_ptr(),
            model_len: MODEL.len(),
            prompt_tokens: 1_200,
            cached_tokens: 0,
            max_tokens: 256,
            expected_tokens: 0,
            n: 1,
            service_tier: 0,
            fast: 0,
        };
        let usage = sluicegate::sg_usage { prompt_tokens: 1_200, cached_tokens: 0, generated_tokens: 180 };
        let mut d = sluicegate::sg_decision::default();
        admit(&request, &mut d);
        // SAFETY: a live engine, valid permit and usage pointers.
        unsafe { sluicegate::sg_settle(self.0, &d.permit, &usage, 0, now) };
    }
}

impl Drop for CEngine {
    fn drop(&mut self) {
        // SAFETY: it came from sg_engine_new and is freed once.
        unsafe { sluicegate::sg_engine_free(self.0) };
    }
}

fn huge() -> Quota {
    Quota::per_second(NonZeroU32::MAX)
}

/// governor's direct (unkeyed) limiter.
pub fn governor_direct() -> DefaultDirectRateLimiter {
    RateLimiter::direct(huge())
}

/// governor's keyed limiter (DashMap store), as a gateway would key it by account and model.
pub fn governor_keyed() -> DefaultKeyedRateLimiter<String> {
    RateLimiter::keyed(huge())
}

/// Keys `account/model` for governor.
pub fn governor_keys(accounts: &[String]) -> Vec<String> {
    accounts.iter().map(|a| format!("{a}/{}", String::from_utf8_lossy(MODEL))).collect()
}
