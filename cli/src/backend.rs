//! A model backend for replays: N concurrent slots per model variant, served first come first
//! served, each request holding a slot for a time derived from its tokens.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::trace::TraceRequest;

/// How fast prompt tokens are processed, as a multiple of the decode rate: prefill runs in
/// parallel over the prompt, decode one token at a time.
pub const PREFILL_SPEEDUP: f64 = 20.0;

/// The backend behind each model variant (`--capacity`, `--tokens-per-second`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backend {
    /// Requests served at once.
    pub slots: u32,
    /// Generated tokens per second per request; prompt tokens go [`PREFILL_SPEEDUP`] times faster.
    pub tokens_per_second: f64,
}

impl Backend {
    /// A backend, or why not: no slots, or a rate that is not a positive number.
    pub fn new(slots: u32, tokens_per_second: f64) -> Result<Self, String> {
        if slots == 0 {
            return Err("--capacity must be at least 1".into());
        }
        if !(tokens_per_second.is_finite() && tokens_per_second > 0.0) {
            return Err(format!("--tokens-per-second must be a positive number, not {tokens_per_second}"));
        }
        Ok(Backend { slots, tokens_per_second })
    }

    /// How long `r` holds a slot, ns.
    pub fn service_ns(&self, r: &TraceRequest) -> u64 {
        let tokens = r.generated_tokens as f64 + r.prompt_tokens as f64 / PREFILL_SPEEDUP;
        (tokens / self.tokens_per_second * 1e9) as u64
    }
}

/// Each model variant's slots: when each busy slot frees.
pub struct Slots {
    backend: Backend,
    busy_until: HashMap<(u32, bool), BinaryHeap<Reverse<u64>>>,
}

impl Slots {
    /// All slots free.
    pub fn new(backend: Backend) -> Self {
        Slots { backend, busy_until: HashMap::new() }
    }

    /// Serves `r` (arriving at `r.t_ns`, in time order) on the first slot of its model variant
    /// to free, and returns when it finishes.
    pub fn serve(&mut self, r: &TraceRequest) -> u64 {
        let busy = self.busy_until.entry((r.model, r.fast)).or_default();
        let start = if busy.len() < self.backend.slots as usize {
            r.t_ns
        } else {
            busy.pop().map_or(r.t_ns, |Reverse(free)| free.max(r.t_ns))
        };
        let finish = start.saturating_add(self.backend.service_ns(r));
        busy.push(Reverse(finish));
        finish
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluicegate_core::ServiceTier;

    const SECOND: u64 = 1_000_000_000;

    fn request(t_ns: u64, prompt_tokens: u64, generated_tokens: u64) -> TraceRequest {
        TraceRequest {
            line: 2,
            t_ns,
            account: 0,
            model: 0,
            fast: false,
            service_tier: ServiceTier::Default,
            n: 1,
            prompt_tokens,
            cached_tokens: 0,
            max_tokens: generated_tokens,
            generated_tokens,
        }
    }

    #[test]
    fn a_request_holds_its_slot_for_its_decode_and_its_prefill() {
        let backend = Backend::new(4, 50.0).unwrap();
        // 100 generated at 50/s is 2 s; 2,000 prompt tokens at 20 × 50/s is 2 s more.
        assert_eq!(backend.service_ns(&request(0, 2_000, 100)), 4 * SECOND);
        assert_eq!(backend.service_ns(&request(0, 0, 25)), SECOND / 2);
        assert_eq!(backend.service_ns(&request(0, 0, 0)), 0);
    }

    #[test]
    fn requests_beyond_the_slots_wait_for_the_first_to_free() {
        let mut slots = Slots::new(Backend::new(2, 10.0).unwrap());
        // Three 1 s requests at once on 2 slots: the third starts when the first finishes.
        assert_eq!(slots.serve(&request(0, 0, 10)), SECOND);
        assert_eq!(slots.serve(&request(0, 0, 20)), 2 * SECOND);
        assert_eq!(slots.serve(&request(0, 0, 10)), 2 * SECOND);
        // One arriving after every slot is free starts at once.
        assert_eq!(slots.serve(&request(5 * SECOND, 0, 10)), 6 * SECOND);
        // Another model variant has slots of its own.
        let fast = TraceRequest { fast: true, ..request(0, 0, 10) };
        assert_eq!(slots.serve(&fast), SECOND);
    }

    #[test]
    fn a_backend_needs_a_slot_and_a_positive_rate() {
        assert!(Backend::new(0, 50.0).unwrap_err().contains("--capacity"));
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Backend::new(1, rate).unwrap_err().contains("--tokens-per-second"), "{rate}");
        }
    }
}
