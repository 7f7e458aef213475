//! The exceptions of `sluicegate/_errors.py`, and the core's errors as them.

use pyo3::prelude::*;
use sluicegate_core::{Error as CoreError, QuotaError, SettleError, SnapshotError};

// The exceptions are Python classes (`sluicegate/_errors.py`): errors about an argument derive
// from both `sluicegate.Error` and the built-in they resemble, which a native exception type
// cannot, and they pickle by the names users import.
pyo3::import_exception!(sluicegate._errors, Error);
pyo3::import_exception!(sluicegate._errors, ArgumentError);
pyo3::import_exception!(sluicegate._errors, ArgumentTypeError);
pyo3::import_exception!(sluicegate._errors, ArgumentOverflowError);
pyo3::import_exception!(sluicegate._errors, PolicyError);
pyo3::import_exception!(sluicegate._errors, TableFullError);
pyo3::import_exception!(sluicegate._errors, InvalidKeyError);
pyo3::import_exception!(sluicegate._errors, UnknownAccountError);
pyo3::import_exception!(sluicegate._errors, SpendLimitAboveTierError);
pyo3::import_exception!(sluicegate._errors, QuotaExceededError);
pyo3::import_exception!(sluicegate._errors, AlreadySettledError);
pyo3::import_exception!(sluicegate._errors, StalePermitError);
pyo3::import_exception!(sluicegate._errors, InvalidUsageError);
pyo3::import_exception!(sluicegate._errors, PermitExpiredError);
pyo3::import_exception!(sluicegate._errors, CorruptSnapshotError);
pyo3::import_exception!(sluicegate._errors, SharedRegionError);
pyo3::import_exception!(sluicegate._errors, EngineInUseError);
pyo3::import_exception!(sluicegate._errors, RedisError);

/// A replica's failure to start as its Python exception.
pub(crate) fn redis_error(e: sluicegate_redis::Error) -> PyErr {
    match e {
        sluicegate_redis::Error::Engine(e) => core_error(e),
        e => RedisError::new_err(e.to_string()),
    }
}

/// A core error as its Python exception.
pub(crate) fn core_error(e: CoreError) -> PyErr {
    let text = e.to_string();
    match e {
        CoreError::Policy(_) | CoreError::BadCapacity(_) => PolicyError::new_err(text),
        CoreError::TableFull(_) => TableFullError::new_err(text),
        CoreError::EmptyKey | CoreError::KeyTooLong { .. } => InvalidKeyError::new_err(text),
        CoreError::UnknownAccount => UnknownAccountError::new_err(text),
        CoreError::SpendLimitAboveTier { .. } => SpendLimitAboveTierError::new_err(text),
        CoreError::Quota(q) => quota_error(q, text),
        CoreError::Region(_) => SharedRegionError::new_err(text),
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

/// A settle, cancel or charge refused, as its Python exception.
pub(crate) fn settle_error(e: SettleError) -> PyErr {
    let text = e.to_string();
    match e {
        SettleError::AlreadySettled => AlreadySettledError::new_err(text),
        SettleError::StalePermit => StalePermitError::new_err(text),
        SettleError::InvalidUsage => InvalidUsageError::new_err(text),
        SettleError::Expired => PermitExpiredError::new_err(text),
    }
}

/// A snapshot refused: `EngineInUseError` for a shared engine other processes use, else
/// `CorruptSnapshotError`.
pub(crate) fn snapshot_error(e: SnapshotError) -> PyErr {
    match e {
        SnapshotError::InUse => EngineInUseError::new_err(e.to_string()),
        _ => CorruptSnapshotError::new_err(e.to_string()),
    }
}
