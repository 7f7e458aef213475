//! Many hosts: an engine whose admissions come from leases of global buckets kept in Redis
//! (SPEC §11), shared by every replica of a gateway.

use core::ffi::{CStr, c_char};

use sluicegate_redis::{Hosts, Options};

use crate::boundary::{arg, boundary, out, sg_result, sg_result::*};
use crate::engine::{heap_engine, sg_config, sg_engine};

impl From<sluicegate_redis::Error> for sg_result {
    fn from(e: sluicegate_redis::Error) -> Self {
        match e {
            sluicegate_redis::Error::Engine(e) => e.into(),
            sluicegate_redis::Error::Thread(_) => SgErrIo,
            _ => SgErrRedis,
        }
    }
}

/// Creates an engine that is one replica of many: every replica connected to the same Redis
/// with the same configuration shares each scope's limits, as one engine would. `url` is
/// `redis://host:port/db` (Redis 7 or later). The call loads sluicegate's Redis functions and
/// starts a background thread that leases shares of each busy scope's buckets; `sg_admit`
/// and `sg_settle` stay local and never wait for Redis (a scope's first request on a replica
/// waits for one lease call). If Redis stops answering, leases are used until they expire, then
/// each replica admits its share of the limits (the limit / the replicas still heard from).
/// Free it with `sg_engine_free`, which gives back what its leases hold.
///
/// Redis unreachable (within 200 ms), answering an error, or answering what sluicegate's
/// functions would not is `SG_ERR_REDIS`; `*engine` is then NULL.
///
/// ```c
/// sg_engine *engine;
/// sg_config cfg;
/// sg_config_default(&cfg);
/// if (sg_engine_connect_redis("redis://10.0.0.5:6379/0", &cfg, &engine) != SG_OK) return 1;
/// ```
///
/// # Safety
/// `url` must be NULL or NUL-terminated; `config` NULL or valid; `engine` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_engine_connect_redis(
    url: *const c_char,
    config: *const sg_config,
    engine: *mut *mut sg_engine,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let engine = unsafe { out(engine)? };
        *engine = core::ptr::null_mut();
        // SAFETY: forwarded from this function's contract.
        let (config, url) = unsafe { (arg(config)?, arg(url)?) };
        // SAFETY: url is NUL-terminated (contract).
        let url = unsafe { CStr::from_ptr(url) }.to_str().map_err(|_| SgErrInvalidArgument)?;
        let inner = heap_engine(config)?;
        let hosts = Hosts::connect(url, inner.policy(), inner.capacity().scopes, Options::default())?;
        *engine = Box::into_raw(Box::new(sg_engine { inner, hosts: Some(hosts) }));
        Ok(())
    })
}
