//! The C ABI of sluicegate, modelled on rustls-ffi: one `sg_` prefix, an opaque engine handle,
//! plain structs of integers, a result code from every function and one panic boundary.
//!
//! `include/sluicegate.h` is generated from this crate by cbindgen; its comments are these doc
//! comments.
#![allow(non_camel_case_types)]
// C functions take their arguments flat, as plain integers and pointers.
#![allow(clippy::too_many_arguments)]

mod account;
mod boundary;
mod engine;
mod metrics;
mod openai;
mod openai_usage;
#[cfg(feature = "redis")]
mod redis;
mod render;
mod scope;
#[cfg(unix)]
mod shared;
mod snapshot;

pub use account::*;
pub use boundary::*;
pub use engine::*;
pub use metrics::*;
pub use openai::*;
pub use openai_usage::*;
#[cfg(feature = "redis")]
pub use redis::*;
pub use render::*;
pub use scope::*;
#[cfg(unix)]
pub use shared::*;
pub use snapshot::*;
