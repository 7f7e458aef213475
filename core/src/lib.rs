//! # sluicegate-core
//!
//! The `no_std` engine of sluicegate: for every LLM API request it decides — without a lock, a
//! heap allocation or a syscall — whether the request runs now, runs over its limit at lower
//! priority, is told to retry later (429) or is shed (503), under adaptive per-account,
//! per-model limits on requests and tokens per minute that grow with sustained use and shrink
//! when idle.
//!
//! ```
//! use sluicegate_core::{Capacity, Completion, Engine, Metric, Policy, Request, ScopeKey, Usage};
//!
//! let engine = Engine::new(Policy::fireworks_2024(), Capacity::scopes(10_000))?;
//! let key = ScopeKey::new(b"acct-1", b"llama-v3p1-70b");
//! let now = 0;
//! let d = engine.admit(key, &Request::new(1_200).max_tokens(256), now)?;
//! assert_eq!(d.levels.limit(Metric::Requests), 60);
//! if let Some(permit) = d.permit() {
//!     // ... forward the request, then report what it used:
//!     engine.settle(permit, &Usage::new(1_200, 180), Completion::Success, now + 3_000_000_000)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Memory: each scope takes a 128-byte hot slot (the four buckets in one 16-byte word,
//! double-buffered per-metric intervals, usage counters) plus 64 bytes of adaptive state that
//! only the once-a-minute tick touches.
#![no_std]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
)]

#[cfg(feature = "std")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod account;
pub mod adapt;
#[cfg(feature = "std")]
pub mod backing;
pub mod bucket;
#[cfg(feature = "std")]
pub mod clock;
pub mod decision;
pub mod engine;
pub mod error;
pub mod error_body;
pub mod handle;
pub mod headers;
#[cfg(not(loom))]
pub mod inspect;
pub mod json;
pub mod key;
pub mod lease;
mod locate;
pub mod metric;
pub mod metrics;
pub mod model;
pub mod openai_request;
pub mod openai_usage;
pub mod overrides;
pub mod permit;
pub mod policy;
pub mod price;
pub mod quota;
mod refs;
pub mod region;
mod repair;
pub mod request;
pub mod response;
pub mod scope;
pub mod service_tier;
#[cfg(all(feature = "std", unix))]
pub mod shared;
pub mod shed;
pub mod snapshot;
pub mod storage;
mod sync;
mod table;
pub mod text;
pub mod tier;

#[cfg(all(test, loom))]
mod loom_models;

/// The README's examples, compiled and run as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub use account::{AccountSlot, AccountState, Suspension};
#[cfg(feature = "std")]
pub use backing::Backing;
pub use bucket::Band;
pub use decision::{ConcurrencyLimited, Decision, Levels, Outcome, RateLimited, Shed, SpendRejection};
pub use engine::Engine;
pub use error::{Error, PolicyError, RegionError, SettleError, SnapshotError, Table};
pub use handle::ScopeHandle;
pub use key::{ScopeKey, Variant};
pub use metric::{Metric, PerMetric};
pub use model::ModelSlot;
pub use overrides::Overrides;
pub use permit::{Permit, PermitSlot, RawPermit, Reservation};
pub use policy::{Adaptation, EwmaRule, MetricLimits, Policy, ThresholdRule, UnknownParameter};
pub use price::Price;
pub use quota::{Quota, QuotaError};
pub use region::{Opening, Region};
pub use request::{Completion, InvalidRequest, Request, Usage};
pub use scope::{ScopeAdaptation, ScopeSlot};
pub use service_tier::ServiceTier;
#[cfg(all(feature = "std", unix))]
pub use shared::SharedFile;
pub use shed::{LoadPermille, ShedThresholds};
#[cfg(feature = "std")]
pub use storage::Heap;
pub use storage::{Borrowed, Capacity, Identity, Storage, Tables};
pub use tier::{Micros, Tier, TierSpec, Tiers};
