//! What the operator sees (SPEC §12): counters per (model, variant, service tier, outcome) and
//! per-model gauges, kept as striped relaxed counters that the hot path adds to once per admit
//! and once per settle, and that readers sum without stopping it.
//!
//! ```
//! use sluicegate_core::metrics::{Event, write_prometheus};
//! use sluicegate_core::{Capacity, Engine, Policy, Request, ScopeKey, ServiceTier, Variant};
//! let e = Engine::new(Policy::fixed(), Capacity::scopes(64))?;
//! for _ in 0..61 {
//!     e.admit(ScopeKey::new(b"acct", b"llama"), &Request::new(10), 0)?;
//! }
//! let metrics = e.metrics();
//! let llama = metrics.model(b"llama", Variant::Regular).unwrap();
//! assert_eq!(llama.count(ServiceTier::Default, Event::Admitted), 60);
//! assert_eq!(llama.count(ServiceTier::Default, Event::RateLimitedRequests), 1);
//! assert_eq!(llama.in_flight, 60);
//! let mut text = String::new();
//! write_prometheus(&metrics, &mut text)?;
//! assert!(text.contains(
//!     r#"sluicegate_requests_total{model="llama",variant="regular",service_tier="default",outcome="admitted"} 60"#
//! ));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::decision::Outcome;
use crate::key::Variant;
use crate::metric::Metric;
use crate::request::Completion;
use crate::service_tier::ServiceTier;
use crate::sync::{AtomicU64, Ordering};

/// Counters are striped by scope slot: threads on different scopes of one model write the same
/// cache line half as often, and threads on one scope already share its bucket's. Two stripes,
/// not more: each is 768 bytes a model (both variants), and a model table holds a quarter as many
/// models as scopes.
pub(crate) const STRIPES: usize = 2;

/// What happened to a request; each is a counter per (model, variant, service tier).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// Admitted within its limits.
    Admitted,
    /// Admitted over a limit, at lower priority.
    AdmittedOverLimit,
    /// 429 on requests per minute.
    RateLimitedRequests,
    /// 429 on prompt tokens per minute.
    RateLimitedPromptTokens,
    /// 429 on uncached prompt tokens per minute.
    RateLimitedUncachedPromptTokens,
    /// 429 on generated tokens per minute.
    RateLimitedGeneratedTokens,
    /// 503: shed for the model's load.
    Shed,
    /// Refused for the account's spend (suspended, or over its spend limit).
    SpendRefused,
    /// 429: too many of the account's requests in flight.
    ConcurrencyLimited,
    /// 400: a malformed request (counted without a model: it is refused before any lookup).
    Invalid,
    /// Refused because a table was full (counted without a model).
    TableFull,
    /// A permit that was never settled, expired (SPEC §7).
    Expired,
    /// Settled: the request ran.
    Succeeded,
    /// Settled: the backend failed it.
    UpstreamFailed,
    /// Settled: the client went away.
    Cancelled,
}

impl Event {
    /// Every event, in the order of their counters.
    pub const ALL: [Event; 15] = [
        Event::Admitted,
        Event::AdmittedOverLimit,
        Event::RateLimitedRequests,
        Event::RateLimitedPromptTokens,
        Event::RateLimitedUncachedPromptTokens,
        Event::RateLimitedGeneratedTokens,
        Event::Shed,
        Event::SpendRefused,
        Event::ConcurrencyLimited,
        Event::Invalid,
        Event::TableFull,
        Event::Expired,
        Event::Succeeded,
        Event::UpstreamFailed,
        Event::Cancelled,
    ];

    /// The event of an admission's outcome.
    pub const fn of(outcome: &Outcome) -> Event {
        match outcome {
            Outcome::Admit(_) => Event::Admitted,
            Outcome::AdmitOverLimit(_) => Event::AdmittedOverLimit,
            Outcome::RejectRateLimited(r) => Event::rate_limited(r.metric),
            Outcome::Shed(_) => Event::Shed,
            Outcome::RejectSpend(_) => Event::SpendRefused,
            Outcome::RejectInvalid(_) => Event::Invalid,
            Outcome::RejectConcurrency(_) => Event::ConcurrencyLimited,
        }
    }

    /// The 429 of a binding metric.
    pub const fn rate_limited(metric: Metric) -> Event {
        match metric {
            Metric::Requests => Event::RateLimitedRequests,
            Metric::PromptTokens => Event::RateLimitedPromptTokens,
            Metric::UncachedPromptTokens => Event::RateLimitedUncachedPromptTokens,
            Metric::GeneratedTokens => Event::RateLimitedGeneratedTokens,
        }
    }

    /// The event of a settle.
    pub const fn settled(completion: Completion) -> Event {
        match completion {
            Completion::Success => Event::Succeeded,
            Completion::UpstreamFailure => Event::UpstreamFailed,
            Completion::Cancelled => Event::Cancelled,
        }
    }

    /// The event's name in `sluicegate top --json` and Python's `Engine.metrics()`.
    ///
    /// ```
    /// use sluicegate_core::metrics::Event;
    /// assert_eq!(Event::AdmittedOverLimit.name(), "over_limit");
    /// assert_eq!(Event::RateLimitedGeneratedTokens.name(), "rate_limited_generated_tokens");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Event::Admitted => "admitted",
            Event::AdmittedOverLimit => "over_limit",
            Event::RateLimitedRequests => "rate_limited_requests",
            Event::RateLimitedPromptTokens => "rate_limited_prompt_tokens",
            Event::RateLimitedUncachedPromptTokens => "rate_limited_uncached_prompt_tokens",
            Event::RateLimitedGeneratedTokens => "rate_limited_generated_tokens",
            Event::Shed => "shed",
            Event::SpendRefused => "spend_refused",
            Event::ConcurrencyLimited => "concurrency_limited",
            Event::Invalid => "invalid",
            Event::TableFull => "table_full",
            Event::Expired => "expired",
            Event::Succeeded => "succeeded",
            Event::UpstreamFailed => "upstream_failure",
            Event::Cancelled => "cancelled",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// The events that end a permit.
const ENDED: [Event; 4] = [Event::Succeeded, Event::UpstreamFailed, Event::Cancelled, Event::Expired];

/// Counter cells per tier: one per event, then spend.
const CELLS: usize = Event::ALL.len() + 1;
const SPEND: usize = Event::ALL.len();

/// One stripe: every tier's cells, on lines of its own.
#[derive(Debug)]
#[repr(C, align(64))]
struct Stripe([[AtomicU64; CELLS]; 3]);

/// The counters of one model (or of the requests refused before any model was found).
#[derive(Debug)]
pub(crate) struct Counters([[Stripe; STRIPES]; 2]);

/// Totals per tier: each event's count, then spend in nano-dollars.
pub(crate) type Totals = [[u64; CELLS]; 3];

const fn tier_index(tier: ServiceTier) -> usize {
    match tier {
        ServiceTier::Flex => 0,
        ServiceTier::Default => 1,
        ServiceTier::Priority => 2,
    }
}

impl Counters {
    pub(crate) fn new() -> Self {
        Counters(core::array::from_fn(|_| {
            core::array::from_fn(|_| {
                Stripe(core::array::from_fn(|_| core::array::from_fn(|_| AtomicU64::new(0))))
            })
        }))
    }

    #[cfg(feature = "counters")]
    fn cell(&self, variant: Variant, stripe: usize, tier: ServiceTier, cell: usize) -> Option<&AtomicU64> {
        let stripe = self.0.get(variant.index())?.get(stripe % STRIPES)?;
        stripe.0.get(tier_index(tier))?.get(cell)
    }

    /// Counts one event; `stripe` is any number that tells callers apart (the scope's slot).
    #[inline]
    pub(crate) fn add(&self, variant: Variant, stripe: usize, tier: ServiceTier, event: Event) {
        self.add_to(variant, stripe, tier, event.index(), 1);
    }

    /// Adds nano-dollars billed.
    #[inline]
    pub(crate) fn add_spend(&self, variant: Variant, stripe: usize, tier: ServiceTier, nanos: u64) {
        if nanos != 0 {
            self.add_to(variant, stripe, tier, SPEND, nanos);
        }
    }

    #[cfg(feature = "counters")]
    #[inline]
    fn add_to(&self, variant: Variant, stripe: usize, tier: ServiceTier, cell: usize, amount: u64) {
        if let Some(c) = self.cell(variant, stripe, tier, cell) {
            c.fetch_add(amount, Ordering::Relaxed);
        }
    }

    /// Without the `counters` feature (measuring their cost), nothing is counted.
    #[cfg(not(feature = "counters"))]
    #[inline]
    fn add_to(&self, _: Variant, _: usize, _: ServiceTier, _: usize, _: u64) {}

    /// The variant's totals, its stripes summed.
    pub(crate) fn read(&self, variant: Variant) -> Totals {
        let mut totals = [[0u64; CELLS]; 3];
        for stripe in self.0.get(variant.index()).into_iter().flatten() {
            for (total, cells) in totals.iter_mut().zip(&stripe.0) {
                for (t, c) in total.iter_mut().zip(cells) {
                    *t = t.wrapping_add(c.load(Ordering::Relaxed));
                }
            }
        }
        totals
    }

    /// Zeroes every counter (a slot taken by another model, a restore).
    pub(crate) fn clear(&self) {
        for c in self.0.iter().flatten().flat_map(|s| s.0.iter().flatten()) {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// One model variant's counters and gauges, read at one moment (each counter exact; the set
/// not one atomic snapshot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelMetrics {
    model: [u8; crate::key::MODEL_KEY_MAX],
    model_len: usize,
    /// The variant.
    pub variant: Variant,
    totals: Totals,
    /// Permits outstanding: admitted and not yet settled or expired.
    pub in_flight: u64,
    /// The variant's load, ‰ of capacity.
    pub load: u32,
}

impl ModelMetrics {
    pub(crate) fn new(model: &[u8], variant: Variant, totals: Totals, load: u32) -> Self {
        let mut key = [0; crate::key::MODEL_KEY_MAX];
        let model_len = model.len().min(key.len());
        if let (Some(dst), Some(src)) = (key.get_mut(..model_len), model.get(..model_len)) {
            dst.copy_from_slice(src);
        }
        let mut m = ModelMetrics { model: key, model_len, variant, totals, in_flight: 0, load };
        let admitted = m.total(&[Event::Admitted, Event::AdmittedOverLimit]);
        m.in_flight = admitted.saturating_sub(m.total(&ENDED));
        m
    }

    /// The model id; empty for requests refused before any model was found.
    pub fn model(&self) -> &[u8] {
        self.model.get(..self.model_len).unwrap_or_default()
    }

    /// How many requests of every tier met any of `events`.
    pub fn total(&self, events: &[Event]) -> u64 {
        let counts = ServiceTier::ALL.iter().flat_map(|t| events.iter().map(|e| self.count(*t, *e)));
        counts.fold(0, u64::wrapping_add)
    }

    /// How many requests of `tier` met `event`.
    pub fn count(&self, tier: ServiceTier, event: Event) -> u64 {
        self.totals.get(tier_index(tier)).and_then(|t| t.get(event.index())).copied().unwrap_or(0)
    }

    /// Micro-dollars billed to requests of `tier` (settled, or expired and billed their
    /// reservation).
    pub fn spend_micros(&self, tier: ServiceTier) -> u64 {
        self.totals
            .get(tier_index(tier))
            .and_then(|t| t.get(SPEND))
            .map_or(0, |n| n / crate::price::NANOS_PER_MICRO)
    }
}

/// Every model variant's metrics, and the requests refused before any model was found (model
/// id empty), as [`crate::Engine::metrics`] reads them.
#[cfg(feature = "std")]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Model variants with any counter or gauge above zero, in table order.
    pub models: alloc::vec::Vec<ModelMetrics>,
}

#[cfg(feature = "std")]
impl Metrics {
    /// The metrics of one model variant, if it has any.
    pub fn model(&self, model: &[u8], variant: Variant) -> Option<&ModelMetrics> {
        self.models.iter().find(|m| m.model() == model && m.variant == variant)
    }
}

impl<S: crate::storage::Storage> crate::Engine<S> {
    /// Calls `each` with the metrics of every model variant that has any, then with those of
    /// the requests refused before any model was found (model id empty). Reads relaxed counters
    /// only: traffic is never stopped, and a shared region is only read.
    pub fn for_each_model_metrics(&self, mut each: impl FnMut(&ModelMetrics)) {
        each_model(self.tables().models, &mut each);
        for variant in [Variant::Regular, Variant::Fast] {
            let m = ModelMetrics::new(&[], variant, self.unattributed.read(variant), 0);
            if m.totals.iter().flatten().any(|v| *v != 0) {
                each(&m);
            }
        }
    }

    /// Every model variant's metrics ([`Engine::for_each_model_metrics`]), for
    /// [`write_prometheus`].
    ///
    /// [`Engine::for_each_model_metrics`]: crate::Engine::for_each_model_metrics
    #[cfg(feature = "std")]
    pub fn metrics(&self) -> Metrics {
        let mut models = alloc::vec::Vec::new();
        self.for_each_model_metrics(|m| models.push(m.clone()));
        Metrics { models }
    }
}

/// Calls `each` with the metrics of every model variant in `models` that has any.
pub(crate) fn each_model(models: &[crate::model::ModelSlot], mut each: impl FnMut(&ModelMetrics)) {
    for slot in models {
        if !crate::table::is_ready(crate::table::Slot::id(slot).load(Ordering::Acquire)) {
            continue;
        }
        let (len, words) = slot.key.read();
        let mut bytes = [0u8; crate::key::MODEL_KEY_MAX];
        for (chunk, w) in bytes.chunks_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        let model = bytes.get(..len).unwrap_or_default();
        for variant in [Variant::Regular, Variant::Fast] {
            let m = ModelMetrics::new(model, variant, slot.counters.read(variant), slot.load(variant));
            if m.in_flight != 0 || m.load != 0 || m.totals.iter().flatten().any(|v| *v != 0) {
                each(&m);
            }
        }
    }
}

const OUTCOMES: [(Event, &str); 7] = [
    (Event::Admitted, "admitted"),
    (Event::AdmittedOverLimit, "over_limit"),
    (Event::Shed, "shed"),
    (Event::SpendRefused, "spend_refused"),
    (Event::ConcurrencyLimited, "concurrency_limited"),
    (Event::Invalid, "invalid"),
    (Event::TableFull, "table_full"),
];

const RATE_LIMITED: [(Event, &str); 4] = [
    (Event::RateLimitedRequests, "requests"),
    (Event::RateLimitedPromptTokens, "prompt_tokens"),
    (Event::RateLimitedUncachedPromptTokens, "uncached_prompt_tokens"),
    (Event::RateLimitedGeneratedTokens, "generated_tokens"),
];

const ENDINGS: [(Event, &str); 4] = [
    (Event::Succeeded, "success"),
    (Event::UpstreamFailed, "upstream_failure"),
    (Event::Cancelled, "cancelled"),
    (Event::Expired, "expired"),
];

/// Writes a model id as the text every surface names it by (the `model` label, Python's
/// `metrics()`, `sluicegate top`): its UTF-8, each backslash doubled, each byte that is not
/// UTF-8 as `\xNN`. Doubling keeps it one-to-one: the id `\xff` (text) is `\\xff`, the byte
/// 0xFF is `\xff`, so two models never share a label.
///
/// ```
/// let mut text = String::new();
/// sluicegate_core::metrics::write_model_text(&mut text, b"a\\b\xff")?;
/// assert_eq!(text, r"a\\b\xff");
/// # Ok::<(), core::fmt::Error>(())
/// ```
pub fn write_model_text(out: &mut dyn core::fmt::Write, model: &[u8]) -> core::fmt::Result {
    for chunk in model.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.write_str("\\\\")?,
                c => out.write_char(c)?,
            }
        }
        for b in chunk.invalid() {
            write!(out, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

/// Writes a model's label value: its text ([`write_model_text`]) with the exposition's escapes
/// (`\`, `"`, newline).
fn label(out: &mut dyn core::fmt::Write, model: &[u8]) -> core::fmt::Result {
    struct Escaped<'a>(&'a mut dyn core::fmt::Write);
    impl core::fmt::Write for Escaped<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for c in s.chars() {
                match c {
                    '\\' => self.0.write_str("\\\\")?,
                    '"' => self.0.write_str("\\\"")?,
                    '\n' => self.0.write_str("\\n")?,
                    c => self.0.write_char(c)?,
                }
            }
            Ok(())
        }
    }
    write_model_text(&mut Escaped(out), model)
}

fn series(
    out: &mut dyn core::fmt::Write,
    name: &str,
    m: &ModelMetrics,
    tier: Option<ServiceTier>,
    extra: Option<(&str, &str)>,
) -> core::fmt::Result {
    out.write_str(name)?;
    out.write_str("{model=\"")?;
    label(out, m.model())?;
    let variant = match m.variant {
        Variant::Regular => "regular",
        Variant::Fast => "fast",
    };
    write!(out, "\",variant=\"{variant}\"")?;
    if let Some(tier) = tier {
        write!(out, ",service_tier=\"{}\"", tier.name())?;
    }
    if let Some((key, value)) = extra {
        write!(out, ",{key}=\"{value}\"")?;
    }
    out.write_str("} ")
}

/// Writes `metrics` in the Prometheus text exposition format (version 0.0.4): `# HELP` and
/// `# TYPE` for each family, counters ending in `_total`. Series that are zero are left out.
#[cfg(feature = "std")]
pub fn write_prometheus(metrics: &Metrics, out: &mut impl core::fmt::Write) -> core::fmt::Result {
    write_from(&|each: &mut dyn FnMut(&ModelMetrics)| metrics.models.iter().for_each(each), out)
}

impl<S: crate::storage::Storage> crate::Engine<S> {
    /// Writes the engine's metrics as [`write_prometheus`] does, into `buf`, without allocating:
    /// the bytes written, or the size needed. Counters move meanwhile: retry a too-small buffer
    /// with room to spare.
    pub fn render_prometheus(&self, buf: &mut [u8]) -> Result<usize, crate::text::BufferTooSmall> {
        let mut sink = crate::text::Sink::new(buf);
        // The sink never fails: what does not fit is counted.
        let _ =
            write_from(&|each: &mut dyn FnMut(&ModelMetrics)| self.for_each_model_metrics(each), &mut sink);
        sink.finish()
    }
}

/// Calls its argument with each model variant's metrics.
type Source<'a> = dyn Fn(&mut dyn FnMut(&ModelMetrics)) + 'a;

/// Writes one family's lines: `line` for every model variant, stopping at the first error.
fn family(
    models: &Source<'_>,
    out: &mut dyn core::fmt::Write,
    line: &dyn Fn(&ModelMetrics, &mut dyn core::fmt::Write) -> core::fmt::Result,
) -> core::fmt::Result {
    let mut result = Ok(());
    models(&mut |m| {
        if result.is_ok() {
            result = line(m, out);
        }
    });
    result
}

fn write_from(models: &Source<'_>, out: &mut dyn core::fmt::Write) -> core::fmt::Result {
    type Counted<'a> = (&'a str, &'a str, &'a [(Event, &'a str)], &'a str);
    let counted: [Counted<'_>; 3] = [
        ("sluicegate_requests_total", "Admission outcomes other than 429.", &OUTCOMES, "outcome"),
        ("sluicegate_rate_limited_total", "429s, by the metric that bound.", &RATE_LIMITED, "metric"),
        ("sluicegate_permits_ended_total", "Permits settled, by how, or expired.", &ENDINGS, "completion"),
    ];
    // Text format 0.0.4 names a family as its samples are named, `_total` included.
    for (name, help, events, key) in counted {
        writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter")?;
        family(models, out, &|m, out| {
            for tier in ServiceTier::ALL {
                for (event, value) in events {
                    let n = m.count(tier, *event);
                    if n != 0 {
                        series(out, name, m, Some(tier), Some((key, value)))?;
                        writeln!(out, "{n}")?;
                    }
                }
            }
            Ok(())
        })?;
    }
    writeln!(out, "# HELP sluicegate_spend_microdollars_total Micro-dollars billed.")?;
    writeln!(out, "# TYPE sluicegate_spend_microdollars_total counter")?;
    family(models, out, &|m, out| {
        for tier in ServiceTier::ALL {
            let spend = m.spend_micros(tier);
            if spend != 0 {
                series(out, "sluicegate_spend_microdollars_total", m, Some(tier), None)?;
                writeln!(out, "{spend}")?;
            }
        }
        Ok(())
    })?;
    writeln!(out, "# HELP sluicegate_in_flight Permits outstanding.\n# TYPE sluicegate_in_flight gauge")?;
    family(models, out, &|m, out| {
        if m.model().is_empty() {
            return Ok(());
        }
        series(out, "sluicegate_in_flight", m, None, None)?;
        writeln!(out, "{}", m.in_flight)
    })?;
    writeln!(out, "# HELP sluicegate_load The model's load, 1 at capacity.\n# TYPE sluicegate_load gauge")?;
    family(models, out, &|m, out| {
        if m.model().is_empty() {
            return Ok(());
        }
        series(out, "sluicegate_load", m, None, None)?;
        writeln!(out, "{}.{:03}", m.load / 1000, m.load % 1000)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_has_its_own_snake_case_name() {
        let names = Event::ALL.map(Event::name);
        for (i, name) in names.iter().enumerate() {
            assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{name}");
            assert!(!names[..i].contains(name), "{name} twice");
        }
        assert_eq!(names[0], "admitted");
        assert_eq!(names[14], "cancelled");
    }
}
