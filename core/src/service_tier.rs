//! Service tiers (SPEC §6): `flex`, `default` and `priority`, after OpenAI's `service_tier`.
//! An account is granted a tier; a request may ask for a lower one, never a higher one.

/// A request's service tier, ordered from shed first to shed last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceTier {
    /// Sheddable batch traffic (OpenAI's `"service_tier": "flex"`).
    Flex,
    /// The tier every account has unless granted another.
    #[default]
    Default,
    /// Shed last.
    Priority,
}

impl ServiceTier {
    /// Every tier, from shed first to shed last.
    pub const ALL: [ServiceTier; 3] = [ServiceTier::Flex, ServiceTier::Default, ServiceTier::Priority];

    /// The tier a body's or an API's name gives (`b"flex"`, `b"default"`, `b"priority"`); other
    /// names (OpenAI's `auto` and `scale` among them) name none.
    ///
    /// ```
    /// use sluicegate_core::ServiceTier;
    /// assert_eq!(ServiceTier::from_name(b"flex"), Some(ServiceTier::Flex));
    /// assert_eq!(ServiceTier::from_name(b"auto"), None);
    /// ```
    pub fn from_name(name: &[u8]) -> Option<ServiceTier> {
        ServiceTier::ALL.into_iter().find(|t| t.name().as_bytes() == name)
    }

    /// The tier's name, as OpenAI's `service_tier` spells it.
    pub const fn name(self) -> &'static str {
        match self {
            ServiceTier::Flex => "flex",
            ServiceTier::Default => "default",
            ServiceTier::Priority => "priority",
        }
    }

    /// The tier a request asking for `self` is served at when its account is granted `grant`:
    /// the lower of the two. Asking above the grant is not refused; it is served at the grant.
    ///
    /// ```
    /// use sluicegate_core::ServiceTier;
    /// assert_eq!(ServiceTier::Priority.within(ServiceTier::Default), ServiceTier::Default);
    /// assert_eq!(ServiceTier::Flex.within(ServiceTier::Priority), ServiceTier::Flex);
    /// ```
    pub fn within(self, grant: ServiceTier) -> ServiceTier {
        self.min(grant)
    }
}
