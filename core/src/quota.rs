//! Per-account quotas (SPEC §8): counters with a limit, acquired and released.

use crate::sync::{AtomicU64, Ordering};

/// A quota an account holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quota {
    /// Deployed custom models and LoRAs (default 100).
    DeployedModels,
    /// A100 GPUs in on-demand deployments (default 8).
    A100Gpus,
    /// H100 GPUs in on-demand deployments (default 8).
    H100Gpus,
}

impl Quota {
    /// Every quota.
    pub const ALL: [Quota; 3] = [Quota::DeployedModels, Quota::A100Gpus, Quota::H100Gpus];

    /// The seeds' default limit.
    pub const fn default_limit(self) -> u32 {
        match self {
            Quota::DeployedModels => 100,
            Quota::A100Gpus | Quota::H100Gpus => 8,
        }
    }

    /// The quota's name, e.g. `a100_gpus`.
    pub const fn name(self) -> &'static str {
        match self {
            Quota::DeployedModels => "deployed_models",
            Quota::A100Gpus => "a100_gpus",
            Quota::H100Gpus => "h100_gpus",
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            Quota::DeployedModels => 0,
            Quota::A100Gpus => 1,
            Quota::H100Gpus => 2,
        }
    }
}

/// Why a quota operation was refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuotaError {
    /// Acquiring would exceed the limit.
    Exhausted {
        /// Units in use.
        used: u32,
        /// The limit.
        limit: u32,
    },
    /// Releasing more than is held.
    NotHeld {
        /// Units in use.
        used: u32,
    },
    /// A new limit below what is in use.
    BelowUse {
        /// Units in use.
        used: u32,
    },
}

/// Usage and limit of one quota, in one word so both change together.
#[derive(Debug)]
pub(crate) struct QuotaCell(AtomicU64);

const fn pack(used: u32, limit: u32) -> u64 {
    ((used as u64) << 32) | limit as u64
}

const fn unpack(w: u64) -> (u32, u32) {
    ((w >> 32) as u32, w as u32)
}

impl QuotaCell {
    pub(crate) fn new(limit: u32) -> Self {
        QuotaCell(AtomicU64::new(pack(0, limit)))
    }

    pub(crate) fn get(&self) -> (u32, u32) {
        unpack(self.0.load(Ordering::Acquire))
    }

    pub(crate) fn reset(&self, used: u32, limit: u32) {
        self.0.store(pack(used, limit), Ordering::Release);
    }

    fn update(
        &self,
        f: impl Fn(u32, u32) -> Result<(u32, u32), QuotaError>,
    ) -> Result<(u32, u32), QuotaError> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (used, limit) = unpack(cur);
            let (u, l) = f(used, limit)?;
            match self.0.compare_exchange(cur, pack(u, l), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok((u, l)),
                Err(now) => cur = now,
            }
        }
    }

    pub(crate) fn acquire(&self, n: u32) -> Result<(u32, u32), QuotaError> {
        self.update(|used, limit| match used.checked_add(n) {
            Some(u) if u <= limit => Ok((u, limit)),
            _ => Err(QuotaError::Exhausted { used, limit }),
        })
    }

    pub(crate) fn release(&self, n: u32) -> Result<(u32, u32), QuotaError> {
        self.update(|used, limit| used.checked_sub(n).map(|u| (u, limit)).ok_or(QuotaError::NotHeld { used }))
    }

    pub(crate) fn set_limit(&self, new_limit: u32) -> Result<(u32, u32), QuotaError> {
        self.update(
            |used, _| {
                if new_limit < used { Err(QuotaError::BelowUse { used }) } else { Ok((used, new_limit)) }
            },
        )
    }
}
