//! Storage chosen at run time, for hosts (the C API, Python) whose engine type cannot depend on
//! where its tables live.

use crate::error::SnapshotError;
use crate::region::Region;
use crate::storage::{Heap, Identity, Storage, Tables};

/// The heap, a shared file, or memory the host maps into its processes.
#[derive(Debug)]
pub enum Backing {
    /// Tables of this process only.
    Heap(Heap),
    /// Tables in a file every worker maps ([`Engine::open_shared`](crate::Engine::open_shared)).
    #[cfg(unix)]
    Shared(crate::shared::SharedFile),
    /// Tables in memory the host owns ([`Engine::in_region`](crate::Engine::in_region)).
    Region(Region<'static>),
}

macro_rules! each {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Backing::Heap($s) => $body,
            #[cfg(unix)]
            Backing::Shared($s) => $body,
            Backing::Region($s) => $body,
        }
    };
}

impl Storage for Backing {
    #[inline]
    fn tables(&self) -> Tables<'_> {
        each!(self, s => s.tables())
    }

    fn identity(&self) -> Option<Identity> {
        each!(self, s => s.identity())
    }

    fn begin_restore(&mut self) -> Result<(), SnapshotError> {
        each!(self, s => s.begin_restore())
    }

    fn end_restore(&mut self, identity: Identity) {
        each!(self, s => s.end_restore(identity))
    }
}
