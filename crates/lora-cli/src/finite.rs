//! NaN and infinities in input models: an error naming the file and the tensor, or with
//! `--allow-nonfinite` one warning per tensor on stderr.
//!
//! Adapters need no check here: lora-core refuses non-finite LoRA factors, DoRA magnitudes and
//! saved tensors when they are built, and lora-io names the file and tensor.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;

use lora_core::{Stored, TensorInfo, TensorSource};
use lora_io::{first_nonfinite_raw, unravel, Location, SafetensorsFile};
use ndarray::ArrayD;

use crate::source::Model;

/// What to do with a non-finite value in an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFinite {
    /// An error naming the file and the tensor.
    Refuse,
    /// A warning on stderr (once per tensor); the values are used as they are.
    Warn,
}

impl NonFinite {
    /// The policy `--allow-nonfinite` asks for.
    pub fn from_flag(allow: bool) -> Self {
        if allow {
            NonFinite::Warn
        } else {
            NonFinite::Refuse
        }
    }
}

/// A non-finite value found in a tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The file.
    pub path: PathBuf,
    /// The tensor.
    pub tensor: String,
    /// The element's index.
    pub index: Vec<usize>,
    /// NaN, inf or -inf.
    pub value: f64,
    /// What the user can do about it, if anything.
    pub hint: Option<&'static str>,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", Location::tensor(&self.path, &self.tensor), self.reason())
    }
}

impl Found {
    /// What was found where, and the hint: the message without the location.
    pub fn reason(&self) -> String {
        let mut s = format!("{} at index {:?}", self.value, self.index);
        if let Some(hint) = self.hint {
            s.push_str(&format!(" ({hint})"));
        }
        s
    }
}

impl std::error::Error for Found {}

/// Check one stored tensor of a safetensors file (integer tensors pass).
pub fn check_stored(file: &SafetensorsFile, name: &str) -> Option<Found> {
    let dtype = file.dtype(name)?;
    let raw = file.raw(name)?;
    let (flat, value) = first_nonfinite_raw(dtype, raw)?;
    Some(Found {
        path: file.path().to_path_buf(),
        tensor: name.to_string(),
        index: unravel(flat, file.shape(name).unwrap_or(&[])),
        value,
        hint: None,
    })
}

/// Reports what [`NonFinite`] says: an error, or a warning once per tensor.
#[derive(Debug)]
pub struct Checker {
    policy: NonFinite,
    hint: Option<&'static str>,
    warned: Mutex<HashSet<(PathBuf, String)>>,
}

impl Checker {
    /// A checker with this policy; `hint` is added to its errors.
    pub fn new(policy: NonFinite, hint: Option<&'static str>) -> Self {
        Checker { policy, hint, warned: Mutex::new(HashSet::new()) }
    }

    /// The checker of a command that has `--allow-nonfinite`.
    pub fn with_flag(allow: bool) -> Self {
        Checker::new(NonFinite::from_flag(allow), Some("pass --allow-nonfinite to go on with a warning"))
    }

    /// Ok when nothing was found or the policy warns (then the warning is printed).
    pub fn judge(&self, found: Option<Found>) -> Result<(), Found> {
        let Some(found) = found else { return Ok(()) };
        match self.policy {
            NonFinite::Refuse => Err(Found { hint: self.hint, ..found }),
            NonFinite::Warn => {
                let key = (found.path.clone(), found.tensor.clone());
                let first = self.warned.lock().map(|mut w| w.insert(key)).unwrap_or(true);
                if first {
                    eprintln!(
                        "warning: {}: {} at index {:?}; used as it is (--allow-nonfinite)",
                        Location::tensor(&found.path, &found.tensor),
                        found.value,
                        found.index
                    );
                }
                Ok(())
            }
        }
    }

    /// Every tensor of a model, checked on its stored bytes.
    pub fn check_model(&self, model: &Model) -> Result<(), Found> {
        for (file, name) in model.stored_tensors() {
            self.judge(check_stored(file, &name))?;
        }
        Ok(())
    }
}

/// A model whose tensors are checked as they are read.
#[derive(Debug)]
pub struct Checked<'a> {
    model: &'a Model,
    checker: &'a Checker,
}

impl<'a> Checked<'a> {
    /// Check `model`'s tensors with `checker` as they are read.
    pub fn new(model: &'a Model, checker: &'a Checker) -> Self {
        Checked { model, checker }
    }

    fn check(&self, name: &str) -> lora_core::Result<()> {
        let found = self.model.file_of(name).and_then(|f| check_stored(f, name));
        self.checker
            .judge(found)
            .map_err(|found| lora_core::Error::Source { name: name.to_string(), source: Box::new(InFile(found)) })
    }
}

impl TensorSource for Checked<'_> {
    fn tensor_names(&self) -> Vec<String> {
        self.model.source().tensor_names()
    }

    fn tensor_info(&self, name: &str) -> Option<TensorInfo> {
        self.model.source().tensor_info(name)
    }

    fn read_f32(&self, name: &str) -> lora_core::Result<ArrayD<f32>> {
        self.check(name)?;
        self.model.source().read_f32(name)
    }

    fn read_f64(&self, name: &str) -> lora_core::Result<ArrayD<f64>> {
        self.check(name)?;
        self.model.source().read_f64(name)
    }

    /// Unchecked, as the trait says: a caller that finds a non-finite value in what it decodes
    /// reads the tensor again through `read_f32` / `read_f64` for the error or the warning.
    fn stored(&self, name: &str) -> Option<Stored<'_>> {
        self.model.source().stored(name)
    }

    fn release(&self, name: &str) {
        self.model.source().release(name);
    }
}

/// A [`Found`] inside lora-core's `Error::Source`, which names the tensor already.
#[derive(Debug)]
struct InFile(Found);

impl fmt::Display for InFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.0.path.display(), self.0.reason())
    }
}

impl std::error::Error for InFile {}

#[cfg(test)]
mod tests {
    use lora_core::DType;

    use super::*;

    /// The scan runs in 1 MiB pieces in parallel: a value past the first piece, or on the edge
    /// of one, is found at its own index, in every dtype.
    #[test]
    fn the_first_nonfinite_value_is_found_anywhere_in_a_large_tensor() {
        let n = 3 << 20; // elements: several pieces in every dtype
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let width = dtype.size();
            let one: Vec<u8> = match dtype {
                DType::F32 => 1f32.to_le_bytes().to_vec(),
                DType::F16 => half::f16::ONE.to_le_bytes().to_vec(),
                DType::BF16 => half::bf16::ONE.to_le_bytes().to_vec(),
                DType::F64 => 1f64.to_le_bytes().to_vec(),
            };
            let inf: Vec<u8> = match dtype {
                DType::F32 => f32::INFINITY.to_le_bytes().to_vec(),
                DType::F16 => half::f16::INFINITY.to_le_bytes().to_vec(),
                DType::BF16 => half::bf16::INFINITY.to_le_bytes().to_vec(),
                DType::F64 => f64::INFINITY.to_le_bytes().to_vec(),
            };
            let mut raw: Vec<u8> = one.iter().copied().cycle().take(n * width).collect();
            assert_eq!(first_nonfinite_raw(dtype, &raw), None, "{dtype:?}");
            for at in [(1 << 20) / width, n - 1, 5 << 18] {
                let mut bad = raw.clone();
                bad[at * width..(at + 1) * width].copy_from_slice(&inf);
                bad[(n - 1) * width..].copy_from_slice(&inf);
                assert_eq!(first_nonfinite_raw(dtype, &bad), Some((at, f64::INFINITY)), "{dtype:?} at {at}");
            }
            raw[7 * width..8 * width].copy_from_slice(&inf);
            assert_eq!(first_nonfinite_raw(dtype, &raw), Some((7, f64::INFINITY)));
        }
    }
}
