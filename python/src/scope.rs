//! `Scope`: a scope resolved once by `Engine.scope`, admitted through without key lookups.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use sluicegate_core::{ScopeHandle, ScopeKey, Variant};

use crate::args::{key_bytes, now};
use crate::errors::core_error;
use crate::{PyDecision, PyEngine, request_of, variant};

/// A scope resolved by :meth:`Engine.scope`: admissions through it skip the key lookups of
/// :meth:`Engine.admit` and decide exactly as it does.
///
/// Resolve one per API key, keep it and share it between threads. It keeps its engine alive
/// (:attr:`engine`) and stays correct for the engine's whole life: if its scope was reclaimed
/// while idle for another key, or the engine restored, the next :meth:`admit` looks the key up
/// again. Settle its decisions with :meth:`Engine.settle`, as any other.
#[pyclass(module = "sluicegate._sluicegate", name = "Scope", frozen)]
pub(crate) struct PyScope {
    engine: Py<PyEngine>,
    handle: ScopeHandle,
    /// The keys as given: an exact `str` or `bytes` (a subclass given is reported as its base).
    account: Py<PyAny>,
    model: Py<PyAny>,
}

/// A key as `Engine.scope` was given it: `str` (UTF-8, checked by `key_bytes`) or `bytes`.
fn as_given<'py>(given: &Bound<'py, PyAny>, key: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let py = given.py();
    if given.is_instance_of::<PyString>() {
        let text = std::str::from_utf8(key).map_err(|e| crate::errors::Error::new_err(e.to_string()))?;
        return Ok(PyString::new(py, text).into_any());
    }
    Ok(PyBytes::new(py, key).into_any())
}

impl PyScope {
    /// `Engine.scope`: the same argument checks as `Engine.admit`, in its order.
    pub(crate) fn resolve(
        engine: &Bound<'_, PyEngine>,
        account: &Bound<'_, PyAny>,
        model: &Bound<'_, PyAny>,
        fast: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyScope> {
        let py = engine.py();
        let (account_key, model_key) = (key_bytes("account", account)?, key_bytes("model", model)?);
        let at = now(now_ns)?;
        let key = ScopeKey { account: &account_key, model: &model_key, variant: variant(fast)? };
        let e = engine.get();
        let handle = py.detach(|| e.core().scope(key, at)).map_err(core_error)?;
        Ok(PyScope {
            engine: engine.clone().unbind(),
            handle,
            account: as_given(account, &account_key)?.unbind(),
            model: as_given(model, &model_key)?.unbind(),
        })
    }
}

#[pymethods]
impl PyScope {
    #[pyo3(signature = (prompt_tokens=None, cached_tokens=None, max_tokens=None, n=None, priority=None, expected_tokens=None, now_ns=None, *, service_tier=None))]
    #[pyo3(
        text_signature = "(self, prompt_tokens=None, cached_tokens=None, max_tokens=None, n=None, priority=False, expected_tokens=None, now_ns=None, *, service_tier=None)"
    )]
    /// Decides as :meth:`Engine.admit` with the scope's key, without looking the key up.
    ///
    /// The arguments, their defaults and their checks are :meth:`Engine.admit`'s. A scope whose
    /// slot another key took while it was idle takes a slot again, and raises
    /// :class:`TableFullError` if none is free, as :meth:`Engine.admit` would for its key.
    fn admit(
        &self,
        prompt_tokens: Option<&Bound<'_, PyAny>>,
        cached_tokens: Option<&Bound<'_, PyAny>>,
        max_tokens: Option<&Bound<'_, PyAny>>,
        n: Option<&Bound<'_, PyAny>>,
        priority: Option<&Bound<'_, PyAny>>,
        expected_tokens: Option<&Bound<'_, PyAny>>,
        now_ns: Option<&Bound<'_, PyAny>>,
        service_tier: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyDecision> {
        let request =
            request_of(prompt_tokens, cached_tokens, max_tokens, n, priority, service_tier, expected_tokens)?;
        let at = now(now_ns)?;
        let (handle, engine) = (&self.handle, self.engine.get());
        engine.decide(at, |core| {
            // A replica's admissions come from its leases, found by key.
            if engine.is_replica() {
                engine.admit_key(core, handle.key(), &request, at)
            } else {
                core.admit_scope(handle, &request, at)
            }
        })
    }

    /// The engine the scope was resolved in (the scope keeps it alive).
    #[getter]
    fn engine(&self, py: Python<'_>) -> Py<PyEngine> {
        self.engine.clone_ref(py)
    }

    /// The account key, as given to :meth:`Engine.scope` (``str`` or ``bytes``).
    #[getter]
    fn account(&self, py: Python<'_>) -> Py<PyAny> {
        self.account.clone_ref(py)
    }

    /// The model key, as given to :meth:`Engine.scope` (``str`` or ``bytes``).
    #[getter]
    fn model(&self, py: Python<'_>) -> Py<PyAny> {
        self.model.clone_ref(py)
    }

    /// Whether the scope is the model's fast variant.
    #[getter]
    fn fast(&self) -> bool {
        self.handle.key().variant == Variant::Fast
    }

    /// The keys as given and the variant.
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let (account, model) = (self.account.bind(py).repr()?, self.model.bind(py).repr()?);
        let fast = if self.fast() { "True" } else { "False" };
        Ok(format!("<Scope account={account} model={model} fast={fast}>"))
    }
}
