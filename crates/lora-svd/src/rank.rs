//! Rank rules: how many singular values to keep.

use crate::error::{Error, Result};

/// The criterion of a [`RankRule`], before the floor and the cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Criterion {
    /// Keep exactly this many singular values.
    Fixed(usize),
    /// Keep the fewest singular values whose squares reach this fraction (in (0, 1]) of
    /// ||dW||_F^2. kohya's `sv_fro = x` is `Energy(x * x)`: kohya states the fraction of the norm,
    /// this rule the fraction of its square (the retained energy).
    Energy(f64),
    /// Keep every sigma_i >= sigma_max / x, for x >= 1 (kohya's `sv_ratio`).
    Ratio(f64),
    /// Keep every sigma_i > eps, for eps >= 0 (mergekit's `sv_epsilon`).
    Threshold(f64),
    /// Keep the fewest singular values whose sum reaches this fraction (in (0, 1]) of the sum of
    /// all of them (kohya's `sv_cumulative`). Needs the whole spectrum, so the exact method.
    Cumulative(f64),
}

impl Criterion {
    /// The rule's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Criterion::Fixed(_) => "fixed",
            Criterion::Energy(_) => "energy",
            Criterion::Ratio(_) => "ratio",
            Criterion::Threshold(_) => "threshold",
            Criterion::Cumulative(_) => "cumulative",
        }
    }

    /// True when the rule can only be decided on the whole spectrum.
    pub fn needs_whole_spectrum(&self) -> bool {
        matches!(self, Criterion::Cumulative(_))
    }
}

/// A rank rule: a [`Criterion`], floored by a minimum rank and capped by a maximum rank.
///
/// The result is also capped by min(d_out, d_in). Construct with [`RankRule::new`] or a
/// shorthand ([`RankRule::fixed`], [`RankRule::energy`], ...) and bound with
/// [`RankRule::with_bounds`]; all of them validate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankRule {
    criterion: Criterion,
    min_rank: usize,
    max_rank: Option<usize>,
}

/// Relative slack when comparing accumulated sums with a target, so that a fraction that is met
/// exactly on paper is not missed by rounding.
const SUM_SLACK: f64 = 1e-12;

impl RankRule {
    /// A rule from a criterion and bounds: `min_rank >= 1`, `max_rank >= min_rank` (`None`: no
    /// cap but min(d_out, d_in)).
    pub fn new(criterion: Criterion, min_rank: usize, max_rank: Option<usize>) -> Result<Self> {
        match criterion {
            Criterion::Fixed(0) => return Err(Error::param("fixed rank", "must be at least 1, got 0")),
            Criterion::Energy(f) | Criterion::Cumulative(f) if !(f > 0.0 && f <= 1.0) => {
                return Err(Error::param("fraction", format!("must be in (0, 1], got {f}")));
            }
            Criterion::Ratio(x) if !(x.is_finite() && x >= 1.0) => {
                return Err(Error::param("ratio", format!("must be finite and at least 1, got {x}")));
            }
            Criterion::Threshold(eps) if !(eps.is_finite() && eps >= 0.0) => {
                return Err(Error::param("threshold", format!("must be finite and non-negative, got {eps}")));
            }
            _ => {}
        }
        if min_rank == 0 {
            return Err(Error::param("min_rank", "must be at least 1, got 0"));
        }
        if let Some(max) = max_rank {
            if max < min_rank {
                return Err(Error::param("max_rank", format!("must be at least min_rank = {min_rank}, got {max}")));
            }
        }
        Ok(RankRule { criterion, min_rank, max_rank })
    }

    /// Keep `rank` singular values.
    pub fn fixed(rank: usize) -> Result<Self> {
        Self::new(Criterion::Fixed(rank), 1, None)
    }

    /// Keep the fewest singular values that retain `fraction` of ||dW||_F^2.
    pub fn energy(fraction: f64) -> Result<Self> {
        Self::new(Criterion::Energy(fraction), 1, None)
    }

    /// Keep sigma_i >= sigma_max / `ratio`.
    pub fn ratio(ratio: f64) -> Result<Self> {
        Self::new(Criterion::Ratio(ratio), 1, None)
    }

    /// Keep sigma_i > `eps`.
    pub fn threshold(eps: f64) -> Result<Self> {
        Self::new(Criterion::Threshold(eps), 1, None)
    }

    /// Keep the fewest singular values whose sum reaches `fraction` of the sum of all.
    pub fn cumulative(fraction: f64) -> Result<Self> {
        Self::new(Criterion::Cumulative(fraction), 1, None)
    }

    /// The same criterion with other bounds.
    pub fn with_bounds(self, min_rank: usize, max_rank: Option<usize>) -> Result<Self> {
        Self::new(self.criterion, min_rank, max_rank)
    }

    /// The criterion.
    pub fn criterion(&self) -> Criterion {
        self.criterion
    }

    /// The floor.
    pub fn min_rank(&self) -> usize {
        self.min_rank
    }

    /// The cap, if any (min(d_out, d_in) always caps too).
    pub fn max_rank(&self) -> Option<usize> {
        self.max_rank
    }

    /// The cap for a matrix whose smaller dimension is `min_dim`.
    pub(crate) fn cap(&self, min_dim: usize) -> usize {
        self.max_rank.map_or(min_dim, |m| m.min(min_dim))
    }

    /// The rank this rule picks from the whole descending spectrum `sigma` of a matrix with
    /// ||dW||_F^2 = `total_energy` (`sigma` holds min(d_out, d_in) values).
    pub fn choose(&self, sigma: &[f64], total_energy: f64) -> usize {
        self.decide(sigma, total_energy, sigma.len(), None).rank
    }

    /// The rank from the leading values `sigma` of the spectrum of a matrix whose smaller
    /// dimension is `min_dim`. `trusted` is `None` when `sigma` is the whole spectrum, or the
    /// number of leading values a sketch resolves accurately; the choice is `decided` when it
    /// does not depend on the values past those.
    pub(crate) fn decide(&self, sigma: &[f64], total_energy: f64, min_dim: usize, trusted: Option<usize>) -> Decision {
        let complete = trusted.is_none();
        let cap = if complete { self.cap(min_dim).min(sigma.len()) } else { self.cap(min_dim) };
        let trusted = trusted.unwrap_or(sigma.len()).min(sigma.len());
        let (raw, decided) = match self.criterion {
            Criterion::Fixed(r) => (r, true),
            Criterion::Energy(f) => {
                let target = f * total_energy * (1.0 - SUM_SLACK);
                match first_reaching(sigma.iter().map(|s| s * s), target) {
                    Some(k) => (k, complete || k <= trusted),
                    None => (sigma.len(), complete),
                }
            }
            Criterion::Cumulative(f) => {
                let total: f64 = sigma.iter().sum();
                let target = f * total * (1.0 - SUM_SLACK);
                (first_reaching(sigma.iter().copied(), target).unwrap_or(sigma.len()), complete)
            }
            Criterion::Ratio(x) => {
                let cut = sigma.first().copied().unwrap_or(0.0) / x;
                let count = sigma.iter().take_while(|&&s| s >= cut && s > 0.0).count();
                (count, complete || count < trusted)
            }
            Criterion::Threshold(eps) => {
                let count = sigma.iter().take_while(|&&s| s > eps).count();
                (count, complete || count < trusted)
            }
        };
        let rank = raw.max(self.min_rank).min(cap).max(1);
        Decision { rank, decided: decided || raw >= cap }
    }
}

/// A rank picked from a (possibly partial) spectrum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    pub rank: usize,
    /// False when a longer sketch could change the rank.
    pub decided: bool,
}

/// The count of leading terms whose running sum first reaches `target` (at least 1 when the
/// target is zero or less).
fn first_reaching(terms: impl Iterator<Item = f64>, target: f64) -> Option<usize> {
    if target <= 0.0 {
        return Some(0);
    }
    let mut sum = 0.0;
    for (i, t) in terms.enumerate() {
        sum += t;
        if sum >= target {
            return Some(i + 1);
        }
    }
    None
}
