//! What every error says: the texts operators read in logs, and the C and Python surfaces pass
//! on. Each is pinned whole, so a change of wording is a deliberate one.

use sluicegate_core::{
    Error, InvalidRequest, Metric, PolicyError, QuotaError, RegionError, SettleError, SnapshotError, Table,
};

fn says(error: impl std::fmt::Display, text: &str) {
    assert_eq!(error.to_string(), text);
}

#[test]
fn engine_errors() {
    says(
        Error::Policy(PolicyError::BadHardFactor),
        "invalid policy: hard factor must be a finite number of at least 1",
    );
    says(Error::BadCapacity(Table::Scopes), "scope table capacity is zero or too large");
    says(Error::TableFull(Table::Accounts), "account table is full");
    says(Error::TableFull(Table::Models), "model table is full");
    says(Error::TableFull(Table::Permits), "permit table is full");
    says(Error::EmptyKey, "account and model keys must not be empty");
    says(Error::KeyTooLong { max: 64 }, "key longer than 64 bytes");
    says(Error::UnknownAccount, "no such account");
    says(Error::SpendLimitAboveTier { max: 50_000_000 }, "spend limit above the tier's $50.000000");
    says(Error::Quota(QuotaError::Exhausted { used: 3, limit: 3 }), "quota exhausted: 3 of 3 in use");
    says(Error::Quota(QuotaError::NotHeld { used: 1 }), "cannot release more than the 1 in use");
    says(Error::Quota(QuotaError::BelowUse { used: 2 }), "quota limit below the 2 in use");
}

#[test]
fn policy_errors() {
    says(PolicyError::BadLimit(Metric::Requests), "limit of requests must be a number of at least 1");
    says(
        PolicyError::FloorAboveCeiling(Metric::GeneratedTokens),
        "floor of generated_tokens is above its ceiling",
    );
    says(PolicyError::HorizonTooLong, "hard factor minutes plus max wait exceed 234 seconds");
    says(PolicyError::BadTick, "adaptation tick must be between 1 ms and 1 hour");
    says(PolicyError::BadPermitTtl, "permit_ttl must be at least 1 second");
    says(PolicyError::BadAdaptation, "adaptation parameter out of range");
    says(PolicyError::BadShedThresholds, "shed thresholds must be ordered");
    says(PolicyError::BadTiers, "tiers must not lower limits as they rise");
}

#[test]
fn settle_errors() {
    says(SettleError::AlreadySettled, "permit already settled");
    says(SettleError::StalePermit, "permit is stale: its scope was reclaimed or the engine restored");
    says(
        SettleError::InvalidUsage,
        "usage is invalid: cached tokens exceed prompt tokens or a count is too large",
    );
    says(SettleError::Expired, "permit expired: it was not settled within the policy's permit_ttl");
}

#[test]
fn snapshot_errors() {
    says(SnapshotError::BufferTooSmall { needed: 4096 }, "snapshot buffer too small: 4096 bytes needed");
    says(SnapshotError::Truncated, "snapshot is truncated");
    says(SnapshotError::TrailingBytes, "snapshot has trailing bytes");
    says(SnapshotError::BadMagic, "not a sluicegate snapshot");
    says(SnapshotError::UnsupportedVersion(9), "unsupported snapshot version 9");
    says(SnapshotError::BadChecksum, "snapshot checksum mismatch");
    says(SnapshotError::CapacityMismatch, "snapshot was taken with other table capacities");
    says(SnapshotError::Corrupt, "snapshot record is inconsistent");
    says(SnapshotError::InUse, "other processes have this shared engine open");
}

/// A malformed request's reason: the message of its 400 body (error_body.rs, Python's `reason`).
#[test]
fn invalid_requests() {
    assert_eq!(InvalidRequest::ZeroN.message(), "n must be at least 1");
    assert_eq!(InvalidRequest::CachedExceedsPrompt.message(), "cached tokens exceed prompt tokens");
    assert_eq!(InvalidRequest::Overflow.message(), "token counts overflow");
}

#[test]
fn region_errors() {
    let region = |e| Error::Region(e).to_string();
    assert_eq!(
        region(RegionError::TooSmall { needed: 4096 }),
        "shared region: memory too small: 4096 bytes needed"
    );
    assert_eq!(region(RegionError::Misaligned), "shared region: memory is not aligned to 128 bytes");
    assert_eq!(
        region(RegionError::NotLockFree),
        "shared region: no lock-free 16-byte atomics on this machine"
    );
    assert_eq!(region(RegionError::NotARegion), "shared region: not a sluicegate region");
    assert_eq!(
        region(RegionError::UnsupportedVersion(7)),
        "shared region: unsupported region layout version 7"
    );
    assert_eq!(region(RegionError::Corrupt), "shared region: region header damaged (checksum mismatch)");
    assert_eq!(
        region(RegionError::CapacityMismatch),
        "shared region: region was made for other table capacities"
    );
    assert_eq!(region(RegionError::PolicyMismatch), "shared region: region was made for another policy");
    assert_eq!(region(RegionError::NotReady), "shared region: region initialisation did not finish");
    assert_eq!(region(RegionError::Io(13)), "shared region: file error (errno 13)");
}
