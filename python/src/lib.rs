//! `sluicegate._sluicegate`: the native module behind the `sluicegate` Python package.
//!
//! Arguments are converted while holding the GIL; the admission itself runs with the GIL
//! released. The docstrings of `Engine`, `Decision` and `Scope` are those of the stubs
//! (`python/sluicegate/_sluicegate.pyi`) word for word, so `help()` shows them too; a test
//! (`test_runtime_docstrings_are_the_stubs`) keeps the two equal.

// Python signatures take their keyword arguments flat, one Rust parameter each.
#![allow(clippy::too_many_arguments)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwapOption, Guard};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use sluicegate_core::error_body::write_error_body;
use sluicegate_core::headers::for_each_header;
use sluicegate_core::metrics::{Event, write_prometheus};
use sluicegate_core::response::{Dialect, Render};
use sluicegate_core::{
    Backing, Band, Capacity, Completion, ConcurrencyLimited, Decision, Engine as CoreEngine,
    Error as CoreError, Heap, InvalidRequest, Levels, Metric, MetricLimits, Outcome as CoreOutcome,
    Overrides, PerMetric, Permit, Policy, Price, Quota, RateLimited, RawPermit, RegionError, Request,
    ScopeKey, ServiceTier, SharedFile, Shed, SnapshotError, SpendRejection, Suspension, Tier, Usage, Variant,
};
use sluicegate_redis::{Hosts, Options};

mod args;
mod errors;
mod scope;

use args::{
    bytes_like, choice, count, count_u32, flag, key_bytes, kind, not_one_of, now, number, optional_count,
    text,
};
use errors::*;

fn dialect(v: &Bound<'_, PyAny>) -> PyResult<Dialect> {
    choice("dialect", v, &Dialect::ALL.map(|d| (d.name(), d)))
}

fn metric(v: &Bound<'_, PyAny>) -> PyResult<Metric> {
    choice("metric", v, &Metric::ALL.map(|m| (m.name(), m)))
}

fn quota(v: &Bound<'_, PyAny>) -> PyResult<Quota> {
    choice("quota", v, &Quota::ALL.map(|q| (q.name(), q)))
}

/// A service tier by name (`service_tier=`, `set_service_tier_grant`); the error lists them all,
/// also for a name given as bytes or any other type.
fn service_tier(name: &str, v: &Bound<'_, PyAny>) -> PyResult<ServiceTier> {
    let tiers = ServiceTier::ALL.map(|t| (t.name(), t));
    if !v.is_instance_of::<PyString>() {
        return Err(ArgumentTypeError::new_err(not_one_of(name, v, tiers.iter().map(|(n, _)| *n))));
    }
    choice(name, v, &tiers)
}

/// A flag left out or given as None is `default`.
fn optional_flag(name: &str, v: Option<&Bound<'_, PyAny>>, default: bool) -> PyResult<bool> {
    v.filter(|v| !v.is_none()).map_or(Ok(default), |v| flag(name, v))
}

/// The variant named by the `fast` argument.
fn variant(fast: Option<&Bound<'_, PyAny>>) -> PyResult<Variant> {
    Ok(if optional_flag("fast", fast, false)? { Variant::Fast } else { Variant::Regular })
}

/// The `decision` argument.
fn decision_of<'a>(v: &'a Bound<'_, PyAny>) -> PyResult<&'a PyDecision> {
    v.cast::<PyDecision>()
        .map(|d| d.get())
        .map_err(|_| ArgumentTypeError::new_err(format!("decision must be a Decision, not {}", kind(v))))
}

/// The members of `sluicegate.Outcome` (a Python enum, which a pyclass cannot be: `list(Outcome)`
/// needs a metaclass), in the order of [`outcome_index`].
const OUTCOMES: [&str; 7] = [
    "ADMIT",
    "ADMIT_OVER_LIMIT",
    "REJECT_RATE_LIMITED",
    "SHED",
    "REJECT_SPEND",
    "REJECT_INVALID",
    "REJECT_CONCURRENCY",
];

fn outcome_index(o: &CoreOutcome) -> usize {
    match o {
        CoreOutcome::Admit(_) => 0,
        CoreOutcome::AdmitOverLimit(_) => 1,
        CoreOutcome::RejectRateLimited(_) => 2,
        CoreOutcome::Shed(_) => 3,
        CoreOutcome::RejectSpend(_) => 4,
        CoreOutcome::RejectInvalid(_) => 5,
        CoreOutcome::RejectConcurrency(_) => 6,
    }
}

/// The `sluicegate.Outcome` member for `o`, looked up once per process.
fn outcome_member<'py>(py: Python<'py>, o: &CoreOutcome) -> PyResult<Bound<'py, PyAny>> {
    static MEMBERS: PyOnceLock<Vec<Py<PyAny>>> = PyOnceLock::new();
    let members = MEMBERS.get_or_try_init(py, || {
        let class = py.import("sluicegate._outcome")?.getattr("Outcome")?;
        OUTCOMES.iter().map(|name| class.getattr(*name).map(Bound::unbind)).collect::<PyResult<Vec<_>>>()
    })?;
    let member = members.get(outcome_index(o)).ok_or_else(|| Error::new_err("unknown outcome"))?;
    Ok(member.bind(py).clone())
}

/// An admission decision; settle it with :meth:`Engine.settle` if it was admitted.
///
/// Decisions pickle: a process sharing the engine's file (``Engine(shared=...)``) can settle
/// one that another admitted.
#[pyclass(module = "sluicegate._sluicegate", name = "Decision", frozen)]
struct PyDecision {
    inner: Decision,
    now_ns: u64,
    dialect: Dialect,
    per_second: bool,
}

/// The first word of a pickled decision: its format (bump it on any change).
const PICKLED: u64 = u64::from_le_bytes(*b"SGDEC\x00\x00\x01");
/// Words in a pickled decision: the format, the outcome and three of its fields, the permit,
/// the levels, the cost, then `now_ns`, the dialect and `per_second`.
const PICKLED_WORDS: usize = 5 + 9 + 4 + 4 + 4 + 3;

fn index_of<T: PartialEq>(all: &[T], x: &T) -> u64 {
    all.iter().position(|a| a == x).unwrap_or(0) as u64
}

impl PyDecision {
    /// The decision as words (see [`PICKLED_WORDS`]).
    fn to_words(&self) -> [u64; PICKLED_WORDS] {
        let d = &self.inner;
        let (mut x, mut y, mut z) = (0, 0, 0);
        let mut permit = [0u64; 9];
        match d.outcome {
            CoreOutcome::Admit(p) | CoreOutcome::AdmitOverLimit(p) => permit = p.to_raw().words,
            CoreOutcome::RejectRateLimited(r) => {
                (x, y, z) = (index_of(&Metric::ALL, &r.metric), r.retry_after_ns, u64::from(r.too_large))
            }
            CoreOutcome::Shed(s) => {
                (x, y, z) = (u64::from(s.band == Band::OverLimit), s.retry_after_ns, u64::from(s.load))
            }
            CoreOutcome::RejectSpend(r) => x = u64::from(r == SpendRejection::AccountSuspended),
            CoreOutcome::RejectInvalid(i) => {
                x = index_of(
                    &[InvalidRequest::ZeroN, InvalidRequest::CachedExceedsPrompt, InvalidRequest::Overflow],
                    &i,
                )
            }
            CoreOutcome::RejectConcurrency(c) => (x, y) = (u64::from(c.max_in_flight), c.retry_after_ns),
        }
        let (debt, interval) = d.levels.to_raw();
        let mut words = [0u64; PICKLED_WORDS];
        let fields = [PICKLED, outcome_index(&d.outcome) as u64, x, y, z]
            .into_iter()
            .chain(permit)
            .chain(debt)
            .chain(interval)
            .chain(d.cost.0)
            .chain([self.now_ns, index_of(&Dialect::ALL, &self.dialect), u64::from(self.per_second)]);
        for (w, f) in words.iter_mut().zip(fields) {
            *w = f;
        }
        words
    }

    /// A decision from [`PyDecision::to_words`]; None if they are not one. A permit made up this
    /// way settles nowhere: engines check each permit against their own seed.
    fn from_words(w: &[u64; PICKLED_WORDS]) -> Option<PyDecision> {
        let [format, kind, x, y, z, rest @ ..] = w;
        if *format != PICKLED {
            return None;
        }
        let (permit, rest) = rest.split_first_chunk::<9>()?;
        let (debt, rest) = rest.split_first_chunk::<4>()?;
        let (interval, rest) = rest.split_first_chunk::<4>()?;
        let (cost, rest) = rest.split_first_chunk::<4>()?;
        let [now_ns, dialect, per_second] = rest else { return None };
        let permit = || Permit::from_raw(&RawPermit { words: *permit });
        let small = |v: u64, below: u64| (v < below).then_some(v as usize);
        let outcome = match kind {
            0 => CoreOutcome::Admit(permit()?),
            1 => CoreOutcome::AdmitOverLimit(permit()?),
            2 => CoreOutcome::RejectRateLimited(RateLimited {
                metric: *Metric::ALL.get(small(*x, 4)?)?,
                retry_after_ns: *y,
                too_large: small(*z, 2)? == 1,
            }),
            3 => CoreOutcome::Shed(Shed {
                band: if small(*x, 2)? == 1 { Band::OverLimit } else { Band::Normal },
                retry_after_ns: *y,
                load: u32::try_from(*z).ok()?,
            }),
            4 => CoreOutcome::RejectSpend(match small(*x, 2)? {
                0 => SpendRejection::SpendLimitExceeded,
                _ => SpendRejection::AccountSuspended,
            }),
            5 => CoreOutcome::RejectInvalid(
                *[InvalidRequest::ZeroN, InvalidRequest::CachedExceedsPrompt, InvalidRequest::Overflow]
                    .get(small(*x, 3)?)?,
            ),
            6 => CoreOutcome::RejectConcurrency(ConcurrencyLimited {
                max_in_flight: u32::try_from(*x).ok()?,
                retry_after_ns: *y,
            }),
            _ => return None,
        };
        Some(PyDecision {
            inner: Decision { outcome, levels: Levels::from_raw(*debt, *interval), cost: PerMetric(*cost) },
            now_ns: *now_ns,
            dialect: *Dialect::ALL.get(small(*dialect, Dialect::ALL.len() as u64)?)?,
            per_second: small(*per_second, 2)? == 1,
        })
    }
}

/// Unpickles a :class:`Decision` (``Decision.__reduce__``).
#[pyfunction]
fn _decision(state: &Bound<'_, PyAny>) -> PyResult<PyDecision> {
    let bytes = bytes_like("state", state)?;
    let not_one = || ArgumentError::new_err("not a pickled sluicegate Decision (or one of another version)");
    let mut words = [0u64; PICKLED_WORDS];
    if bytes.len() != PICKLED_WORDS * 8 {
        return Err(not_one());
    }
    for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        *w = u64::from_le_bytes(chunk.try_into().map_err(|_| not_one())?);
    }
    PyDecision::from_words(&words).ok_or_else(not_one)
}

fn per_metric(py: Python<'_>, f: impl Fn(Metric) -> u64) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for m in Metric::ALL {
        let v = f(m);
        if v == u64::MAX {
            d.set_item(m.name(), py.None())?;
        } else {
            d.set_item(m.name(), v)?;
        }
    }
    Ok(d)
}

impl PyDecision {
    fn render(
        &self,
        dialect_arg: Option<&Bound<'_, PyAny>>,
        unix_ns: Option<u64>,
        jitter_seed: Option<u64>,
    ) -> PyResult<Render> {
        let d = match dialect_arg.filter(|d| !d.is_none()) {
            Some(name) => dialect(name)?,
            None => self.dialect,
        };
        let unix = unix_ns.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |t| t.as_nanos() as u64)
        });
        let seed = jitter_seed.unwrap_or(self.now_ns ^ self.inner.levels.to_raw().0[0]);
        Ok(Render::new(d).per_second(self.per_second).wall_clock(unix, self.now_ns).jitter_seed(seed))
    }

    fn permit(&self) -> PyResult<Permit> {
        self.inner
            .permit()
            .copied()
            .ok_or_else(|| ArgumentError::new_err("the decision was not admitted: nothing to settle"))
    }
}

#[pymethods]
impl PyDecision {
    /// What to do with the request.
    #[getter]
    fn outcome<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        outcome_member(py, &self.inner.outcome)
    }

    /// Whether the request may run (normally or over its limit).
    #[getter]
    fn admitted(&self) -> bool {
        self.inner.admitted()
    }

    /// Whether it runs (or would run) over its limit, at lower priority.
    #[getter]
    fn over_limit(&self) -> bool {
        match &self.inner.outcome {
            CoreOutcome::Admit(p) | CoreOutcome::AdmitOverLimit(p) => p.over_limit(),
            _ => self.inner.levels.over_limit(),
        }
    }

    /// The service tier an admitted request is served at (the one asked for, capped by its
    /// account's grant); None if not admitted.
    #[getter]
    fn service_tier(&self) -> Option<&'static str> {
        self.inner.permit().map(|p| p.service_tier().name())
    }

    /// The HTTP status in the engine's dialect: 200, 400, 402, 429 or 503.
    #[getter]
    fn status_code(&self) -> PyResult<u16> {
        Ok(self.render(None, Some(0), Some(0))?.status(&self.inner))
    }

    /// Seconds until the request would fit (429) or the shed delay (503); else None.
    #[getter]
    fn retry_after(&self) -> Option<f64> {
        self.inner.retry_after_ns().map(|ns| ns as f64 / 1e9)
    }

    /// :attr:`retry_after` in nanoseconds.
    #[getter]
    fn retry_after_ns(&self) -> Option<u64> {
        self.inner.retry_after_ns()
    }

    /// Seconds to delay forwarding an admitted request (smoothing); usually 0.
    #[getter]
    fn wait(&self) -> f64 {
        self.inner.permit().map_or(0.0, |p| p.wait_ns() as f64 / 1e9)
    }

    /// For a 429, the metric that binds.
    #[getter]
    fn binding_metric(&self) -> Option<&'static str> {
        match self.inner.outcome {
            CoreOutcome::RejectRateLimited(r) => Some(r.metric.name()),
            _ => None,
        }
    }

    /// For a 429, whether the request can never fit at the current limit.
    #[getter]
    fn too_large(&self) -> bool {
        matches!(self.inner.outcome, CoreOutcome::RejectRateLimited(r) if r.too_large)
    }

    /// For spend, concurrency and invalid refusals, why (e.g. ``"concurrency_limited"``).
    #[getter]
    fn reason(&self) -> Option<&'static str> {
        match self.inner.outcome {
            CoreOutcome::RejectSpend(sluicegate_core::SpendRejection::SpendLimitExceeded) => {
                Some("spend_limit_exceeded")
            }
            CoreOutcome::RejectSpend(sluicegate_core::SpendRejection::AccountSuspended) => {
                Some("account_suspended")
            }
            CoreOutcome::RejectInvalid(i) => Some(i.message()),
            CoreOutcome::RejectConcurrency(_) => Some("concurrency_limited"),
            _ => None,
        }
    }

    /// Each metric's limit per minute (None when not enforced).
    #[getter]
    fn limits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        per_metric(py, |m| self.inner.levels.limit(m))
    }

    /// Each metric's units left before its limit, None when not enforced.
    #[getter]
    fn remaining<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let l = &self.inner.levels;
        per_metric(py, |m| if l.limit(m) == u64::MAX { u64::MAX } else { l.remaining(m) })
    }

    /// What the request costs on each metric.
    #[getter]
    fn cost<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        per_metric(py, |m| *self.inner.cost.get(m))
    }

    /// The rate-limit headers to send, in ``dialect`` (the engine's by default).
    ///
    /// ``unix_ns`` anchors the engine's clock to wall time for Anthropic's RFC 3339 resets
    /// (default: now); ``jitter_seed`` seeds a 503's retry-after jitter.
    #[pyo3(signature = (dialect=None, *, unix_ns=None, jitter_seed=None))]
    fn headers(
        &self,
        dialect: Option<&Bound<'_, PyAny>>,
        unix_ns: Option<&Bound<'_, PyAny>>,
        jitter_seed: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<(String, String)>> {
        let (unix_ns, jitter_seed) =
            (optional_count("unix_ns", unix_ns)?, optional_count("jitter_seed", jitter_seed)?);
        let render = self.render(dialect, unix_ns, jitter_seed)?;
        let mut out = Vec::new();
        for_each_header(&self.inner, &render, self.now_ns, |n, v| out.push((n.to_string(), v.to_string())));
        Ok(out)
    }

    /// The OpenAI-compatible JSON error body of a refusal, parsed; None if admitted.
    #[pyo3(signature = (dialect=None, *, jitter_seed=None))]
    fn error_body<'py>(
        &self,
        py: Python<'py>,
        dialect: Option<&Bound<'_, PyAny>>,
        jitter_seed: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let render = self.render(dialect, Some(0), optional_count("jitter_seed", jitter_seed)?)?;
        let mut buf = [0u8; 2048];
        // Neither can happen: bodies are a few hundred bytes of ASCII.
        let n =
            write_error_body(&self.inner, &render, &mut buf).map_err(|e| Error::new_err(e.to_string()))?;
        if n == 0 {
            return Ok(None);
        }
        let text =
            std::str::from_utf8(buf.get(..n).unwrap_or(&[])).map_err(|e| Error::new_err(e.to_string()))?;
        let json = py.import("json")?;
        Ok(Some(json.call_method1("loads", (text,))?))
    }

    /// Pickles as its words (a permit keeps working in any process that shares the engine).
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let bytes: Vec<u8> = self.to_words().iter().flat_map(|w| w.to_le_bytes()).collect();
        let unpickle = py.import("sluicegate._sluicegate")?.getattr("_decision")?;
        Ok((unpickle, (PyBytes::new(py, &bytes),)))
    }

    fn __repr__(&self) -> String {
        let name = OUTCOMES.get(outcome_index(&self.inner.outcome)).copied().unwrap_or("?");
        format!("<Decision {name}>")
    }
}

/// The admission engine: fixed-capacity tables, safe to share between threads.
///
/// ``policy`` is a preset (``fireworks_2024``, ``fireworks_2026``, ``together``, ``fixed``).
/// Keyword overrides are collected, then resolved and checked together, so their order never
/// matters:
///
/// - ``<metric>_per_minute`` (``requests_per_minute``, ``prompt_tokens_per_minute``,
///   ``uncached_prompt_tokens_per_minute``, ``generated_tokens_per_minute``) is the metric's
///   limit, its floor when limits adapt. Under ``fixed``, naming any metric's limit enforces only
///   the metrics named; ``fixed`` with none named keeps its documented floors.
/// - ``<metric>_ceiling`` (e.g. ``requests_ceiling``) bounds adaptation (default: the preset's,
///   raised to the floor); a floor above its ceiling is a :class:`PolicyError`.
/// - ``hard_factor`` (ρ ≥ 1), ``max_wait`` (smoothing, seconds; 0 turns it off), ``tick``
///   (seconds) and ``permit_ttl`` (seconds, at least 1; default 900, 15 minutes): a decision not
///   settled within ``permit_ttl`` of its ``now_ns`` expires, and settling it raises
///   :class:`PermitExpiredError`.
/// - ``max_in_flight`` (a whole number, at least 1) caps the permits one account may have
///   outstanding; default: a quarter of ``permits``, so that no account can take the whole
///   ledger. Beyond it, admission is ``Outcome.REJECT_CONCURRENCY``, a 429
///   ``concurrency_limited``; :meth:`set_max_in_flight` gives one account its own cap.
/// - ``None`` means ``inf``, no limit: it turns a metric off under any preset, removes a
///   ceiling, makes permits never expire, lifts the ``max_in_flight`` cap.
///
/// A value out of range raises :class:`PolicyError` naming it; an unknown keyword raises
/// ``TypeError`` naming it. ``repr(engine)`` shows each metric's limit in force (``off`` when
/// not enforced) and ``max_in_flight``. Every ``now_ns`` defaults to ``time.monotonic_ns()``;
/// pass explicit values to simulate hours in milliseconds.
///
/// ``shared`` (a path: str or ``os.PathLike``; default None, this process's memory) puts the
/// tables in a memory-mapped file, e.g. ``/dev/shm/sluicegate-api``: every process that opens
/// the same path with the same policy, overrides and capacities shares each account's limits
/// exactly, such as the workers of ``uvicorn --workers 4`` each creating its engine at import.
/// The first opener creates the file (mode 0600) and initialises it; a file made for another
/// configuration, damaged, or not a sluicegate region raises :class:`SharedRegionError` and is
/// left as it was. sluicegate never deletes the file: remove it, once no process has it open,
/// to start afresh. Permits held by a process that dies are not given back at once: each
/// expires ``permit_ttl`` after its admission (its reservation stays charged), and what it
/// held, its account's in-flight place and its model's load, comes back as the engine meets
/// it, sweeping the ledger as time goes (4,096 permits a tick, more on refusals). One killed
/// inside a call may leave a count one off until every process has closed the file: the
/// next opener, alone, recounts the region first. ``seed``
/// cannot be given with ``shared``: the region keeps the seed of the process that created it.
///
/// ``redis`` (a URL, ``redis://host:port/db``; default None) makes the engine one replica of
/// many behind a load balancer: every engine connected to the same Redis 7 with the same
/// policy and overrides shares each scope's limits, as one engine would. Admissions stay local,
/// from leases of the global buckets a background thread keeps (a scope's first request waits
/// for one Redis call); if Redis stops answering, leases run out, then each replica admits its
/// share of the limits (the limit / replicas still heard from). Redis unreachable (within
/// 200 ms) raises :class:`RedisError`. ``redis`` cannot be given with ``shared``.
#[pyclass(module = "sluicegate._sluicegate", name = "Engine", frozen)]
struct PyEngine {
    /// `restore` builds a new engine and swaps it in whole; every other call works on the engine
    /// it loaded, so a heap engine's restore never waits for, or fails because of, calls in
    /// progress. A shared engine's restore rewrites the one region every handle reads: it takes
    /// the engine out (None) while it runs, after the calls in progress have finished, and calls
    /// made meanwhile wait for it to be put back.
    core: ArcSwapOption<CoreEngine<Backing>>,
    /// Held by a shared engine's restore (one at a time).
    restoring: Mutex<()>,
    dialect: Dialect,
    policy_name: String,
    /// The file of a shared engine, as given.
    shared: Option<PathBuf>,
    /// A replica's leases of the global buckets in Redis, and its URL as given.
    hosts: Option<(Hosts, String)>,
    /// The process that opened the file: a process forked from it shares its file lock, so
    /// cannot tell whether others use the region.
    opener: u32,
}

/// The engine in force, loaded for one call (never None: [`PyEngine::core`] waits out a restore).
struct Current(Guard<Option<Arc<CoreEngine<Backing>>>>);

impl std::ops::Deref for Current {
    type Target = CoreEngine<Backing>;

    fn deref(&self) -> &CoreEngine<Backing> {
        self.0.as_deref().expect("PyEngine::core returns a loaded engine")
    }
}

/// Puts the engine a shared restore took out back if the restore ends early (an error or a
/// panic), so that callers waiting for it never wait forever.
struct TakenOut<'a> {
    cell: &'a ArcSwapOption<CoreEngine<Backing>>,
    engine: Option<Arc<CoreEngine<Backing>>>,
}

impl TakenOut<'_> {
    /// Puts `engine` in, in place of the one taken out.
    fn replace(mut self, engine: CoreEngine<Backing>) {
        self.cell.store(Some(Arc::new(engine)));
        self.engine = None;
    }
}

impl Drop for TakenOut<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.engine.take() {
            self.cell.store(Some(e));
        }
    }
}

/// The `shared` argument: anything `os.fsencode` takes (str, bytes, `os.PathLike`).
fn shared_path(v: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    static FSENCODE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let fsencode = FSENCODE.import(v.py(), "os", "fsencode")?;
    let not_a_path =
        || ArgumentTypeError::new_err(format!("shared must be a path (str or os.PathLike), not {}", kind(v)));
    let encoded = fsencode.call1((v,)).map_err(|_| not_a_path())?;
    let bytes = encoded.cast::<PyBytes>().map_err(|_| not_a_path())?;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes.as_bytes())))
}

/// A shared engine's file refused: `SharedRegionError` naming the file (and the system's words
/// for an errno); any other error as usual.
fn open_error(e: CoreError, path: &Path) -> PyErr {
    let mut text = e.to_string();
    match e {
        CoreError::Region(region) => {
            if let RegionError::Io(errno @ 1..) = region {
                let words = std::io::Error::from_raw_os_error(errno).to_string();
                let suffix = format!(" (os error {errno})");
                text = format!("{text}: {}", words.strip_suffix(&suffix).unwrap_or(&words));
            }
            SharedRegionError::new_err(format!("{text}: {}", path.display()))
        }
        other => core_error(other),
    }
}

fn positive_float(name: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    let x = number(name, v)?;
    if !(x.is_finite() && x >= 1.0) {
        return Err(ArgumentError::new_err(format!("{name} must be a finite number of at least 1, got {x}")));
    }
    Ok(x)
}

/// An override's value: a number, or None for `inf` (no limit: the metric off, no ceiling, a
/// permit that never expires). Ranges are the core's to check, so they do not depend on the order
/// the keywords come in.
fn override_value(name: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    if v.is_none() {
        return Ok(f64::INFINITY);
    }
    number(name, v)
        .map_err(|_| ArgumentTypeError::new_err(format!("{name} must be a number or None, not {}", kind(v))))
}

/// The preset named by `policy` (default `fireworks_2024`) with the keyword overrides, collected
/// first and resolved together.
fn policy_from(
    policy: Option<&Bound<'_, PyAny>>,
    overrides: Option<&Bound<'_, PyDict>>,
) -> PyResult<(String, Policy)> {
    let name = match policy.filter(|p| !p.is_none()) {
        Some(p) => text("policy", p)?.to_string(),
        None => "fireworks_2024".to_string(),
    };
    let preset = match (Policy::preset(&name), policy) {
        (Some(p), _) => p,
        (None, Some(given)) => {
            return Err(PolicyError::new_err(not_one_of("policy", given, Policy::PRESETS.into_iter())));
        }
        (None, None) => return Err(PolicyError::new_err("no default policy")),
    };
    let mut collected = Overrides::default();
    for (key, value) in overrides.into_iter().flat_map(|d| d.iter()) {
        let key: String = key.extract()?;
        // The name first: an unknown keyword is an error whatever its value, None included.
        if !Policy::OVERRIDES.contains(&key.as_str()) {
            return Err(ArgumentTypeError::new_err(format!(
                "Engine() got an unexpected keyword argument '{key}'; overrides are {}",
                Policy::OVERRIDES.join(", ")
            )));
        }
        let _ = collected.set(&key, override_value(&key, &value)?);
    }
    let policy = preset.with(&collected).map_err(|e| PolicyError::new_err(e.to_string()))?;
    Ok((name, policy))
}

/// A cap on an account's permits in flight: a whole number from 1 to 2**32 - 1.
fn in_flight_cap(v: &Bound<'_, PyAny>) -> PyResult<u32> {
    let below_one = || {
        let given = v.repr().map(|r| r.to_string()).unwrap_or_default();
        ArgumentError::new_err(format!("max_in_flight must be at least 1 (None: the policy's), got {given}"))
    };
    match count_u32("max_in_flight", v) {
        Ok(0) => Err(below_one()),
        Ok(n) => Ok(n),
        // Negative (an overflow is reported as one).
        Err(e)
            if !e.is_instance_of::<ArgumentOverflowError>(v.py())
                && e.is_instance_of::<ArgumentError>(v.py()) =>
        {
            Err(below_one())
        }
        Err(e) => Err(e),
    }
}

/// A per-minute figure as written in a repr: whole numbers without a fraction.
fn per_minute(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v}") }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (policy=None, capacity=None, *, accounts=None, models=None, permits=None, seed=None, dialect=None, shared=None, redis=None, **overrides))]
    #[pyo3(
        text_signature = "(policy='fireworks_2024', capacity=None, *, accounts=None, models=None, permits=None, seed=None, dialect='fireworks', shared=None, redis=None, **overrides)"
    )]
    fn new(
        py: Python<'_>,
        policy: Option<&Bound<'_, PyAny>>,
        capacity: Option<&Bound<'_, PyAny>>,
        accounts: Option<&Bound<'_, PyAny>>,
        models: Option<&Bound<'_, PyAny>>,
        permits: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
        dialect: Option<&Bound<'_, PyAny>>,
        shared: Option<&Bound<'_, PyAny>>,
        redis: Option<String>,
        overrides: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let dialect = match dialect.filter(|d| !d.is_none()) {
            Some(d) => self::dialect(d)?,
            None => Dialect::Fireworks,
        };
        let (policy, p) = policy_from(policy, overrides)?;
        let size =
            |n: u64| usize::try_from(n).map_err(|_| ArgumentOverflowError::new_err("capacity too large"));
        let mut cap = Capacity::scopes(size(optional_count("capacity", capacity)?.unwrap_or(100_000))?);
        for (name, field, value) in [
            ("accounts", &mut cap.accounts, accounts),
            ("models", &mut cap.models, models),
            ("permits", &mut cap.permits, permits),
        ] {
            if let Some(v) = optional_count(name, value)? {
                *field = size(v)?;
            }
        }
        let seed = optional_count("seed", seed)?;
        let path = shared.filter(|s| !s.is_none()).map(shared_path).transpose()?;
        let inner = match &path {
            Some(path) => {
                if seed.is_some() {
                    return Err(ArgumentError::new_err(
                        "seed cannot be given with shared: a shared engine keeps the seed of its region",
                    ));
                }
                // Opening may wait for another process's initialisation of the file.
                let file = py.detach(|| SharedFile::open(path, &p, cap)).map_err(|e| open_error(e, path))?;
                // The region's seed is used; the argument is ignored.
                CoreEngine::with_storage(p, Backing::Shared(file), 0)
            }
            None => {
                let heap = Heap::new(cap).map_err(core_error)?;
                let seed = seed.unwrap_or_else(sluicegate_core::storage::random_seed);
                CoreEngine::with_storage(p, Backing::Heap(heap), seed)
            }
        }
        .map_err(core_error)?;
        let hosts = match redis {
            Some(_) if path.is_some() => {
                return Err(ArgumentError::new_err(
                    "redis cannot be given with shared: a replica's engine is in its own memory",
                ));
            }
            // Connecting waits for Redis (at most its timeout).
            Some(url) => Some((
                py.detach(|| Hosts::connect(&url, &p, cap.scopes, Options::default()))
                    .map_err(redis_error)?,
                url,
            )),
            None => None,
        };
        Ok(PyEngine {
            core: ArcSwapOption::from_pointee(inner),
            restoring: Mutex::new(()),
            dialect,
            policy_name: policy,
            shared: path,
            hosts,
            opener: std::process::id(),
        })
    }

    /// The file of a shared engine (``Engine(shared=...)``), as given; None for this process's memory.
    #[getter]
    fn shared<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyString>>> {
        self.shared
            .as_deref()
            .map(|p| p.as_os_str().into_pyobject(py))
            .transpose()
            .map_err(|never| match never {})
    }

    /// The Redis of a replica's engine (``Engine(redis=...)``), as given; None for a standalone one.
    #[getter]
    fn redis(&self) -> Option<&str> {
        self.hosts.as_ref().map(|(_, url)| url.as_str())
    }

    /// The preset the engine was built from.
    #[getter]
    fn policy(&self) -> &str {
        &self.policy_name
    }

    /// The dialect decisions render in by default (``Engine(dialect=...)``).
    #[getter]
    fn dialect(&self) -> &'static str {
        self.dialect.name()
    }

    #[pyo3(signature = (account, model, prompt_tokens=None, cached_tokens=None, max_tokens=None, n=None, priority=None, fast=None, expected_tokens=None, now_ns=None, *, service_tier=None))]
    #[pyo3(
        text_signature = "(self, account, model, prompt_tokens=None, cached_tokens=None, max_tokens=None, n=None, priority=False, fast=False, expected_tokens=None, now_ns=None, *, service_tier=None)"
    )]
    /// Decides whether a request may run now; reserves its costs only if it is admitted.
    ///
    /// ``prompt_tokens`` (of which ``cached_tokens`` are expected to hit the prompt cache),
    /// ``max_tokens`` per completion, ``n`` completions (default 1) and ``expected_tokens`` (the
    /// completion length expected, if below ``max_tokens``) size the reservation; ``fast``
    /// selects the model's fast variant. Counts are ints or anything with ``__index__``.
    ///
    /// ``service_tier`` (``"flex"``, ``"default"``, ``"priority"``; default ``"default"``) is
    /// the tier asked for: under load, flex is shed first and priority last. The account's grant
    /// (:meth:`set_service_tier_grant`, ``"default"`` until set) caps it: asking above the grant
    /// is not refused, it is served at the grant (:attr:`Decision.service_tier`).
    /// ``priority=True`` is ``service_tier="priority"``; with another ``service_tier`` it raises
    /// :class:`ArgumentError`.
    ///
    /// Refusals are decisions, not exceptions; settle an admitted decision with :meth:`settle`
    /// (or :meth:`cancel`).
    fn admit(
        &self,
        account: &Bound<'_, PyAny>,
        model: &Bound<'_, PyAny>,
        prompt_tokens: Option<&Bound<'_, PyAny>>,
        cached_tokens: Option<&Bound<'_, PyAny>>,
        max_tokens: Option<&Bound<'_, PyAny>>,
        n: Option<&Bound<'_, PyAny>>,
        priority: Option<&Bound<'_, PyAny>>,
        fast: Option<&Bound<'_, PyAny>>,
        expected_tokens: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
        service_tier: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyDecision> {
        let (account, model) = (key_bytes("account", account)?, key_bytes("model", model)?);
        let request =
            request_of(prompt_tokens, cached_tokens, max_tokens, n, priority, service_tier, expected_tokens)?;
        let at = now(now_ns)?;
        let key = ScopeKey { account: &account, model: &model, variant: variant(fast)? };
        self.decide(at, |core| self.admit_key(core, key, &request, at))
    }

    /// Resolves the scope of ``account`` and ``model`` (creating it if new) for :meth:`Scope.admit`.
    ///
    /// Keys, ``fast`` and ``now_ns`` are as for :meth:`admit`, and so are the exceptions:
    /// :class:`InvalidKeyError` for an empty or too long key, :class:`TableFullError` when no
    /// slot is free for a new one. Resolve once per API key and keep the scope.
    #[pyo3(signature = (account, model, *, fast=None, now_ns=None))]
    #[pyo3(text_signature = "(self, account, model, *, fast=False, now_ns=None)")]
    fn scope(
        slf: &Bound<'_, Self>,
        account: &Bound<'_, PyAny>,
        model: &Bound<'_, PyAny>,
        fast: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<scope::PyScope> {
        scope::PyScope::resolve(slf, account, model, fast, now_ns)
    }

    #[pyo3(signature = (decision, prompt_tokens=None, cached_tokens=None, generated_tokens=None, *, completion=None, now_ns=None))]
    #[pyo3(
        text_signature = "(self, decision, prompt_tokens=None, cached_tokens=None, generated_tokens=None, *, completion='success', now_ns=None)"
    )]
    /// Settles an admitted decision with actual usage.
    ///
    /// Every field left out is what was reserved at admission: ``prompt_tokens`` and
    /// ``cached_tokens`` as admitted (cached at most ``prompt_tokens``), ``generated_tokens`` as
    /// reserved. ``completion="upstream_failure"`` refunds and bills nothing.
    ///
    /// Raises :class:`AlreadySettledError` on a second settle, and :class:`PermitExpiredError`
    /// past the policy's ``permit_ttl``.
    fn settle(
        &self,
        decision: &Bound<'_, PyAny>,
        prompt_tokens: Option<&Bound<'_, PyAny>>,
        cached_tokens: Option<&Bound<'_, PyAny>>,
        generated_tokens: Option<&Bound<'_, PyAny>>,
        completion: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let completion = match completion.filter(|c| !c.is_none()) {
            Some(c) => choice("completion", c, &COMPLETIONS)?,
            None => Completion::Success,
        };
        self.finish(decision, prompt_tokens, cached_tokens, generated_tokens, completion, now_ns)
    }

    /// Settles a request the client abandoned, with what it used (omitted: what was reserved).
    #[pyo3(signature = (decision, prompt_tokens=None, cached_tokens=None, generated_tokens=None, *, now_ns=None))]
    fn cancel(
        &self,
        decision: &Bound<'_, PyAny>,
        prompt_tokens: Option<&Bound<'_, PyAny>>,
        cached_tokens: Option<&Bound<'_, PyAny>>,
        generated_tokens: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.finish(decision, prompt_tokens, cached_tokens, generated_tokens, Completion::Cancelled, now_ns)
    }

    /// Records generated tokens of a stream as they arrive.
    #[pyo3(signature = (decision, generated_tokens, *, now_ns=None))]
    fn charge(
        &self,
        py: Python<'_>,
        decision: &Bound<'_, PyAny>,
        generated_tokens: &Bound<'_, PyAny>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let permit = decision_of(decision)?.permit()?;
        let tokens = count("generated_tokens", generated_tokens)?;
        let at = now(now_ns)?;
        py.detach(|| match &self.hosts {
            Some((hosts, _)) => hosts.charge(&self.core(), &permit, tokens, at),
            None => self.core().charge(&permit, tokens, at),
        })
        .map_err(settle_error)
    }

    /// Each metric's current limit per minute for a scope, None when not enforced (the scope is not created).
    #[pyo3(signature = (account, model, *, fast=None, now_ns=None))]
    #[pyo3(text_signature = "(self, account, model, *, fast=False, now_ns=None)")]
    fn limits<'py>(
        &self,
        py: Python<'py>,
        account: &Bound<'_, PyAny>,
        model: &Bound<'_, PyAny>,
        fast: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let l = self.levels(account, model, fast, now_ns)?;
        per_metric(py, |m| l.limit(m))
    }

    /// Each metric's units left for a scope, None when not enforced.
    #[pyo3(signature = (account, model, *, fast=None, now_ns=None))]
    #[pyo3(text_signature = "(self, account, model, *, fast=False, now_ns=None)")]
    fn remaining<'py>(
        &self,
        py: Python<'py>,
        account: &Bound<'_, PyAny>,
        model: &Bound<'_, PyAny>,
        fast: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let l = self.levels(account, model, fast, now_ns)?;
        per_metric(py, |m| if l.limit(m) == u64::MAX { u64::MAX } else { l.remaining(m) })
    }

    /// Sets a model's load signal (1.0 = at capacity); classes of request are shed as it rises.
    #[pyo3(signature = (model, load, *, fast=None))]
    #[pyo3(text_signature = "(self, model, load, *, fast=False)")]
    fn set_load(
        &self,
        model: &Bound<'_, PyAny>,
        load: &Bound<'_, PyAny>,
        fast: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let load = number("load", load)?;
        if !(load.is_finite() && load >= 0.0) {
            return Err(ArgumentError::new_err(format!("load must be a non-negative number, got {load}")));
        }
        let permille = (load * 1000.0).round().min(f64::from(u32::MAX)) as u32;
        self.core().set_load(&key_bytes("model", model)?, variant(fast)?, permille).map_err(core_error)
    }

    /// A model's current load.
    #[pyo3(signature = (model, *, fast=None))]
    #[pyo3(text_signature = "(self, model, *, fast=False)")]
    fn load(&self, model: &Bound<'_, PyAny>, fast: Option<&Bound<'_, PyAny>>) -> PyResult<f64> {
        let permille = self.core().load(&key_bytes("model", model)?, variant(fast)?).map_err(core_error)?;
        Ok(f64::from(permille) / 1000.0)
    }

    /// Derives a model's load from outstanding permits: in-flight / ``in_flight`` (0: off).
    #[pyo3(signature = (model, in_flight, *, fast=None))]
    #[pyo3(text_signature = "(self, model, in_flight, *, fast=False)")]
    fn set_model_capacity(
        &self,
        model: &Bound<'_, PyAny>,
        in_flight: &Bound<'_, PyAny>,
        fast: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let cap = count_u32("in_flight", in_flight)?;
        self.core().set_model_capacity(&key_bytes("model", model)?, variant(fast)?, cap).map_err(core_error)
    }

    /// Sets a model's prices in micro-dollars per million tokens.
    #[pyo3(signature = (model, *, uncached_prompt, cached_prompt, generated, fast=None))]
    #[pyo3(text_signature = "(self, model, *, uncached_prompt, cached_prompt, generated, fast=False)")]
    fn set_price(
        &self,
        model: &Bound<'_, PyAny>,
        uncached_prompt: &Bound<'_, PyAny>,
        cached_prompt: &Bound<'_, PyAny>,
        generated: &Bound<'_, PyAny>,
        fast: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let price = Price {
            uncached_prompt: count("uncached_prompt", uncached_prompt)?,
            cached_prompt: count("cached_prompt", cached_prompt)?,
            generated: count("generated", generated)?,
        };
        self.core().set_price(&key_bytes("model", model)?, variant(fast)?, price).map_err(core_error)
    }

    /// Everything about an account (money in micro-dollars); UnknownAccountError if unseen.
    ///
    /// Money is reserved at admission: ``reserved`` is the worst-case cost of the account's
    /// outstanding permits, held against ``spend_limit`` (None: none) with ``period_spend`` until
    /// each is settled (then replaced by what it is billed) or expires (then billed).
    /// ``in_flight`` counts those permits; ``max_in_flight`` is the account's own cap on them
    /// (None: the policy's). ``service_tier_grant`` is the highest service tier its requests are
    /// served at (:meth:`set_service_tier_grant`).
    fn account<'py>(&self, py: Python<'py>, account: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.core().account(&key_bytes("account", account)?).map_err(core_error)?;
        let d = PyDict::new(py);
        d.set_item("tier", s.tier.name())?;
        d.set_item("tier_pinned", s.tier_pinned)?;
        d.set_item("payment_method", s.payment_method)?;
        d.set_item("spend_limit", if s.spend_limit == u64::MAX { None } else { Some(s.spend_limit) })?;
        d.set_item("period_spend", s.period_spend)?;
        d.set_item("reserved", s.reserved)?;
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("max_in_flight", s.max_in_flight)?;
        d.set_item("service_tier_grant", s.service_tier_grant.name())?;
        d.set_item("historical_spend", s.historical_spend)?;
        d.set_item("credits", s.credits)?;
        let refusal = s.refusal.map(|r| match r {
            sluicegate_core::SpendRejection::SpendLimitExceeded => "spend_limit_exceeded",
            sluicegate_core::SpendRejection::AccountSuspended => "account_suspended",
        });
        d.set_item("refusal", refusal)?;
        d.set_item("suspended_by_operator", s.suspended_by_operator)?;
        d.set_item("payment_failed", s.payment_failed)?;
        d.set_item("no_payment_method", s.no_payment_method)?;
        let quotas = PyDict::new(py);
        for (q, (used, limit)) in Quota::ALL.into_iter().zip(s.quotas) {
            quotas.set_item(q.name(), (used, limit))?;
        }
        d.set_item("quotas", quotas)?;
        Ok(d)
    }

    /// Adds prepaid credits; they count toward historical spend and so the tier.
    fn add_credits(&self, account: &Bound<'_, PyAny>, micros: &Bound<'_, PyAny>) -> PyResult<()> {
        self.core().add_credits(&key_bytes("account", account)?, count("micros", micros)?).map_err(core_error)
    }

    /// Records whether a payment method is on file.
    fn set_payment_method(&self, account: &Bound<'_, PyAny>, on_file: &Bound<'_, PyAny>) -> PyResult<()> {
        let on_file = flag("on_file", on_file)?;
        self.core().set_payment_method(&key_bytes("account", account)?, on_file).map_err(core_error)
    }

    /// Sets the user's own monthly spend limit, within the tier's.
    fn set_spend_limit(&self, account: &Bound<'_, PyAny>, micros: &Bound<'_, PyAny>) -> PyResult<()> {
        self.core()
            .set_spend_limit(&key_bytes("account", account)?, count("micros", micros)?)
            .map_err(core_error)
    }

    /// Caps the account's permits in flight at ``max_in_flight`` (None: back to the policy's).
    ///
    /// Beyond it, admission is ``Outcome.REJECT_CONCURRENCY`` (429 ``concurrency_limited``), e.g.
    /// more for an account that streams many slow completions. A cap below 1 raises
    /// :class:`ArgumentError`.
    fn set_max_in_flight(
        &self,
        account: &Bound<'_, PyAny>,
        max_in_flight: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let max = if max_in_flight.is_none() { None } else { Some(in_flight_cap(max_in_flight)?) };
        self.core().set_max_in_flight(&key_bytes("account", account)?, max).map_err(core_error)
    }

    /// Grants an account a service tier: ``"flex"``, ``"default"`` (every account's until set)
    /// or ``"priority"``.
    ///
    /// Its requests are served at the tier they ask for (:meth:`admit`'s ``service_tier``), or at
    /// the grant if they ask for more: a flex grant makes all its traffic flex, shed first. The
    /// grant keeps the account in its table (it is not reclaimed while idle) and is in snapshots.
    fn set_service_tier_grant(
        &self,
        account: &Bound<'_, PyAny>,
        service_tier: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let tier = self::service_tier("service_tier", service_tier)?;
        self.core().set_service_tier_grant(&key_bytes("account", account)?, tier).map_err(core_error)
    }

    /// Suspends an account (or lifts the suspension).
    #[pyo3(signature = (account, reason=None, suspended=None))]
    #[pyo3(text_signature = "(self, account, reason='operator', suspended=True)")]
    fn set_suspended(
        &self,
        account: &Bound<'_, PyAny>,
        reason: Option<&Bound<'_, PyAny>>,
        suspended: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let reason = match reason.filter(|r| !r.is_none()) {
            Some(r) => choice(
                "reason",
                r,
                &[("operator", Suspension::Operator), ("payment_failed", Suspension::PaymentFailed)],
            )?,
            None => Suspension::Operator,
        };
        let suspended = optional_flag("suspended", suspended, true)?;
        self.core().set_suspended(&key_bytes("account", account)?, reason, suspended).map_err(core_error)
    }

    /// Grants a tier, or with None returns to the earned one; ceilings change at once.
    #[pyo3(signature = (account, tier, *, now_ns=None))]
    fn set_tier(
        &self,
        account: &Bound<'_, PyAny>,
        tier: &Bound<'_, PyAny>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let tier = if tier.is_none() {
            None
        } else {
            Some(choice("tier", tier, &Tier::ALL.map(|t| (t.name(), t)))?)
        };
        self.core().set_tier(&key_bytes("account", account)?, tier, now(now_ns)?).map_err(core_error)
    }

    /// Gives an account its own floor and ceiling on a metric (None: the policy's).
    #[pyo3(signature = (account, metric, floor=None, ceiling=None, *, now_ns=None))]
    fn set_limits_override(
        &self,
        account: &Bound<'_, PyAny>,
        metric: &Bound<'_, PyAny>,
        floor: Option<&Bound<'_, PyAny>>,
        ceiling: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let m = self::metric(metric)?;
        let limits = match (floor.filter(|f| !f.is_none()), ceiling.filter(|c| !c.is_none())) {
            (None, None) => None,
            (Some(f), c) => {
                let floor = positive_float("floor", f)?;
                let ceiling = c.map(|c| positive_float("ceiling", c)).transpose()?.unwrap_or(floor);
                Some(MetricLimits { floor, ceiling })
            }
            (None, Some(_)) => return Err(ArgumentError::new_err("an override needs a floor")),
        };
        self.core()
            .set_limits_override(&key_bytes("account", account)?, m, limits, now(now_ns)?)
            .map_err(core_error)
    }

    /// Starts a new billing period for every account; permits expired by ``now_ns`` are billed
    /// to the closing period first.
    #[pyo3(signature = (now_ns=None))]
    fn start_billing_period(&self, now_ns: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.core().start_billing_period(now(now_ns)?);
        Ok(())
    }

    /// Acquires units of a quota; returns (used, limit).
    #[pyo3(signature = (account, quota, n=None))]
    fn acquire_quota(
        &self,
        account: &Bound<'_, PyAny>,
        quota: &Bound<'_, PyAny>,
        n: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(u32, u32)> {
        let n = n.filter(|n| !n.is_none()).map(|n| count_u32("n", n)).transpose()?.unwrap_or(1);
        self.core().acquire_quota(&key_bytes("account", account)?, self::quota(quota)?, n).map_err(core_error)
    }

    /// Releases units of a quota; returns (used, limit).
    #[pyo3(signature = (account, quota, n=None))]
    fn release_quota(
        &self,
        account: &Bound<'_, PyAny>,
        quota: &Bound<'_, PyAny>,
        n: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(u32, u32)> {
        let n = n.filter(|n| !n.is_none()).map(|n| count_u32("n", n)).transpose()?.unwrap_or(1);
        self.core().release_quota(&key_bytes("account", account)?, self::quota(quota)?, n).map_err(core_error)
    }

    /// Sets a quota's limit (not below use); returns (used, limit).
    fn set_quota_limit(
        &self,
        account: &Bound<'_, PyAny>,
        quota: &Bound<'_, PyAny>,
        limit: &Bound<'_, PyAny>,
    ) -> PyResult<(u32, u32)> {
        let limit = count_u32("limit", limit)?;
        self.core()
            .set_quota_limit(&key_bytes("account", account)?, self::quota(quota)?, limit)
            .map_err(core_error)
    }

    /// Every model's admission counters and gauges (SPEC §12), read without stopping traffic.
    ///
    /// ``{"models": [...]}`` has an entry for each model variant with any counter or gauge above
    /// zero: ``model`` (the id's text: each backslash doubled, each byte that is not UTF-8 as ``\xNN``),
    /// ``variant`` (``"regular"`` or ``"fast"``), ``in_flight`` (permits outstanding), ``load``
    /// (1.0 at capacity) and ``counts``, which maps each service tier (``"flex"``, ``"default"``,
    /// ``"priority"``) to its requests' count of every event, zeros included: ``admitted``,
    /// ``over_limit``, ``rate_limited_requests``, ``rate_limited_prompt_tokens``,
    /// ``rate_limited_uncached_prompt_tokens``, ``rate_limited_generated_tokens``, ``shed``,
    /// ``spend_refused``, ``concurrency_limited``, ``invalid``, ``table_full``, ``expired``,
    /// ``succeeded``, ``upstream_failure``, ``cancelled``; and ``spend_microdollars`` billed.
    /// Requests refused before any model was found (invalid, or no slot free for their key) are
    /// counted under model ``""``.
    ///
    /// Each count is exact; the whole is not one atomic cut. Counts restart when a model's slot
    /// is reclaimed for another model and when the engine is restored. :meth:`metrics_text`
    /// writes them for Prometheus, as does ``sluicegate.prometheus.SluicegateCollector``.
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let metrics = py.detach(|| self.core().metrics());
        let models = PyList::empty(py);
        for m in &metrics.models {
            let entry = PyDict::new(py);
            entry.set_item("model", model_text(m.model()))?;
            entry.set_item("variant", variant_name(m.variant))?;
            entry.set_item("in_flight", m.in_flight)?;
            entry.set_item("load", f64::from(m.load) / 1000.0)?;
            let counts = PyDict::new(py);
            for tier in ServiceTier::ALL {
                let events = PyDict::new(py);
                for event in Event::ALL {
                    events.set_item(event.name(), m.count(tier, event))?;
                }
                events.set_item("spend_microdollars", m.spend_micros(tier))?;
                counts.set_item(tier.name(), events)?;
            }
            entry.set_item("counts", counts)?;
            models.append(entry)?;
        }
        let d = PyDict::new(py);
        d.set_item("models", models)?;
        Ok(d)
    }

    /// :meth:`metrics` in the Prometheus text exposition format (version 0.0.4), for a
    /// ``/metrics`` endpoint.
    ///
    /// Counters ``sluicegate_requests_total`` (label ``outcome``),
    /// ``sluicegate_rate_limited_total`` (``metric``), ``sluicegate_permits_ended_total``
    /// (``completion``) and ``sluicegate_spend_microdollars_total``, each by ``model``,
    /// ``variant`` and ``service_tier``; gauges ``sluicegate_in_flight`` and ``sluicegate_load``
    /// by ``model`` and ``variant``. Counters that are zero are left out.
    fn metrics_text(&self, py: Python<'_>) -> PyResult<String> {
        let metrics = py.detach(|| self.core().metrics());
        let mut text = String::new();
        // Writing to a String cannot fail.
        write_prometheus(&metrics, &mut text).map_err(|e| Error::new_err(e.to_string()))?;
        Ok(text)
    }

    /// The whole state as a versioned, checksummed byte string.
    ///
    /// Safe while other threads use the engine: each scope is read atomically (the snapshot is
    /// not one cut across scopes), and keys added meanwhile are taken in.
    #[pyo3(signature = (*, now_ns=None))]
    fn snapshot<'py>(
        &self,
        py: Python<'py>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let at = now(now_ns)?;
        let bytes = py.detach(|| snapshot_of(&self.core(), at)).map_err(snapshot_error)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Replaces the state with a snapshot's, re-based on this clock; needs the same capacities.
    ///
    /// ``data`` is any bytes-like object. Safe while other threads use the engine: a new engine
    /// is built from the snapshot and swapped in whole; calls in progress finish on the old one,
    /// and permits it issued settle with :class:`StalePermitError`. A damaged or foreign snapshot
    /// raises :class:`CorruptSnapshotError` and changes nothing.
    ///
    /// A shared engine's restore replaces the tables every process shares, so it needs the file
    /// to itself: while any other process (or another ``Engine`` of this one) has it open, it
    /// raises :class:`EngineInUseError` and changes nothing. Calls made by other threads while it
    /// runs wait for it.
    #[pyo3(signature = (data, *, now_ns=None))]
    fn restore(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let data = bytes_like("data", data)?;
        let at = now(now_ns)?;
        if self.shared.is_some() {
            return py.detach(|| self.restore_shared(&data, at));
        }
        let (policy, capacity) = {
            let current = self.core();
            (*current.policy(), current.capacity())
        };
        let fresh = py.detach(|| {
            // A new engine draws a new random seed, so a new incarnation: permits of the one it
            // replaces settle as stale (SPEC §10).
            let heap = Heap::new(capacity).map_err(core_error)?;
            let seed = sluicegate_core::storage::random_seed();
            let mut fresh =
                CoreEngine::with_storage(policy, Backing::Heap(heap), seed).map_err(core_error)?;
            fresh.restore(&data, at).map_err(snapshot_error)?;
            Ok::<_, PyErr>(fresh)
        })?;
        self.core.store(Some(Arc::new(fresh)));
        Ok(())
    }

    /// The preset, the scope capacity, a shared engine's file, each metric's limit in force
    /// (`floor..ceiling/min` when it adapts, `n/min` when fixed, `off` when not enforced) and the
    /// cap on each account's permits in flight (`off`: none).
    fn __repr__(&self) -> String {
        let core = self.core();
        let policy = core.policy();
        let mut out = format!("<Engine policy='{}' capacity={}", self.policy_name, core.capacity().scopes);
        if let Some(path) = &self.shared {
            out.push_str(&format!(" shared='{}'", path.display()));
        }
        for m in Metric::ALL {
            let l = policy.limits.get(m);
            let shown = if !l.is_limited() {
                "off".to_string()
            } else if l.floor == l.ceiling {
                format!("{}/min", per_minute(l.floor))
            } else {
                format!("{}..{}/min", per_minute(l.floor), per_minute(l.ceiling))
            };
            out.push_str(&format!(" {}={shown}", m.name()));
        }
        // The core's default: a quarter of the permit ledger (`Policy::max_in_flight`).
        match policy.max_in_flight {
            Some(u32::MAX) => out.push_str(" max_in_flight=off"),
            Some(n) => out.push_str(&format!(" max_in_flight={n}")),
            None => out.push_str(&format!(" max_in_flight={}", (core.capacity().permits / 4).max(1))),
        }
        out.push('>');
        out
    }
}

/// A variant as `Engine.metrics()` and the Prometheus labels name it.
fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::Regular => "regular",
        Variant::Fast => "fast",
    }
}

/// A model id as text, as the Prometheus exposition's label and `sluicegate top` name it
/// (`sluicegate_core::metrics::write_model_text`: backslashes doubled, bytes that are not UTF-8
/// as `\xNN`).
fn model_text(id: &[u8]) -> String {
    let mut out = String::with_capacity(id.len());
    // Writing into a String cannot fail.
    let _ = sluicegate_core::metrics::write_model_text(&mut out, id);
    out
}

/// What `settle(completion=...)` accepts.
const COMPLETIONS: [(&str, Completion); 3] = [
    ("success", Completion::Success),
    ("upstream_failure", Completion::UpstreamFailure),
    ("cancelled", Completion::Cancelled),
];

/// A snapshot of `engine`, in a buffer sized for it. Keys added while it is taken can make it
/// outgrow that size: then it is taken again with more room, which ends at the latest when the
/// room covers full tables.
fn snapshot_of(engine: &CoreEngine<Backing>, now_ns: u64) -> Result<Vec<u8>, SnapshotError> {
    let mut spare = 0usize;
    loop {
        let size = engine.snapshot_size();
        let mut buf = vec![0u8; size.saturating_add(spare)];
        match engine.snapshot(&mut buf, now_ns) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(SnapshotError::BufferTooSmall { needed }) => {
                spare = spare.saturating_mul(2).max(needed.saturating_sub(size)).max(4096);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The request `Engine.admit` and `Scope.admit` size and class (their keys aside), from their
/// arguments: each count left out or None is 0, but `n` 1.
fn request_of(
    prompt_tokens: Option<&Bound<'_, PyAny>>,
    cached_tokens: Option<&Bound<'_, PyAny>>,
    max_tokens: Option<&Bound<'_, PyAny>>,
    n: Option<&Bound<'_, PyAny>>,
    priority: Option<&Bound<'_, PyAny>>,
    service_tier: Option<&Bound<'_, PyAny>>,
    expected_tokens: Option<&Bound<'_, PyAny>>,
) -> PyResult<Request> {
    let mut request = Request::new(optional_count("prompt_tokens", prompt_tokens)?.unwrap_or(0))
        .cached_tokens(optional_count("cached_tokens", cached_tokens)?.unwrap_or(0))
        .max_tokens(optional_count("max_tokens", max_tokens)?.unwrap_or(0))
        .n(optional_count("n", n)?.unwrap_or(1))
        .service_tier(asked_tier(priority, service_tier)?);
    if let Some(e) = optional_count("expected_tokens", expected_tokens)? {
        request = request.expected_tokens(e);
    }
    Ok(request)
}

/// The tier `service_tier=` asks for, or `priority=True` (its older spelling; False or None
/// asks for nothing); default `Default`. The two disagreeing is an error, not a silent choice.
fn asked_tier(
    priority: Option<&Bound<'_, PyAny>>,
    service_tier: Option<&Bound<'_, PyAny>>,
) -> PyResult<ServiceTier> {
    let priority = optional_flag("priority", priority, false)?;
    match service_tier.filter(|t| !t.is_none()) {
        None if priority => Ok(ServiceTier::Priority),
        None => Ok(ServiceTier::Default),
        Some(t) => {
            let tier = self::service_tier("service_tier", t)?;
            if priority && tier != ServiceTier::Priority {
                return Err(ArgumentError::new_err(format!(
                    "priority=True asks for service_tier='priority', but service_tier='{}' was given; \
                     pass only service_tier",
                    tier.name()
                )));
            }
            Ok(tier)
        }
    }
}

impl PyEngine {
    /// An admission (`admit`, on the engine in force) as a `Decision` of this engine at `at`.
    /// The GIL stays held: an admission takes a few hundred nanoseconds and never blocks, less
    /// than letting the GIL go and taking it back costs.
    /// Admits `key` from its scope's buckets, or, for a replica, from its lease.
    pub(crate) fn admit_key(
        &self,
        core: &CoreEngine<Backing>,
        key: ScopeKey<'_>,
        request: &Request,
        at: u64,
    ) -> Result<Decision, CoreError> {
        match &self.hosts {
            Some((hosts, _)) => hosts.admit(core, key, request, at),
            None => core.admit(key, request, at),
        }
    }

    /// Whether admissions come from leases of a Redis's global buckets.
    pub(crate) fn is_replica(&self) -> bool {
        self.hosts.is_some()
    }

    fn decide(
        &self,
        at: u64,
        admit: impl FnOnce(&CoreEngine<Backing>) -> Result<Decision, CoreError>,
    ) -> PyResult<PyDecision> {
        let core = self.core();
        let decision = admit(&core).map_err(core_error)?;
        Ok(PyDecision {
            inner: decision,
            now_ns: at,
            dialect: self.dialect,
            per_second: core.policy().per_second_headers,
        })
    }

    /// The engine in force (a restore swaps in another). While a shared engine's restore has it
    /// out, this waits for it: the restore needs no GIL and nothing this thread holds.
    fn core(&self) -> Current {
        loop {
            let loaded = self.core.load();
            if loaded.is_some() {
                return Current(loaded);
            }
            drop(loaded);
            std::thread::yield_now();
        }
    }

    /// Restores a shared engine: through a second handle on the file (sharing this process's
    /// lock on it, so that this engine does not count as another user), once every call in
    /// progress in this process has finished and with new calls held off, since the tables
    /// being rewritten are the ones the engine in force reads.
    fn restore_shared(&self, data: &[u8], at: u64) -> PyResult<()> {
        let _one_at_a_time = self.restoring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if std::process::id() != self.opener {
            return Err(EngineInUseError::new_err(format!(
                "this shared engine was opened by process {} before it forked: the processes share \
                 its file lock, so a restore cannot tell whether they use it; open it again in \
                 this process (Engine(..., shared=...)) to restore",
                self.opener
            )));
        }
        let (policy, file) = {
            let current = self.core();
            let Backing::Shared(file) = current.storage() else {
                return Err(Error::new_err("a shared engine without its file"));
            };
            (*current.policy(), file.try_clone().map_err(core_error)?)
        };
        let mut fresh = CoreEngine::with_storage(policy, Backing::Shared(file), 0).map_err(core_error)?;
        let taken = TakenOut { cell: &self.core, engine: self.core.swap(None) };
        // The swap paid every guard's debt: the count is exact, and falls as calls finish.
        while taken.engine.as_ref().is_some_and(|e| Arc::strong_count(e) > 1) {
            std::thread::yield_now();
        }
        let restored = fresh.restore(data, at);
        // Even a restore that failed leaves `fresh` agreeing with the region: refused before
        // anything changed, it reads what the old engine read; refused while filling, it has the
        // region's new seed and incarnation, which the old one does not.
        taken.replace(fresh);
        restored.map_err(snapshot_error)
    }

    fn levels(
        &self,
        account: &Bound<'_, PyAny>,
        model: &Bound<'_, PyAny>,
        fast: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Levels> {
        let (account, model) = (key_bytes("account", account)?, key_bytes("model", model)?);
        let key = ScopeKey { account: &account, model: &model, variant: variant(fast)? };
        self.core().limits(key, now(now_ns)?).map_err(core_error)
    }

    /// Settles or cancels: each usage field left out is what was reserved; cached tokens at most
    /// the prompt tokens, so `settle(d, prompt_tokens=...)` alone never reports an impossible usage.
    fn finish(
        &self,
        decision: &Bound<'_, PyAny>,
        prompt_tokens: Option<&Bound<'_, PyAny>>,
        cached_tokens: Option<&Bound<'_, PyAny>>,
        generated_tokens: Option<&Bound<'_, PyAny>>,
        completion: Completion,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let permit = decision_of(decision)?.permit()?;
        let reserved = permit.reserved();
        let prompt = optional_count("prompt_tokens", prompt_tokens)?.unwrap_or(reserved.prompt_tokens);
        let reserved_cached = reserved.prompt_tokens.saturating_sub(reserved.uncached_prompt_tokens);
        let usage = Usage {
            prompt_tokens: prompt,
            cached_tokens: optional_count("cached_tokens", cached_tokens)?
                .unwrap_or(reserved_cached.min(prompt)),
            generated_tokens: optional_count("generated_tokens", generated_tokens)?
                .unwrap_or(reserved.generated_tokens),
        };
        let at = now(now_ns)?;
        // With the GIL held, as for admissions.
        let core = self.core();
        match &self.hosts {
            Some((hosts, _)) => hosts.settle(&core, &permit, &usage, completion, at),
            None => core.settle(&permit, &usage, completion, at),
        }
        .map_err(settle_error)
    }
}

#[pymodule]
fn _sluicegate(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyEngine>()?;
    m.add_class::<PyDecision>()?;
    m.add_class::<scope::PyScope>()?;
    // Not in `__all__` (which `add_function` would put it in): private, for pickle only.
    m.setattr("_decision", wrap_pyfunction!(_decision, m)?)?;
    m.add("Outcome", py.import("sluicegate._outcome")?.getattr("Outcome")?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    let errors = py.import("sluicegate._errors")?;
    for name in [
        "Error",
        "ArgumentError",
        "ArgumentTypeError",
        "ArgumentOverflowError",
        "PolicyError",
        "TableFullError",
        "InvalidKeyError",
        "UnknownAccountError",
        "SpendLimitAboveTierError",
        "QuotaExceededError",
        "AlreadySettledError",
        "StalePermitError",
        "InvalidUsageError",
        "PermitExpiredError",
        "CorruptSnapshotError",
        "SharedRegionError",
        "RedisError",
        "EngineInUseError",
    ] {
        m.add(name, errors.getattr(name)?)?;
    }
    Ok(())
}
