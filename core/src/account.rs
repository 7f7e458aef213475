//! The account table: one slot per account id, which scopes refer to by index.

use crate::key::{ACCOUNT_KEY_MAX, KeyBytes};
use crate::sync::AtomicU64;
use crate::table::{Keyed, Slot};

/// One account: its id bytes.
#[derive(Debug)]
pub struct AccountSlot {
    id: AtomicU64,
    pub(crate) key: KeyBytes<{ ACCOUNT_KEY_MAX / 8 }>,
}

impl Default for AccountSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl AccountSlot {
    /// An empty slot.
    pub fn new() -> Self {
        AccountSlot {
            id: AtomicU64::new(0),
            key: KeyBytes::new(),
        }
    }
}

impl Slot for AccountSlot {
    fn id(&self) -> &AtomicU64 {
        &self.id
    }
}

impl Keyed for AccountSlot {
    fn key_equals(&self, key: &[u8]) -> bool {
        self.key.equals(key)
    }
}
