//! Named tensors read from somewhere: the seam between the math and the file formats.
//!
//! Model-level code (extraction in lora-svd, merging in the CLI) walks a model through
//! [`TensorSource`]; lora-io implements it over memory-mapped safetensors, [`MemorySource`] over
//! arrays in memory. This keeps lora-svd and lora-io independent of each other.

use indexmap::IndexMap;
use ndarray::{Array2, ArrayD, Ix2};

use crate::error::{Error, Result, ShapePattern};
use crate::Scalar;

/// The element type a tensor is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// Shape and stored type of a tensor, known without reading its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The shape.
    pub shape: Vec<usize>,
    /// The stored element type.
    pub dtype: DType,
}

/// A tensor's bytes as stored: little-endian `dtype` values in row-major order, borrowed from
/// the source (a memory-mapped file). See [`TensorSource::stored`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored<'a> {
    /// The stored element type.
    pub dtype: DType,
    /// The bytes, a whole number of elements.
    pub bytes: &'a [u8],
}

impl Stored<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// True when the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Convert `out.len()` elements, starting at element `start`, into `out`: the same
    /// conversion as [`TensorSource::read_f32`] and [`TensorSource::read_f64`] (exact, except
    /// f64 to f32, which rounds to nearest).
    ///
    /// Panics when `start + out.len()` exceeds [`Stored::len`].
    pub fn decode_into<T: Scalar>(&self, start: usize, out: &mut [T]) {
        let width = self.dtype.size();
        let bytes = &self.bytes[start * width..(start + out.len()) * width];
        T::decode_le(self.dtype, bytes, out);
    }
}

/// A read-only collection of named tensors, read one at a time.
///
/// Implementations decode lazily: [`TensorSource::tensor_info`] must not touch tensor data, and
/// each read returns a fresh array. Errors name the tensor (and, where there is one, the file).
pub trait TensorSource: Sync {
    /// Every tensor name, in the source's order.
    fn tensor_names(&self) -> Vec<String>;

    /// Shape and dtype of a tensor, or `None` when the source has no such tensor.
    fn tensor_info(&self, name: &str) -> Option<TensorInfo>;

    /// The tensor converted to f32.
    fn read_f32(&self, name: &str) -> Result<ArrayD<f32>>;

    /// The tensor converted to f64. The default widens [`TensorSource::read_f32`], which loses
    /// nothing unless the tensor is stored as f64: sources that can hold f64 override it.
    fn read_f64(&self, name: &str) -> Result<ArrayD<f64>> {
        Ok(self.read_f32(name)?.mapv(f64::from))
    }

    /// The tensor's stored bytes, for a caller that decodes them in its own loop (extraction
    /// decodes two models and subtracts in one pass, with no intermediate arrays). `None`, the
    /// default, when the source does not hold the tensor as bytes: read it with
    /// [`TensorSource::read_f32`] then. The bytes are not checked: wrappers that refuse NaN or
    /// infinities on read do not see them, so the caller checks what it decodes.
    fn stored(&self, _name: &str) -> Option<Stored<'_>> {
        None
    }

    /// The caller is done with the bytes [`TensorSource::stored`] gave for this tensor: a
    /// memory-mapped source drops them from the resident set (reads do this on their own). The
    /// default does nothing.
    fn release(&self, _name: &str) {}
}

/// Read a 2-D tensor in `T`; any other rank is an error naming the tensor.
pub fn read_matrix<T: Scalar, S: TensorSource + ?Sized>(source: &S, name: &str) -> Result<Array2<T>> {
    let tensor = T::read_from(source, name)?;
    let shape = tensor.shape().to_vec();
    tensor.into_dimensionality::<Ix2>().map_err(|_| Error::shape(name, ShapePattern(vec![None, None]), &shape))
}

/// Tensors held in memory (as f64, with the dtype they claim to be stored in): for tests, and for
/// models built in code such as the demo's.
#[derive(Debug, Clone, Default)]
pub struct MemorySource {
    tensors: IndexMap<String, (ArrayD<f64>, DType)>,
}

impl MemorySource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace a tensor. Values are rounded to `dtype` when read as f32 only through the
    /// f32 conversion; no f16 rounding is simulated.
    pub fn insert<T: Scalar>(&mut self, name: impl Into<String>, tensor: ArrayD<T>, dtype: DType) {
        self.tensors.insert(name.into(), (tensor.mapv(T::as_f64), dtype));
    }
}

impl TensorSource for MemorySource {
    fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn tensor_info(&self, name: &str) -> Option<TensorInfo> {
        self.tensors.get(name).map(|(t, dtype)| TensorInfo { shape: t.shape().to_vec(), dtype: *dtype })
    }

    fn read_f32(&self, name: &str) -> Result<ArrayD<f32>> {
        Ok(self.get(name)?.mapv(|v| v as f32))
    }

    fn read_f64(&self, name: &str) -> Result<ArrayD<f64>> {
        Ok(self.get(name)?.clone())
    }
}

impl MemorySource {
    fn get(&self, name: &str) -> Result<&ArrayD<f64>> {
        self.tensors.get(name).map(|(t, _)| t).ok_or_else(|| Error::TensorNotFound { name: name.into() })
    }
}
