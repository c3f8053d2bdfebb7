//! DoRA (weight-decomposed low-rank adaptation), as PEFT defines it.
//!
//! W' = m ⊙ (W + s B A) / ||W + s B A||, the norm taken over each output row of the (d_out, d_in)
//! matrix and m the learned magnitude vector (d_out). For a `fan_in_fan_out` weight PEFT
//! transposes to (d_out, d_in) first, so the norm is still per output feature.

use ndarray::{Array1, Array2, ArrayRef2, Axis};

use crate::error::{Error, Result, ShapePattern};
use crate::layer::{check_finite, row_norms, LoraLayer, WeightLayout};
use crate::Scalar;

/// A LoRA layer with a DoRA magnitude vector.
#[derive(Debug, Clone, PartialEq)]
pub struct DoraLayer<T> {
    lora: LoraLayer<T>,
    magnitude: Array1<T>,
}

impl<T: Scalar> DoraLayer<T> {
    /// A DoRA layer from a LoRA layer and PEFT's `lora_magnitude_vector` (d_out).
    pub fn new(lora: LoraLayer<T>, magnitude: Array1<T>) -> Result<Self> {
        if magnitude.len() != lora.d_out() {
            return Err(Error::shape("lora_magnitude_vector", ShapePattern::exact(&[lora.d_out()]), magnitude.shape()));
        }
        check_finite("lora_magnitude_vector", &magnitude)?;
        Ok(DoraLayer { lora, magnitude })
    }

    /// A new DoRA layer as PEFT initialises one: m = ||W + s B A|| per output row, so the adapted
    /// weight equals W until training moves it.
    pub fn init_from_weight(lora: LoraLayer<T>, w: &ArrayRef2<T>, layout: WeightLayout) -> Result<Self> {
        let norms = weight_norm(&lora, w, layout)?;
        Self::new(lora, norms)
    }

    /// The LoRA part.
    pub fn lora(&self) -> &LoraLayer<T> {
        &self.lora
    }

    /// The magnitude vector m (d_out).
    pub fn magnitude(&self) -> &Array1<T> {
        &self.magnitude
    }

    /// The per-output-row norm ||W + s B A|| that DoRA divides by.
    pub fn weight_norm(&self, w: &ArrayRef2<T>, layout: WeightLayout) -> Result<Array1<T>> {
        weight_norm(&self.lora, w, layout)
    }

    /// The merged weight m ⊙ (W + s B A) / ||W + s B A||, in the weight's layout.
    pub fn merged_weight(&self, w: &ArrayRef2<T>, layout: WeightLayout) -> Result<Array2<T>> {
        let mut merged = w.to_owned();
        self.merge_into(&mut merged, layout)?;
        Ok(merged)
    }

    /// Replace W by the DoRA-merged weight. Returns the norms ||W + s B A|| that
    /// [`DoraLayer::unmerge_from`] needs: the merged weight alone does not determine them (PEFT
    /// caches them for the same reason).
    pub fn merge_into(&self, w: &mut ArrayRef2<T>, layout: WeightLayout) -> Result<Array1<T>> {
        self.lora.merge_into(w, layout)?;
        let norms = out_row_norms(w, layout);
        if let Some(row) = norms.iter().position(|n| *n == T::zero()) {
            self.lora.unmerge_from(w, layout)?;
            return Err(Error::ZeroNorm { row });
        }
        let factor = &self.magnitude / &norms;
        scale_out_rows(w, layout, &factor);
        Ok(norms)
    }

    /// Undo [`DoraLayer::merge_into`] given the norms it returned.
    pub fn unmerge_from(&self, w: &mut ArrayRef2<T>, layout: WeightLayout, norms: &Array1<T>) -> Result<()> {
        self.lora.check_weight(w, layout)?;
        if norms.len() != self.lora.d_out() {
            return Err(Error::shape("dora norms", ShapePattern::exact(&[self.lora.d_out()]), norms.shape()));
        }
        if let Some(row) = self.magnitude.iter().position(|m| *m == T::zero()) {
            return Err(Error::ZeroNorm { row });
        }
        let factor = norms / &self.magnitude;
        scale_out_rows(w, layout, &factor);
        self.lora.unmerge_from(w, layout)
    }

    /// The adapted output (m / ||W + s B A||) ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ), computed as PEFT's unmerged
    /// forward does, without building the merged weight (the norm needs one pass over W).
    pub fn forward(&self, x: &ArrayRef2<T>, w: &ArrayRef2<T>, layout: WeightLayout) -> Result<Array2<T>> {
        let norms = self.weight_norm(w, layout)?;
        if let Some(row) = norms.iter().position(|n| *n == T::zero()) {
            return Err(Error::ZeroNorm { row });
        }
        let mut y = self.lora.forward(x, w, layout)?;
        let factor = &self.magnitude / &norms;
        y *= &factor.view().insert_axis(Axis(0));
        Ok(y)
    }

    /// Trainable parameters: the LoRA factors plus the magnitude vector.
    pub fn param_count(&self) -> crate::ParamCount {
        let mut count = self.lora.param_count();
        count.trainable += self.magnitude.len() as u64;
        count
    }
}

fn weight_norm<T: Scalar>(lora: &LoraLayer<T>, w: &ArrayRef2<T>, layout: WeightLayout) -> Result<Array1<T>> {
    lora.check_weight(w, layout)?;
    let mut merged = w.to_owned();
    lora.merge_into(&mut merged, layout)?;
    Ok(out_row_norms(&merged, layout))
}

fn out_row_norms<T: Scalar>(w: &ArrayRef2<T>, layout: WeightLayout) -> Array1<T> {
    let norms = match layout {
        WeightLayout::OutIn => row_norms(w),
        WeightLayout::InOut => row_norms(&w.t()),
    };
    norms.into_iter().map(T::from_f64).collect()
}

fn scale_out_rows<T: Scalar>(w: &mut ArrayRef2<T>, layout: WeightLayout, factor: &Array1<T>) {
    match layout {
        WeightLayout::OutIn => *w *= &*factor.view().insert_axis(Axis(1)),
        WeightLayout::InOut => *w *= &*factor.view().insert_axis(Axis(0)),
    }
}
