//! Load shedding (SPEC §6): which class of request a model sheds at which load.

use crate::bucket::Band;

/// Load is given in thousandths of capacity: 1000 means the model runs exactly at capacity.
pub type LoadPermille = u32;

/// The four classes of request, in the order they are shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Over its limit, regular tier: shed first.
    OverLimitRegular,
    /// Over its limit, priority tier.
    OverLimitPriority,
    /// Within its limit, regular tier.
    InLimitRegular,
    /// Within its limit, priority tier: shed last.
    InLimitPriority,
}

impl Class {
    /// The class of a request in `band` with the given priority.
    pub const fn of(band: Band, priority: bool) -> Self {
        match (band, priority) {
            (Band::OverLimit, false) => Class::OverLimitRegular,
            (Band::OverLimit, true) => Class::OverLimitPriority,
            (Band::Normal, false) => Class::InLimitRegular,
            (Band::Normal, true) => Class::InLimitPriority,
        }
    }
}

/// Load at or above which each class is shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShedThresholds {
    /// Over-limit regular requests (default 800‰).
    pub over_limit_regular: LoadPermille,
    /// Over-limit priority requests (default 900‰).
    pub over_limit_priority: LoadPermille,
    /// In-limit regular requests (default 1000‰). Limits also stop growing at this load.
    pub in_limit_regular: LoadPermille,
    /// In-limit priority requests (default 1200‰).
    pub in_limit_priority: LoadPermille,
}

impl ShedThresholds {
    /// SPEC §6 defaults: 0.8 < 0.9 < 1.0 < 1.2.
    pub const DEFAULT: ShedThresholds = ShedThresholds {
        over_limit_regular: 800,
        over_limit_priority: 900,
        in_limit_regular: 1000,
        in_limit_priority: 1200,
    };

    /// The threshold of `class`.
    pub const fn of(&self, class: Class) -> LoadPermille {
        match class {
            Class::OverLimitRegular => self.over_limit_regular,
            Class::OverLimitPriority => self.over_limit_priority,
            Class::InLimitRegular => self.in_limit_regular,
            Class::InLimitPriority => self.in_limit_priority,
        }
    }

    /// Whether a request of `class` is shed at `load`.
    ///
    /// ```
    /// use sluicegate_core::{Band, ShedThresholds};
    /// use sluicegate_core::shed::Class;
    /// let t = ShedThresholds::DEFAULT;
    /// assert!(t.sheds(Class::of(Band::Normal, false), 1000));
    /// assert!(!t.sheds(Class::of(Band::Normal, true), 1000));
    /// ```
    pub const fn sheds(&self, class: Class, load: LoadPermille) -> bool {
        load >= self.of(class)
    }

    /// Whether limits should hold instead of growing at `load`.
    pub const fn holds_growth(&self, load: LoadPermille) -> bool {
        load >= self.in_limit_regular
    }

    /// Thresholds must shed over-limit before in-limit and regular before priority.
    pub const fn is_ordered(&self) -> bool {
        self.over_limit_regular <= self.over_limit_priority
            && self.over_limit_priority <= self.in_limit_regular
            && self.in_limit_regular <= self.in_limit_priority
    }
}

impl Default for ShedThresholds {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_limit_regular_is_shed_first_and_in_limit_priority_last() {
        let t = ShedThresholds::DEFAULT;
        let order = [
            Class::OverLimitRegular,
            Class::OverLimitPriority,
            Class::InLimitRegular,
            Class::InLimitPriority,
        ];
        for load in (0..1500).step_by(10) {
            let shed: [bool; 4] = order.map(|c| t.sheds(c, load));
            // Once a class is spared, every later class is spared too.
            assert!(shed.windows(2).all(|w| w[0] || !w[1]), "load {load}: {shed:?}");
        }
        assert!(t.sheds(Class::OverLimitRegular, 800) && !t.sheds(Class::OverLimitPriority, 800));
        assert!(t.sheds(Class::InLimitRegular, 1000) && !t.sheds(Class::InLimitPriority, 1199));
    }
}
