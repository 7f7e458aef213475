//! Python arguments as Rust values. Every refusal names the argument and is a
//! `sluicegate.Error` that is also the built-in Python would raise: `ArgumentTypeError` (a
//! `TypeError`), `ArgumentError` (a `ValueError`), `ArgumentOverflowError` (an `OverflowError`).

use pyo3::prelude::*;
use pyo3::pybacked::{PyBackedBytes, PyBackedStr};
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyInt, PyString};

use crate::errors::{ArgumentError, ArgumentOverflowError, ArgumentTypeError};

/// The name of `v`'s type, for messages.
pub(crate) fn kind(v: &Bound<'_, PyAny>) -> String {
    v.get_type().name().map(|n| n.to_string()).unwrap_or_default()
}

/// An `int`, from anything with `__index__` (numpy integers, user types) but not a bool: a bool
/// is far more often a mistake than a count.
fn integer<'py>(name: &str, v: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyInt>> {
    let not_an_int = || ArgumentTypeError::new_err(format!("{name} must be an int, not {}", kind(v)));
    if v.is_instance_of::<PyBool>() {
        return Err(not_an_int());
    }
    if let Ok(i) = v.cast::<PyInt>() {
        return Ok(i.clone());
    }
    static INDEX: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let index = INDEX.import(v.py(), "operator", "index")?;
    let i = index.call1((v,)).map_err(|_| not_an_int())?;
    i.cast_into::<PyInt>().map_err(|_| not_an_int())
}

/// A non-negative integer below 2**64.
pub(crate) fn count(name: &str, v: &Bound<'_, PyAny>) -> PyResult<u64> {
    let i = integer(name, v)?;
    i.extract::<u64>().map_err(|_| {
        if i.lt(0).unwrap_or(false) {
            ArgumentError::new_err(format!("{name} must not be negative, got {i}"))
        } else {
            ArgumentOverflowError::new_err(format!("{name} must be below 2**64, got {i}"))
        }
    })
}

/// [`count`], or None when the argument was left out or given as None.
pub(crate) fn optional_count(name: &str, v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
    v.filter(|v| !v.is_none()).map(|v| count(name, v)).transpose()
}

/// A non-negative integer below 2**32.
pub(crate) fn count_u32(name: &str, v: &Bound<'_, PyAny>) -> PyResult<u32> {
    let n = count(name, v)?;
    u32::try_from(n)
        .map_err(|_| ArgumentOverflowError::new_err(format!("{name} must be below 2**32, got {n}")))
}

/// A flag: a bool, or an int (0 is false), as `priority=1` is often written.
pub(crate) fn flag(name: &str, v: &Bound<'_, PyAny>) -> PyResult<bool> {
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(b.is_true());
    }
    let i = integer(name, v)
        .map_err(|_| ArgumentTypeError::new_err(format!("{name} must be a bool, not {}", kind(v))))?;
    i.is_truthy()
}

/// A real number (an int or a float, not a bool or a string).
pub(crate) fn number(name: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    let not_a_number = || ArgumentTypeError::new_err(format!("{name} must be a number, not {}", kind(v)));
    if v.is_instance_of::<PyBool>() || v.is_instance_of::<PyString>() || v.is_instance_of::<PyBytes>() {
        return Err(not_a_number());
    }
    v.extract::<f64>().map_err(|_| not_a_number())
}

/// A `str`.
pub(crate) fn text(name: &str, v: &Bound<'_, PyAny>) -> PyResult<PyBackedStr> {
    match v.cast::<PyString>() {
        Ok(s) => s.clone().try_into(),
        Err(_) => Err(ArgumentTypeError::new_err(format!("{name} must be str, not {}", kind(v)))),
    }
}

/// One of `options`, by name; the error lists them all.
pub(crate) fn choice<T: Copy>(name: &str, v: &Bound<'_, PyAny>, options: &[(&str, T)]) -> PyResult<T> {
    let given = text(name, v)?;
    match options.iter().find(|(n, _)| *n == &*given) {
        Some((_, t)) => Ok(*t),
        None => Err(ArgumentError::new_err(not_one_of(name, v, options.iter().map(|(n, _)| *n)))),
    }
}

/// "`name` must be one of a, b, c; got 'x'".
pub(crate) fn not_one_of<'a>(
    name: &str,
    given: &Bound<'_, PyAny>,
    options: impl Iterator<Item = &'a str>,
) -> String {
    let given = given.repr().map(|r| r.to_string()).unwrap_or_default();
    format!("{name} must be one of {}; got {given}", options.collect::<Vec<_>>().join(", "))
}

/// Key bytes held by the Python objects they came from: no copy on the Rust side.
pub(crate) enum KeyBuf {
    Str(PyBackedStr),
    Bytes(PyBackedBytes),
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
pub(crate) fn key_bytes(name: &str, v: &Bound<'_, PyAny>) -> PyResult<KeyBuf> {
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(KeyBuf::Str(s.clone().try_into()?));
    }
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(KeyBuf::Bytes(b.clone().into()));
    }
    Err(ArgumentTypeError::new_err(format!("{name} must be str or bytes, not {}", kind(v))))
}

/// The bytes of any bytes-like object (`bytes`, `bytearray`, `memoryview`, anything with the
/// buffer protocol): `bytes` without a copy, the others copied, so they can be read with the
/// GIL released.
pub(crate) fn bytes_like(name: &str, v: &Bound<'_, PyAny>) -> PyResult<PyBackedBytes> {
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(b.clone().into());
    }
    if let Ok(b) = v.cast::<PyByteArray>() {
        return Ok(b.clone().into());
    }
    // The buffer protocol is not in the stable ABI before 3.11: let memoryview read it.
    let not_bytes =
        || ArgumentTypeError::new_err(format!("{name} must be a bytes-like object, not {}", kind(v)));
    if v.is_instance_of::<PyString>() {
        return Err(not_bytes());
    }
    static MEMORYVIEW: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let view = MEMORYVIEW.import(v.py(), "builtins", "memoryview")?.call1((v,)).map_err(|_| not_bytes())?;
    let bytes = view.call_method0("tobytes")?;
    Ok(bytes.cast_into::<PyBytes>().map_err(|_| not_bytes())?.into())
}

/// `now_ns`, by default `time.monotonic_ns()` (the core's clock reads the same CLOCK_MONOTONIC).
pub(crate) fn now(now_ns: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
    Ok(optional_count("now_ns", now_ns)?.unwrap_or_else(sluicegate_core::clock::now_ns))
}
