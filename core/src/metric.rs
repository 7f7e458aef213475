//! The four quantities every scope limits at once (SPEC §2).

/// One of the four metrics a scope enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Metric {
    /// Completions per minute; a request with `n` choices counts as `n`.
    Requests = 0,
    /// Prompt tokens per minute, cached and uncached.
    PromptTokens = 1,
    /// Prompt tokens per minute that missed the prompt cache.
    UncachedPromptTokens = 2,
    /// Generated (output) tokens per minute.
    GeneratedTokens = 3,
}

impl Metric {
    /// Every metric, in the order [`PerMetric`] stores them.
    pub const ALL: [Metric; 4] =
        [Metric::Requests, Metric::PromptTokens, Metric::UncachedPromptTokens, Metric::GeneratedTokens];

    /// The metric's name as it appears in error bodies, CSV columns and Python dicts.
    ///
    /// ```
    /// use sluicegate_core::Metric;
    /// assert_eq!(Metric::UncachedPromptTokens.name(), "uncached_prompt_tokens");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Metric::Requests => "requests",
            Metric::PromptTokens => "prompt_tokens",
            Metric::UncachedPromptTokens => "uncached_prompt_tokens",
            Metric::GeneratedTokens => "generated_tokens",
        }
    }

    /// Whether the metric counts tokens (and so is corrected at settle).
    pub const fn is_tokens(self) -> bool {
        !matches!(self, Metric::Requests)
    }
}

/// One value per metric, indexed by [`Metric`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct PerMetric<T>(pub [T; 4]);

impl<T> PerMetric<T> {
    /// Builds a value per metric from a function of the metric.
    pub fn from_fn(mut f: impl FnMut(Metric) -> T) -> Self {
        let [a, b, c, d] = Metric::ALL;
        PerMetric([f(a), f(b), f(c), f(d)])
    }

    /// The value for `metric`.
    pub const fn get(&self, metric: Metric) -> &T {
        let [a, b, c, d] = &self.0;
        match metric {
            Metric::Requests => a,
            Metric::PromptTokens => b,
            Metric::UncachedPromptTokens => c,
            Metric::GeneratedTokens => d,
        }
    }

    /// The value for `metric`, mutably.
    pub fn get_mut(&mut self, metric: Metric) -> &mut T {
        let [a, b, c, d] = &mut self.0;
        match metric {
            Metric::Requests => a,
            Metric::PromptTokens => b,
            Metric::UncachedPromptTokens => c,
            Metric::GeneratedTokens => d,
        }
    }

    /// Pairs each metric with its value.
    pub fn iter(&self) -> impl Iterator<Item = (Metric, &T)> {
        Metric::ALL.into_iter().zip(self.0.iter())
    }

    /// Applies `f` to every value.
    pub fn map<U>(self, mut f: impl FnMut(Metric, T) -> U) -> PerMetric<U> {
        let [a, b, c, d] = self.0;
        PerMetric([
            f(Metric::Requests, a),
            f(Metric::PromptTokens, b),
            f(Metric::UncachedPromptTokens, c),
            f(Metric::GeneratedTokens, d),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_requests_are_not_tokens() {
        let tokens = Metric::ALL.map(Metric::is_tokens);
        assert_eq!(tokens, [false, true, true, true]);
    }
}
