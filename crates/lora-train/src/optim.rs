//! The optimizer side of training: AdamW with decoupled weight decay (PyTorch's
//! `torch.optim.AdamW`), learning-rate schedules with linear warmup (transformers'
//! `get_*_schedule_with_warmup`) and gradient clipping by global norm
//! (`torch.nn.utils.clip_grad_norm_`).

use indexmap::IndexMap;
use lora_core::Scalar;
use ndarray::{Array2, Zip};

use crate::error::{Error, Result};
use crate::lora::LoraParamsMut;
use crate::model::LoraGrads;

/// AdamW's hyper-parameters other than the learning rate (which the schedule gives per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// beta1, the decay of the first moment (PyTorch's default 0.9).
    pub beta1: f64,
    /// beta2, the decay of the second moment (PyTorch's default 0.999).
    pub beta2: f64,
    /// eps, added to the bias-corrected root of the second moment (PyTorch's default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay: every step multiplies each parameter by 1 - lr x weight_decay
    /// (PyTorch's default 0.01).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamWConfig {
    fn validate(&self) -> Result<()> {
        let ok = (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps >= 0.0
            && self.weight_decay >= 0.0
            && self.eps.is_finite()
            && self.weight_decay.is_finite();
        if ok {
            Ok(())
        } else {
            Err(Error::Input(format!(
                "adamw needs 0 <= beta1, beta2 < 1 and finite eps, weight_decay >= 0, got {self:?}"
            )))
        }
    }
}

/// The moments of one LoRA module: first and second moments of A and of B.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments<T> {
    /// First moment of A (`exp_avg`).
    pub m_a: Array2<T>,
    /// Second moment of A (`exp_avg_sq`).
    pub v_a: Array2<T>,
    /// First moment of B.
    pub m_b: Array2<T>,
    /// Second moment of B.
    pub v_b: Array2<T>,
}

/// AdamW over the LoRA factors of a model, with PyTorch's arithmetic (`torch.optim.AdamW`,
/// single-tensor path): decay, then moment updates, then the bias-corrected step.
///
/// For a parameter p with gradient g at step t (from 1) and learning rate lr:
/// p ← p (1 - lr λ); m ← m + (1 - β1)(g - m); v ← β2 v + (1 - β2) g²;
/// p ← p - lr / (1 - β1ᵗ) · m / (√v / √(1 - β2ᵗ) + ε).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW<T> {
    config: AdamWConfig,
    step: u64,
    moments: IndexMap<String, Moments<T>>,
}

impl<T: Scalar> AdamW<T> {
    /// A fresh optimizer (step 0, no moments yet).
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(AdamW { config, step: 0, moments: IndexMap::new() })
    }

    /// An optimizer restored from a checkpoint: its step count and moments.
    pub fn from_state(config: AdamWConfig, step: u64, moments: IndexMap<String, Moments<T>>) -> Result<Self> {
        config.validate()?;
        Ok(AdamW { config, step, moments })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// How many steps have been taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The moments, by module path.
    pub fn moments(&self) -> &IndexMap<String, Moments<T>> {
        &self.moments
    }

    /// One step at learning rate `lr` on `params` with `grads` (by module path; every parameter
    /// needs its gradient, of its shape).
    pub fn step(&mut self, params: &mut [LoraParamsMut<'_, T>], grads: &LoraGrads<T>, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::Input(format!("learning rate must be finite and >= 0, got {lr}")));
        }
        // check everything before changing anything
        for p in params.iter() {
            let g = grads.get(&p.module).ok_or_else(|| Error::Adapter {
                module: p.module.clone(),
                message: "no gradient for this module".into(),
            })?;
            if g.a.dim() != p.a.dim() || g.b.dim() != p.b.dim() {
                return Err(Error::Adapter {
                    module: p.module.clone(),
                    message: format!(
                        "gradient shapes {:?} / {:?} differ from the factors' {:?} / {:?}",
                        g.a.dim(),
                        g.b.dim(),
                        p.a.dim(),
                        p.b.dim()
                    ),
                });
            }
            if let Some(m) = self.moments.get(&p.module) {
                if m.m_a.dim() != p.a.dim() || m.m_b.dim() != p.b.dim() {
                    return Err(Error::Adapter {
                        module: p.module.clone(),
                        message: "optimizer moments have other shapes than the factors".into(),
                    });
                }
            }
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = T::from_f64((1.0 - c.beta2.powi(t)).sqrt());
        let step_size = T::from_f64(lr / bc1);
        let decay = T::from_f64(1.0 - lr * c.weight_decay);
        let (w1, b2, w2, eps) =
            (T::from_f64(1.0 - c.beta1), T::from_f64(c.beta2), T::from_f64(1.0 - c.beta2), T::from_f64(c.eps));
        for p in params.iter_mut() {
            let g = &grads[&p.module];
            let m = self.moments.entry(p.module.clone()).or_insert_with(|| Moments {
                m_a: Array2::zeros(p.a.raw_dim()),
                v_a: Array2::zeros(p.a.raw_dim()),
                m_b: Array2::zeros(p.b.raw_dim()),
                v_b: Array2::zeros(p.b.raw_dim()),
            });
            for (param, grad, exp_avg, exp_avg_sq) in
                [(&mut p.a, &g.a, &mut m.m_a, &mut m.v_a), (&mut p.b, &g.b, &mut m.m_b, &mut m.v_b)]
            {
                Zip::from(param).and(grad).and(exp_avg).and(exp_avg_sq).for_each(|p, &g, m, v| {
                    *p *= decay;
                    *m = *m + w1 * (g - *m);
                    *v = *v * b2 + w2 * g * g;
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    *p -= step_size * (*m / denom);
                });
            }
        }
        Ok(())
    }
}

/// The shape of the learning rate over training, after a linear warmup from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// The peak rate after warmup (`get_constant_schedule_with_warmup`).
    Constant,
    /// Linear decay from the peak to 0 at the last step (`get_linear_schedule_with_warmup`).
    #[default]
    Linear,
    /// Half a cosine from the peak to 0 at the last step (`get_cosine_schedule_with_warmup`).
    Cosine,
}

impl Schedule {
    /// The schedule's name (`constant`, `linear`, `cosine`).
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    /// The schedule of a name (`constant`, `linear`, `cosine`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(Error::Input(format!("unknown schedule {name:?}: expected constant, linear or cosine"))),
        }
    }

    /// The multiplier of the peak rate at optimizer step `step` (counted from 0) of `total`, with
    /// `warmup` warmup steps: transformers' lambda, so step 0 of a warmup has rate 0.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((total as f64 - step as f64) / (total.saturating_sub(warmup)).max(1) as f64).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

/// The global 2-norm of every gradient (as one vector), in f64.
pub fn grad_norm<T: Scalar>(grads: &LoraGrads<T>) -> f64 {
    grads
        .values()
        .flat_map(|g| g.a.iter().chain(g.b.iter()))
        .map(|v| {
            let v = v.as_f64();
            v * v
        })
        .sum::<f64>()
        .sqrt()
}

/// Clip the gradients to global norm `max_norm` as `torch.nn.utils.clip_grad_norm_` does:
/// multiply every gradient by min(1, max_norm / (norm + 1e-6)). Returns the norm before
/// clipping. A non-finite norm is an error (training diverged), not a silent NaN.
pub fn clip_grad_norm<T: Scalar>(grads: &mut LoraGrads<T>, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads);
    if !norm.is_finite() {
        return Err(Error::Input(format!("the gradient norm is {norm}: training diverged")));
    }
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        let c = T::from_f64(coef);
        for g in grads.values_mut() {
            g.a.mapv_inplace(|v| v * c);
            g.b.mapv_inplace(|v| v * c);
        }
    }
    Ok(norm)
}
