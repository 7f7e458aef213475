//! `sluicegate._sluicegate`: the native module behind the `sluicegate` Python package.
//!
//! Arguments are converted while holding the GIL; the admission itself runs with the GIL
//! released. Docstrings that users read live in `python/sluicegate/_sluicegate.pyi`.

// Python signatures take their keyword arguments flat, one Rust parameter each.
#![allow(clippy::too_many_arguments)]

use pyo3::exceptions::{PyException, PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyString};
use sluicegate_core::error_body::write_error_body;
use sluicegate_core::headers::for_each_header;
use sluicegate_core::response::{Dialect, Render};
use sluicegate_core::{
    Capacity, Completion, Decision, Engine as CoreEngine, Error as CoreError, Heap, Levels, Metric,
    MetricLimits, Outcome as CoreOutcome, Overrides, Permit, Policy, Price, Quota, QuotaError, Request,
    ScopeKey, SettleError, SnapshotError, Suspension, Tier, Usage, Variant,
};

pyo3::create_exception!(_sluicegate, Error, PyException, "Base of every sluicegate error.");
pyo3::create_exception!(_sluicegate, PolicyError, Error, "The policy or an override is unusable.");
pyo3::create_exception!(
    _sluicegate,
    TableFullError,
    Error,
    "A fixed-capacity table has no room for this key."
);
pyo3::create_exception!(_sluicegate, KeyError_, Error, "An account or model key is empty or too long.");
pyo3::create_exception!(_sluicegate, UnknownAccountError, Error, "No such account.");
pyo3::create_exception!(_sluicegate, SpendLimitAboveTierError, Error, "A spend limit above the tier's.");
pyo3::create_exception!(_sluicegate, QuotaExceededError, Error, "A quota operation was refused.");
pyo3::create_exception!(_sluicegate, AlreadySettledError, Error, "The permit was already settled.");
pyo3::create_exception!(
    _sluicegate,
    StalePermitError,
    Error,
    "The permit's scope was reclaimed or restored."
);
pyo3::create_exception!(_sluicegate, InvalidUsageError, Error, "Impossible usage reported at settle.");
pyo3::create_exception!(
    _sluicegate,
    PermitExpiredError,
    Error,
    "The permit was not settled within the policy's permit_ttl."
);
pyo3::create_exception!(
    _sluicegate,
    CorruptSnapshotError,
    Error,
    "The snapshot is damaged, foreign or does not fit."
);

fn core_error(e: CoreError) -> PyErr {
    let text = e.to_string();
    match e {
        CoreError::Policy(_) | CoreError::BadCapacity(_) => PolicyError::new_err(text),
        CoreError::TableFull(_) => TableFullError::new_err(text),
        CoreError::EmptyKey | CoreError::KeyTooLong { .. } => KeyError_::new_err(text),
        CoreError::UnknownAccount => UnknownAccountError::new_err(text),
        CoreError::SpendLimitAboveTier { .. } => SpendLimitAboveTierError::new_err(text),
        CoreError::Quota(q) => quota_error(q, text),
    }
}

fn quota_error(q: QuotaError, text: String) -> PyErr {
    let (used, limit) = match q {
        QuotaError::Exhausted { used, limit } => (used, Some(limit)),
        QuotaError::NotHeld { used } | QuotaError::BelowUse { used } => (used, None),
    };
    let err = QuotaExceededError::new_err(text);
    Python::attach(|py| {
        let value = err.value(py);
        let _ = value.setattr("used", used);
        let _ = value.setattr("limit", limit);
    });
    err
}

fn settle_error(e: SettleError) -> PyErr {
    let text = e.to_string();
    match e {
        SettleError::AlreadySettled => AlreadySettledError::new_err(text),
        SettleError::StalePermit => StalePermitError::new_err(text),
        SettleError::InvalidUsage => InvalidUsageError::new_err(text),
        SettleError::Expired => PermitExpiredError::new_err(text),
    }
}

fn snapshot_error(e: SnapshotError) -> PyErr {
    CorruptSnapshotError::new_err(e.to_string())
}

/// A non-negative integer below 2**64, with a message that names the argument.
fn count(name: &str, v: &Bound<'_, PyAny>) -> PyResult<u64> {
    if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
        let kind = v.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        return Err(PyTypeError::new_err(format!("{name} must be an int, not {kind}")));
    }
    v.extract::<u64>().map_err(|_| {
        if v.lt(0).unwrap_or(false) {
            PyValueError::new_err(format!("{name} must not be negative, got {v}"))
        } else {
            PyOverflowError::new_err(format!("{name} must be below 2**64, got {v}"))
        }
    })
}

fn optional_count(name: &str, v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
    v.filter(|v| !v.is_none()).map(|v| count(name, v)).transpose()
}

fn count_u32(name: &str, v: &Bound<'_, PyAny>) -> PyResult<u32> {
    let n = count(name, v)?;
    u32::try_from(n).map_err(|_| PyOverflowError::new_err(format!("{name} must be below 2**32, got {n}")))
}

/// Key bytes held by the Python objects they came from: no copy on the Rust side.
enum KeyBuf {
    Str(pyo3::pybacked::PyBackedStr),
    Bytes(pyo3::pybacked::PyBackedBytes),
}

impl std::ops::Deref for KeyBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            KeyBuf::Str(s) => s.as_bytes(),
            KeyBuf::Bytes(b) => b,
        }
    }
}

/// Key bytes from `str` (UTF-8) or `bytes`.
fn key_bytes(name: &str, v: &Bound<'_, PyAny>) -> PyResult<KeyBuf> {
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(KeyBuf::Str(s.clone().try_into()?));
    }
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(KeyBuf::Bytes(b.clone().into()));
    }
    let kind = v.get_type().name().map(|n| n.to_string()).unwrap_or_default();
    Err(PyTypeError::new_err(format!("{name} must be str or bytes, not {kind}")))
}

/// Python's `time.monotonic_ns()`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux and macOS.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

fn now(now_ns: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
    Ok(optional_count("now_ns", now_ns)?.unwrap_or_else(monotonic_ns))
}

fn dialect(name: &str) -> PyResult<Dialect> {
    Dialect::from_name(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown dialect {name:?}; expected fireworks, together, openai, anthropic or ietf"
        ))
    })
}

fn metric(name: &str) -> PyResult<Metric> {
    Metric::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown metric {name:?}; expected requests, prompt_tokens, uncached_prompt_tokens or generated_tokens"
        ))
    })
}

fn variant(fast: bool) -> Variant {
    if fast { Variant::Fast } else { Variant::Regular }
}

/// The outcome of an admission.
#[pyclass(module = "sluicegate._sluicegate", eq, eq_int, frozen, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq)]
// The names Python users write: sluicegate.Outcome.ADMIT_OVER_LIMIT.
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
enum Outcome {
    ADMIT,
    ADMIT_OVER_LIMIT,
    REJECT_RATE_LIMITED,
    SHED,
    REJECT_SPEND,
    REJECT_INVALID,
}

/// An admission decision, with its permit if admitted.
#[pyclass(module = "sluicegate._sluicegate", name = "Decision", frozen)]
struct PyDecision {
    inner: Decision,
    now_ns: u64,
    dialect: Dialect,
    per_second: bool,
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
        dialect_name: Option<&str>,
        unix_ns: Option<u64>,
        jitter_seed: Option<u64>,
    ) -> PyResult<Render> {
        let d = match dialect_name {
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
            .ok_or_else(|| PyValueError::new_err("the decision was not admitted: nothing to settle"))
    }
}

#[pymethods]
impl PyDecision {
    #[getter]
    fn outcome(&self) -> Outcome {
        match self.inner.outcome {
            CoreOutcome::Admit(_) => Outcome::ADMIT,
            CoreOutcome::AdmitOverLimit(_) => Outcome::ADMIT_OVER_LIMIT,
            CoreOutcome::RejectRateLimited(_) => Outcome::REJECT_RATE_LIMITED,
            CoreOutcome::Shed(_) => Outcome::SHED,
            CoreOutcome::RejectSpend(_) => Outcome::REJECT_SPEND,
            CoreOutcome::RejectInvalid(_) => Outcome::REJECT_INVALID,
        }
    }

    #[getter]
    fn admitted(&self) -> bool {
        self.inner.admitted()
    }

    #[getter]
    fn over_limit(&self) -> bool {
        match &self.inner.outcome {
            CoreOutcome::Admit(p) | CoreOutcome::AdmitOverLimit(p) => p.over_limit(),
            _ => self.inner.levels.over_limit(),
        }
    }

    #[getter]
    fn status_code(&self) -> PyResult<u16> {
        Ok(self.render(None, Some(0), Some(0))?.status(&self.inner))
    }

    #[getter]
    fn retry_after(&self) -> Option<f64> {
        self.inner.retry_after_ns().map(|ns| ns as f64 / 1e9)
    }

    #[getter]
    fn retry_after_ns(&self) -> Option<u64> {
        self.inner.retry_after_ns()
    }

    #[getter]
    fn wait(&self) -> f64 {
        self.inner.permit().map_or(0.0, |p| p.wait_ns() as f64 / 1e9)
    }

    #[getter]
    fn binding_metric(&self) -> Option<&'static str> {
        match self.inner.outcome {
            CoreOutcome::RejectRateLimited(r) => Some(r.metric.name()),
            _ => None,
        }
    }

    #[getter]
    fn too_large(&self) -> bool {
        matches!(self.inner.outcome, CoreOutcome::RejectRateLimited(r) if r.too_large)
    }

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
            _ => None,
        }
    }

    #[getter]
    fn limits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        per_metric(py, |m| self.inner.levels.limit(m))
    }

    #[getter]
    fn remaining<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let l = &self.inner.levels;
        per_metric(py, |m| if l.limit(m) == u64::MAX { u64::MAX } else { l.remaining(m) })
    }

    #[getter]
    fn cost<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        per_metric(py, |m| *self.inner.cost.get(m))
    }

    #[pyo3(signature = (dialect=None, *, unix_ns=None, jitter_seed=None))]
    fn headers(
        &self,
        dialect: Option<&str>,
        unix_ns: Option<u64>,
        jitter_seed: Option<u64>,
    ) -> PyResult<Vec<(String, String)>> {
        let render = self.render(dialect, unix_ns, jitter_seed)?;
        let mut out = Vec::new();
        for_each_header(&self.inner, &render, self.now_ns, |n, v| out.push((n.to_string(), v.to_string())));
        Ok(out)
    }

    #[pyo3(signature = (dialect=None, *, jitter_seed=None))]
    fn error_body<'py>(
        &self,
        py: Python<'py>,
        dialect: Option<&str>,
        jitter_seed: Option<u64>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let render = self.render(dialect, Some(0), jitter_seed)?;
        let mut buf = [0u8; 2048];
        let n = write_error_body(&self.inner, &render, &mut buf)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        if n == 0 {
            return Ok(None);
        }
        let text = std::str::from_utf8(buf.get(..n).unwrap_or(&[]))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let json = py.import("json")?;
        Ok(Some(json.call_method1("loads", (text,))?))
    }

    fn __repr__(&self) -> String {
        let name = match self.inner.outcome {
            CoreOutcome::Admit(_) => "ADMIT",
            CoreOutcome::AdmitOverLimit(_) => "ADMIT_OVER_LIMIT",
            CoreOutcome::RejectRateLimited(_) => "REJECT_RATE_LIMITED",
            CoreOutcome::Shed(_) => "SHED",
            CoreOutcome::RejectSpend(_) => "REJECT_SPEND",
            CoreOutcome::RejectInvalid(_) => "REJECT_INVALID",
        };
        format!("<Decision {name}>")
    }
}

/// The admission engine. Not frozen: `restore` borrows it mutably, which pyo3 refuses while any
/// other call is using it.
#[pyclass(module = "sluicegate._sluicegate", name = "Engine")]
struct PyEngine {
    inner: CoreEngine<Heap>,
    dialect: Dialect,
    policy_name: String,
}

fn positive_float(name: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    if v.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!("{name} must be a number, not bool")));
    }
    let x: f64 = v.extract().map_err(|_| PyTypeError::new_err(format!("{name} must be a number")))?;
    if !(x.is_finite() && x >= 1.0) {
        return Err(PyValueError::new_err(format!("{name} must be a finite number of at least 1, got {x}")));
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
    let kind = v.get_type().name().map(|n| n.to_string()).unwrap_or_default();
    let not_a_number = || PyTypeError::new_err(format!("{name} must be a number or None, not {kind}"));
    if v.is_instance_of::<PyBool>() || v.is_instance_of::<PyString>() || v.is_instance_of::<PyBytes>() {
        return Err(not_a_number());
    }
    v.extract::<f64>().map_err(|_| not_a_number())
}

/// The preset `name` with the keyword overrides, collected first and resolved together.
fn policy_from(name: &str, overrides: Option<&Bound<'_, PyDict>>) -> PyResult<Policy> {
    let preset = Policy::preset(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown policy {name:?}; expected one of {}",
            Policy::PRESETS.join(", ")
        ))
    })?;
    let mut collected = Overrides::default();
    for (key, value) in overrides.into_iter().flat_map(|d| d.iter()) {
        let key: String = key.extract()?;
        // The name first: an unknown keyword is an error whatever its value, None included.
        if !Policy::OVERRIDES.contains(&key.as_str()) {
            return Err(PyTypeError::new_err(format!(
                "Engine() got an unexpected keyword argument {key:?}; overrides are {}",
                Policy::OVERRIDES.join(", ")
            )));
        }
        let _ = collected.set(&key, override_value(&key, &value)?);
    }
    preset.with(&collected).map_err(|e| PolicyError::new_err(e.to_string()))
}

/// A per-minute figure as written in a repr: whole numbers without a fraction.
fn per_minute(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v}") }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (policy="fireworks_2024", capacity=None, *, accounts=None, models=None, permits=None, seed=None, dialect="fireworks", **overrides))]
    fn new(
        policy: &str,
        capacity: Option<&Bound<'_, PyAny>>,
        accounts: Option<&Bound<'_, PyAny>>,
        models: Option<&Bound<'_, PyAny>>,
        permits: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
        dialect: &str,
        overrides: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let p = policy_from(policy, overrides)?;
        let size = |n: u64| usize::try_from(n).map_err(|_| PyOverflowError::new_err("capacity too large"));
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
        let inner = match optional_count("seed", seed)? {
            Some(s) => CoreEngine::with_storage(p, Heap::new(cap).map_err(core_error)?, s),
            None => CoreEngine::new(p, cap),
        }
        .map_err(core_error)?;
        Ok(PyEngine { inner, dialect: self::dialect(dialect)?, policy_name: policy.to_string() })
    }

    #[getter]
    fn policy(&self) -> &str {
        &self.policy_name
    }

    #[pyo3(signature = (account, model, prompt_tokens=None, cached_tokens=None, max_tokens=None, n=None, priority=false, fast=false, expected_tokens=None, now_ns=None))]
    fn admit(
        &self,
        py: Python<'_>,
        account: &Bound<'_, PyAny>,
        model: &Bound<'_, PyAny>,
        prompt_tokens: Option<&Bound<'_, PyAny>>,
        cached_tokens: Option<&Bound<'_, PyAny>>,
        max_tokens: Option<&Bound<'_, PyAny>>,
        n: Option<&Bound<'_, PyAny>>,
        priority: bool,
        fast: bool,
        expected_tokens: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyDecision> {
        let (account, model) = (key_bytes("account", account)?, key_bytes("model", model)?);
        let mut request = Request::new(optional_count("prompt_tokens", prompt_tokens)?.unwrap_or(0))
            .cached_tokens(optional_count("cached_tokens", cached_tokens)?.unwrap_or(0))
            .max_tokens(optional_count("max_tokens", max_tokens)?.unwrap_or(0))
            .n(optional_count("n", n)?.unwrap_or(1))
            .priority(priority);
        if let Some(e) = optional_count("expected_tokens", expected_tokens)? {
            request = request.expected_tokens(e);
        }
        let at = now(now_ns)?;
        let key = ScopeKey { account: &account, model: &model, variant: variant(fast) };
        let decision = py.detach(|| self.inner.admit(key, &request, at)).map_err(core_error)?;
        Ok(PyDecision {
            inner: decision,
            now_ns: at,
            dialect: self.dialect,
            per_second: self.inner.policy().per_second_headers,
        })
    }

    #[pyo3(signature = (decision, prompt_tokens=None, cached_tokens=None, generated_tokens=None, *, completion="success", now_ns=None))]
    fn settle(
        &self,
        py: Python<'_>,
        decision: &PyDecision,
        prompt_tokens: Option<&Bound<'_, PyAny>>,
        cached_tokens: Option<&Bound<'_, PyAny>>,
        generated_tokens: Option<&Bound<'_, PyAny>>,
        completion: &str,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let permit = decision.permit()?;
        let reserved = permit.reserved();
        // Each field left out is what was reserved; cached tokens at most the prompt tokens, so
        // `settle(d, prompt_tokens=...)` alone never reports an impossible usage.
        let prompt = optional_count("prompt_tokens", prompt_tokens)?.unwrap_or(reserved.prompt_tokens);
        let reserved_cached = reserved.prompt_tokens.saturating_sub(reserved.uncached_prompt_tokens);
        let usage = Usage {
            prompt_tokens: prompt,
            cached_tokens: optional_count("cached_tokens", cached_tokens)?
                .unwrap_or(reserved_cached.min(prompt)),
            generated_tokens: optional_count("generated_tokens", generated_tokens)?
                .unwrap_or(reserved.generated_tokens),
        };
        let completion = match completion {
            "success" => Completion::Success,
            "upstream_failure" => Completion::UpstreamFailure,
            "cancelled" => Completion::Cancelled,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown completion {other:?}; expected success, upstream_failure or cancelled"
                )));
            }
        };
        let at = now(now_ns)?;
        py.detach(|| self.inner.settle(&permit, &usage, completion, at)).map_err(settle_error)
    }

    #[pyo3(signature = (decision, prompt_tokens=None, cached_tokens=None, generated_tokens=None, *, now_ns=None))]
    fn cancel(
        &self,
        py: Python<'_>,
        decision: &PyDecision,
        prompt_tokens: Option<&Bound<'_, PyAny>>,
        cached_tokens: Option<&Bound<'_, PyAny>>,
        generated_tokens: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.settle(py, decision, prompt_tokens, cached_tokens, generated_tokens, "cancelled", now_ns)
    }

    #[pyo3(signature = (decision, generated_tokens, *, now_ns=None))]
    fn charge(
        &self,
        py: Python<'_>,
        decision: &PyDecision,
        generated_tokens: &Bound<'_, PyAny>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let permit = decision.permit()?;
        let tokens = count("generated_tokens", generated_tokens)?;
        let at = now(now_ns)?;
        py.detach(|| self.inner.charge(&permit, tokens, at)).map_err(settle_error)
    }

    #[pyo3(signature = (account, model, *, fast=false, now_ns=None))]
    fn limits<'py>(
        &self,
        py: Python<'py>,
        account: &Bound<'_, PyAny>,
        model: &Bound<'_, PyAny>,
        fast: bool,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let l = self.levels(account, model, fast, now_ns)?;
        per_metric(py, |m| l.limit(m))
    }

    #[pyo3(signature = (account, model, *, fast=false, now_ns=None))]
    fn remaining<'py>(
        &self,
        py: Python<'py>,
        account: &Bound<'_, PyAny>,
        model: &Bound<'_, PyAny>,
        fast: bool,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let l = self.levels(account, model, fast, now_ns)?;
        per_metric(py, |m| if l.limit(m) == u64::MAX { u64::MAX } else { l.remaining(m) })
    }

    #[pyo3(signature = (model, load, *, fast=false))]
    fn set_load(&self, model: &Bound<'_, PyAny>, load: f64, fast: bool) -> PyResult<()> {
        if !(load.is_finite() && load >= 0.0) {
            return Err(PyValueError::new_err(format!("load must be a non-negative number, got {load}")));
        }
        let permille = (load * 1000.0).round().min(f64::from(u32::MAX)) as u32;
        self.inner.set_load(&key_bytes("model", model)?, variant(fast), permille).map_err(core_error)
    }

    #[pyo3(signature = (model, *, fast=false))]
    fn load(&self, model: &Bound<'_, PyAny>, fast: bool) -> PyResult<f64> {
        Ok(f64::from(self.inner.load(&key_bytes("model", model)?, variant(fast)).map_err(core_error)?)
            / 1000.0)
    }

    #[pyo3(signature = (model, in_flight, *, fast=false))]
    fn set_model_capacity(
        &self,
        model: &Bound<'_, PyAny>,
        in_flight: &Bound<'_, PyAny>,
        fast: bool,
    ) -> PyResult<()> {
        let cap = count_u32("in_flight", in_flight)?;
        self.inner.set_model_capacity(&key_bytes("model", model)?, variant(fast), cap).map_err(core_error)
    }

    #[pyo3(signature = (model, *, uncached_prompt, cached_prompt, generated, fast=false))]
    fn set_price(
        &self,
        model: &Bound<'_, PyAny>,
        uncached_prompt: &Bound<'_, PyAny>,
        cached_prompt: &Bound<'_, PyAny>,
        generated: &Bound<'_, PyAny>,
        fast: bool,
    ) -> PyResult<()> {
        let price = Price {
            uncached_prompt: count("uncached_prompt", uncached_prompt)?,
            cached_prompt: count("cached_prompt", cached_prompt)?,
            generated: count("generated", generated)?,
        };
        self.inner.set_price(&key_bytes("model", model)?, variant(fast), price).map_err(core_error)
    }

    fn account<'py>(&self, py: Python<'py>, account: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.account(&key_bytes("account", account)?).map_err(core_error)?;
        let d = PyDict::new(py);
        d.set_item("tier", s.tier.name())?;
        d.set_item("tier_pinned", s.tier_pinned)?;
        d.set_item("payment_method", s.payment_method)?;
        d.set_item("spend_limit", if s.spend_limit == u64::MAX { None } else { Some(s.spend_limit) })?;
        d.set_item("period_spend", s.period_spend)?;
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

    fn add_credits(&self, account: &Bound<'_, PyAny>, micros: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.add_credits(&key_bytes("account", account)?, count("micros", micros)?).map_err(core_error)
    }

    fn set_payment_method(&self, account: &Bound<'_, PyAny>, on_file: bool) -> PyResult<()> {
        self.inner.set_payment_method(&key_bytes("account", account)?, on_file).map_err(core_error)
    }

    fn set_spend_limit(&self, account: &Bound<'_, PyAny>, micros: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner
            .set_spend_limit(&key_bytes("account", account)?, count("micros", micros)?)
            .map_err(core_error)
    }

    #[pyo3(signature = (account, reason="operator", suspended=true))]
    fn set_suspended(&self, account: &Bound<'_, PyAny>, reason: &str, suspended: bool) -> PyResult<()> {
        let reason = match reason {
            "operator" => Suspension::Operator,
            "payment_failed" => Suspension::PaymentFailed,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown reason {other:?}; expected operator or payment_failed"
                )));
            }
        };
        self.inner.set_suspended(&key_bytes("account", account)?, reason, suspended).map_err(core_error)
    }

    #[pyo3(signature = (account, tier, *, now_ns=None))]
    fn set_tier(
        &self,
        account: &Bound<'_, PyAny>,
        tier: Option<&str>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let tier = tier
            .map(|t| {
                Tier::ALL.into_iter().find(|x| x.name() == t).ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "unknown tier {t:?}; expected tier_1, tier_2, tier_3, tier_4 or unlimited"
                    ))
                })
            })
            .transpose()?;
        self.inner.set_tier(&key_bytes("account", account)?, tier, now(now_ns)?).map_err(core_error)
    }

    #[pyo3(signature = (account, metric, floor=None, ceiling=None, *, now_ns=None))]
    fn set_limits_override(
        &self,
        account: &Bound<'_, PyAny>,
        metric: &str,
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
            (None, Some(_)) => return Err(PyValueError::new_err("an override needs a floor")),
        };
        self.inner
            .set_limits_override(&key_bytes("account", account)?, m, limits, now(now_ns)?)
            .map_err(core_error)
    }

    fn start_billing_period(&self) {
        self.inner.start_billing_period();
    }

    #[pyo3(signature = (account, quota, n=None))]
    fn acquire_quota(
        &self,
        account: &Bound<'_, PyAny>,
        quota: &str,
        n: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(u32, u32)> {
        let n = n.map(|n| count_u32("n", n)).transpose()?.unwrap_or(1);
        self.inner.acquire_quota(&key_bytes("account", account)?, quota_of(quota)?, n).map_err(core_error)
    }

    #[pyo3(signature = (account, quota, n=None))]
    fn release_quota(
        &self,
        account: &Bound<'_, PyAny>,
        quota: &str,
        n: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(u32, u32)> {
        let n = n.map(|n| count_u32("n", n)).transpose()?.unwrap_or(1);
        self.inner.release_quota(&key_bytes("account", account)?, quota_of(quota)?, n).map_err(core_error)
    }

    fn set_quota_limit(
        &self,
        account: &Bound<'_, PyAny>,
        quota: &str,
        limit: &Bound<'_, PyAny>,
    ) -> PyResult<(u32, u32)> {
        let limit = count_u32("limit", limit)?;
        self.inner
            .set_quota_limit(&key_bytes("account", account)?, quota_of(quota)?, limit)
            .map_err(core_error)
    }

    #[pyo3(signature = (*, now_ns=None))]
    fn snapshot<'py>(
        &self,
        py: Python<'py>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let at = now(now_ns)?;
        loop {
            let mut buf = vec![0u8; self.inner.snapshot_size()];
            match self.inner.snapshot(&mut buf, at) {
                Ok(n) => return Ok(PyBytes::new(py, buf.get(..n).unwrap_or(&[]))),
                Err(SnapshotError::BufferTooSmall { .. }) => continue,
                Err(e) => return Err(snapshot_error(e)),
            }
        }
    }

    #[pyo3(signature = (data, *, now_ns=None))]
    fn restore(&mut self, data: &Bound<'_, PyBytes>, now_ns: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let at = now(now_ns)?;
        self.inner.restore(data.as_bytes(), at).map_err(snapshot_error)
    }

    /// The preset, the scope capacity and each metric's limit in force: `floor..ceiling/min`
    /// when it adapts, `n/min` when fixed, `off` when not enforced.
    fn __repr__(&self) -> String {
        let policy = self.inner.policy();
        let mut out =
            format!("<Engine policy='{}' capacity={}", self.policy_name, self.inner.capacity().scopes);
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
        out.push('>');
        out
    }
}

fn quota_of(name: &str) -> PyResult<Quota> {
    Quota::ALL.into_iter().find(|q| q.name() == name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown quota {name:?}; expected deployed_models, a100_gpus or h100_gpus"
        ))
    })
}

impl PyEngine {
    fn levels(
        &self,
        account: &Bound<'_, PyAny>,
        model: &Bound<'_, PyAny>,
        fast: bool,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Levels> {
        let (account, model) = (key_bytes("account", account)?, key_bytes("model", model)?);
        let key = ScopeKey { account: &account, model: &model, variant: variant(fast) };
        self.inner.limits(key, now(now_ns)?).map_err(core_error)
    }
}

#[pymodule]
fn _sluicegate(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyEngine>()?;
    m.add_class::<PyDecision>()?;
    m.add_class::<Outcome>()?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("PolicyError", py.get_type::<PolicyError>())?;
    m.add("TableFullError", py.get_type::<TableFullError>())?;
    m.add("InvalidKeyError", py.get_type::<KeyError_>())?;
    m.add("UnknownAccountError", py.get_type::<UnknownAccountError>())?;
    m.add("SpendLimitAboveTierError", py.get_type::<SpendLimitAboveTierError>())?;
    m.add("QuotaExceededError", py.get_type::<QuotaExceededError>())?;
    m.add("AlreadySettledError", py.get_type::<AlreadySettledError>())?;
    m.add("StalePermitError", py.get_type::<StalePermitError>())?;
    m.add("InvalidUsageError", py.get_type::<InvalidUsageError>())?;
    m.add("PermitExpiredError", py.get_type::<PermitExpiredError>())?;
    m.add("CorruptSnapshotError", py.get_type::<CorruptSnapshotError>())?;
    Ok(())
}
