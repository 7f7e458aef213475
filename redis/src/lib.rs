//! # sluicegate-redis
//!
//! Many hosts (SPEC §11): replicas of a gateway behind a load balancer share each account's
//! limits through Redis, so that N replicas never grant N × L.
//!
//! Each scope's four buckets live in one Redis hash, updated only by a versioned Redis function
//! (`lua/sluicegate.lua`), all-or-nothing and timed by Redis `TIME`. A replica never calls Redis
//! per request: a background thread **leases** a share of each busy scope's buckets, sized from
//! the replica's recent rate and capped by the global level, and gives back what it did not use
//! and what settles refunded. The hot path is the local engine's
//! ([`sluicegate_core::Engine::admit_leased`]).
//!
//! Bound: every unit admitted was first taken from the global bucket, so the replicas together
//! over-admit only what requests use beyond their reservation, charged when they settle:
//! E = Σ over in-flight permits of max(0, actual − reserved) — 0 for requests, and for tokens
//! reserved at `max_tokens`.
//!
//! Outage: leases are used until their TTL, then each replica admits its [`Outage`] share.
//!
//! ```no_run
//! use sluicegate_core::{Capacity, Completion, Policy, Request, ScopeKey, Usage};
//! use sluicegate_redis::{Options, Replica};
//!
//! let replica = Replica::connect("redis://127.0.0.1:6379/0", Policy::fireworks_2024(), Capacity::scopes(10_000), Options::default())?;
//! let now = sluicegate_core::clock::now_ns();
//! let d = replica.admit(ScopeKey::new(b"acct-1", b"llama-v3p1-70b"), &Request::new(1_200).max_tokens(256), now)?;
//! if let Some(permit) = d.permit() {
//!     replica.settle(permit, &Usage::new(1_200, 180), Completion::Success, sluicegate_core::clock::now_ns())?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
pub mod functions;
mod leases;
mod replica;

pub use error::Error;
pub use replica::{Clock, Hosts, Mode, Options, Outage, Replica};
