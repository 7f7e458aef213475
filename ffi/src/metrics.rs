//! What the operator sees (SPEC §12): the engine's counters as Prometheus text, for a C
//! gateway's `/metrics`.

use crate::boundary::{arg, boundary, buffer, out, sg_result, sized};
use crate::engine::sg_engine;

/// Writes the engine's metrics in the Prometheus text exposition format (version 0.0.4) into
/// `buf`, without allocating: counters per model, variant, service tier and outcome
/// (`sluicegate_requests_total`, `sluicegate_rate_limited_total`,
/// `sluicegate_permits_ended_total`, `sluicegate_spend_microdollars_total`) and per-model gauges
/// (`sluicegate_in_flight`, `sluicegate_load`). Only reads: traffic is never stopped, and a
/// shared region is read as it is. `*written` receives the length, or on
/// `SG_ERR_BUFFER_TOO_SMALL` the length needed; counters move meanwhile, so retry with room to
/// spare. The text is not NUL-terminated.
///
/// # Safety
/// `engine` must be a live engine; `buf` NULL (with `len` 0) or `len` writable bytes; `written`
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sg_metrics_render(
    engine: *const sg_engine,
    buf: *mut u8,
    len: usize,
    written: *mut usize,
) -> sg_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let (engine, buf, written) = unsafe { (arg(engine)?, buffer(buf, len)?, out(written)?) };
        sized(engine.inner.render_prometheus(buf), written)
    })
}
