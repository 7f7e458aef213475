//! Load shedding (SPEC §6): which class of request a model sheds at which load.

use crate::bucket::Band;
use crate::service_tier::ServiceTier;

/// Load is given in thousandths of capacity: 1000 means the model runs exactly at capacity.
pub type LoadPermille = u32;

/// The six classes of request, in the order they are shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Over its limit, flex tier: shed first.
    OverLimitFlex,
    /// Within its limit, flex tier.
    InLimitFlex,
    /// Over its limit, default tier.
    OverLimitDefault,
    /// Over its limit, priority tier.
    OverLimitPriority,
    /// Within its limit, default tier.
    InLimitDefault,
    /// Within its limit, priority tier: shed last.
    InLimitPriority,
}

impl Class {
    /// Every class, from shed first to shed last.
    pub const ALL: [Class; 6] = [
        Class::OverLimitFlex,
        Class::InLimitFlex,
        Class::OverLimitDefault,
        Class::OverLimitPriority,
        Class::InLimitDefault,
        Class::InLimitPriority,
    ];

    /// The class of a request in `band` served at `tier`.
    pub const fn of(band: Band, tier: ServiceTier) -> Self {
        match (band, tier) {
            (Band::OverLimit, ServiceTier::Flex) => Class::OverLimitFlex,
            (Band::Normal, ServiceTier::Flex) => Class::InLimitFlex,
            (Band::OverLimit, ServiceTier::Default) => Class::OverLimitDefault,
            (Band::OverLimit, ServiceTier::Priority) => Class::OverLimitPriority,
            (Band::Normal, ServiceTier::Default) => Class::InLimitDefault,
            (Band::Normal, ServiceTier::Priority) => Class::InLimitPriority,
        }
    }
}

/// Load at or above which each class is shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShedThresholds {
    /// Over-limit flex requests (default 600‰).
    pub over_limit_flex: LoadPermille,
    /// In-limit flex requests (default 700‰).
    pub in_limit_flex: LoadPermille,
    /// Over-limit default requests (default 800‰).
    pub over_limit_default: LoadPermille,
    /// Over-limit priority requests (default 900‰).
    pub over_limit_priority: LoadPermille,
    /// In-limit default requests (default 1000‰). Limits also stop growing at this load.
    pub in_limit_default: LoadPermille,
    /// In-limit priority requests (default 1200‰).
    pub in_limit_priority: LoadPermille,
}

impl ShedThresholds {
    /// SPEC §6 defaults: 0.6 < 0.7 < 0.8 < 0.9 < 1.0 < 1.2.
    pub const DEFAULT: ShedThresholds = ShedThresholds {
        over_limit_flex: 600,
        in_limit_flex: 700,
        over_limit_default: 800,
        over_limit_priority: 900,
        in_limit_default: 1000,
        in_limit_priority: 1200,
    };

    /// The threshold of `class`.
    pub const fn of(&self, class: Class) -> LoadPermille {
        match class {
            Class::OverLimitFlex => self.over_limit_flex,
            Class::InLimitFlex => self.in_limit_flex,
            Class::OverLimitDefault => self.over_limit_default,
            Class::OverLimitPriority => self.over_limit_priority,
            Class::InLimitDefault => self.in_limit_default,
            Class::InLimitPriority => self.in_limit_priority,
        }
    }

    /// Whether a request of `class` is shed at `load`.
    ///
    /// ```
    /// use sluicegate_core::{Band, ServiceTier, ShedThresholds};
    /// use sluicegate_core::shed::Class;
    /// let t = ShedThresholds::DEFAULT;
    /// assert!(t.sheds(Class::of(Band::Normal, ServiceTier::Default), 1000));
    /// assert!(!t.sheds(Class::of(Band::Normal, ServiceTier::Priority), 1000));
    /// assert!(t.sheds(Class::of(Band::Normal, ServiceTier::Flex), 700));
    /// ```
    pub const fn sheds(&self, class: Class, load: LoadPermille) -> bool {
        load >= self.of(class)
    }

    /// Whether limits should hold instead of growing at `load`.
    pub const fn holds_growth(&self, load: LoadPermille) -> bool {
        load >= self.in_limit_default
    }

    /// Thresholds must shed the classes in [`Class::ALL`]'s order: each at most the next.
    pub const fn is_ordered(&self) -> bool {
        self.over_limit_flex <= self.in_limit_flex
            && self.in_limit_flex <= self.over_limit_default
            && self.over_limit_default <= self.over_limit_priority
            && self.over_limit_priority <= self.in_limit_default
            && self.in_limit_default <= self.in_limit_priority
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
    fn the_classes_are_shed_in_order_flex_first_and_in_limit_priority_last() {
        let t = ShedThresholds::DEFAULT;
        for load in (0..1500).step_by(10) {
            let shed = Class::ALL.map(|c| t.sheds(c, load));
            // Once a class is spared, every later class is spared too.
            assert!(shed.windows(2).all(|w| w[0] || !w[1]), "load {load}: {shed:?}");
        }
        let at = Class::ALL.map(|c| t.of(c));
        assert_eq!(at, [600, 700, 800, 900, 1000, 1200]);
        for (class, threshold) in Class::ALL.into_iter().zip(at) {
            assert!(t.sheds(class, threshold) && !t.sheds(class, threshold - 1), "{class:?}");
        }
        assert!(t.is_ordered());
        assert!(!ShedThresholds { in_limit_flex: 599, ..t }.is_ordered());
        assert!(!ShedThresholds { over_limit_default: 699, ..t }.is_ordered());
        assert!(!ShedThresholds { over_limit_priority: 799, ..t }.is_ordered());
        assert!(!ShedThresholds { in_limit_default: 899, ..t }.is_ordered());
        assert!(!ShedThresholds { in_limit_priority: 999, ..t }.is_ordered());
        assert!(t.holds_growth(1000) && !t.holds_growth(999));
    }
}
