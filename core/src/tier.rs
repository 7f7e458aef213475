//! Spending tiers (SPEC §8): each tier's monthly spend limit, what qualifies an account for it,
//! and how far it raises the rate-limit ceilings.

/// Money in integer micro-dollars.
pub type Micros = u64;

/// One micro-dollar per dollar.
pub const DOLLAR: Micros = 1_000_000;

/// An account's spending tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum Tier {
    /// $50/month; a valid payment method.
    #[default]
    One = 0,
    /// $500/month; $100+ historical spend.
    Two = 1,
    /// $5,000/month; $1,000+ historical spend.
    Three = 2,
    /// $50,000/month; $10,000+ historical spend.
    Four = 3,
    /// No spend limit; set by an operator.
    Unlimited = 4,
}

impl Tier {
    /// Every tier, lowest first.
    pub const ALL: [Tier; 5] = [Tier::One, Tier::Two, Tier::Three, Tier::Four, Tier::Unlimited];

    /// The tier numbered `n` in [`Tier::ALL`] order.
    pub fn from_index(n: u8) -> Option<Tier> {
        Tier::ALL.get(usize::from(n)).copied()
    }

    /// The tier's name, e.g. `tier_2`, `unlimited`.
    pub const fn name(self) -> &'static str {
        match self {
            Tier::One => "tier_1",
            Tier::Two => "tier_2",
            Tier::Three => "tier_3",
            Tier::Four => "tier_4",
            Tier::Unlimited => "unlimited",
        }
    }
}

/// What a tier gives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TierSpec {
    /// Monthly spend limit; `u64::MAX` for none.
    pub monthly_spend_limit: Micros,
    /// Historical spend (payments and prepaid credits) at which an account reaches the tier;
    /// `u64::MAX` for tiers only an operator grants.
    pub qualifying_spend: Micros,
    /// The policy's rate-limit ceilings are multiplied by this for accounts of the tier.
    pub ceiling_scale: f64,
}

/// The tier table of a policy, indexed by [`Tier`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tiers(pub [TierSpec; 5]);

impl Tiers {
    /// Fireworks' published tiers; each tier doubles the rate-limit ceilings.
    pub const FIREWORKS: Tiers = Tiers([
        TierSpec { monthly_spend_limit: 50 * DOLLAR, qualifying_spend: 0, ceiling_scale: 1.0 },
        TierSpec { monthly_spend_limit: 500 * DOLLAR, qualifying_spend: 100 * DOLLAR, ceiling_scale: 2.0 },
        TierSpec {
            monthly_spend_limit: 5_000 * DOLLAR,
            qualifying_spend: 1_000 * DOLLAR,
            ceiling_scale: 4.0,
        },
        TierSpec {
            monthly_spend_limit: 50_000 * DOLLAR,
            qualifying_spend: 10_000 * DOLLAR,
            ceiling_scale: 8.0,
        },
        TierSpec { monthly_spend_limit: u64::MAX, qualifying_spend: u64::MAX, ceiling_scale: 16.0 },
    ]);

    /// What `tier` gives.
    pub fn spec(&self, tier: Tier) -> TierSpec {
        let [a, b, c, d, e] = self.0;
        match tier {
            Tier::One => a,
            Tier::Two => b,
            Tier::Three => c,
            Tier::Four => d,
            Tier::Unlimited => e,
        }
    }

    /// The highest tier `historical` spend qualifies for.
    ///
    /// ```
    /// use sluicegate_core::tier::{DOLLAR, Tier, Tiers};
    /// assert_eq!(Tiers::FIREWORKS.earned(99 * DOLLAR), Tier::One);
    /// assert_eq!(Tiers::FIREWORKS.earned(100 * DOLLAR), Tier::Two);
    /// assert_eq!(Tiers::FIREWORKS.earned(u64::MAX - 1), Tier::Four);
    /// ```
    pub fn earned(&self, historical: Micros) -> Tier {
        Tier::ALL
            .into_iter()
            .rev()
            .find(|t| self.spec(*t).qualifying_spend <= historical)
            .unwrap_or(Tier::One)
    }

    /// Limits must rise with the tier.
    pub fn is_ordered(&self) -> bool {
        self.0.windows(2).all(|w| match w {
            [lo, hi] => {
                lo.monthly_spend_limit <= hi.monthly_spend_limit
                    && lo.qualifying_spend <= hi.qualifying_spend
                    && lo.ceiling_scale <= hi.ceiling_scale
            }
            _ => true,
        }) && self.0.iter().all(|t| t.ceiling_scale >= 1.0 && t.ceiling_scale.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::{Tier, TierSpec, Tiers};

    /// Each tier's spend limit, qualifying spend and ceiling scale rise (or stay) with the tier,
    /// and scales are finite and at least 1: any one out of order makes the table refused.
    #[test]
    fn a_tier_table_out_of_order_is_refused() {
        let ordered = Tiers::FIREWORKS;
        assert!(ordered.is_ordered());
        let with = |i: usize, f: &dyn Fn(&mut TierSpec)| {
            let mut t = ordered;
            f(&mut t.0[i]);
            t.is_ordered()
        };
        assert!(!with(1, &|t| t.monthly_spend_limit = 0), "a spend limit below the tier's under it");
        assert!(!with(0, &|t| t.qualifying_spend = u64::MAX), "a qualifying spend above the next tier's");
        assert!(!with(1, &|t| t.ceiling_scale = 1.5 * 2.0 * 2.0), "a scale above the next tier's");
        assert!(!with(0, &|t| t.ceiling_scale = 0.5), "a scale below 1");
        assert!(!with(4, &|t| t.ceiling_scale = f64::INFINITY), "an infinite scale");
        assert!(with(4, &|t| t.ceiling_scale = ordered.0[3].ceiling_scale), "equal neighbours are in order");
    }

    /// The names every surface shows (C, Python, metrics labels): distinct, and as documented.
    #[test]
    fn tiers_have_their_documented_names() {
        let names = Tier::ALL.map(Tier::name);
        assert_eq!(names, ["tier_1", "tier_2", "tier_3", "tier_4", "unlimited"]);
    }
}
