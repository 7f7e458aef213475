//! Typed errors. Nothing in the engine panics; every failure is one of these.

use core::fmt;

use crate::metric::Metric;

/// Why a policy was refused at construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyError {
    /// A floor is below 1 or a bound is NaN.
    BadLimit(Metric),
    /// A floor is above its ceiling.
    FloorAboveCeiling(Metric),
    /// The hard factor ρ is below 1 or not finite.
    BadHardFactor,
    /// ρ minutes plus the smoothing wait exceed what a bucket can hold (about 3.9 minutes).
    HorizonTooLong,
    /// The adaptation tick is shorter than 1 ms or longer than an hour.
    BadTick,
    /// The permit time-to-live is shorter than 1 s.
    BadPermitTtl,
    /// An adaptation parameter is out of range.
    BadAdaptation,
    /// Shedding thresholds are not ordered over-limit < in-limit and regular < priority.
    BadShedThresholds,
    /// Tier limits, qualifications or ceiling scales fall as the tier rises.
    BadTiers,
    /// An override's value is out of its range; the name is one of [`Policy::OVERRIDES`](crate::Policy::OVERRIDES).
    BadParameter(&'static str),
}

/// Which fixed-capacity table an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// The scope table (account, model, variant).
    Scopes,
    /// The account table.
    Accounts,
    /// The model table.
    Models,
    /// The table of outstanding permits.
    Permits,
}

/// Errors of engine construction and admission that are not a decision about the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The policy is unusable.
    Policy(PolicyError),
    /// A capacity is zero or beyond what slot indices can address.
    BadCapacity(Table),
    /// No free slot within the key's probe window; existing keys keep working.
    TableFull(Table),
    /// An account or model key is empty.
    EmptyKey,
    /// An account or model key is longer than the table stores.
    KeyTooLong {
        /// The longest key accepted.
        max: usize,
    },
    /// No such account.
    UnknownAccount,
    /// A user may lower their spend limit within their tier, never raise it above the tier's.
    SpendLimitAboveTier {
        /// The tier's limit, micro-dollars.
        max: u64,
    },
    /// A quota operation was refused.
    Quota(crate::quota::QuotaError),
    /// Shared memory could not be opened as this engine's region.
    Region(RegionError),
}

/// Why a memory region (shared by processes) could not hold or attach an engine. The region is
/// left as it was; nothing is read past its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// The memory is shorter than the capacity needs; this many bytes are needed.
    TooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// The memory is not aligned to 128 bytes.
    Misaligned,
    /// This machine has no lock-free 16-byte atomics, so processes cannot share the tables.
    NotLockFree,
    /// The memory holds something other than a sluicegate region.
    NotARegion,
    /// A region of a layout this build does not read.
    UnsupportedVersion(u32),
    /// The header's checksum does not match: its bytes were damaged.
    Corrupt,
    /// The region was made for other table capacities.
    CapacityMismatch,
    /// The region was made for another policy.
    PolicyMismatch,
    /// Initialisation did not finish in time: the initialiser is slow or died (a torn
    /// initialisation); or, when only attaching, nobody has initialised the region.
    NotReady,
    /// The operating system refused to create, size, lock or map the file (`errno`, 0 if none).
    Io(i32),
}

/// Errors of settling or charging a permit. Each leaves the engine unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleError {
    /// The permit was already settled or cancelled.
    AlreadySettled,
    /// The permit's scope was reclaimed, or the engine was restored since it was issued.
    StalePermit,
    /// The reported usage is impossible (cached tokens above prompt tokens, or too large).
    InvalidUsage,
    /// The permit was not settled within the policy's `permit_ttl`: its reservation stays
    /// charged as if fully used, and what it held has been released (SPEC §7).
    Expired,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::BadLimit(m) => {
                write!(f, "limit of {} must be a number of at least 1", m.name())
            }
            PolicyError::FloorAboveCeiling(m) => {
                write!(f, "floor of {} is above its ceiling", m.name())
            }
            PolicyError::BadHardFactor => f.write_str("hard factor must be a finite number of at least 1"),
            PolicyError::HorizonTooLong => {
                f.write_str("hard factor minutes plus max wait exceed 234 seconds")
            }
            PolicyError::BadTick => f.write_str("adaptation tick must be between 1 ms and 1 hour"),
            PolicyError::BadPermitTtl => f.write_str("permit_ttl must be at least 1 second"),
            PolicyError::BadAdaptation => f.write_str("adaptation parameter out of range"),
            PolicyError::BadShedThresholds => f.write_str("shed thresholds must be ordered"),
            PolicyError::BadTiers => f.write_str("tiers must not lower limits as they rise"),
            PolicyError::BadParameter(name) => write!(f, "{name} must be {}", crate::overrides::rule(name)),
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::Scopes => "scope",
            Table::Accounts => "account",
            Table::Models => "model",
            Table::Permits => "permit",
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Policy(e) => write!(f, "invalid policy: {e}"),
            Error::BadCapacity(t) => write!(f, "{t} table capacity is zero or too large"),
            Error::TableFull(t) => write!(f, "{t} table is full"),
            Error::EmptyKey => f.write_str("account and model keys must not be empty"),
            Error::KeyTooLong { max } => write!(f, "key longer than {max} bytes"),
            Error::UnknownAccount => f.write_str("no such account"),
            Error::SpendLimitAboveTier { max } => {
                write!(f, "spend limit above the tier's ${}.{:06}", max / 1_000_000, max % 1_000_000)
            }
            Error::Quota(crate::quota::QuotaError::Exhausted { used, limit }) => {
                write!(f, "quota exhausted: {used} of {limit} in use")
            }
            Error::Quota(crate::quota::QuotaError::NotHeld { used }) => {
                write!(f, "cannot release more than the {used} in use")
            }
            Error::Quota(crate::quota::QuotaError::BelowUse { used }) => {
                write!(f, "quota limit below the {used} in use")
            }
            Error::Region(e) => write!(f, "shared region: {e}"),
        }
    }
}

impl fmt::Display for SettleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SettleError::AlreadySettled => "permit already settled",
            SettleError::StalePermit => "permit is stale: its scope was reclaimed or the engine restored",
            SettleError::InvalidUsage => {
                "usage is invalid: cached tokens exceed prompt tokens or a count is too large"
            }
            SettleError::Expired => "permit expired: it was not settled within the policy's permit_ttl",
        })
    }
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionError::TooSmall { needed } => write!(f, "memory too small: {needed} bytes needed"),
            RegionError::Misaligned => f.write_str("memory is not aligned to 128 bytes"),
            RegionError::NotLockFree => f.write_str("no lock-free 16-byte atomics on this machine"),
            RegionError::NotARegion => f.write_str("not a sluicegate region"),
            RegionError::UnsupportedVersion(v) => write!(f, "unsupported region layout version {v}"),
            RegionError::Corrupt => f.write_str("region header damaged (checksum mismatch)"),
            RegionError::CapacityMismatch => f.write_str("region was made for other table capacities"),
            RegionError::PolicyMismatch => f.write_str("region was made for another policy"),
            RegionError::NotReady => f.write_str("region initialisation did not finish"),
            RegionError::Io(errno) => write!(f, "file error (errno {errno})"),
        }
    }
}

impl From<RegionError> for Error {
    fn from(e: RegionError) -> Self {
        Error::Region(e)
    }
}

impl From<PolicyError> for Error {
    fn from(e: PolicyError) -> Self {
        Error::Policy(e)
    }
}

impl core::error::Error for PolicyError {}
impl core::error::Error for Error {}
impl core::error::Error for SettleError {}
impl core::error::Error for RegionError {}

/// Why a snapshot could not be written or restored. A failed restore changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotError {
    /// The buffer is too small; this many bytes are needed.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// The bytes end before the snapshot does.
    Truncated,
    /// More bytes than the snapshot declares.
    TrailingBytes,
    /// Not a sluicegate snapshot.
    BadMagic,
    /// A snapshot format this build does not read.
    UnsupportedVersion(u16),
    /// The checksum does not match: the bytes were damaged.
    BadChecksum,
    /// The snapshot was taken from an engine with other table capacities.
    CapacityMismatch,
    /// A record is inconsistent (an index out of range or repeated, a dangling reference, an
    /// impossible value).
    Corrupt,
    /// Other processes have this shared engine open: a restore would change state under them.
    InUse,
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::BufferTooSmall { needed } => {
                write!(f, "snapshot buffer too small: {needed} bytes needed")
            }
            SnapshotError::Truncated => f.write_str("snapshot is truncated"),
            SnapshotError::TrailingBytes => f.write_str("snapshot has trailing bytes"),
            SnapshotError::BadMagic => f.write_str("not a sluicegate snapshot"),
            SnapshotError::UnsupportedVersion(v) => write!(f, "unsupported snapshot version {v}"),
            SnapshotError::BadChecksum => f.write_str("snapshot checksum mismatch"),
            SnapshotError::CapacityMismatch => f.write_str("snapshot was taken with other table capacities"),
            SnapshotError::Corrupt => f.write_str("snapshot record is inconsistent"),
            SnapshotError::InUse => f.write_str("other processes have this shared engine open"),
        }
    }
}

impl core::error::Error for SnapshotError {}
