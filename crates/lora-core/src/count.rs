//! Parameter counts: what LoRA trains against what a full fine-tune would.

use std::iter::Sum;
use std::ops::{Add, AddAssign};

/// Trainable parameters of an adapter against the parameters of the full layers it adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParamCount {
    /// Numbers an adapter tunes: r (d_in + d_out) per LoRA layer (plus d_out for DoRA).
    pub trainable: u64,
    /// Numbers a full fine-tune of the same layers tunes: d_in d_out per layer.
    pub full: u64,
}

impl ParamCount {
    /// The count of one LoRA layer of rank r on a d_in -> d_out linear map.
    pub fn lora(d_in: usize, d_out: usize, rank: usize) -> Self {
        ParamCount { trainable: (rank * (d_in + d_out)) as u64, full: (d_in * d_out) as u64 }
    }

    /// trainable / full (0 when there is nothing).
    pub fn ratio(&self) -> f64 {
        if self.full == 0 {
            0.0
        } else {
            self.trainable as f64 / self.full as f64
        }
    }

    /// full / trainable: how many times fewer numbers are tuned (infinite when none are).
    pub fn reduction(&self) -> f64 {
        self.full as f64 / self.trainable as f64
    }
}

impl Add for ParamCount {
    type Output = ParamCount;
    fn add(self, rhs: ParamCount) -> ParamCount {
        ParamCount { trainable: self.trainable + rhs.trainable, full: self.full + rhs.full }
    }
}

impl AddAssign for ParamCount {
    fn add_assign(&mut self, rhs: ParamCount) {
        *self = *self + rhs;
    }
}

impl Sum for ParamCount {
    fn sum<I: Iterator<Item = ParamCount>>(iter: I) -> ParamCount {
        iter.fold(ParamCount::default(), Add::add)
    }
}
